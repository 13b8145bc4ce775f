"""One event of a session: process, resume or cancel it, and finish the session's run."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.structs import ConsumerRecord
from langgraph.checkpoint.base import BaseCheckpointSaver

from nodes.errors import AnswerError, EventValidationError, ProtocolError
from nodes.finalize import build_result
from nodes.models import (
    CANCEL_EVENT_TYPE,
    CloudEvent,
    MultitaskStrategy,
    ResultStatus,
    WorkflowResult,
    answer_origin,
    derived_session_id,
    session_id_problem,
)
from nodes.protocol import MESSAGE, REPLY, parse_agent_event
from service.bootstrap import is_infra_error
from service.config import Settings
from service.errors import UnknownSessionError
from service.observe import metrics
from service.runtime.runner import SessionRunner, interrupt_kind
from service.storage.checkpoints import expire_session
from service.storage.questions import QuestionStore
from service.storage.sessions import WAITS, SessionStore
from service.storage.transitions import ENDED_STATUSES, Transition, TransitionType
from service.worker.crash_points import crash_point
from service.worker.outbox import RESULT, Outbox
from service.worker.waits import HUMAN_TIMEOUT_SOURCE, AgentWaits

__all__ = ["STATE_LOST", "EventHandler"]

logger = logging.getLogger(__name__)

STATE_LOST = "session state lost"
"""The reason a live session ends failed when its checkpoints are gone."""
ROLLBACK = "agentflow.rollback"
"""The message a run's task is cancelled with when a newer event rolls it back."""
_KEEPS_STATE = frozenset({"interrupted", "waiting", "superseded", "rolled_back"})
"""Statuses after which a session goes on: its checkpoints get no retention TTL yet."""


async def _nothing() -> None:
    return None


class EventHandler:
    """Run the events of sessions: each after the session's previous one, through outages.

    An event runs the graph for its session (`agentflow.resume` continues an interrupted
    run with its answer, `agentflow.cancel` ends the session), then the result goes out
    through the outbox. An event that already has its result is not run again; one that
    cannot be parsed goes to the dead-letter topic. Redis and Kafka outages are retried
    with backoff, never turned into a failed run.
    """

    def __init__(
        self,
        runner: SessionRunner,
        store: SessionStore,
        outbox: Outbox,
        settings: Settings,
        *,
        on_degraded: Callable[[str | None], None] = lambda reason: None,
        restore_setup: Callable[[], Awaitable[None]] | None = None,
        waits: AgentWaits | None = None,
        questions: QuestionStore | None = None,
    ) -> None:
        """Run events with these collaborators.

        Args:
            runner: runs the graph for a session.
            store: session records and which events were seen.
            outbox: sends results, lifecycle messages and dead letters.
            settings: `AGENTFLOW_MAX_EVENT_BYTES`, `_MAX_JSON_DEPTH`, `_MAX_ID_BYTES` and
                `_SESSION_TTL_S` are read.
            on_degraded: told why Redis or Kafka is away, and None once they answer again.
            restore_setup: sets up Redis again (indexes) after it lost its setup.
            waits: sends the remote agents' tasks a run waits for (none: a run that waits
                for a remote agent fails, as nothing would send its task).
            questions: where the interrupts sessions wait on humans for are recorded,
                with their deadlines (none: they are not listed, and have no deadline).
        """
        self.runner = runner
        self.store = store
        self.outbox = outbox
        self.settings = settings
        self.on_degraded = on_degraded
        self.restore_setup = restore_setup or _nothing
        self.waits = waits
        self.questions = questions
        self.completed = self.failed = self.duplicates = 0
        self._started: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._stopped: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._superseded: weakref.WeakKeyDictionary[asyncio.Task[Any], tuple[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._driving: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

    def strategy(self, event: CloudEvent) -> MultitaskStrategy:
        """What an event does to its session when the session is busy."""
        return event.multitask or self.settings.multitask

    def supersede(self, task: asyncio.Task[Any], how: MultitaskStrategy, by: str) -> None:
        """Stop an earlier event's run of a session for a newer event `by`.

        `interrupt`: the run stops at its next step boundary, its checkpoints kept.
        `rollback`: the run stops now, and its checkpoints are deleted. An event not
        started yet ends the same way without running.
        """
        if task.done() or task in self._superseded:
            return
        self._superseded[task] = (how, by)
        if how == "rollback" and task in self._started:
            task.cancel(msg=ROLLBACK)

    def stop_for_cancel(self, task: asyncio.Task[Any]) -> None:
        """Stop an event's task for an `agentflow.cancel` event of its session.

        A task that has not run its first step yet (taken in the same poll as the cancel)
        is only marked: cancelled before that step it would never enter `handle`, so its
        event would get no result and its offset would never be committed.
        """
        if task in self._started:
            task.cancel(msg=CANCEL_EVENT_TYPE)
        else:
            self._stopped.add(task)

    def __repr__(self) -> str:
        return (
            f"EventHandler(completed={self.completed} failed={self.failed} "
            f"duplicates={self.duplicates})"
        )

    def parse(self, record: ConsumerRecord) -> tuple[str, CloudEvent | None, str | None]:
        """Read a record: its session id, and the event or why it cannot be processed.

        The session is the event's `sessionid`, else the record's key, else one derived
        from the event id. Key and attribute keep the one session-id rule; a key that is
        not UTF-8 is not a session id (it is not patched into one).
        """
        key: str | None = None
        value: bytes = record.value or b""
        if record.key:  # an empty key is no key
            try:
                key = record.key.decode()
            except UnicodeDecodeError:
                return "", None, "the record's key (its session id) is not valid UTF-8"
            if (problem := session_id_problem(key)) is not None:
                return "", None, f"the record's key is not a session id: {problem}"
        if len(value) > self.settings.max_event_bytes:
            return (
                key or "",
                None,
                (
                    f"event of {len(value)} bytes exceeds AGENTFLOW_MAX_EVENT_BYTES "
                    f"({self.settings.max_event_bytes})"
                ),
            )
        try:
            event = CloudEvent.parse(value, self.settings.event_limits())
        except EventValidationError as exc:
            return key or "", None, str(exc)
        session_id = event.sessionid or key or derived_session_id(event.id)
        if event.is_resume and not (event.sessionid or key):
            return session_id, None, "resume event without a sessionid attribute"
        return session_id, event, None

    def parse_agent(self, record: ConsumerRecord) -> tuple[str, str, dict[str, Any], str | None]:
        """Read a record of the replies topic: its session, type and data, or what is wrong."""
        try:
            event = parse_agent_event(record.value or b"", accept=(REPLY, MESSAGE))
        except ProtocolError as exc:
            key = record.key.decode(errors="replace") if record.key else ""
            return key, "", {}, f"agent reply: {exc}"
        return event.sessionid, event.type, event.data.model_dump(mode="json"), None

    async def handle_agent(
        self,
        record: ConsumerRecord,
        session_id: str,
        kind: str,
        data: dict[str, Any],
        problem: str | None,
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Handle a record of the replies topic: a reply, an agent's message, or a malformed one.

        A reply runs after the session's events before it; a malformed record is
        dead-lettered with its reason.
        """
        if previous is not None:
            await asyncio.wait([previous])
        if problem is not None:
            await self._retrying(self.outbox.dead_letter, record, problem)
        elif kind == "agentflow.agent.message":
            await self._retrying(self.agent_message, session_id, data)
        else:
            await self._retrying(self.reply, record, session_id, data)

    async def agent_message(self, session_id: str, data: dict[str, Any]) -> None:
        """Publish what a remote agent says while it works, as an `agent.message` transition."""
        wait = await self.waits.find(session_id, str(data["task_id"])) if self.waits else None
        if wait is None:
            logger.info("message of task %s, not waited for, dropped", data["task_id"])
            return
        await self.runner.emit(
            Transition(
                session_id=session_id,
                type="agent.message",
                step_id=wait.step_id,
                agent=wait.agent,
                data={
                    "content": str(data.get("content", ""))[:2000],
                    "tool_calls": data.get("tool_calls") or [],
                    "task_id": wait.task_id,
                },
            )
        )

    async def handle(
        self,
        record: ConsumerRecord,
        session_id: str,
        event: CloudEvent | None,
        problem: str | None,
        previous: asyncio.Task[None] | None,
        *,
        busy: bool = False,
    ) -> None:
        """Handle one record, after `previous` (the session's event before it) is done.

        Returns when the event is done: its result or dead letter is sent. A cancel event
        of the session may stop it on the way (the run ends as cancelled, not
        redelivered), and so may a newer event that rolls it back.

        Args:
            record: the event's record.
            session_id: its session.
            event: the event, None when it cannot be processed.
            problem: why it cannot be processed.
            previous: the session's event before it, still going when this one came.
            busy: a run of the session was going when this event came: a new event that
                says `reject` is refused at once.

        Raises:
            asyncio.CancelledError: cancelled otherwise (shutdown, revoked partition): the
                event is left for redelivery.
            StaleWriter: another worker took the session while this event ran: nothing
                more was written or sent for it, and the other worker runs it.
        """
        me = asyncio.current_task()
        assert me is not None
        self._started.add(me)
        cancelled = me in self._stopped
        rolled_back = self._superseded.get(me, ("", ""))[0] == "rollback"
        if cancelled and previous is not None and not previous.done():
            self.stop_for_cancel(previous)
        refuse = busy and event is not None and _is_new(event) and self.strategy(event) == "reject"
        if refuse:
            previous = None  # refused at once, not after the run that keeps the session busy
        while True:
            try:
                if previous is not None:
                    await asyncio.wait([previous])  # per-session order
                if event is None:
                    reason = problem or "invalid event"
                    await self._retrying(self.outbox.dead_letter, record, reason)
                elif cancelled and not event.is_cancel:
                    await self._retrying(self.cancel, record, session_id, event)
                elif rolled_back:
                    await self._retrying(self.roll_back, record, session_id, event)
                else:
                    await self._retrying(self.process, record, session_id, event, refuse=refuse)
                return
            except asyncio.CancelledError as exc:
                if exc.args == (ROLLBACK,):
                    # A newer event of this session rolls this run back: after the events
                    # before it (stopped too), its checkpoints go and its result says so.
                    me.uncancel()
                    rolled_back = True
                    continue
                if exc.args != (CANCEL_EVENT_TYPE,):
                    raise
                # An agentflow.cancel event of this session: the run ends as cancelled
                # (not redelivered), and so do the session's events queued before it.
                me.uncancel()
                cancelled = True
                if previous is not None and not previous.done():
                    self.stop_for_cancel(previous)

    async def _retrying(
        self, func: Callable[..., Awaitable[None]], *args: Any, **kwargs: Any
    ) -> None:
        """Run `func` until it gets through Redis and Kafka outages.

        After an outage Redis may have come back empty, without its search indexes, and
        the graph's nodes would meet that as failed steps: `restore_setup` runs before
        `func` runs again.
        """
        delay = 0.25
        lost = False
        while True:
            try:
                if lost:
                    await self.restore_setup()
                    lost = False
                await func(*args, **kwargs)
                self.on_degraded(None)
                return
            except Exception as exc:
                if not is_infra_error(exc):
                    raise
                lost = True  # a connection error, or "no such index" (`setup_lost`)
                self.on_degraded(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def process(
        self,
        record: ConsumerRecord,
        session_id: str,
        event: CloudEvent,
        *,
        refuse: bool = False,
        parked: bool = False,
    ) -> None:
        """Run an event, unless it already has its result; resume and cancel events too.

        An event id belongs to the first session that takes it: a redelivery to that
        session is skipped (or continued), a delivery to another session is dead-lettered.
        A new event for a session that waits for an answer is refused (`reject`) or parked
        until the wait ends (every other strategy): the question is never dropped.

        Args:
            record: the event's record.
            session_id: its session.
            event: the event.
            refuse: a run of the session was going when it came and it says `reject`.
            parked: it was parked behind the session and its turn has come.
        """
        claim, owner = await self.store.claim_event(event.id, session_id)
        if owner != session_id:
            await self._duplicate(record, event, owner)
            return
        if claim == "published" or (claim == "parked" and not parked):
            self.duplicates += 1
            logger.info("event %s already has its result or waits its turn; skipped", event.id)
            if claim == "published":
                await self._run_parked(session_id)  # a crash may have cut a drain short
            return
        if claim == "finished" and await self._publish_finished(record, session_id, event.id):
            return  # crashed between the result and its publication
        if event.is_resume:
            await self.resume(record, session_id, event, redelivered=claim != "new")
            await self._run_parked(session_id)
            return
        if event.is_cancel:
            await self.cancel(record, session_id, event)
            await self._run_parked(session_id)
            return
        if refuse:
            await self.refuse(record, session_id, event, f"session {session_id} is running")
            return
        if not parked and await self._parks_or_refuses(record, session_id, event):
            return
        await self.store.open(
            session_id, event_id=event.id, event_type=event.type, subject=event.subject
        )
        if claim in ("new", "parked"):
            await (await self.outbox.session_message("session.started", session_id, event.id))
        me = asyncio.current_task()
        assert me is not None
        self._driving.add(me)
        with metrics.timed_run() as run:
            result = await self.runner.start(event, session_id, stop=self._stop_check(me))
            run.status = result.status
        await self.finish(result, record)

    def _stop_check(self, task: asyncio.Task[Any]) -> Callable[[], str | None]:
        """Return what a run asks at its step boundaries: the event that interrupts it."""

        def superseded_by() -> str | None:
            how, by = self._superseded.get(task, ("", ""))
            return by if how == "interrupt" else None

        return superseded_by

    async def _parks_or_refuses(
        self, record: ConsumerRecord, session_id: str, event: CloudEvent
    ) -> bool:
        """Park or refuse a new event when its session waits (for a human, or for agents).

        Events parked before it run first when the session no longer waits (a crash
        left them). A wait for remote agents gives way to an event that says `interrupt`
        or `rollback` (`_end_wait`); a human's question never does. Returns whether the
        event was parked or refused.
        """
        waiting, parked = await self.store.busy(session_id)
        if parked and not waiting:
            await self._run_parked(session_id)
            waiting, parked = await self.store.busy(session_id)
        if not waiting and not parked:
            return False
        strategy = self.strategy(event)
        on = "remote agents" if waiting == "waiting" else "a human answer"
        if strategy == "reject":
            await self.refuse(record, session_id, event, f"session {session_id} waits for {on}")
            return True
        if waiting == "waiting" and not parked and strategy in ("interrupt", "rollback"):
            # A run that waits for remote agents is at a step boundary: it stops there.
            await self._end_wait(session_id, strategy, event.id)
            return False
        await self.store.park(session_id, _pack(record))
        await self.store.mark_event(event.id, session_id, "parked")
        reason = f"waits until session {session_id} no longer waits for {on}, or is cancelled"
        await self.runner.emit(
            Transition(
                session_id=session_id,
                type="event.parked",
                data={"event_id": event.id, "reason": reason},
            )
        )
        logger.info("event %s parked: session %s waits for %s", event.id, session_id, on)
        return True

    async def _end_wait(self, session_id: str, how: MultitaskStrategy, by: str) -> None:
        """End a run that waits for remote agents, for a newer event (interrupt, rollback).

        Its tasks are cancelled, and the event it answers gets its result.

        `interrupt` keeps the run's checkpoints (the newer event runs on its state),
        `rollback` deletes them (the newer event runs from the state before it).
        """
        known = await self.store.get(session_id)
        awaited = known.waiting_event if known is not None else None
        status: ResultStatus = "superseded" if how == "interrupt" else "rolled_back"
        kind: TransitionType = "session.superseded" if how == "interrupt" else "session.rolled_back"
        error = f"{status.replace('_', ' ')} by event {by}"
        if self.waits is not None:
            await self.waits.cancel(session_id, error)
        snapshot = await self.runner.graph.aget_state(self.runner.config(session_id))
        if how == "rollback":
            run_id = await self.runner.run_of(session_id)
            checkpointer = self.runner.graph.checkpointer
            if run_id and isinstance(checkpointer, BaseCheckpointSaver):
                await checkpointer.adelete_for_runs([run_id])
        result = build_result(
            snapshot.values or {}, session_id=session_id, status=status, error=error
        )
        result.event_id = awaited or result.event_id
        await self.runner.emit(
            Transition(
                session_id=session_id,
                type=kind,
                data={
                    "status": status,
                    "error": error,
                    "by": by,
                    "result": result.model_dump(mode="json"),
                },
            )
        )
        await self.finish(result)

    async def _run_parked(self, session_id: str) -> None:
        """Run the events parked behind a session, in order, while it does not wait.

        Each leaves the list only after it ran: after a crash it is found first again,
        and its claim makes the second run a continuation, never a second result.
        """
        while (entry := await self.store.first_parked(session_id)) is not None:
            waiting, _ = await self.store.busy(session_id)
            if waiting:
                return
            record = _unpack(entry)
            _, event, problem = self.parse(record)
            if event is None:  # parked once valid; cannot happen unless the rules changed
                await self.outbox.dead_letter(record, problem or "invalid event")
            else:
                await self.process(record, session_id, event, parked=True)
            await self.store.unpark(session_id, entry)

    async def refuse(
        self, record: ConsumerRecord, session_id: str, event: CloudEvent, reason: str
    ) -> None:
        """Refuse an event for a busy session (`reject`): its result says so, nothing ran."""
        error = f"refused: {reason}"
        result = build_result({}, session_id=session_id, status="refused", error=error)
        result.event_id = event.id
        await self.runner.emit(
            Transition(
                session_id=session_id,
                type="event.refused",
                data={
                    "status": "refused",
                    "error": error,
                    "result": result.model_dump(mode="json"),
                },
            )
        )
        await self._send_result(record, result)

    async def roll_back(self, record: ConsumerRecord, session_id: str, event: CloudEvent) -> None:
        """End a run that a newer event rolls back: its checkpoints go, its result says so.

        The session's state is what it was before the run began, so the newer event runs
        from there. A run that finished before it could be stopped keeps its result.
        """
        me = asyncio.current_task()
        assert me is not None
        _, by = self._superseded.get(me, ("rollback", ""))
        state, owner = await self.store.claim_event(event.id, session_id)
        if owner != session_id:
            await self._duplicate(record, event, owner)
            return
        if state == "published":
            return
        if state == "finished" and await self._publish_finished(record, session_id, event.id):
            return
        if me in self._driving:
            run_id = event.id if not event.is_resume else await self.runner.run_of(session_id)
            checkpointer = self.runner.graph.checkpointer
            if run_id and isinstance(checkpointer, BaseCheckpointSaver):
                await checkpointer.adelete_for_runs([run_id])
        error = f"rolled back by event {by}"
        result = build_result({}, session_id=session_id, status="rolled_back", error=error)
        result.event_id = event.id
        await self.runner.emit(
            Transition(
                session_id=session_id,
                type="session.rolled_back",
                data={
                    "status": "rolled_back",
                    "error": error,
                    "by": by,
                    "result": result.model_dump(mode="json"),
                },
            )
        )
        await self.finish(result, record)

    async def resume(
        self, record: ConsumerRecord, session_id: str, event: CloudEvent, *, redelivered: bool
    ) -> None:
        """Continue an interrupted session with the decision an `agentflow.resume` event holds.

        `data` holds the decision (`decision`, `interrupt_id`, `feedback`, `steps`,
        `args`) or free text under `answer` (or is that text). An answer that cannot be
        taken (no decision, an unknown interrupt, steps that do not exist) is
        dead-lettered with the reason, like a resume for an unknown session.
        """
        data = event.data
        if data is None or (isinstance(data, dict) and not {"decision", "answer"} & set(data)):
            reason = "resume event without data.decision or data.answer"
            await self._reject(record, session_id, event, reason)
            return
        me = asyncio.current_task()
        assert me is not None
        stop = self._stop_check(me)
        self._driving.add(me)
        source, who = answer_origin(event)
        try:
            with metrics.timed_run() as run:
                try:
                    answer = await self.runner.check_answer(
                        session_id, data, source=source, who=who, event_id=event.id
                    )
                    await self.store.answered(session_id, answer)
                    result = await self.runner.resume(
                        session_id, answer, event_id=event.id, stop=stop
                    )
                except UnknownSessionError:
                    # A redelivered answer whose run was under way: continue that run.
                    if not redelivered:
                        raise
                    result = await self.runner.continue_run(
                        session_id, event_id=event.id, stop=stop
                    )
                run.status = result.status
        except (UnknownSessionError, AnswerError) as exc:
            if event.source == HUMAN_TIMEOUT_SOURCE:
                # A deadline's answer to a question answered meanwhile: nothing to end.
                logger.info("session %s: %s; the deadline's answer is dropped", session_id, exc)
                await self.store.release_event(event.id, session_id)
                return
            if isinstance(exc, AnswerError):
                await self._reject(record, session_id, event, f"answer refused: {exc}")
                return
            if await self._state_lost(record, session_id, event):
                return
            await self._reject(record, session_id, event, f"unknown session for resume: {exc}")
            return
        await self.finish(result, record)

    async def _state_lost(self, record: ConsumerRecord, session_id: str, event: CloudEvent) -> bool:
        """End a live session whose checkpoints are gone as failed: `session state lost`.

        Its record says it runs or waits for an answer, but nothing is left to go on from
        (Redis lost its data): the session ends with a reason instead of running on from
        nothing. Returns whether it did; False for a session that is unknown or ended.
        """
        record = await self.store.get(session_id)
        if record is None or record.status not in ("running", *WAITS):
            return False
        snapshot = await self.runner.graph.aget_state(self.runner.config(session_id))
        if snapshot.values:
            return False
        error = STATE_LOST
        logger.warning("session %s: %s (no checkpoint left to resume)", session_id, error)
        result = build_result({}, session_id=session_id, status="failed", error=error)
        result.event_id = event.id
        await self.runner.emit(
            Transition(
                session_id=session_id,
                type="session.failed",
                data={"status": "failed", "error": error, "result": result.model_dump(mode="json")},
            )
        )
        await self.finish(result, record)
        return True

    async def cancel(self, record: ConsumerRecord, session_id: str, event: CloudEvent) -> None:
        """Cancel a session for an `agentflow.cancel` event, or for the run it stopped.

        A cancel (or a stopped resume) for a session that does not exist is dead-lettered.
        A session's first event stopped before it ran opens the session, which ends
        cancelled.
        """
        if not event.is_cancel:  # a run stopped by a cancel: it may have finished already
            state, owner = await self.store.claim_event(event.id, session_id)
            if owner != session_id:
                await self._duplicate(record, event, owner)
                return
            if state == "published":
                return
            if state == "finished" and await self._publish_finished(record, session_id, event.id):
                return
        snapshot = await self.runner.graph.aget_state(self.runner.config(session_id))
        known = await self.store.get(session_id)
        if known is None and not snapshot.values:
            if event.is_cancel or event.is_resume:
                kind = "cancel" if event.is_cancel else "resume"
                reason = f"unknown session for {kind}: session {session_id} does not exist"
                await self._reject(record, session_id, event, reason)
                return
            await self.store.open(
                session_id, event_id=event.id, event_type=event.type, subject=event.subject
            )
            status: str | None = "running"
        else:
            status = known.status if known is not None else None
        live = status in ("running", *WAITS)
        ended = status in ENDED_STATUSES
        error = f"nothing to cancel: session {status}" if ended else "cancelled"
        result = build_result(
            snapshot.values or {}, session_id=session_id, status="failed", error=error
        )
        result.event_id = event.id
        if live:
            if status == "waiting" and known is not None:
                # The tasks out are called off, and the event the wait was for gets its
                # one result: the run it began ends here.
                if self.waits is not None:
                    await self.waits.cancel(session_id, "cancelled")
                if known.waiting_event and known.waiting_event != event.id:
                    awaited = result.model_copy(update={"event_id": known.waiting_event})
                    await self._send_result(record, awaited)
            checkpointer = self.runner.graph.checkpointer
            await expire_session(
                checkpointer,
                session_id,
                self.settings.session_ttl_s,
                retention=self.settings.checkpoint_retention,
            )
            if self.questions is not None:
                await self.questions.clear(session_id)
            await self.store.close(result, status="cancelled")
            await self.runner.emit(
                Transition(
                    session_id=session_id,
                    type="session.failed",
                    data={
                        "status": "failed",
                        "error": error,
                        "result": result.model_dump(mode="json"),
                    },
                )
            )
        await self._send_result(record, result)

    async def _send_result(self, record: ConsumerRecord, result: WorkflowResult) -> None:
        """Send the result of an event that leaves the session record alone (cancel, refusal).

        Marked finished with where it will land first, as `finish` does.
        """
        sent_from = await self.outbox.positions(result.session_id)
        await self.store.mark_event(
            result.event_id, result.session_id, "finished", sent_from=sent_from
        )
        crash_point("finished")
        await self.outbox.publish_result(result, source=record)

    async def _duplicate(self, record: ConsumerRecord, event: CloudEvent, owner: str) -> None:
        """Dead-letter a delivery of an event id that another session already took."""
        reason = f"duplicate event id: {event.id!r} already belongs to session {owner}"
        await self.outbox.dead_letter(record, reason)

    async def _reject(
        self, record: ConsumerRecord, session_id: str, event: CloudEvent, reason: str
    ) -> None:
        """Dead-letter a claimed event that gets no result, forgetting its claim first.

        Forgotten first: a crash between the two redelivers the event, which is claimed
        and dead-lettered again, rather than leaving a `running` claim behind for days.
        """
        await self.store.release_event(event.id, session_id)
        await self.outbox.dead_letter(record, reason)

    async def finish(self, result: WorkflowResult, record: ConsumerRecord | None = None) -> None:
        """Close a run: retention for an ended session, its record, its result out.

        The event is marked finished with its result and the ends of the partitions its
        messages go to, before they are sent: a crash after that leaves a result in doubt
        that a redelivery settles by reading those partitions back (`_publish_finished`).

        Args:
            result: the run's result.
            record: the event's record (its offset, for a Kafka transaction).
        """
        crash_point("checkpoint")  # the run's final checkpoint is written
        if result.status == "waiting":
            await self._wait(result)
            return
        if self.questions is not None and result.status == "interrupted":
            asked = await self.runner.questions(result.session_id)
            await self.questions.record(
                result.session_id,
                [(i, interrupt_kind(i)) for i in asked],
                timeout_s=self.settings.human_timeout_s,
            )
        elif self.questions is not None and result.status in ENDED_STATUSES:
            await self.questions.clear(result.session_id)
        retention: Awaitable[object]
        if result.status in _KEEPS_STATE:
            retention = _nothing()  # a session that waits, or goes on with a newer event
        else:
            retention = expire_session(
                self.runner.graph.checkpointer,
                result.session_id,
                self.settings.session_ttl_s,
                retention=self.settings.checkpoint_retention,
            )
        # Side by side: the session's record says it ended one round trip after its stream.
        sent_from, _ = await asyncio.gather(self.outbox.positions(result.session_id), retention)
        await self.store.close(result, finished_event=result.event_id, sent_from=sent_from)
        crash_point("finished")
        await self.outbox.publish_result(result, source=record)
        if result.status == "failed":
            self.failed += 1
        elif result.status in ("completed", "rejected", "interrupted"):
            self.completed += 1

    async def _wait(self, result: WorkflowResult) -> None:
        """Send the tasks a run waits for, once each, and record that the session waits.

        No result goes out: the event's one result comes when a run resumed by the
        replies reaches an end. The event's offset can be committed meanwhile.
        """
        session_id = result.session_id
        tasks = await self.runner.agent_tasks(session_id)
        if self.waits is None:
            raise RuntimeError("a run waits for a remote agent, and no AgentWaits sends tasks")
        known = await self.store.get(session_id)
        subject = known.subject if known is not None else None
        result.waiting_on = await self.waits.send(session_id, subject, tasks)
        await self.store.close(result)
        logger.info(
            "session %s waits for %s",
            session_id,
            ", ".join(f"{w.agent} (task {w.task_id})" for w in result.waiting_on),
        )

    async def reply(self, record: ConsumerRecord, session_id: str, reply: dict[str, Any]) -> None:
        """Resume a session that waits for a remote agent with the agent's reply.

        A reply for a task the session does not wait for (a duplicate, a late one, an
        unknown task) is logged and dropped: it is never applied twice. When the run ends
        (not in another wait), the result goes to the event the session waited for.
        """
        task_id = str(reply["task_id"])
        known = await self.store.get(session_id)
        awaited = known.waiting_event if known is not None else None
        me = asyncio.current_task()
        assert me is not None
        self._driving.add(me)
        try:
            with metrics.timed_run() as run:
                result = await self.runner.reply(
                    session_id, task_id, reply, stop=self._stop_check(me)
                )
                run.status = result.status
        except UnknownSessionError:
            logger.info(
                "reply to task %s of session %s dropped: the session does not wait for it",
                task_id,
                session_id,
            )
            if awaited and await self.store.event_state(awaited) == "finished":
                # A crash between the result of the run this reply resumed and its
                # publication: the redelivered reply publishes it, once.
                await self._publish_finished(record, session_id, awaited)
            return
        if self.waits is not None:
            await self.waits.settle(session_id, [task_id])
        if awaited:
            result.event_id = awaited
        await self.finish(result, record)
        await self._run_parked(session_id)

    async def _publish_finished(
        self, record: ConsumerRecord, session_id: str, event_id: str
    ) -> bool:
        """Publish the result of an event that finished before a crash, never twice.

        What Kafka took before the crash is read back from where the event recorded its
        messages would land, and only what is missing is sent. Returns False when the
        result is nowhere (the session record lost it, and Kafka does not have it): the
        event runs again.
        """
        sent_from = await self.store.sent_from(event_id)
        result = await self._stored_result(session_id, event_id)
        if result is None and sent_from:  # Redis lost the record: Kafka may have it
            value = (await self.outbox.landed(event_id, sent_from)).get(RESULT)
            if value is not None:
                result = WorkflowResult.model_validate_json(value)
        if result is None:
            return False
        await self.outbox.publish_result(result, sent_from=sent_from, source=record)
        return True

    async def _stored_result(self, session_id: str, event_id: str) -> WorkflowResult | None:
        record = await self.store.get(session_id)
        if record and record.result and record.result.event_id == event_id:
            return record.result
        return None


def _is_new(event: CloudEvent) -> bool:
    """Whether an event starts a run of its own (not an answer, not a cancel)."""
    return not event.is_resume and not event.is_cancel


def _pack(record: ConsumerRecord) -> str:
    """An event's record as parked in Redis: enough to run it, or dead-letter it, later."""
    return json.dumps(
        {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp": record.timestamp,
            "key": base64.b64encode(record.key).decode() if record.key is not None else None,
            "value": base64.b64encode(record.value or b"").decode(),
        }
    )


def _unpack(entry: str) -> ConsumerRecord:
    raw = json.loads(entry)
    key = base64.b64decode(raw["key"]) if raw["key"] is not None else None
    value = base64.b64decode(raw["value"])
    return ConsumerRecord(
        topic=raw["topic"],
        partition=raw["partition"],
        offset=raw["offset"],
        timestamp=raw["timestamp"],
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value),
        headers=(),
    )
