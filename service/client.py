"""Talking to a running agentflow from outside: send events, follow and answer sessions."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

from nodes.models import (
    RESUME_EVENT_TYPE,
    CloudEvent,
    HumanDecision,
    WorkflowResult,
    derived_session_id,
)
from service.bootstrap import (
    RedisClient,
    kafka_admin,
    kafka_consumer,
    kafka_producer,
    redis_client,
    require_services,
)
from service.config import Settings, redact_url
from service.errors import UnknownSessionError
from service.storage.keys import log_key, session_key
from service.storage.publisher import ended_at, ended_by, follow, newest_seq, read_log
from service.storage.questions import PendingInterrupt, QuestionStore
from service.storage.sessions import SessionRecord, SessionStore
from service.storage.transitions import Transition
from service.storage.workers import read_worker_states

__all__ = [
    "follow_event",
    "health_problems",
    "last_seq",
    "pending_interrupts",
    "produce_event",
    "resume_event",
    "send_and_follow",
    "session_id_for",
    "wait_for_result",
    "waiting_session",
    "watch_session",
]

OnTransition = Callable[[Transition], object]
"""Called with each transition as it is read."""


def session_id_for(event: CloudEvent) -> str:
    """The session an event belongs to: its `sessionid`, else one derived from its id.

    See `nodes.models.derived_session_id`: `session-{id}`, or a digest of a long id.
    """
    return event.sessionid or derived_session_id(event.id)


async def produce_event(settings: Settings, event: CloudEvent) -> str:
    """Produce an event to the events topic, keyed by its session id; return the id."""
    session_id = session_id_for(event)
    producer = kafka_producer(settings)
    try:  # stopped even when it could not start: it holds a client all the same
        await producer.start()
        await producer.send_and_wait(
            settings.topic_events,
            event.model_dump_json(exclude_none=True).encode(),
            key=session_id.encode(),
        )
    finally:
        await producer.stop()
    return session_id


async def last_seq(settings: Settings, session_id: str) -> int:
    """Return the `seq` of a session's newest logged transition (0 if none)."""
    redis = _redis(settings)
    try:
        seq, _ = await newest_seq(redis, session_id)
        return seq
    finally:
        await redis.aclose()


async def watch_session(
    settings: Settings, session_id: str, after_seq: int = 0, *, wait_s: float = 30.0
) -> AsyncIterator[Transition]:
    """Yield a session's transitions, the log first, then live, until the session ends.

    An interrupted session is followed on through its answer: the session has ended at a
    completed or failed transition with nothing logged after it. A session with neither
    a record nor a logged transition may be about to start (its event was just sent), so
    its first transition is waited for. A session that has ended at or before `after_seq`
    yields nothing.

    Args:
        settings: where Redis is.
        session_id: the session to follow.
        after_seq: yield only transitions with a greater `seq`.
        wait_s: how long to wait for a session that has not started yet.

    Raises:
        UnknownSessionError: the session did not start within `wait_s`.
    """
    redis = _redis(settings)
    try:
        if await ended_by(redis, session_id, after_seq):
            return  # nothing follows: the gateway answers 204 here
        known = await redis.exists(log_key(session_id), session_key(session_id)) > 0
        async with contextlib.aclosing(follow(redis, session_id, after_seq)) as transitions:
            if not known:
                try:
                    async with asyncio.timeout(wait_s):
                        first = await anext(transitions)
                except TimeoutError:
                    raise UnknownSessionError(
                        f"session {session_id} is unknown: it has no record and no transition, "
                        f"and none came within {wait_s:g} s"
                    ) from None
                yield first
                if await ended_at(redis, first):
                    return
            async for transition in transitions:
                yield transition
                if await ended_at(redis, transition):
                    return
    finally:
        await redis.aclose()


async def wait_for_result(
    settings: Settings, session_id: str, event_id: str, timeout_s: float = 120.0
) -> WorkflowResult:
    """Read the results topic until the result of this event arrives.

    Raises:
        TimeoutError: no result arrived in time.
    """
    consumer = kafka_consumer(settings, settings.topic_results)
    try:  # stopped even when it could not start: it holds a client all the same
        await consumer.start()
        async with asyncio.timeout(timeout_s):
            async for record in consumer:
                headers = dict(record.headers or [])
                if headers.get("event_id", b"").decode() == event_id:
                    return WorkflowResult.model_validate(json.loads(record.value))
    finally:
        await consumer.stop()
    raise TimeoutError(f"no result for event {event_id} of session {session_id}")


async def follow_event(
    settings: Settings,
    session_id: str,
    event_id: str,
    *,
    after_seq: int = 0,
    timeout_s: float = 300.0,
    on_transition: OnTransition | None = None,
) -> WorkflowResult:
    """Follow a session's transitions until the result of one of its events arrives.

    The result comes from the results topic, so an event that was handled before (its
    transitions logged long ago, none new to come) returns its result at once.

    Args:
        settings: where Kafka and Redis are.
        session_id: the event's session.
        event_id: the event whose result ends the wait.
        after_seq: pass only transitions with a greater `seq` to `on_transition`.
        timeout_s: how long to wait for the result.
        on_transition: called with each transition until the event's run ends.

    Raises:
        TimeoutError: no result within `timeout_s`.
    """
    show = on_transition or (lambda _transition: None)
    redis = _redis(settings)
    shown = after_seq
    reached_end = False

    async def pump() -> None:
        nonlocal shown, reached_end
        async with contextlib.aclosing(follow(redis, session_id, after_seq)) as transitions:
            async for transition in transitions:
                shown = transition.seq
                show(transition)
                if _ends_run_of(transition, event_id):
                    reached_end = True
                    return

    pumping = asyncio.create_task(pump(), name=f"follow {session_id}")
    waiting = asyncio.create_task(wait_for_result(settings, session_id, event_id, timeout_s))
    try:
        async with asyncio.timeout(timeout_s):
            done, _ = await asyncio.wait({pumping, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if pumping in done:
                pumping.result()  # a Redis error; else the run's end was seen
            result = await waiting
        if not reached_end:
            # The worker logs a run's transitions before it sends the result: show those
            # the live follower had not reached yet.
            for transition in await read_log(redis, session_id, shown):
                show(transition)
                if _ends_run_of(transition, event_id):
                    break
        return result
    except TimeoutError:
        raise TimeoutError(
            f"no result for event {event_id} of session {session_id} within {timeout_s:g} s"
        ) from None
    finally:
        for task in (pumping, waiting):
            task.cancel()
        await asyncio.gather(pumping, waiting, return_exceptions=True)
        await redis.aclose()


async def send_and_follow(
    settings: Settings,
    event: CloudEvent,
    *,
    timeout_s: float = 300.0,
    on_transition: OnTransition | None = None,
) -> WorkflowResult:
    """Produce an event, pass on its session's new transitions, and return its result.

    Raises:
        TimeoutError: no result within `timeout_s`.
    """
    session_id = session_id_for(event)
    after = await last_seq(settings, session_id)
    await produce_event(settings, event)
    return await follow_event(
        settings,
        session_id,
        event.id,
        after_seq=after,
        timeout_s=timeout_s,
        on_transition=on_transition,
    )


def resume_event(
    session_id: str,
    decision: HumanDecision,
    *,
    source: str = "agentflow/client",
    authid: str | None = None,
) -> CloudEvent:
    """Build the `agentflow.resume` event that answers an interrupted session.

    Args:
        session_id: the session.
        decision: the answer; its fields go under `data`.
        source: the event's `source`.
        authid: who answered, as the gateway authenticated them (the name of their
            token): the CloudEvents `authid` attribute, with `authtype` `api_key`.
    """
    data = decision.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    event = CloudEvent.wrap(RESUME_EVENT_TYPE, data, session_id=session_id, source=source)
    if authid is not None:  # extension attributes (CloudEvents' authcontext)
        event = event.model_copy(update={"authtype": "api_key", "authid": authid})
    return event


async def waiting_session(settings: Settings, session_id: str) -> SessionRecord:
    """Return the record of a session that waits for an answer.

    Raises:
        UnknownSessionError: the session has no record, or is not waiting for an answer.
    """
    redis = _redis(settings)
    try:
        record = await SessionStore(redis, ttl_s=settings.session_ttl_s).get(session_id)
    finally:
        await redis.aclose()
    if record is None:
        raise UnknownSessionError(
            f"session {session_id} does not exist in {redact_url(settings.redis_url)}"
        )
    if (why := record.why_not_answerable()) is not None:
        raise UnknownSessionError(why)
    return record


async def pending_interrupts(
    settings: Settings, session_id: str | None = None
) -> list[tuple[str, PendingInterrupt]]:
    """Return the interrupts waiting for a human: of one session, or of every session.

    Raises:
        UnknownSessionError: the session given does not exist.
    """
    redis = _redis(settings)
    try:
        store = SessionStore(redis, ttl_s=settings.session_ttl_s)
        if session_id is not None:
            if await store.get(session_id) is None:
                raise UnknownSessionError(
                    f"session {session_id} does not exist in {redact_url(settings.redis_url)}"
                )
            sessions = [session_id]
        else:
            records, _ = await store.list(status="interrupted", limit=500)
            sessions = [r.session_id for r in records]
        questions = QuestionStore(redis)
        return [(s, p) for s in sessions for p in await questions.pending(s)]
    finally:
        await redis.aclose()


async def health_problems(settings: Settings) -> list[str]:
    """Return what is wrong: Kafka or Redis that does not answer, workers that are degraded.

    One line each. A worker is degraded when it takes no new events because Redis or
    Kafka is away or Redis is being set up again (its own report, see
    `service.storage.workers`).
    """
    problems = []
    redis = redis_client(
        settings.redis_url or "", cluster=settings.redis_cluster, socket_connect_timeout=3
    )
    try:
        await redis.ping()
        problems += [
            f"worker {w.name} degraded since {w.since.isoformat(timespec='seconds')}, "
            f"taking no new events: {w.reason}"
            for w in await read_worker_states(redis)
            if w.state != "running"
        ]
    except Exception as exc:
        problems.append(f"Redis at {redact_url(settings.redis_url)}: {exc}")
    finally:
        await redis.aclose()
    admin = kafka_admin(settings, request_timeout_ms=3000)
    try:
        await asyncio.wait_for(admin.start(), 5)
        await admin.list_topics()
    except Exception as exc:
        problems.append(f"Kafka at {settings.kafka_bootstrap}: {exc!r}")
    finally:
        await admin.close()
    return problems


def _redis(settings: Settings) -> RedisClient:
    require_services(settings, kafka=False)
    assert settings.redis_url is not None
    return redis_client(settings.redis_url, cluster=settings.redis_cluster)


def _ends_run_of(transition: Transition, event_id: str) -> bool:
    """Whether a transition ends the run of this event (ended or waiting for an answer)."""
    result = (transition.data or {}).get("result") or {}
    return transition.terminal and result.get("event_id") == event_id
