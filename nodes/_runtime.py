"""Small helpers nodes share to read their runtime."""

from __future__ import annotations

import json
from typing import Any

from langgraph.runtime import Runtime

from nodes.context import WorkflowContext

__all__ = ["context_of", "dumps", "write"]


def context_of(runtime: Runtime[WorkflowContext] | None) -> WorkflowContext:
    """Return the run's context, or the defaults when the caller gave none."""
    context = runtime.context if runtime is not None else None
    if isinstance(context, WorkflowContext):
        return context
    if isinstance(context, dict):  # LangGraph's server passes the context as JSON
        return WorkflowContext(**context)
    return WorkflowContext()


def write(runtime: Runtime[WorkflowContext] | None, payload: dict[str, Any]) -> None:
    """Emit a custom stream event (a transition detail) if anyone listens."""
    if runtime is not None and runtime.stream_writer is not None:
        runtime.stream_writer(payload)


def dumps(value: Any) -> str:
    """Render JSON for a prompt: compact, stable, readable."""
    return json.dumps(value, ensure_ascii=False, default=str, sort_keys=False)
