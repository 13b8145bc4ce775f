"""Durable deadlines: one sorted set per kind of wait, swept by one worker at a time."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, cast

from nodes.models import utcnow
from service.storage._redis import RedisClient

__all__ = ["Deadlines", "Wake"]

Wake = Callable[[str, str, str], Awaitable[None]]
"""Wakes one wait past its deadline: called with its topic, session id and item id."""


class Deadlines:
    """The deadlines of one kind of wait (remote agents' tasks, humans' questions).

    Each entry is `<topic> <session id> <item id>` scored by its deadline (a Unix time):
    the topic is where the wake-up goes, so workers of other deployments (other topics)
    may share the Redis. Every worker sweeps; a short lock with a TTL lets one at a time do
    it, and a dead sweeper is replaced when the lock expires. An entry leaves the set after
    its wake-up is sent: a crash in between sends it twice, and the receiver must drop the
    second (it finds nothing waiting any more).

    Args:
        redis: a text client.
        key: the sorted set.
        lock_key: the sweeper's lock.
    """

    def __init__(self, redis: RedisClient, key: str, lock_key: str) -> None:
        self.redis = redis
        self.key = key
        self.lock_key = lock_key

    def __repr__(self) -> str:
        return f"Deadlines(key={self.key!r})"

    @staticmethod
    def member(topic: str, session_id: str, item_id: str) -> str:
        """Return the entry of one wait."""
        return f"{topic} {session_id} {item_id}"

    def add(self, pipe: Any, member: str, deadline: datetime) -> None:
        """Queue the entry of a wait on a pipeline."""
        pipe.zadd(self.key, {member: deadline.timestamp()})

    def remove(self, pipe: Any, *members: str) -> None:
        """Queue the removal of entries on a pipeline."""
        if members:
            pipe.zrem(self.key, *members)

    async def sweep(self, wake: Wake, *, lock_s: float = 5.0, batch: int = 100) -> int:
        """Wake each wait past its deadline, unless another worker sweeps; returns how many."""
        me = uuid.uuid4().hex
        if not await self.redis.set(self.lock_key, me, nx=True, px=int(lock_s * 1000)):
            return 0
        try:
            due = cast(
                list[str],
                await self.redis.zrangebyscore(
                    self.key, "-inf", utcnow().timestamp(), start=0, num=batch
                ),
            )
            for entry in due:
                topic, rest = entry.split(" ", 1)
                session_id, item_id = rest.rsplit(" ", 1)
                await wake(topic, session_id, item_id)
                await self.redis.zrem(self.key, entry)
            return len(due)
        finally:
            if await self.redis.get(self.lock_key) == me:
                await self.redis.delete(self.lock_key)
