"""Publish transitions to Redis: pub/sub for live clients, a stream for late ones."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from service.transitions import Transition

__all__ = [
    "ALL_TRANSITIONS_CHANNEL",
    "TransitionPublisher",
    "log_key",
    "follow",
    "read_log",
    "session_channel",
]

logger = logging.getLogger(__name__)

ALL_TRANSITIONS_CHANNEL = "agentflow:transitions"


def session_channel(session_id: str) -> str:
    """The pub/sub channel of one session's transitions."""
    return f"agentflow:session:{session_id}:transitions"


def log_key(session_id: str) -> str:
    """The stream that keeps one session's transitions for late clients."""
    return f"agentflow:session:{session_id}:log"


def seq_key(session_id: str) -> str:
    """The counter that numbers one session's transitions."""
    return f"agentflow:session:{session_id}:seq"


# Numbering, logging and publishing happen in one atomic step, so `seq` has no gaps
# and a reader that replays the log then follows pub/sub never misses one.
_PUBLISH = """
local seq = redis.call('INCR', KEYS[1])
local body = string.gsub(ARGV[1], '"seq":0', '"seq":' .. seq, 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq .. '-1', 'transition', body)
redis.call('PUBLISH', KEYS[3], body)
redis.call('PUBLISH', KEYS[4], body)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[4] ~= '' and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('HSET', KEYS[5], 'current_node', ARGV[4], 'updated_at', ARGV[5])
end
return seq
"""


class TransitionPublisher:
    """Number each transition and PUBLISH + XADD it, atomically, in Redis."""

    def __init__(self, redis: Redis, *, ttl_s: int, maxlen: int = 10_000) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self._script = redis.register_script(_PUBLISH)
        self.published = 0

    def __repr__(self) -> str:
        return f"TransitionPublisher(published={self.published})"

    async def publish(self, transition: Transition) -> None:
        """Number and publish one transition; sets `transition.seq`."""
        transition.seq = 0
        body = transition.model_dump_json()
        sid = transition.session_id
        # A node.started also moves the current node of the session's record, if it has one.
        node = transition.node if transition.type == "node.started" and transition.node else ""
        seq = await self._script(
            keys=[
                seq_key(sid),
                log_key(sid),
                session_channel(sid),
                ALL_TRANSITIONS_CHANNEL,
                f"agentflow:session:{sid}",
            ],
            args=[body, self.maxlen, self.ttl_s, node, transition.ts.isoformat()],
        )
        transition.seq = int(seq)
        self.published += 1


async def read_log(redis: Redis, session_id: str, after_seq: int = 0) -> list[Transition]:
    """Return a session's logged transitions with `seq` greater than `after_seq`."""
    entries = await redis.xrange(log_key(session_id), min=f"({after_seq}-1", max="+")
    return [Transition.model_validate_json(fields[b"transition"]) for _, fields in entries]


async def follow(redis: Redis, session_id: str, after_seq: int = 0) -> AsyncIterator[Transition]:
    """Yield a session's transitions from the log, then live, without gap or duplicate.

    Subscribes first, then replays the log, then skips live messages already replayed.
    """
    pubsub = redis.pubsub()
    await pubsub.subscribe(session_channel(session_id))
    try:
        last = after_seq
        for transition in await read_log(redis, session_id, after_seq):
            last = transition.seq
            yield transition
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None:
                continue
            transition = Transition.model_validate_json(message["data"])
            if transition.seq <= last:
                continue
            if transition.seq > last + 1:  # missed while slow: fill from the log
                for missed in await read_log(redis, session_id, last):
                    if missed.seq < transition.seq:
                        last = missed.seq
                        yield missed
            last = transition.seq
            yield transition
    finally:
        with contextlib.suppress(redis_errors.ConnectionError):
            await pubsub.unsubscribe()
        await pubsub.aclose()
