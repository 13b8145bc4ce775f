"""Checkpoint serialisation shared by every checkpointer agentflow opens."""

from __future__ import annotations

from typing import Any

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from nodes import models

__all__ = ["CHECKPOINT_TYPES", "checkpoint_serde", "expire_session", "redis_checkpoint_serde"]

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


async def expire_session(saver: Any, session_id: str, ttl_s: int) -> int:
    """Give every Redis key of a session's checkpoints (all branches) a retention TTL.

    Called once when a session finishes, instead of an EXPIRE per key on every write
    (about 95 round trips per session). Returns how many keys got the TTL.
    """
    from langgraph.checkpoint.redis.util import to_storage_safe_id
    from redis.commands.search.query import Query
    from redisvl.query.filter import Tag

    query = Query(str(Tag("thread_id") == to_storage_safe_id(session_id)))
    query = query.no_content().paging(0, 10_000)
    redis = saver._redis
    keys: set[str] = set()
    for index in (saver.checkpoints_index, saver.checkpoint_writes_index):
        found = await redis.ft(index.name).search(query)
        keys.update(_text(doc.id) for doc in found.docs)
    for key in [k for k in keys if k.startswith(f"{saver._checkpoint_prefix}:")]:
        # checkpoint:<thread>:<namespace>:<checkpoint id>
        _, _, namespace, checkpoint = key.rsplit(":", 3)
        keys.add(saver._make_redis_checkpoint_latest_key(session_id, namespace))
        if saver._key_registry is not None:
            keys.add(
                saver._key_registry.make_write_keys_zset_key(session_id, namespace, checkpoint)
            )
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.expire(key, ttl_s)
    await pipe.execute()
    return len(keys)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
