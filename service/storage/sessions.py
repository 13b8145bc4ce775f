"""Session records and event bookkeeping in Redis."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, cast

from pydantic import BaseModel, Field
from redis.asyncio import RedisCluster

from nodes.models import AgentWait, HumanAnswer, WorkflowResult, utcnow
from service.storage._redis import RedisClient, require_text_client
from service.storage.keys import INDEX_KEY, epoch_key, event_key, parked_key, session_key

__all__ = ["WAITS", "EventClaim", "SentFrom", "SessionRecord", "SessionStore"]

SessionStatus = Literal[
    "running",
    "interrupted",
    "waiting",
    "completed",
    "failed",
    "rejected",
    "cancelled",
    "superseded",
    "rolled_back",
]
WAITS: frozenset[str] = frozenset({"interrupted", "waiting"})
"""Statuses of a session whose run waits: for a human's answer, or for remote agents."""
EventClaim = Literal["new", "running", "parked", "finished", "published"]
_Writes = Callable[[Any], object]
"""Queues commands on a pipeline, all on keys of one cluster slot."""
SentFrom = dict[str, tuple[int, int]]
"""Where an event's messages land, by topic: (partition, end offset before they were sent).

A finished event carries it: until the event is published, whether Kafka took its result
is in doubt, and reading these partitions from these offsets settles it."""


# Compare-and-delete: a claim is removed only while it is exactly the one its caller made.
_RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# Raise a session's fencing epoch: past the one before, and to Redis's clock in
# microseconds, so an epoch taken after Redis lost the key (a restart without persistence)
# is still newer than every one taken before. SET drops the key's TTL: a live session's
# epoch does not expire under a run; `close` gives it the record's TTL.
_TAKE = """
local now = redis.call('TIME')
local epoch = math.max(tonumber(redis.call('GET', KEYS[1]) or '0') + 1, now[1] * 1000000 + now[2])
redis.call('SET', KEYS[1], string.format('%d', epoch))
return epoch
"""


# Take the first parked event off only while it is the one that ran.
_UNPARK = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then
  return redis.call('LPOP', KEYS[1])
end
return false
"""


class SessionRecord(BaseModel):
    """What the service knows about a session."""

    session_id: str
    status: SessionStatus = "running"
    current_node: str | None = None
    event_ids: list[str] = Field(default_factory=list)
    event_type: str | None = None
    subject: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    question: str | None = None
    waiting_on: list[AgentWait] = Field(default_factory=list)
    """With status waiting: the remote agents' tasks it waits for."""
    waiting_event: str | None = None
    """The event whose result comes when the session's latest wait for agents ends."""
    answers: list[HumanAnswer] = Field(default_factory=list)
    """Every human answer the session took, oldest first: who decided what, how and when."""
    result: WorkflowResult | None = None

    def why_not_answerable(self) -> str | None:
        """Why a human's answer cannot go to this session now, or None when it can."""
        if self.status == "interrupted":
            return None
        if self.status == "waiting":
            agents = ", ".join(sorted({w.agent for w in self.waiting_on})) or "remote agents"
            return f"session {self.session_id} waits for {agents}, not for a human answer"
        return f"session {self.session_id} is {self.status}, not waiting for an answer"


class SessionStore:
    """Session records (hashes), an index by update time, and seen event ids.

    Args:
        redis: a client made with `decode_responses=True` (records are read as text).
        ttl_s: how long a finished session's record and its event ids are kept.

    Raises:
        TypeError: the client answers bytes.
    """

    def __init__(self, redis: RedisClient, *, ttl_s: int) -> None:
        self.redis = require_text_client(redis, "SessionStore")
        self.ttl_s = ttl_s
        self._release = self.redis.register_script(_RELEASE_CLAIM)
        self._unpark = self.redis.register_script(_UNPARK)
        self._take = self.redis.register_script(_TAKE)

    def __repr__(self) -> str:
        return f"SessionStore(ttl_s={self.ttl_s})"

    async def get(self, session_id: str) -> SessionRecord | None:
        """Return a session's record, or None if there is none."""
        fields = cast(dict[str, str], await self.redis.hgetall(session_key(session_id)))
        if not fields:
            return None
        data: dict[str, Any] = {k: v for k, v in fields.items() if v != ""}
        data.setdefault("session_id", session_id)  # a record whose opening was lost
        data["event_ids"] = json.loads(fields.get("event_ids", "[]"))
        data["waiting_on"] = json.loads(fields.get("waiting_on") or "[]")
        data["answers"] = json.loads(fields.get("answers") or "[]")
        if "result" in data:
            data["result"] = WorkflowResult.model_validate_json(data["result"])
        return SessionRecord.model_validate(data)

    async def list(
        self, *, status: str | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[list[SessionRecord], int]:
        """Return sessions, newest first, optionally of one status, and the total count."""
        total = await self.redis.zcard(INDEX_KEY)
        records: list[SessionRecord] = []
        cursor = 0
        skipped = 0
        page = max(limit, 50)
        while len(records) < limit and cursor < total:
            ids = cast(list[str], await self.redis.zrevrange(INDEX_KEY, cursor, cursor + page - 1))
            cursor += page
            for session_id in ids:
                record = await self.get(session_id)
                if record is None:
                    await self.redis.zrem(INDEX_KEY, session_id)  # expired
                    continue
                if status and record.status != status:
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                records.append(record)
                if len(records) == limit:
                    break
        return records, total

    async def open(
        self, session_id: str, *, event_id: str, event_type: str, subject: str | None
    ) -> None:
        """Create or reopen a session for an event."""
        key = session_key(session_id)
        updated = utcnow()
        now = updated.isoformat()
        current = await self.redis.hget(key, "event_ids")
        ids = json.loads(current) if current else []
        if event_id not in ids:
            ids.append(event_id)

        def record(pipe: Any) -> None:
            pipe.hsetnx(key, "created_at", now)
            pipe.hset(
                key,
                mapping={
                    "session_id": session_id,
                    "status": "running",
                    "event_ids": json.dumps(ids),
                    "event_type": event_type,
                    "subject": subject or "",
                    "updated_at": now,
                    "question": "",
                },
            )
            pipe.persist(key)

        # The record before the index: `list` takes an id without a record for expired.
        await self._write(record, self._index(session_id, updated))

    async def answered(self, session_id: str, answer: HumanAnswer) -> None:
        """Keep a human's answer in the session's record, and its event among the events.

        The same event's answer is kept once (its redelivery after a crash comes again).
        """
        key = session_key(session_id)
        known = cast(list[str | None], await self.redis.hmget(key, ["answers", "event_ids"]))
        answers = json.loads(known[0] or "[]")
        ids = json.loads(known[1] or "[]")
        if answer.event_id is not None and any(
            a.get("event_id") == answer.event_id for a in answers
        ):
            return
        answers.append(answer.model_dump(mode="json", exclude_none=True))
        if answer.event_id is not None and answer.event_id not in ids:
            ids.append(answer.event_id)
        await self.redis.hset(
            key, mapping={"answers": json.dumps(answers), "event_ids": json.dumps(ids)}
        )  # type: ignore[misc]

    async def close(
        self,
        result: WorkflowResult,
        *,
        status: SessionStatus | None = None,
        finished_event: str | None = None,
        sent_from: SentFrom | None = None,
    ) -> None:
        """Record a run's outcome; finished sessions get the retention TTL (record and epoch).

        With `finished_event`, that event moves to `finished` in the same transaction,
        with `sent_from` (where its result will land); on a cluster, just before.
        """
        key = session_key(result.session_id)
        final = status or result.status
        updated = utcnow()  # the record's updated_at and its score in the index alike

        def record(pipe: Any) -> None:
            pipe.hset(
                key,
                mapping={
                    "status": final,
                    "updated_at": updated.isoformat(),
                    "question": result.question or "",
                    "result": result.model_dump_json(),
                    "waiting_on": json.dumps(
                        [w.model_dump(mode="json") for w in result.waiting_on]
                    ),
                    **({"waiting_event": result.event_id} if final == "waiting" else {}),
                },
            )
            if final not in WAITS:
                pipe.expire(key, self.ttl_s)
                pipe.expire(epoch_key(result.session_id), self.ttl_s)

        parts = [record, self._index(result.session_id, updated)]
        if finished_event is not None:
            mark = _event_mark(result.session_id, "finished", sent_from)
            # The event's mark before the record, which readers take for the run's outcome:
            # a crash between leaves a finished event whose result is in neither the record
            # nor Kafka, which a redelivery runs again. The other way round, a crash would
            # leave an outcome on show for an event that runs again, maybe to another result.
            parts.insert(0, lambda pipe: pipe.set(event_key(finished_event), mark, ex=self.ttl_s))
        await self._write(*parts)

    def _index(self, session_id: str, updated: datetime) -> _Writes:
        """The index's part of a write: scored by `updated`, the record's `updated_at`."""
        return lambda pipe: pipe.zadd(INDEX_KEY, {session_id: updated.timestamp()})

    async def _write(self, *parts: _Writes) -> None:
        """Run the parts of a write in order: one MULTI on one Redis, one per part on a cluster.

        A MULTI cannot span a cluster's slots and each part's keys share one, so on a
        cluster a crash may leave the first parts done and not the rest: callers order
        them so that is safe.
        """
        groups = [(part,) for part in parts] if isinstance(self.redis, RedisCluster) else [parts]
        for group in groups:
            async with self.redis.pipeline(transaction=True) as pipe:
                for part in group:
                    part(pipe)
                await pipe.execute()

    async def take(self, session_id: str) -> int:
        """Take a session for a run: raise its fencing epoch and return the new one.

        Checkpoint writes and transitions that carry an older epoch are refused from
        then on (`StaleWriter`), so a run that lost its session (a rebalance, a grace
        period run out) cannot fork the session's checkpoints. The epoch is never below
        Redis's clock (microseconds), so a run that began before Redis lost the key is
        fenced off all the same; it lives as long as the session's record (`close`).
        """
        return int(await self._take(keys=[epoch_key(session_id)]))

    async def claim_event(self, event_id: str, session_id: str) -> tuple[EventClaim, str]:
        """Take an event id for a session, or say how far it got before and whose it is.

        The claim is one `SET NX GET`: of concurrent claims (other workers, other sessions)
        exactly one finds the id new, and every other one sees the first claimant's
        session, so a caller can tell a redelivery (same session) from a second delivery of
        the id to another session.

        Returns:
            The event's state before this call, and the session that took it (the given
            one when it is new).
        """
        claim = json.dumps({"session_id": session_id, "state": "running"})
        raw = await self.redis.set(event_key(event_id), claim, nx=True, get=True, ex=self.ttl_s)
        if raw is None:
            return "new", session_id
        known = json.loads(cast(str, raw))
        return cast(EventClaim, known["state"]), str(known["session_id"])

    async def release_event(self, event_id: str, session_id: str) -> bool:
        """Forget a claim that produced no result (its event was dead-lettered).

        Only a `running` claim of this session goes: one that another session holds, or
        that has a result, stays. Returns whether the claim was removed.
        """
        claim = json.dumps({"session_id": session_id, "state": "running"})
        return bool(await self._release(keys=[event_key(event_id)], args=[claim]))

    async def mark_event(
        self,
        event_id: str,
        session_id: str,
        state: EventClaim,
        *,
        sent_from: SentFrom | None = None,
    ) -> None:
        """Move an event to `finished` (result known) or `published` (result sent).

        Args:
            event_id: the event.
            session_id: the session that took it.
            state: its new state.
            sent_from: for `finished`, where its result and `session.ended` will land.
        """
        await self.redis.set(
            event_key(event_id), _event_mark(session_id, state, sent_from), ex=self.ttl_s
        )

    async def busy(self, session_id: str) -> tuple[str | None, int]:
        """Return how a session waits, and how many events are parked behind it.

        The first is `interrupted` (for a human), `waiting` (for remote agents) or None.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(session_key(session_id), "status")
            pipe.llen(parked_key(session_id))
            status, parked = await pipe.execute()
        return (status if status in WAITS else None), int(parked)

    async def park(self, session_id: str, entry: str) -> None:
        """Put an event behind a session that waits, until the wait ends (`first_parked`).

        Parked events have no TTL: like the waiting session itself, they stay until the
        question is answered or the session cancelled.
        """
        await self.redis.rpush(parked_key(session_id), entry)  # type: ignore[misc]

    async def first_parked(self, session_id: str) -> str | None:
        """Return the oldest event parked behind a session, or None."""
        return cast(str | None, await self.redis.lindex(parked_key(session_id), 0))  # type: ignore[misc]

    async def unpark(self, session_id: str, entry: str) -> None:
        """Take a parked event off its session's list once it has run (only if still first)."""
        await self._unpark(keys=[parked_key(session_id)], args=[entry])

    async def event_state(self, event_id: str) -> EventClaim | None:
        """Return how far an event got, or None if it is not known."""
        raw = await self.redis.get(event_key(event_id))
        return None if raw is None else cast(EventClaim, json.loads(cast(str, raw))["state"])

    async def sent_from(self, event_id: str) -> SentFrom | None:
        """Return where a finished event's messages land, or None if it was not recorded."""
        raw = await self.redis.get(event_key(event_id))
        if raw is None:
            return None
        recorded = json.loads(cast(str, raw)).get("sent_from")
        if not recorded:
            return None
        return {topic: (int(where[0]), int(where[1])) for topic, where in recorded.items()}


def _event_mark(session_id: str, state: EventClaim, sent_from: SentFrom | None) -> str:
    mark: dict[str, Any] = {"session_id": session_id, "state": state}
    if sent_from:
        mark["sent_from"] = {topic: list(where) for topic, where in sent_from.items()}
    return json.dumps(mark)
