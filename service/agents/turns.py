"""One task, one agent turn: what a host does with a task, as the worker does with a step.

The turn is `nodes.execution.run_agent_turn`, the bounded tool-calling loop the worker
runs for a local agent, inside a one-node LangGraph graph so that it gets the same
retry policy as the worker's model-calling nodes (`AGENTFLOW_MODEL_MAX_ATTEMPTS`, with
backoff and jitter).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from langchain_core.messages import BaseMessage
from langgraph.graph import START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from nodes.agents import AgentRegistry
from nodes.chat_models import make_chat_model
from nodes.execution import AgentTurn, run_agent_turn, step_task_message
from nodes.protocol import AgentReply, AgentTask, AgentUsage, ConversationMessage
from service.config import Settings

__all__ = ["TaskTurns"]

logger = logging.getLogger(__name__)

OnMessage = Callable[[BaseMessage], Awaitable[None]]
"""Called with each message of the turn as it is produced."""


class _TurnState(TypedDict, total=False):
    task_id: str
    turn: AgentTurn


@dataclass(frozen=True)
class _Take:
    """The graph's context: the turn to take (again, on a retry)."""

    turn: Callable[[], Awaitable[AgentTurn]]


async def _take_turn(state: _TurnState, runtime: Runtime[_Take]) -> dict[str, Any]:
    return {"turn": await runtime.context.turn()}


class TaskTurns:
    """Take the turns of the agents a host serves, one per task, and say how each ended."""

    def __init__(self, settings: Settings, registry: AgentRegistry) -> None:
        """Take turns with the agents `registry` hosts (their tools ready).

        The settings give the models, the tool-call bound, the model timeout and the
        retry policy.
        """
        self.settings = settings
        self.registry = registry
        self._model = settings.context().model_for("execute")
        builder = StateGraph(_TurnState, context_schema=_Take)
        builder.add_node("turn", _take_turn, retry_policy=settings.model_retry())
        builder.add_edge(START, "turn")
        self._graph: CompiledStateGraph[Any, Any, Any, Any] = builder.compile(name="agent turn")

    async def reply(self, task: AgentTask, on_message: OnMessage) -> AgentReply:
        """Let the task's agent take its turn on the task's step; return the reply.

        The agent sees the task's `history`, or, when it is empty, the step's task
        message built from the task's fields, as the worker builds it. A turn that
        fails (a model error after the last attempt, a tool that raises) is a `failed`
        reply saying why.
        """
        agent = self.registry.get(task.agent)
        conversation = task.conversation() or [
            step_task_message(
                task.step,
                task.event,
                intent=task.intent,
                inputs=task.inputs,
                feedback=task.feedback,
            )
        ]
        settings = self.settings
        model = make_chat_model(
            agent.model or self._model,
            timeout_s=settings.model_timeout_s,
        )

        def turn() -> Awaitable[AgentTurn]:
            return run_agent_turn(
                agent,
                conversation,
                model=model,
                tools=self.registry.tools_of(agent.name),
                max_iterations=settings.max_tool_iterations,
                timeout_s=settings.model_timeout_s,
                on_message=on_message,
            )

        try:
            state = await self._graph.ainvoke({"task_id": task.task_id}, context=_Take(turn))
        except Exception as exc:
            logger.warning("task %s of agent %s failed: %s", task.task_id, agent.name, exc)
            return AgentReply(
                task_id=task.task_id,
                agent=agent.name,
                status="failed",
                error=f"{type(exc).__name__}: {exc}",
            )
        done: AgentTurn = state["turn"]
        return AgentReply(
            task_id=task.task_id,
            agent=agent.name,
            status="done",
            output=done.answer,
            messages=[ConversationMessage.of(m) for m in done.messages],
            usage=AgentUsage.of(done.usage),
        )
