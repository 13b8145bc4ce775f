"""Checkpoint serialisation shared by every checkpointer agentflow opens."""

from __future__ import annotations

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from nodes import models

__all__ = ["CHECKPOINT_TYPES", "checkpoint_serde", "redis_checkpoint_serde"]

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
