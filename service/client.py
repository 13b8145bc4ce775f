"""Talking to a running agentflow from outside: send events, follow sessions."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import cast

from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from nodes.models import CloudEvent, WorkflowResult
from service.bootstrap import kafka_producer
from service.config import Settings
from service.storage.keys import log_key
from service.storage.publisher import follow
from service.storage.transitions import Transition

__all__ = ["last_seq", "produce_event", "session_id_for", "wait_for_result", "watch_session"]


def session_id_for(event: CloudEvent) -> str:
    """The session an event belongs to: its `sessionid`, else one derived from its id."""
    return event.sessionid or f"session-{event.id}"


async def produce_event(settings: Settings, event: CloudEvent) -> str:
    """Produce an event to the events topic, keyed by its session id; return the id."""
    session_id = session_id_for(event)
    producer = kafka_producer(settings)
    await producer.start()
    try:
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
    assert settings.redis_url
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        newest = await redis.xrevrange(log_key(session_id), count=1)
    finally:
        await redis.aclose()
    return int(cast(str, newest[0][0]).split("-")[0]) if newest else 0


async def watch_session(
    settings: Settings, session_id: str, after_seq: int = 0
) -> AsyncIterator[Transition]:
    """Yield a session's transitions: the log first, then live, until it stops."""
    assert settings.redis_url
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        async with contextlib.aclosing(follow(redis, session_id, after_seq)) as transitions:
            async for transition in transitions:
                yield transition
                if transition.terminal:
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
    consumer = AIOKafkaConsumer(
        settings.topic_results,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(timeout_s):
            async for record in consumer:
                headers = dict(record.headers or [])
                if headers.get("event_id", b"").decode() == event_id:
                    return WorkflowResult.model_validate(json.loads(record.value))
    finally:
        await consumer.stop()
    raise TimeoutError(f"no result for event {event_id} of session {session_id}")
