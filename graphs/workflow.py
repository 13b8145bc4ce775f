"""The agentflow workflow graph.

discover -> plan -> assign -> execute <-> execute_step (one task per ready step)
-> review -> (execute again | escalate to a human -> (execute again | finalize) | finalize).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import RetryPolicy

from nodes.assignment import assign
from nodes.chat_models import MODEL_RETRY
from nodes.context import WorkflowContext
from nodes.discovery import discover
from nodes.execution import dispatch_ready_steps, execute, execute_step
from nodes.finalize import finalize
from nodes.planning import plan
from nodes.review import escalate, review, route_answer, route_review
from nodes.state import InputState, OutputState, StepTask, WorkflowState

__all__ = ["build_graph", "builder", "graph", "make_builder"]

NODES = ("discover", "plan", "assign", "execute", "execute_step", "review", "escalate", "finalize")


def make_builder(model_retry: RetryPolicy = MODEL_RETRY) -> StateGraph[Any, Any, Any, Any]:
    """Wire the workflow graph; the nodes that call models retry under `model_retry`.

    `execute_step` and `finalize` also get the policy's `max_attempts`: on the last
    attempt a step is marked failed (for the review to see) and the summary falls back
    to the steps, instead of failing the run.
    """
    attempts = model_retry.max_attempts
    builder = StateGraph(
        WorkflowState,
        context_schema=WorkflowContext,
        input_schema=InputState,
        output_schema=OutputState,
    )
    builder.add_node("discover", discover)
    builder.add_node("plan", plan, retry_policy=model_retry)
    builder.add_node("assign", assign, retry_policy=model_retry)
    builder.add_node("execute", execute)
    # LangGraph's add_node typing has no variant for a Send target's own input type, nor
    # for runtime plus config: these two are checked by the tests instead.
    builder.add_node(
        "execute_step",
        partial(execute_step, max_attempts=attempts),  # type: ignore[arg-type]
        input_schema=StepTask,
        retry_policy=model_retry,
    )
    builder.add_node("review", review, retry_policy=model_retry)
    builder.add_node("escalate", escalate)
    builder.add_node(
        "finalize",
        partial(finalize, max_attempts=attempts),  # type: ignore[arg-type]
        retry_policy=model_retry,
    )

    builder.add_edge(START, "discover")
    builder.add_edge("discover", "plan")
    builder.add_edge("plan", "assign")
    builder.add_edge("assign", "execute")
    builder.add_conditional_edges("execute", dispatch_ready_steps, ["execute_step", "review"])
    builder.add_edge("execute_step", "execute")
    builder.add_conditional_edges("review", route_review, ["execute", "escalate", "finalize"])
    builder.add_conditional_edges("escalate", route_answer, ["execute", "finalize"])
    builder.add_edge("finalize", END)
    return builder


builder = make_builder()
"""The graph as wired with the default retry policy (notebooks draw and compile it)."""


def build_graph(
    checkpointer: Any = None, store: Any = None, *, model_retry: RetryPolicy | None = None
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Compile the workflow graph with a checkpointer, a long-term store and a retry policy.

    Args:
        checkpointer: where the session's checkpoints go (none: no persistence).
        store: the long-term store (subject notes), if any.
        model_retry: the retry policy of the nodes that call models; the default has
            `MODEL_MAX_ATTEMPTS` attempts (the service passes `AGENTFLOW_MODEL_MAX_ATTEMPTS`).
    """
    wired = builder if model_retry is None else make_builder(model_retry)
    return wired.compile(checkpointer=checkpointer, store=store, name="agentflow")


graph = builder.compile(name="agentflow")
