"""Publish transitions to Redis: pub/sub for live clients, a stream for late ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any, cast

from redis import exceptions as redis_errors

from service.errors import EpochLost, StaleWriter, fence_refusal
from service.storage._redis import RedisClient, require_text_client
from service.storage.keys import (
    ALL_TRANSITIONS_CHANNEL,
    epoch_key,
    log_key,
    seq_key,
    session_channel,
    session_key,
)
from service.storage.transitions import ENDED, Transition, TransitionType

__all__ = [
    "BackgroundPublisher",
    "TransitionPublisher",
    "ended_at",
    "ended_by",
    "follow",
    "newest_seq",
    "read_log",
]

logger = logging.getLogger(__name__)


# Numbering, logging and publishing happen in one atomic step, so `seq` has no gaps
# and a reader that replays the log then follows pub/sub never misses one. One call
# takes a batch of transitions of one session. KEYS are the session's counter, log,
# record and fencing epoch (one hash tag: one cluster slot); ARGV is maxlen, ttl, the two
# channels, then body, node, time and run epoch ('' for none) of each transition. A
# transition of a run that no longer holds the session (a newer run took it, or Redis lost
# the epoch) is refused: not numbered, logged or sent (its seq is 0). Returns the seqs and
# the session's epoch (0: none).
_PUBLISH = """
local current = tonumber(redis.call('GET', KEYS[4]) or '0')
local seqs = {}
for i = 5, #ARGV, 4 do
  if ARGV[i + 3] ~= '' and tonumber(ARGV[i + 3]) ~= current then
    seqs[#seqs + 1] = 0
  else
    local seq = redis.call('INCR', KEYS[1])
    local body = string.gsub(ARGV[i], '"seq":0', '"seq":' .. seq, 1)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], seq .. '-1', 'transition', body)
    redis.call('PUBLISH', ARGV[3], body)
    redis.call('PUBLISH', ARGV[4], body)
    if ARGV[i + 1] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then
      redis.call('HSET', KEYS[3], 'current_node', ARGV[i + 1], 'updated_at', ARGV[i + 2])
    end
    seqs[#seqs + 1] = seq
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {seqs, current}
"""


class TransitionPublisher:
    """Number each transition and PUBLISH + XADD it, atomically, in Redis.

    Args:
        redis: a client in either mode (it reads back only the numbers it gave).
        ttl_s: how long a session's log and counter are kept after its last transition.
        maxlen: about how many transitions a session's log keeps.
    """

    def __init__(self, redis: RedisClient, *, ttl_s: int, maxlen: int = 10_000) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self._sha = redis.register_script(_PUBLISH).sha
        self.published = 0

    def __repr__(self) -> str:
        return f"TransitionPublisher(published={self.published})"

    async def publish(self, transition: Transition) -> None:
        """Number and publish one transition; sets `transition.seq`.

        Raises:
            StaleWriter: a newer run took the session: it was not published.
            EpochLost: Redis lost the session's epoch: it was not published.
        """
        for refused in await self.publish_batch({transition.session_id: [transition]}):
            raise refused

    async def publish_batch(
        self, batch: dict[str, list[Transition]]
    ) -> list[StaleWriter | EpochLost]:
        """Number and publish transitions of several sessions, each in order, in one round trip.

        A node.started also moves the current node of the session's record, if it has one.
        A transition whose `epoch` is not its session's any more is refused (its seq stays 0).

        Returns:
            One error per session and epoch whose transitions were refused.
        """
        calls = []
        for sid, transitions in batch.items():
            args: list[Any] = [
                self.maxlen,
                self.ttl_s,
                session_channel(sid),
                ALL_TRANSITIONS_CHANNEL,
            ]
            for transition in transitions:
                transition.seq = 0
                started = transition.type == "node.started" and transition.node
                node = transition.node if started else ""
                epoch = "" if transition.epoch is None else transition.epoch
                args += [transition.model_dump_json(), node, transition.ts.isoformat(), epoch]
            keys = [seq_key(sid), log_key(sid), session_key(sid), epoch_key(sid)]
            calls.append((*keys, *args))
        try:
            numbered = await self._evalsha(calls)
        except redis_errors.NoScriptError:  # a new or restarted Redis: load it, send again
            await self.redis.script_load(_PUBLISH)
            numbered = await self._evalsha(calls)
        refused: dict[tuple[str, int], StaleWriter | EpochLost] = {}
        for (sid, transitions), (seqs, current) in zip(batch.items(), numbered, strict=True):
            for transition, seq in zip(transitions, seqs, strict=True):
                transition.seq = int(seq)
                if transition.seq:
                    self.published += 1
                elif transition.epoch is not None:
                    error = fence_refusal(sid, transition.epoch, int(current))
                    refused.setdefault((sid, transition.epoch), error)
        return list(refused.values())

    async def _evalsha(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        # Not the pipeline's own script support: it asks SCRIPT EXISTS on every batch. A
        # raw command: a cluster pipeline refuses its `evalsha` method, not EVALSHA itself.
        pipe = self.redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command("EVALSHA", self._sha, 4, *call)
        return list(await pipe.execute())


class BackgroundPublisher:
    """Publish transitions in the background, in batches, each session's in order.

    Runs do not wait for Redis on every transition: what queues up while a batch is on
    its way goes out in the next one, all sessions together in one round trip. A
    session's terminal transition waits until everything before it is published, and a
    failed publish is raised to the session's run on its next transition (so the worker
    retries the event as for any Redis error). Runs are told apart by their epoch: a
    refused transition (`StaleWriter`, `EpochLost`) is raised to its own run only.
    """

    def __init__(self, publisher: TransitionPublisher) -> None:
        self.publisher = publisher
        self._pending: dict[str, list[Transition]] = {}
        self._pending_sent = asyncio.Event()
        self._sending: dict[str, list[Transition]] = {}
        self._sending_sent = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._errors: dict[tuple[str, int | None], Exception] = {}
        """Failures not raised yet, by session and run epoch."""
        self.batches = 0

    def __repr__(self) -> str:
        return f"BackgroundPublisher(batches={self.batches}, {self.publisher!r})"

    async def publish(self, transition: Transition) -> None:
        """Queue a transition; for a terminal one, wait until the session's are published."""
        sid = transition.session_id
        if (error := self._errors.pop((sid, transition.epoch), None)) is not None:
            raise error
        if transition.epoch is not None and self._errors:
            self._forget_older(sid, transition.epoch)
        self._pending.setdefault(sid, []).append(transition)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        if transition.terminal:
            await self.drain(sid, transition.epoch)

    async def drain(self, session_id: str, epoch: int | None = None) -> None:
        """Wait until a session's queued transitions are published; raise a failure.

        Args:
            session_id: the session.
            epoch: the run whose failure is raised (None: transitions without one).
        """
        while True:
            if session_id in self._pending:
                sent = self._pending_sent
            elif session_id in self._sending:
                sent = self._sending_sent
            else:
                break
            await sent.wait()
        if (error := self._errors.pop((session_id, epoch), None)) is not None:
            raise error

    def _forget_older(self, session_id: str, epoch: int) -> None:
        """Drop what runs of a session older than `epoch` left unraised: a newer one took over."""
        for sid, older in list(self._errors):
            if sid == session_id and older is not None and older < epoch:
                del self._errors[(sid, older)]

    async def close(self) -> None:
        """Wait for everything queued (failures are logged)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        for (session_id, _), error in self._errors.items():
            logger.warning("transitions of session %s not published: %s", session_id, error)
        self._errors.clear()

    async def _flush(self) -> None:
        try:
            while self._pending:
                self._sending, self._pending = self._pending, {}
                self._sending_sent, self._pending_sent = self._pending_sent, asyncio.Event()
                try:
                    for refused in await self.publisher.publish_batch(self._sending):
                        self._errors[(refused.session_id, refused.epoch)] = refused
                except Exception as exc:
                    for session_id, transitions in self._sending.items():
                        for transition in transitions:
                            self._errors[(session_id, transition.epoch)] = exc
                finally:
                    self.batches += 1
                    self._sending = {}
                    self._sending_sent.set()
        finally:
            self._flusher = None


async def read_log(redis: RedisClient, session_id: str, after_seq: int = 0) -> list[Transition]:
    """Return a session's logged transitions with `seq` greater than `after_seq`.

    Args:
        redis: a client made with `decode_responses=True`.
        session_id: the session.
        after_seq: read only what comes after this transition.

    Raises:
        TypeError: the client answers bytes.
    """
    require_text_client(redis, "read_log")
    entries = await redis.xrange(log_key(session_id), min=f"({after_seq}-1", max="+")
    rows = cast(list[tuple[str, dict[str, str]]], entries)
    return [Transition.model_validate_json(fields["transition"]) for _, fields in rows]


async def newest_seq(redis: RedisClient, session_id: str) -> tuple[int, TransitionType | None]:
    """Return the seq and type of a session's newest logged transition ((0, None) if none).

    Raises:
        TypeError: the client answers bytes.
    """
    require_text_client(redis, "newest_seq")
    entries = await redis.xrevrange(log_key(session_id), count=1)
    rows = cast(list[tuple[str, dict[str, str]]], entries)
    if not rows:
        return 0, None
    newest = Transition.model_validate_json(rows[0][1]["transition"])
    return newest.seq, newest.type


async def ended_by(redis: RedisClient, session_id: str, seq: int) -> bool:
    """Whether a session has ended at its transition `seq` or before.

    It has when its newest logged transition completed or failed it and is not newer than
    `seq`: a session that goes on (answered, or sent another event) logs more.
    """
    newest, kind = await newest_seq(redis, session_id)
    return kind in ENDED and newest <= seq


async def ended_at(redis: RedisClient, transition: Transition) -> bool:
    """Whether a session has ended at this transition: it completed or failed, nothing after.

    Redis is asked only about a transition that completes or fails the session; a later
    run of the session (an answer, another event) would have logged more after it.
    """
    return transition.type in ENDED and await ended_by(redis, transition.session_id, transition.seq)


async def follow(
    redis: RedisClient, session_id: str, after_seq: int = 0
) -> AsyncGenerator[Transition, None]:
    """Yield a session's transitions from the log, then live, without gap or duplicate.

    Subscribes first, then replays the log, then skips live messages already replayed.
    Needs a client made with `decode_responses=True`, as `read_log` does.
    """
    require_text_client(redis, "follow")
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
