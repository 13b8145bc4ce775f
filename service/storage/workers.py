"""What each running worker says about itself in Redis: taking events or degraded, since when.

A worker writes its state every few seconds with a short TTL, so a worker that is gone
leaves nothing behind; `agentflow health` and the gateway's `/healthz` read them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, TypeVar, cast

from pydantic import BaseModel

from service.storage._redis import RedisClient
from service.storage.keys import WORKER_PREFIX, worker_key

__all__ = ["WorkerState", "read_reports", "read_worker_states", "write_worker_state"]


class WorkerState(BaseModel):
    """One worker's state as it last reported it."""

    name: str
    state: Literal["running", "degraded"]
    """`degraded`: Redis or Kafka is away (or Redis is being set up again): no new events."""
    since: datetime
    """When the worker entered this state."""
    reason: str | None = None
    """Why it is degraded."""


async def write_worker_state(redis: RedisClient, state: WorkerState, *, ttl_s: int) -> None:
    """Record a worker's state for `ttl_s` seconds."""
    await redis.set(worker_key(state.name), state.model_dump_json(), ex=ttl_s)


async def read_worker_states(redis: RedisClient) -> list[WorkerState]:
    """Return the states of the workers that reported lately, by name."""
    return await read_reports(redis, WORKER_PREFIX, WorkerState)


ReportT = TypeVar("ReportT", bound=BaseModel)


async def read_reports(redis: RedisClient, prefix: str, model: type[ReportT]) -> list[ReportT]:
    """Return what running components report under `{prefix}:{name}` (short TTLs), by name.

    Each report is `model`'s JSON and has a `name`.
    """
    keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=500)]
    # GETs in one pipeline, not MGET: on a cluster the keys live in different slots.
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
        values = cast(list[str | bytes | None], await pipe.execute())
    reports = [model.model_validate_json(v) for v in values if v]
    return sorted(reports, key=lambda r: str(getattr(r, "name", "")))
