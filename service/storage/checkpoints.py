"""Checkpoints: the Redis checkpointer, the serialisation every checkpointer shares, retention."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from nodes import models
from service.storage.checkpointer import RedisSaver

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig
    from langgraph.graph.state import CompiledStateGraph
    from langgraph.types import StateSnapshot

    from service.storage._redis import RedisClient

__all__ = [
    "CHECKPOINT_TYPES",
    "Retention",
    "checkpoint_serde",
    "expire_session",
    "open_checkpointer",
    "session_states",
]

CHECKPOINT_TYPES: list[tuple[str, str]] = [
    ("nodes.models", name)
    for name in (
        "CloudEvent",
        "Step",
        "SimilarWorkflow",
        "Usage",
        "ReviewDecision",
        "HumanAnswer",
        "WorkflowResult",
        "ResultWorkflow",
        "ResultReview",
    )
    if hasattr(models, name)
]
"""Our own types that checkpoints may hold; anything else outside LangGraph's is refused."""


def checkpoint_serde() -> JsonPlusSerializer:
    """Return a serializer that accepts our state types without warnings."""
    return JsonPlusSerializer(allowed_msgpack_modules=CHECKPOINT_TYPES)


Retention = Literal["all", "latest"]
"""What a finished session keeps until its TTL: every checkpoint, or its latest only."""


async def expire_session(
    saver: Any, session_id: str, ttl_s: int, *, retention: Retention = "all"
) -> int:
    """Give every Redis key of a finished session's checkpoints a retention TTL.

    Called once when a session finishes (a later event of the session makes its keys
    live again until that run finishes). With `retention="latest"` the session is first
    pruned to its latest checkpoint, as LangGraph Server's `keep_latest` does; its agent
    conversations still read back whole (see `RedisSaver.aprune`).

    Args:
        saver: the sessions' `RedisSaver`.
        session_id: the session (thread) id.
        ttl_s: the TTL, `AGENTFLOW_SESSION_TTL_S`.
        retention: `AGENTFLOW_CHECKPOINT_RETENTION`.

    Returns:
        How many keys got the TTL.
    """
    if retention == "latest":
        await saver.aprune([session_id], strategy="keep_latest")
    return int(await saver.aexpire(session_id, ttl_s))


async def open_checkpointer(client: RedisClient) -> RedisSaver:
    """Set up agentflow's Redis checkpointer on an existing client (of either mode)."""
    # No per-write TTL: the worker gives a session's keys their TTL when it finishes
    # (`expire_session`), so a session waiting for a human answer does not expire.
    saver = RedisSaver(redis_client=client, serde=checkpoint_serde())
    await saver.asetup()
    return saver


async def session_states(
    graph: CompiledStateGraph,
    session_id: str,
    *,
    limit: int | None = None,
    before: str | None = None,
) -> AsyncIterator[StateSnapshot]:
    """Yield a session's checkpoints, newest first (all branches).

    Args:
        graph: a compiled graph with a checkpointer.
        session_id: the session (thread) id.
        limit: at most this many checkpoints.
        before: only checkpoints older than this checkpoint id.
    """
    config: RunnableConfig = {"configurable": {"thread_id": session_id}}
    older: RunnableConfig | None = None
    if before is not None:
        older = {"configurable": {"thread_id": session_id, "checkpoint_id": before}}
    async for snapshot in graph.aget_state_history(config, limit=limit, before=older):
        yield snapshot
