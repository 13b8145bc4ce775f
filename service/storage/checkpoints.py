"""Checkpoints: the Redis checkpointer, the serialisation every checkpointer shares, retention."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from nodes import models
from service.storage._redis import quiet_index_setup

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig
    from langgraph.graph.state import CompiledStateGraph
    from langgraph.types import StateSnapshot
    from redis.asyncio import Redis

__all__ = [
    "CHECKPOINT_TYPES",
    "checkpoint_serde",
    "expire_session",
    "open_checkpointer",
    "redis_checkpoint_serde",
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
        "WorkflowResult",
        "ResultWorkflow",
        "ResultReview",
    )
    if hasattr(models, name)
]
"""Our own types that checkpoints may hold; anything else outside LangGraph's is refused."""


JSON_TYPES: list[tuple[str, ...]] = [
    (*module.split("."), name) for module, name in CHECKPOINT_TYPES
]
"""The same types, as the JSON reviver (used by the Redis checkpointer) names them."""


def checkpoint_serde() -> JsonPlusSerializer:
    """Return a serializer that accepts our state types without warnings."""
    return JsonPlusSerializer(allowed_msgpack_modules=CHECKPOINT_TYPES)


def redis_checkpoint_serde() -> JsonPlusSerializer:
    """Return the Redis checkpointer's serializer, accepting our state types."""
    from langgraph.checkpoint.redis.jsonplus_redis import JsonPlusRedisSerializer

    return JsonPlusRedisSerializer(
        allowed_msgpack_modules=CHECKPOINT_TYPES, allowed_json_modules=JSON_TYPES
    )


# Finds a session's checkpoint and write documents through the checkpointer's search
# indexes and expires them, with the latest-checkpoint pointers and write registries that
# go with them, in one round trip. The TAG search matches case-insensitively (and splits
# stored ids at commas), so each hit's own thread id is compared byte for byte: finishing
# `Case-T` must not expire `case-T`. Like the transition script it names keys it was not
# given, so it runs on standalone Redis (as all of agentflow does), not on a cluster.
_EXPIRE_SESSION = """
local query, ttl, thread = ARGV[3], ARGV[4], ARGV[8]
local checkpoint, latest, registry = ARGV[5] .. ':', ARGV[6] .. ':', ARGV[7] .. ':'
local count = 0
for i = 1, 2 do
  local offset = 0
  repeat
    local found = redis.call(
      'FT.SEARCH', ARGV[i], query, 'RETURN', 1, 'thread_id', 'LIMIT', offset, 500)
    for j = 2, #found, 2 do
      local key, fields, mine = found[j], found[j + 1], false
      for f = 1, #fields, 2 do
        if fields[f] == 'thread_id' and fields[f + 1] == thread then mine = true end
      end
      if mine then
        count = count + redis.call('EXPIRE', key, ttl)
        if string.sub(key, 1, #checkpoint) == checkpoint then
          local rest = string.sub(key, #checkpoint + 1)
          redis.call('EXPIRE', registry .. rest, ttl)
          redis.call('EXPIRE', latest .. string.match(rest, '^(.*):[^:]*$'), ttl)
        end
      end
    end
    offset = offset + 500
  until offset >= found[1]
end
return count
"""


async def expire_session(saver: Any, session_id: str, ttl_s: int) -> int:
    """Give every Redis key of a session's checkpoints (all branches) a retention TTL.

    Called once when a session finishes, instead of an EXPIRE per key on every write
    (about 95 round trips per session). Returns how many documents got the TTL.
    """
    from langgraph.checkpoint.redis.key_registry import WRITE_KEYS_ZSET_PREFIX
    from langgraph.checkpoint.redis.util import to_storage_safe_id
    from redisvl.query.filter import Tag

    thread = to_storage_safe_id(session_id)
    query = str(Tag("thread_id") == thread)
    prefix = saver._checkpoint_prefix
    args = [
        saver.checkpoints_index.name,
        saver.checkpoint_writes_index.name,
        query,
        ttl_s,
        prefix,
        f"{prefix}_latest",
        WRITE_KEYS_ZSET_PREFIX,
        thread,
    ]
    return int(await saver._redis.eval(_EXPIRE_SESSION, 0, *args))


async def open_checkpointer(client: Redis) -> Any:
    """Set up the langgraph-checkpoint-redis saver on an existing client (of either mode)."""
    from langgraph.checkpoint.redis.aio import AsyncRedisSaver

    # No per-write TTL: the worker gives a session's keys their TTL when it finishes
    # (`expire_session`), so a session waiting for a human answer does not expire.
    saver = AsyncRedisSaver(redis_client=client)
    saver.serde = redis_checkpoint_serde()
    with quiet_index_setup():
        await saver.asetup()
    return saver


async def session_states(
    graph: CompiledStateGraph, session_id: str, *, limit: int | None = None
) -> AsyncIterator[StateSnapshot]:
    """Yield a session's checkpoints, newest first: its own, byte for byte, and no other's.

    langgraph-checkpoint-redis finds a thread's checkpoints with a search on a TAG field,
    which matches case-insensitively and splits stored values at commas: `Case-T` finds the
    checkpoints of `case-T` too. Each snapshot's thread id is compared here; when others
    were mixed into a limited answer, the history is read again whole.

    Args:
        graph: a compiled graph with a checkpointer.
        session_id: the session (thread) id.
        limit: at most this many checkpoints.
    """
    config: RunnableConfig = {"configurable": {"thread_id": session_id}}
    yielded, foreign = 0, False
    async for snapshot in graph.aget_state_history(config, limit=limit):
        if snapshot.config["configurable"].get("thread_id") != session_id:
            foreign = True
            continue
        yield snapshot
        yielded += 1
    if not foreign or limit is None or yielded >= limit:
        return
    skip = yielded  # the newest ones, already yielded
    async for snapshot in graph.aget_state_history(config):
        if snapshot.config["configurable"].get("thread_id") != session_id:
            continue
        if skip:
            skip -= 1
            continue
        yield snapshot
        yielded += 1
        if yielded >= limit:
            return
