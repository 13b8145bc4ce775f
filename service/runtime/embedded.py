"""The embedded mode: one event, one process, no broker."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from rich.console import Console

from graphs.workflow import build_graph
from nodes.agents import load_agents
from nodes.library import default_library
from nodes.models import CLI_SOURCE, CloudEvent, HumanDecision, WorkflowResult
from service.config import Settings
from service.observe.terminal import print_transition
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import checkpoint_serde
from service.storage.library import seed_library
from service.storage.transitions import Transition

__all__ = ["run_embedded"]


async def run_embedded(
    settings: Settings,
    *,
    session_id: str,
    event: CloudEvent | None = None,
    decision: HumanDecision | None = None,
    memory: bool = False,
    console: Console | None = None,
) -> WorkflowResult:
    """Run an event (or answer a session's interrupt with a decision) on a local checkpointer.

    An answer is recorded as the CLI's (`source` cli, `who` agentflow/cli).

    The workflow library is the process's in-memory one; `AGENTFLOW_LIBRARY_SEED` (a
    template file or folder, like `examples/workflows`) seeds it before the run.
    """

    async def sink(transition: Transition) -> None:
        if console is not None:
            print_transition(console, transition)

    async with AsyncExitStack() as stack:
        checkpointer: Any
        if memory:
            checkpointer = InMemorySaver(serde=checkpoint_serde())
        else:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            path = settings.data_dir / "checkpoints.sqlite"
            checkpointer = await stack.enter_async_context(
                AsyncSqliteSaver.from_conn_string(str(path))
            )
            checkpointer.serde = checkpoint_serde()
        if settings.library_seed is not None:  # templates keep their ids: seeding twice is fine
            await seed_library(
                default_library(), settings.library_seed, load_agents(settings.agents_file)
            )
        graph = build_graph(checkpointer, model_retry=settings.model_retry())
        runner = SessionRunner(graph, settings.context(), sink=sink)
        if event is None:
            assert decision is not None, "a resume needs a decision"
            answer = await runner.check_answer(session_id, decision, source="cli", who=CLI_SOURCE)
            return await runner.resume(session_id, answer)
        return await runner.start(event, session_id)
