"""The interrupts sessions wait on a human for: what they ask, since when, until when."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from langgraph.types import Interrupt
from pydantic import BaseModel, Field

from nodes.models import InterruptKind, utcnow
from service.storage._redis import RedisClient
from service.storage.deadlines import Deadlines
from service.storage.keys import HUMAN_DEADLINES_KEY, HUMAN_SWEEPER_KEY, questions_key

__all__ = ["PendingInterrupt", "QuestionStore"]


class PendingInterrupt(BaseModel):
    """An interrupt a session waits on a human for."""

    id: str = Field(description="The interrupt's id: `interrupt_id` of an answer.")
    kind: InterruptKind = Field(description="review (the reviewer's question) or tool_approval.")
    payload: dict[str, Any] = Field(description="What it asks, as the graph raised it.")
    since: datetime = Field(description="When the session began to wait for it.")
    deadline: datetime | None = Field(
        default=None, description="When it ends as rejected (AGENTFLOW_HUMAN_TIMEOUT_S)."
    )

    @property
    def timeout_s(self) -> float | None:
        """How long it may wait, if it has a deadline."""
        return (self.deadline - self.since).total_seconds() if self.deadline else None


class QuestionStore:
    """The pending human interrupts of sessions (a hash each) and their deadlines.

    Written by the worker when a run stops at interrupts and when they are answered;
    read by the gateway and the CLI. A deadline is an entry in `Deadlines` that a worker's
    sweep turns into a `reject` answer (`service.worker.waits.HumanWaits`).

    Args:
        redis: a text client.
        topic: the events topic that deadlines' answers go to (a writer's; readers need none).
    """

    def __init__(self, redis: RedisClient, *, topic: str = "") -> None:
        self.redis = redis
        self.topic = topic
        self.deadlines = Deadlines(redis, HUMAN_DEADLINES_KEY, HUMAN_SWEEPER_KEY)

    def __repr__(self) -> str:
        return f"QuestionStore(topic={self.topic!r})"

    async def pending(self, session_id: str) -> list[PendingInterrupt]:
        """Return the interrupts a session waits on a human for, oldest first."""
        raw = cast(dict[str, str], await self.redis.hgetall(questions_key(session_id)))
        found = [PendingInterrupt.model_validate_json(v) for v in raw.values()]
        return sorted(found, key=lambda p: (p.since, p.id))

    async def find(self, session_id: str, interrupt_id: str) -> PendingInterrupt | None:
        """Return one pending interrupt of a session, or None."""
        raw = await self.redis.hget(questions_key(session_id), interrupt_id)
        return None if raw is None else PendingInterrupt.model_validate_json(raw)

    async def record(
        self,
        session_id: str,
        interrupts: list[tuple[Interrupt, InterruptKind]],
        *,
        timeout_s: float | None = None,
    ) -> list[PendingInterrupt]:
        """Record the interrupts a session now waits on a human for; forget the others.

        One already recorded keeps its `since` and deadline; a new one waits from now, and
        with `timeout_s` gets a deadline.
        """
        key = questions_key(session_id)
        known = {p.id: p for p in await self.pending(session_id)}
        now = utcnow()
        current: list[PendingInterrupt] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for interrupt, kind in interrupts:
                if interrupt.id in known:
                    current.append(known.pop(interrupt.id))
                    continue
                deadline = now + timedelta(seconds=timeout_s) if timeout_s else None
                value = interrupt.value if isinstance(interrupt.value, dict) else {}
                pending = PendingInterrupt(
                    id=interrupt.id, kind=kind, payload=value, since=now, deadline=deadline
                )
                pipe.hset(key, pending.id, pending.model_dump_json())
                if deadline is not None:
                    self.deadlines.add(pipe, self._member(session_id, pending.id), deadline)
                current.append(pending)
            self._forget(pipe, session_id, list(known))
            await pipe.execute()
        return current

    async def clear(self, session_id: str) -> None:
        """Forget every interrupt of a session (its run ended, or it was cancelled)."""
        known = [p.id for p in await self.pending(session_id)]
        if not known:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            self._forget(pipe, session_id, known)
            await pipe.execute()

    def _forget(self, pipe: Any, session_id: str, ids: list[str]) -> None:
        if ids:
            pipe.hdel(questions_key(session_id), *ids)
            self.deadlines.remove(pipe, *[self._member(session_id, i) for i in ids])

    def _member(self, session_id: str, interrupt_id: str) -> str:
        return self.deadlines.member(self.topic, session_id, interrupt_id)
