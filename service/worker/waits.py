"""What sessions wait for, timed durably: remote agents' tasks, and humans' answers.

A task is sent once, timed and settled once; a question is timed when
AGENTFLOW_HUMAN_TIMEOUT_S is set.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, cast

from aiokafka import AIOKafkaProducer
from langgraph.types import Interrupt

from nodes.models import RESUME_EVENT_TYPE, AgentWait, CloudEvent, utcnow
from nodes.protocol import (
    PROTOCOL_VERSION,
    WORKER_SOURCE,
    AgentCancel,
    AgentReply,
    AgentTask,
    encode,
    envelope,
)
from service.config import Settings
from service.storage._redis import RedisClient
from service.storage.deadlines import Deadlines
from service.storage.keys import DEADLINES_KEY, SWEEPER_KEY, waits_key
from service.storage.questions import QuestionStore

__all__ = ["HUMAN_TIMEOUT_SOURCE", "AgentWaits", "HumanWaits"]

logger = logging.getLogger(__name__)


class AgentWaits:
    """Send the tasks a session waits for, keep their deadlines, and settle them.

    A task is sent once: its wait is recorded in the session's `waits` hash with when it
    was sent and its deadline, and a run that waits for it again (the session resumed by
    another reply, or its event redelivered) finds it there. Deadlines are `Deadlines`,
    swept by every worker in turn; a task past its deadline gets a `timeout` reply on the
    replies topic, which the session's owner handles like any reply.

    Args:
        redis: a text client.
        producer: a started producer.
        settings: the topics and the session TTL.
    """

    def __init__(self, redis: RedisClient, producer: AIOKafkaProducer, settings: Settings) -> None:
        self.redis = redis
        self.producer = producer
        self.settings = settings
        self.deadlines = Deadlines(redis, DEADLINES_KEY, SWEEPER_KEY)
        self.sent = self.timed_out = 0

    def __repr__(self) -> str:
        return f"AgentWaits(sent={self.sent} timed_out={self.timed_out})"

    async def send(
        self, session_id: str, subject: str | None, interrupts: list[Interrupt]
    ) -> list[AgentWait]:
        """Send each task not sent yet; return every wait with since when and its deadline."""
        key = waits_key(session_id)
        known = cast(dict[str, str], await self.redis.hgetall(key))
        waits: list[AgentWait] = []
        for interrupt in interrupts:
            task = interrupt.value
            recorded = known.get(task["task_id"])
            if recorded is not None:
                waits.append(AgentWait.model_validate_json(recorded))
                continue
            since = utcnow()
            wait = AgentWait(
                task_id=task["task_id"],
                agent=task["agent"],
                step_id=task["step"]["id"],
                attempt=task.get("attempt", 1),
                timeout_s=task["timeout_s"],
                interrupt_id=interrupt.id,
                since=since,
                deadline=since + timedelta(seconds=float(task["timeout_s"])),
            )
            sent = _task(session_id, task, wait, self.settings.topic_agent_replies)
            await self._produce(self.settings.agent_topic(wait.agent), session_id, sent, subject)
            # Recorded after it is sent: a crash in between sends it again under the same
            # id, which a host answers once.
            assert wait.deadline is not None
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, wait.task_id, wait.model_dump_json())
                self.deadlines.add(pipe, self._member(session_id, wait.task_id), wait.deadline)
                await pipe.execute()
            self.sent += 1
            waits.append(wait)
        return waits

    async def settle(self, session_id: str, task_ids: list[str]) -> None:
        """Forget tasks that were answered (or cancelled): no deadline wakes them again."""
        if not task_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(waits_key(session_id), *task_ids)
            self.deadlines.remove(pipe, *[self._member(session_id, t) for t in task_ids])
            await pipe.execute()

    async def find(self, session_id: str, task_id: str) -> AgentWait | None:
        """Return a task a session waits for, or None."""
        raw = await self.redis.hget(waits_key(session_id), task_id)
        return None if raw is None else AgentWait.model_validate_json(raw)

    async def pending(self, session_id: str) -> list[AgentWait]:
        """Return the tasks a session waits for."""
        raw = cast(dict[str, str], await self.redis.hgetall(waits_key(session_id)))
        return [AgentWait.model_validate_json(v) for v in raw.values()]

    async def cancel(self, session_id: str, reason: str) -> int:
        """Tell the hosts of a session's pending tasks to stop them; returns how many."""
        waits = await self.pending(session_id)
        for wait in waits:
            cancel = AgentCancel(task_id=wait.task_id, session_id=session_id, reason=reason)
            await self._produce(self.settings.agent_topic(wait.agent), session_id, cancel)
        await self.settle(session_id, [w.task_id for w in waits])
        return len(waits)

    async def sweep(self, *, lock_s: float = 5.0, batch: int = 100) -> int:
        """Send a `timeout` reply for each task past its deadline; returns how many.

        The reply of a task answered meanwhile finds no task pending and is dropped.
        """
        return await self.deadlines.sweep(self._time_out, lock_s=lock_s, batch=batch)

    async def _time_out(self, replies: str, session_id: str, task_id: str) -> None:
        """Send a task's `timeout` reply to the replies topic of the worker that sent it."""
        recorded = await self.redis.hget(waits_key(session_id), task_id)
        if recorded is None:
            return
        wait = AgentWait.model_validate_json(recorded)
        timeout = AgentReply(
            task_id=task_id,
            agent=wait.agent,
            status="timeout",
            error=f"no reply within {wait.timeout_s:g} s",
        )
        await self._produce(replies, session_id, timeout)
        self.timed_out += 1

    def _member(self, session_id: str, task_id: str) -> str:
        """A task's entry in the deadlines: `<replies topic> <session id> <task id>`."""
        return self.deadlines.member(self.settings.topic_agent_replies, session_id, task_id)

    async def _produce(
        self,
        topic: str,
        session_id: str,
        data: AgentTask | AgentReply | AgentCancel,
        subject: str | None = None,
    ) -> None:
        event = envelope(data, session_id=session_id, source=WORKER_SOURCE, subject=subject)
        await self.producer.send_and_wait(topic, encode(event), key=session_id.encode())


def _task(session_id: str, task: dict[str, Any], wait: AgentWait, reply_to: str) -> AgentTask:
    """The protocol's task for a wait's interrupt payload (see `nodes.execution`)."""
    assert wait.deadline is not None
    return AgentTask.model_validate(
        {
            **{k: task[k] for k in ("step", "intent", "event", "inputs", "feedback", "history")},
            "task_id": wait.task_id,
            "session_id": session_id,
            "agent": wait.agent,
            "attempt": wait.attempt,
            "deadline": wait.deadline,
            "reply_to": reply_to,
            "protocol_version": PROTOCOL_VERSION,
        }
    )


HUMAN_TIMEOUT_SOURCE = "agentflow/human-timeout"
"""The `source` of the `reject` answers a question's deadline sends (who answered)."""


class HumanWaits:
    """End questions nobody answered in time: a `reject` answer on the events topic.

    The deadlines are `QuestionStore`'s, swept like the remote agents' (`Deadlines`). The
    answer is an `agentflow.resume` event keyed by the session, so the worker that owns
    the session's partition handles it like any answer, after the session's events before
    it; one for a question answered meanwhile finds nothing to answer and is dropped.

    Args:
        questions: the pending questions, with the events topic.
        producer: a started producer.
    """

    def __init__(self, questions: QuestionStore, producer: AIOKafkaProducer) -> None:
        self.questions = questions
        self.producer = producer
        self.timed_out = 0

    def __repr__(self) -> str:
        return f"HumanWaits(timed_out={self.timed_out})"

    async def sweep(self, *, lock_s: float = 5.0, batch: int = 100) -> int:
        """Send a `reject` answer for each question past its deadline; returns how many."""
        return await self.questions.deadlines.sweep(self._time_out, lock_s=lock_s, batch=batch)

    async def _time_out(self, topic: str, session_id: str, interrupt_id: str) -> None:
        pending = await self.questions.find(session_id, interrupt_id)
        if pending is None or pending.timeout_s is None:
            return
        answer = {
            "interrupt_id": interrupt_id,
            "decision": "reject",
            "feedback": f"no answer within {pending.timeout_s:g} s",
        }
        event = CloudEvent.wrap(
            RESUME_EVENT_TYPE, answer, session_id=session_id, source=HUMAN_TIMEOUT_SOURCE
        )
        await self.producer.send_and_wait(
            topic, event.model_dump_json(exclude_none=True).encode(), key=session_id.encode()
        )
        self.timed_out += 1
