"""The agentflow workflow graph.

discover -> plan -> assign -> execute <-> execute_step (one task per ready step)
-> review -> (execute again | escalate to a human -> review | finalize).
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from nodes.assignment import assign
from nodes.chat_models import MODEL_RETRY
from nodes.context import WorkflowContext
from nodes.discovery import discover
from nodes.execution import dispatch_ready_steps, execute, execute_step
from nodes.finalize import finalize
from nodes.planning import plan
from nodes.review import escalate, review, route_review
from nodes.state import InputState, OutputState, WorkflowState

__all__ = ["build_graph", "builder", "graph"]

NODES = ("discover", "plan", "assign", "execute", "execute_step", "review", "escalate", "finalize")

builder = StateGraph(
    WorkflowState,
    context_schema=WorkflowContext,
    input_schema=InputState,
    output_schema=OutputState,
)
builder.add_node("discover", discover)
builder.add_node("plan", plan, retry_policy=MODEL_RETRY)
builder.add_node("assign", assign, retry_policy=MODEL_RETRY)
builder.add_node("execute", execute)
# LangGraph's add_node typing has no variant for a Send target's own input type, nor for
# runtime plus config: these two are checked by the tests instead.
builder.add_node("execute_step", execute_step, retry_policy=MODEL_RETRY)  # type: ignore[arg-type]
builder.add_node("review", review, retry_policy=MODEL_RETRY)
builder.add_node("escalate", escalate)
builder.add_node("finalize", finalize, retry_policy=MODEL_RETRY)  # type: ignore[arg-type]

builder.add_edge(START, "discover")
builder.add_edge("discover", "plan")
builder.add_edge("plan", "assign")
builder.add_edge("assign", "execute")
builder.add_conditional_edges("execute", dispatch_ready_steps, ["execute_step", "review"])
builder.add_edge("execute_step", "execute")
builder.add_conditional_edges("review", route_review, ["execute", "escalate", "finalize"])
builder.add_edge("escalate", "review")
builder.add_edge("finalize", END)


def build_graph(
    checkpointer: Any = None, store: Any = None
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Compile the workflow graph with a checkpointer and a long-term store."""
    return builder.compile(checkpointer=checkpointer, store=store, name="agentflow")


graph = builder.compile(name="agentflow")
