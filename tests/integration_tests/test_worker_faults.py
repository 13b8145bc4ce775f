"""Faults inside the worker: an event whose handling raises, a session whose state is gone."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config import Settings
from service.storage.sessions import SessionStore
from service.worker.handler import STATE_LOST, EventHandler
from service.worker.worker import Worker
from tests.integration_tests.conftest import (
    example,
    offsets,
    read_topic,
    results_by_event,
    send,
    wait_until,
)


async def test_an_event_whose_handling_raises_fails_with_its_reason_and_is_committed(
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad, good = example("claim_submitted"), example("claim_submitted")
    process = EventHandler.process

    async def broken(
        self: EventHandler, record: Any, session_id: str, event: Any, **kw: Any
    ) -> None:
        if event.id == bad["id"]:
            raise RuntimeError("a bug in the handler")
        await process(self, record, session_id, event, **kw)

    monkeypatch.setattr(EventHandler, "process", broken)
    caplog.set_level(logging.ERROR, logger="service.worker.worker")
    settings = settings.model_copy(update={"topic_partitions": 1})
    await start_worker(settings)
    tag = uuid.uuid4().hex[:6]
    await send(producer, settings, bad, f"raises-{tag}")
    await send(producer, settings, good, f"after-{tag}")  # same partition, after it

    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: {bad["id"], good["id"]} <= set(results_by_event(rs)),
    )
    results = results_by_event(records)
    assert len(results[bad["id"]]) == 1
    failed = results[bad["id"]][0]
    assert failed["status"] == "failed"
    assert failed["error"] == "internal error: RuntimeError: a bug in the handler"
    assert results[good["id"]][0]["status"] == "completed"
    logged = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # with its traceback

    async def all_committed() -> bool:
        committed, end = await offsets(settings)
        return committed == end == 2

    await wait_until(all_committed, "both offsets committed")


async def test_a_resume_whose_checkpoints_are_gone_ends_failed_state_lost(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer
) -> None:
    worker = await start_worker(settings)
    session_id = f"lost-{uuid.uuid4().hex[:6]}"
    event = example("claim_needs_review")
    await send(producer, settings, event, session_id)
    first = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event["id"] in results_by_event(rs),
    )
    assert results_by_event(first)[event["id"]][0]["status"] == "interrupted"
    # Redis lost the session's checkpoints; its record (waiting for an answer) is left.
    await worker.runner.graph.checkpointer.adelete_thread(session_id)
    assert (await worker.store.get(session_id)).status == "interrupted"

    resume = {
        "specversion": "1.0",
        "id": f"resume-{uuid.uuid4().hex[:6]}",
        "source": "test",
        "type": "agentflow.resume",
        "sessionid": session_id,
        "data": {"answer": "approve"},
    }
    await send(producer, settings, resume, session_id)
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: resume["id"] in results_by_event(rs),
    )
    result = results_by_event(records)[resume["id"]][0]
    assert result["status"] == "failed"
    assert result["error"] == STATE_LOST
    record = await worker.store.get(session_id)
    assert record.status == "failed"
    assert record.result.error == STATE_LOST


async def test_redis_lost_after_kafka_took_the_result_still_one_result(
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kafka has the result, then Redis drops the connection before the event is marked.

    The worker retries the event (it cannot tell the outage from one before the send);
    the retry marks it published without sending its result again.
    """
    event, after = example("claim_submitted"), example("claim_submitted")
    mark_event = SessionStore.mark_event
    dropped: list[str] = []

    async def drops_once(self: SessionStore, event_id: str, session_id: str, state: Any) -> None:
        if event_id == event["id"] and state == "published" and not dropped:
            dropped.append(event_id)
            raise RedisConnectionError("Connection closed by server.")
        await mark_event(self, event_id, session_id, state)

    monkeypatch.setattr(SessionStore, "mark_event", drops_once)
    settings = settings.model_copy(update={"topic_partitions": 1})
    worker = await start_worker(settings)
    tag = uuid.uuid4().hex[:6]
    await send(producer, settings, event, f"dropped-{tag}")

    async def published() -> bool:
        claim, _ = await worker.store.claim_event(event["id"], f"dropped-{tag}")
        return claim == "published"

    await wait_until(published, "the event marked published after the retry")
    assert dropped == [event["id"]]
    # One partition: a later event's result comes after every copy of the first one.
    await send(producer, settings, after, f"after-{tag}")
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: after["id"] in results_by_event(rs),
    )
    results = results_by_event(records)
    assert len(results[event["id"]]) == 1
    assert results[event["id"]][0]["status"] == "completed"


async def test_an_idle_worker_gives_memory_back_and_works_on(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer
) -> None:
    worker: Worker = await start_worker(settings)
    worker.idle.after_s = worker.idle.at_most_every_s = 0  # at once when idle
    for _ in range(2):  # idle after each: it gives back, then takes the next event
        event = example("claim_submitted")
        given = worker.idle.given_back
        await send(producer, settings, event, f"idle-{uuid.uuid4().hex[:6]}")
        records = await read_topic(
            settings.kafka_bootstrap or "",
            settings.topic_results,
            until=lambda rs, e=event: e["id"] in results_by_event(rs),  # type: ignore[misc]
        )
        assert results_by_event(records)[event["id"]][0]["status"] == "completed"
        await wait_until(lambda g=given: worker.idle.given_back > g, "the idle worker gives back")
