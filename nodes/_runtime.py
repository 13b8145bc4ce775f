"""Small helpers nodes share to read their runtime."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from langgraph.runtime import Runtime
from langgraph.types import interrupt

from nodes.context import WorkflowContext
from nodes.errors import AnswerError
from nodes.models import HumanAnswer

__all__ = ["ask_human", "context_of", "dumps", "write"]


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


def ask_human(
    question: dict[str, Any], problem_with: Callable[[HumanAnswer], str | None]
) -> HumanAnswer:
    """Interrupt with a question until a human's answer is one it takes; return that answer.

    The service checks an answer before it resumes the run; one that comes another way
    (LangGraph's server, a notebook) and cannot be taken is asked again with the reason
    (`problem`), instead of failing the run.
    """
    problem = None
    while True:
        value = interrupt({**question, "problem": problem} if problem else question)
        try:
            answer = HumanAnswer.read(value)  # with who, how and when, from the service
            problem = problem_with(answer)
        except AnswerError as exc:
            problem = str(exc)
        if problem is None:
            return answer
