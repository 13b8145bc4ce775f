"""Small building blocks for unit tests: scripted models and agent files."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatResult
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import RetryPolicy

from graphs.workflow import build_graph
from nodes.chat_models import OfflineChatModel, model_retry
from nodes.context import WorkflowContext
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import checkpoint_serde
from service.storage.transitions import Transition


class ScriptedModel(OfflineChatModel):
    """The offline model, with a hook that may raise or replace answers per call."""

    hook: Any = None
    calls: list[str] = []

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        text = "\n".join(str(m.content) for m in messages)
        self.calls.append(text)
        if self.hook is not None:
            replaced = self.hook(text, kw)
            if replaced is not None:
                return replaced
        await asyncio.sleep(0)
        return self._generate(messages, stop, None, **kw)


def scripted(hook: Callable[[str, dict[str, Any]], Any]) -> ScriptedModel:
    """Return a scripted model with its own call log."""
    return ScriptedModel(hook=hook, calls=[])


def write_agents(tmp_path: Path, tools_module: str, body: str, module: str = "test_tools") -> Path:
    """Write an agents file and a tools module (named `module`) next to it."""
    (tmp_path / f"{module}.py").write_text(tools_module)
    path = tmp_path / "agents.yaml"
    path.write_text(body)
    return path


FAST_RETRY = model_retry(initial_interval=0.001, max_interval=0.001, jitter=False)
"""The model nodes' default attempts without the waits between them: tests do not sleep."""


def runner_for(
    context: WorkflowContext, *, retry: RetryPolicy = FAST_RETRY
) -> tuple[SessionRunner, list[Transition]]:
    """A runner on an in-memory checkpointer, and the list its transitions go to."""
    seen: list[Transition] = []

    async def sink(t: Transition) -> None:
        seen.append(t)

    graph = build_graph(InMemorySaver(serde=checkpoint_serde()), model_retry=retry)
    return SessionRunner(graph, context, sink=sink), seen
