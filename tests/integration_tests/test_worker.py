"""The worker through a real Kafka-protocol broker and a real Redis."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from service.bootstrap import max_request_bytes
from service.config import Settings
from service.storage.keys import session_key
from service.storage.publisher import read_log
from service.storage.sessions import SessionStore
from tests.integration_tests.conftest import (
    example,
    offsets,
    read_topic,
    results_by_event,
    send,
    wait_until,
)


async def test_example_events_end_to_end(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer, redis: Redis
) -> None:
    await start_worker(settings)
    events = {
        "s-submit": example("claim_submitted"),
        "s-doc": example("document_uploaded"),
        "s-status": example("status_requested"),
        "s-review": example("claim_needs_review"),
    }
    for session_id, event in events.items():
        await send(producer, settings, event, session_id)
    ids = {e["id"] for e in events.values()}
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: ids <= set(results_by_event(rs)),
    )
    results = results_by_event(records)
    assert all(len(v) == 1 for v in results.values())
    by_session = {r[0]["session_id"]: r[0] for r in results.values()}
    assert {s: r["status"] for s, r in by_session.items()} == {
        "s-submit": "completed",
        "s-doc": "completed",
        "s-status": "completed",
        "s-review": "interrupted",
    }
    assert {rec.key.decode() for rec in records} == set(events)

    store = SessionStore(redis, ttl_s=60)
    record = await store.get("s-submit")
    assert record is not None and record.status == "completed"
    assert record.current_node == "finalize" and record.result is not None
    assert record.event_ids == [events["s-submit"]["id"]]
    assert 0 < await redis.ttl(session_key("s-submit")) <= settings.session_ttl_s
    review = await store.get("s-review")
    assert review is not None and review.status == "interrupted" and review.question

    async def checkpoint_ttls(session_id: str) -> list[int]:
        keys = [f"agentflow:checkpoint:{{{session_id}}}:{part}" for part in ("i", "d")]
        assert await redis.exists(*keys) == 2, session_id
        return [await redis.ttl(k) for k in keys]

    # a finished session's checkpoints get the retention TTL; one waiting for a human keeps its
    finished, waiting = await checkpoint_ttls("s-submit"), await checkpoint_ttls("s-review")
    assert all(0 < t <= settings.session_ttl_s for t in finished)
    assert all(t == -1 for t in waiting)

    log = await read_log(redis, "s-submit")
    assert [t.seq for t in log] == list(range(1, len(log) + 1))
    assert log[0].type == "session.started" and log[-1].type == "session.completed"
    assert {"plan", "assign", "review", "finalize"} <= {t.node for t in log}

    sessions = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_sessions,
        until=lambda rs: sum(json.loads(r.value)["type"] == "session.ended" for r in rs) >= 3,
    )
    kinds = [(json.loads(r.value)["type"], r.key.decode()) for r in sessions]
    assert ("session.started", "s-submit") in kinds and ("session.ended", "s-submit") in kinds


async def test_bad_events_go_to_the_dead_letter_topic(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer
) -> None:
    settings = settings.model_copy(update={"max_event_bytes": 4096})
    await start_worker(settings)
    topic = settings.topic_events
    await producer.send_and_wait(topic, b"\xff not json", key=b"k1", headers=[("trace", b"t-1")])
    await producer.send_and_wait(
        topic, json.dumps({"specversion": "1.0", "id": "x"}).encode(), key=b"k2"
    )
    big = example("claim_submitted", data={"blob": "x" * 5000})
    await producer.send_and_wait(topic, json.dumps(big).encode(), key=b"k3")
    resume = {
        "specversion": "1.0",
        "id": f"r-{uuid.uuid4().hex[:6]}",
        "source": "test",
        "type": "agentflow.resume",
        "sessionid": "no-such-session",
        "data": {"answer": "yes"},
    }
    await producer.send_and_wait(topic, json.dumps(resume).encode(), key=b"no-such-session")
    good = example("status_requested")
    await send(producer, settings, good, "k-good")

    dlq = await read_topic(
        settings.kafka_bootstrap or "", settings.topic_dlq, until=lambda rs: len(rs) >= 4
    )
    reasons = {r.key.decode(): dict(r.headers) for r in dlq}
    assert b"not valid JSON" in reasons["k1"]["reason"]
    assert reasons["k1"]["trace"] == b"t-1"  # original headers kept
    assert next(r for r in dlq if r.key == b"k1").value == b"\xff not json"  # original bytes
    assert b"field 'source'" in reasons["k2"]["reason"]
    assert b"exceeds AGENTFLOW_MAX_EVENT_BYTES" in reasons["k3"]["reason"]
    assert b"unknown session" in reasons["no-such-session"]["reason"]
    for headers in reasons.values():
        assert headers["source_topic"] == topic.encode()
        assert int(headers["partition"]) >= 0 and int(headers["offset"]) >= 0

    results = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: good["id"] in results_by_event(rs),
    )
    assert results_by_event(results)[good["id"]][0]["status"] == "completed"


async def test_duplicate_event_id_runs_once(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer, redis: Redis
) -> None:
    await start_worker(settings)
    event = example("claim_submitted")
    for _ in range(3):
        await send(producer, settings, event, "dup-session")
    marker = example("status_requested")
    await send(producer, settings, marker, "dup-session")  # same session: runs after the copies
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: marker["id"] in results_by_event(rs),
    )
    results = results_by_event(records)
    assert len(results[event["id"]]) == 1
    log = await read_log(redis, "dup-session")
    plans = [t for t in log if t.node == "plan" and t.type == "node.started"]
    assert len(plans) == 2  # the event once, the marker once


async def test_resume_over_kafka(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer, redis: Redis
) -> None:
    await start_worker(settings)
    event = example("claim_needs_review")
    await send(producer, settings, event, "esc-session")
    first = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event["id"] in results_by_event(rs),
    )
    assert results_by_event(first)[event["id"]][0]["status"] == "interrupted"
    resume = {
        "specversion": "1.0",
        "id": f"resume-{uuid.uuid4().hex[:6]}",
        "source": "test",
        "type": "agentflow.resume",
        "sessionid": "esc-session",
        "data": {"answer": "approve: discharge verified"},
    }
    await send(producer, settings, resume, "esc-session")
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: resume["id"] in results_by_event(rs),
    )
    result = results_by_event(records)[resume["id"]][0]
    assert result["status"] == "completed"
    assert "discharge verified" in result["review"]["feedback"]
    log = await read_log(redis, "esc-session")
    assert [t.seq for t in log] == list(range(1, len(log) + 1))  # no gap across the resume
    assert [t.type for t in log].count("session.interrupted") == 1
    assert sum(t.node == "plan" and t.type == "node.started" for t in log) == 1


async def test_two_workers_many_sessions_keep_order_and_one_result_each(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer, redis: Redis
) -> None:
    await start_worker(settings, name="w1")
    await start_worker(settings, name="w2")
    sent: dict[str, list[str]] = {}
    for i in range(20):
        session_id = f"many-{i}"
        for name in ("claim_submitted", "status_requested"):
            event = example(name)
            sent.setdefault(session_id, []).append(event["id"])
            await send(producer, settings, event, session_id)
    all_ids = {e for ids in sent.values() for e in ids}
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: all_ids <= set(results_by_event(rs)),
        timeout_s=120,
    )
    results = results_by_event(records)
    assert all(len(results[e]) == 1 for e in all_ids)
    assert all(results[e][0]["status"] == "completed" for e in all_ids)
    for session_id, (first, second) in sent.items():
        log = await read_log(redis, session_id)
        starts = [t.data["event_id"] for t in log if t.type == "session.started"]
        assert starts == [first, second], session_id
        ends = [i for i, t in enumerate(log) if t.type == "session.completed"]
        second_start = [i for i, t in enumerate(log) if t.type == "session.started"][1]
        assert ends[0] < second_start  # the second event waited for the first


async def test_a_cancel_in_the_same_batch_as_its_event_cancels_it(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer
) -> None:
    # One record batch, so one poll takes both and the cancel meets an event task that has
    # not run its first step yet.
    session_id = f"s-cancel-{uuid.uuid4().hex[:6]}"
    event = example("claim_submitted")
    cancel = example("claim_submitted", type="agentflow.cancel", sessionid=session_id, data=None)
    batch = producer.create_batch()
    for body in (event, cancel):
        batch.append(key=session_id.encode(), value=json.dumps(body).encode(), timestamp=None)
    batch.close()
    await (await producer.send_batch(batch, settings.topic_events, partition=0))
    worker = await start_worker(settings)

    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: {event["id"], cancel["id"]} <= set(results_by_event(rs)),
    )
    results = results_by_event(records)
    assert [r["status"] for r in results[event["id"]]] == ["failed"]
    assert results[event["id"]][0]["error"] == "cancelled"
    assert len(results[cancel["id"]]) == 1

    # Tansu reports the end of a many-record batch as one past its first record, so the
    # committed offsets are compared with the two records sent.
    async def settled() -> bool:
        committed, _end = await offsets(settings)
        return committed == 2 and worker.in_flight == 0

    await wait_until(settled, "both offsets committed and nothing in flight")


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


async def test_an_event_too_large_to_dead_letter_whole_never_pins_its_partition(
    settings: Settings, start_worker: Any
) -> None:
    settings = settings.model_copy(update={"max_event_bytes": 4096, "topic_partitions": 1})
    limit = max_request_bytes(settings)  # the largest record the worker's producer sends
    await start_worker(settings)
    big = example("claim_submitted", data={"blob": "x" * (3 * limit)})
    raw = json.dumps(big).encode()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, max_request_size=4 * limit + 65536
    )
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic_events, raw, key=b"s-big")
        after = example("status_requested")  # the same partition, right behind it
        await send(producer, settings, after, "s-big")
    finally:
        await producer.stop()

    dlq = await read_topic(
        settings.kafka_bootstrap or "", settings.topic_dlq, until=lambda rs: len(rs) >= 1
    )
    headers = dict(dlq[0].headers)
    assert b"exceeds AGENTFLOW_MAX_EVENT_BYTES" in headers["reason"]
    assert headers["truncated"] == b"true" and int(headers["original_size"]) == len(raw)
    assert headers["original_sha256"] == hashlib.sha256(raw).hexdigest().encode()
    assert raw.startswith(dlq[0].value) and 0 < len(dlq[0].value) < limit
    assert dlq[0].key == b"s-big"

    results = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: after["id"] in results_by_event(rs),
    )
    assert results_by_event(results)[after["id"]][0]["status"] == "completed"

    async def all_committed() -> bool:
        committed, end = await offsets(settings)
        return committed == end == 2

    await wait_until(all_committed, "both offsets committed, the oversized one too")


async def test_deep_json_is_dead_lettered_and_a_result_always_names_its_event(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer, redis: Redis
) -> None:
    await start_worker(settings)
    deep: dict[str, str] = {}  # key -> event id
    for levels in (64, 150, 199, 1_000, 100_000):  # under the event (level 1) and `data`
        event = example("status_requested", data={"nested": "NESTED"})
        # by hand: json.dumps itself gives up at about 1,000 levels
        raw = json.dumps(event).replace('"NESTED"', "[" * levels + "1" + "]" * levels)
        key = f"s-deep-{levels}"
        deep[key] = event["id"]
        await producer.send_and_wait(settings.topic_events, raw.encode(), key=key.encode())
    at_limit = example("status_requested", data=_nested(63))  # 64 levels in all: allowed
    await send(producer, settings, at_limit, "s-at-limit")

    dlq = await read_topic(
        settings.kafka_bootstrap or "", settings.topic_dlq, until=lambda rs: len(rs) >= len(deep)
    )
    reasons = {r.key.decode(): dict(r.headers)["reason"] for r in dlq}
    assert set(reasons) == set(deep)
    for reason in reasons.values():
        assert b"nests deeper than AGENTFLOW_MAX_JSON_DEPTH (64 levels)" in reason

    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: at_limit["id"] in results_by_event(rs),
    )
    results = results_by_event(records)
    assert results[at_limit["id"]][0]["status"] == "completed"
    assert set(results) == {at_limit["id"]}  # none for a deep event, none without an id
    assert all(json.loads(r.value)["event_id"] for r in records)
    assert not await redis.exists("agentflow:event:")

    async def all_committed() -> bool:
        committed, end = await offsets(settings)
        return committed == end == len(deep) + 1

    await wait_until(all_committed, "every offset committed, the dead letters' too")


async def test_one_session_id_rule_for_keys_and_attributes(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer
) -> None:
    await start_worker(settings)
    topic = settings.topic_events
    bad: dict[str, tuple[bytes | None, bytes]] = {}  # event id -> key, expected reason

    async def produce(event: dict[str, Any], key: bytes | None) -> None:
        await producer.send_and_wait(topic, json.dumps(event).encode(), key=key)

    for key, reason in [
        (b"has space", b"key is not a session id"),
        (b"a/b", b"key is not a session id"),
        (b"k" * 100_000, b"not 100000 characters"),
        (b"\xff\xfe", b"not valid UTF-8"),
        (b"\xff\xfd", b"not valid UTF-8"),  # would have been the same session as the one above
    ]:
        event = example("status_requested")
        bad[event["id"]] = (key, reason)
        await produce(event, key)
    for fields, reason in [
        ({"sessionid": "a/b"}, b"field 'sessionid'"),
        ({"sessionid": "x" * 201}, b"field 'sessionid'"),
        ({"id": "x" * 257}, b"AGENTFLOW_MAX_ID_BYTES (256)"),
        ({"id": "bell\x07"}, b"control characters"),
    ]:
        event = example("status_requested") | fields
        bad[event["id"]] = (None, reason)
        await produce(event, None)

    odd_id = f"claim 7/{uuid.uuid4().hex[:6]}"  # allowed as an event id, not as a session id
    odd = example("status_requested") | {"id": odd_id}
    await produce(odd, None)
    long_id = uuid.uuid4().hex.ljust(256, "e")  # the longest id: `session-{id}` would be 264
    await produce(example("status_requested") | {"id": long_id}, None)
    plain = example("status_requested")
    await produce(plain, None)

    dlq = await read_topic(
        settings.kafka_bootstrap or "", settings.topic_dlq, until=lambda rs: len(rs) >= len(bad)
    )
    got = {json.loads(r.value)["id"]: (r.key, dict(r.headers)["reason"]) for r in dlq}
    assert set(got) == set(bad)
    for event_id, (key, reason) in bad.items():
        assert got[event_id][0] == key  # the original key, bytes for bytes
        assert reason in got[event_id][1], (event_id[:40], got[event_id][1])

    wanted = {odd_id, long_id, plain["id"]}
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: wanted <= set(results_by_event(rs)),
    )
    sessions = {e: r[0]["session_id"] for e, r in results_by_event(records).items()}
    for event_id in (odd_id, long_id):
        digest = hashlib.sha256(event_id.encode()).hexdigest()[:32]
        assert sessions[event_id] == f"session-{digest}"
    assert sessions[plain["id"]] == f"session-{plain['id']}"
    assert set(sessions) == wanted
