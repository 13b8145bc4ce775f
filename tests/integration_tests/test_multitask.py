"""Double texting through Kafka: what a second event does to a busy session.

A run is kept busy on purpose: its model calls go to the loopback OpenAI-compatible
server, which holds back the answers to the first event's requests until the test
releases them (`Hold`). Nothing here waits for time; every step waits for a condition.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from service.config import Settings
from service.devtools.servers import LocalServers
from service.storage.checkpointer import RedisSaver
from service.storage.publisher import read_log
from service.storage.sessions import SessionStore
from service.worker.worker import Worker
from tests.integration_tests.conftest import (
    example,
    hold_answers,
    marked_event,
    offsets,
    own_settings,
    read_topic,
    results_by_event,
    send,
    wait_until,
)
from tests.openai_server import OpenAICompatibleServer


@pytest.fixture
def model_settings(servers: LocalServers, openai_server: OpenAICompatibleServer) -> Settings:
    """Settings of a worker whose model is the loopback server."""
    return own_settings(servers, model="openai:test-model")


async def _results(settings: Settings, *event_ids: str) -> dict[str, list[dict[str, Any]]]:
    """Read the results topic until every event has a result."""
    wanted = set(event_ids)
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: wanted <= set(results_by_event(rs)),
    )
    return results_by_event(records)


async def _runs(redis_url: str, session_id: str) -> dict[str, int]:
    """Count a session's checkpoints by the run (event id) that wrote them."""
    async with RedisSaver.from_conn_string(redis_url) as saver:
        counts: dict[str, int] = {}
        async for item in saver.alist({"configurable": {"thread_id": session_id}}):
            run = str(item.metadata.get("run_id") or "")
            counts[run] = counts.get(run, 0) + 1
    return counts


async def test_reject_refuses_the_new_event_and_leaves_the_run_alone(
    model_settings: Settings,
    openai_server: OpenAICompatibleServer,
    start_worker: Any,
    producer: AIOKafkaProducer,
    redis: Redis,
) -> None:
    worker = await start_worker(model_settings)
    session_id = f"mt-reject-{uuid.uuid4().hex[:6]}"
    first, second = marked_event(session_id), marked_event(session_id, "reject")
    hold = hold_answers(openai_server, first)
    await send(producer, model_settings, first, session_id)
    await wait_until(hold.held.is_set, "the first run to be inside a model call")

    await send(producer, model_settings, second, session_id)
    refused = (await _results(model_settings, second["id"]))[second["id"]]
    assert [r["status"] for r in refused] == ["refused"]
    assert refused[0]["error"] == f"refused: session {session_id} is running"
    assert not hold.released.is_set()  # decided while the first run was still held

    hold.release()
    results = await _results(model_settings, first["id"], second["id"])
    assert [r["status"] for r in results[first["id"]]] == ["completed"]
    assert [r["status"] for r in results[second["id"]]] == ["refused"]
    log = await read_log(redis, session_id)
    refusals = [t for t in log if t.type == "event.refused"]
    assert len(refusals) == 1 and refusals[0].data is not None
    assert refusals[0].data["result"]["event_id"] == second["id"]
    assert worker.handler.completed == 1


async def test_enqueue_runs_the_new_event_after_the_running_one(
    model_settings: Settings,
    openai_server: OpenAICompatibleServer,
    start_worker: Any,
    producer: AIOKafkaProducer,
    redis: Redis,
) -> None:
    worker = await start_worker(model_settings)
    session_id = f"mt-enqueue-{uuid.uuid4().hex[:6]}"
    first, second = marked_event(session_id), marked_event(session_id, "enqueue")
    hold = hold_answers(openai_server, first)
    await send(producer, model_settings, first, session_id)
    await wait_until(hold.held.is_set, "the first run to be inside a model call")
    await send(producer, model_settings, second, session_id)
    await wait_until(lambda: worker.received == 2, "the worker to take the second event")
    hold.release()

    results = await _results(model_settings, first["id"], second["id"])
    assert [r["status"] for r in results[first["id"]]] == ["completed"]
    assert [r["status"] for r in results[second["id"]]] == ["completed"]
    log = await read_log(redis, session_id)
    ends = {
        t.data["result"]["event_id"]: t.seq
        for t in log
        if t.type == "session.completed" and t.data is not None
    }
    starts = {t.data["event_id"]: t.seq for t in log if t.type == "session.started" and t.data}
    assert ends[first["id"]] < starts[second["id"]]  # one after the other, in order


async def test_interrupt_stops_the_run_at_a_step_boundary_and_keeps_its_checkpoints(
    model_settings: Settings,
    openai_server: OpenAICompatibleServer,
    start_worker: Any,
    producer: AIOKafkaProducer,
    redis: Redis,
    servers: LocalServers,
) -> None:
    worker = await start_worker(model_settings)
    session_id = f"mt-interrupt-{uuid.uuid4().hex[:6]}"
    first, second = marked_event(session_id), marked_event(session_id, "interrupt")
    hold = hold_answers(openai_server, first)
    await send(producer, model_settings, first, session_id)
    await wait_until(hold.held.is_set, "the first run to be inside a model call")
    await send(producer, model_settings, second, session_id)
    await wait_until(lambda: worker.received == 2, "the worker to take the second event")
    hold.release()  # the step in flight finishes; the run stops before the next one

    results = await _results(model_settings, first["id"], second["id"])
    [superseded] = results[first["id"]]
    assert superseded["status"] == "superseded"
    assert superseded["error"] == f"superseded by event {second['id']}"
    assert [r["status"] for r in results[second["id"]]] == ["completed"]

    log = await read_log(redis, session_id)
    [stop] = [t for t in log if t.type == "session.superseded"]
    assert stop.data is not None and stop.data["by"] == second["id"]
    first_nodes = [
        t.node for t in log if t.seq < stop.seq and t.type == "node.completed" and t.node
    ]
    started_before_stop = [
        t.node for t in log if t.seq < stop.seq and t.type == "node.started" and t.node
    ]
    assert first_nodes and "finalize" not in first_nodes
    assert started_before_stop == first_nodes  # no step was cut off half-way
    runs = await _runs(servers.redis_url, session_id)
    assert runs.get(first["id"], 0) > 0  # the interrupted run's checkpoints are kept
    assert runs.get(second["id"], 0) > 0
    record = await SessionStore(redis, ttl_s=60).get(session_id)
    assert record is not None and record.status == "completed"
    assert record.result is not None and record.result.event_id == second["id"]


async def test_rollback_deletes_the_running_runs_checkpoints(
    model_settings: Settings,
    openai_server: OpenAICompatibleServer,
    start_worker: Any,
    producer: AIOKafkaProducer,
    redis: Redis,
    servers: LocalServers,
) -> None:
    await start_worker(model_settings)
    session_id = f"mt-rollback-{uuid.uuid4().hex[:6]}"
    before = marked_event(session_id)
    await send(producer, model_settings, before, session_id)
    await _results(model_settings, before["id"])
    runs_before = await _runs(servers.redis_url, session_id)

    first, second = marked_event(session_id), marked_event(session_id, "rollback")
    hold = hold_answers(openai_server, first)
    await send(producer, model_settings, first, session_id)
    await wait_until(hold.held.is_set, "the run to be inside a model call")
    assert (await _runs(servers.redis_url, session_id)).get(first["id"], 0) > 0
    await send(producer, model_settings, second, session_id)

    rolled = (await _results(model_settings, first["id"]))[first["id"]]
    assert [r["status"] for r in rolled] == ["rolled_back"]
    assert rolled[0]["error"] == f"rolled back by event {second['id']}"
    hold.release()
    results = await _results(model_settings, second["id"])
    assert [r["status"] for r in results[second["id"]]] == ["completed"]

    runs = await _runs(servers.redis_url, session_id)
    assert first["id"] not in runs  # gone: the second event ran from the state before it
    assert runs[before["id"]] == runs_before[before["id"]]
    assert runs.get(second["id"], 0) > 0
    log = await read_log(redis, session_id)
    [rollback] = [t for t in log if t.type == "session.rolled_back"]
    assert rollback.data is not None and rollback.data["by"] == second["id"]


@pytest.mark.parametrize("strategy", ["reject", "enqueue", "interrupt", "rollback"])
async def test_a_session_waiting_for_a_human_keeps_its_question(
    strategy: str,
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    redis: Redis,
) -> None:
    """No strategy drops the question: `reject` refuses, the others park until answered."""
    await start_worker(settings)
    session_id = f"mt-wait-{strategy}-{uuid.uuid4().hex[:6]}"
    escalating = example("claim_needs_review", sessionid=session_id)
    await send(producer, settings, escalating, session_id)
    waiting = (await _results(settings, escalating["id"]))[escalating["id"]]
    assert [r["status"] for r in waiting] == ["interrupted"]
    question = waiting[0]["question"]

    new = marked_event(session_id, strategy)
    await send(producer, settings, new, session_id)
    store = SessionStore(redis, ttl_s=60)
    if strategy == "reject":
        refused = (await _results(settings, new["id"]))[new["id"]]
        assert refused[0]["error"] == f"refused: session {session_id} waits for a human answer"
    else:
        log_has = _log_has(redis, session_id, "event.parked")
        await wait_until(log_has, "the new event to be parked")

        async def all_committed() -> bool:
            committed, ends = await offsets(settings)
            return committed == ends

        await wait_until(all_committed, "the parked event's offset to be committed")
    record = await store.get(session_id)
    assert record is not None and record.status == "interrupted"
    assert record.question == question  # the question is still there to answer

    answer = {
        "specversion": "1.0",
        "id": f"answer-{uuid.uuid4().hex[:6]}",
        "source": "test",
        "type": "agentflow.resume",
        "sessionid": session_id,
        "data": {"answer": "approve: discharge confirmed"},
    }
    await send(producer, settings, answer, session_id)
    wanted = [answer["id"]] if strategy == "reject" else [answer["id"], new["id"]]
    results = await _results(settings, *wanted)
    assert [r["status"] for r in results[answer["id"]]] == ["completed"]
    if strategy != "reject":
        assert [r["status"] for r in results[new["id"]]] == ["completed"]
        log = await read_log(redis, session_id)
        answered = next(
            t.seq
            for t in log
            if t.type == "session.completed" and t.data["result"]["event_id"] == answer["id"]
        )
        ran = next(
            t.seq
            for t in log
            if t.type == "session.started" and t.data and t.data["event_id"] == new["id"]
        )
        assert answered < ran  # the parked event ran once the wait ended
        assert await redis.exists(f"agentflow:session:{{{session_id}}}:parked") == 0


def _log_has(redis: Redis, session_id: str, kind: str) -> Any:
    async def has() -> bool:
        return any(t.type == kind for t in await read_log(redis, session_id))

    return has


async def test_parked_events_run_in_order(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer, redis: Redis
) -> None:
    worker: Worker = await start_worker(settings)
    session_id = f"mt-order-{uuid.uuid4().hex[:6]}"
    escalating = example("claim_needs_review", sessionid=session_id)
    await send(producer, settings, escalating, session_id)
    await _results(settings, escalating["id"])
    parked = [marked_event(session_id) for _ in range(3)]
    for event in parked:
        await send(producer, settings, event, session_id)
    await wait_until(lambda: worker.received == 4, "the worker to take the three events")
    answer = {
        "specversion": "1.0",
        "id": f"answer-{uuid.uuid4().hex[:6]}",
        "source": "test",
        "type": "agentflow.resume",
        "sessionid": session_id,
        "data": {"answer": "approve"},
    }
    await send(producer, settings, answer, session_id)
    ids = [e["id"] for e in parked]
    results = await _results(settings, answer["id"], *ids)
    assert all(len(results[i]) == 1 and results[i][0]["status"] == "completed" for i in ids)
    log = await read_log(redis, session_id)
    order = [
        t.data["event_id"]
        for t in log
        if t.type == "session.started" and t.data and t.data["event_id"] in ids
    ]
    assert order == ids
