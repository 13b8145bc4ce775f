"""Ids mean one thing: an event id one result, a session id its own state, a subject its notes.

Real Tansu, real Redis (with the query engine), real HTTP.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from langgraph.graph.state import CompiledStateGraph
from redis.asyncio import Redis

from graphs.workflow import build_graph
from nodes.context import WorkflowContext
from nodes.library import InMemoryWorkflowLibrary
from nodes.models import CloudEvent, SimilarWorkflow
from service.config import Settings
from service.gateway.app import serve_gateway
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import expire_session, open_checkpointer, session_states
from service.storage.keys import event_key
from service.storage.library.search import RedisWorkflowLibrary
from service.storage.memory import open_subject_store, subject_notes
from service.storage.sessions import SessionStore
from tests.integration_tests.conftest import (
    example,
    offsets,
    read_topic,
    results_by_event,
    send,
    wait_until,
)


def dead_letters(records: list[ConsumerRecord]) -> list[tuple[str, str, str]]:
    """Each dead letter as (key, event id, reason)."""
    return [
        (
            (r.key or b"").decode(),
            json.loads(r.value).get("id", ""),
            dict(r.headers)["reason"].decode(),
        )
        for r in records
    ]


async def all_committed(settings: Settings, sent: int) -> None:
    """Wait until the worker has committed every event sent (each was sent on its own)."""

    async def done() -> bool:
        committed, _end = await offsets(settings)
        return committed == sent

    await wait_until(done, f"{sent} offsets committed")


# --- item 4: one event id, one result --------------------------------------------------------


async def test_an_event_id_belongs_to_the_first_session_that_takes_it(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer
) -> None:
    await start_worker(settings)
    tag = uuid.uuid4().hex[:6]
    sessions = [f"dup-a-{tag}", f"dup-b-{tag}", f"dup-c-{tag}"]
    event = example("status_requested")
    keys = [sessions[i % 3] for i in range(11)]  # 11 copies of one id over three sessions
    for key in keys:
        await send(producer, settings, event, key)
    await all_committed(settings, len(keys))

    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event["id"] in results_by_event(rs),
    )
    results = results_by_event(records)[event["id"]]
    assert len(results) == 1, results
    owner = results[0]["session_id"]
    others = [k for k in keys if k != owner]
    dlq = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_dlq,
        until=lambda rs: len(rs) >= len(others),
    )
    letters = dead_letters(dlq)
    assert sorted(k for k, _, _ in letters) == sorted(others)  # the owner's copies: skipped
    assert all(i == event["id"] and r.startswith("duplicate event id") for _, i, r in letters)

    # A later delivery to another session is dead-lettered too; one to the owner is skipped.
    await send(producer, settings, event, f"dup-d-{tag}")
    await send(producer, settings, event, owner)
    await all_committed(settings, len(keys) + 2)
    dlq = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_dlq,
        until=lambda rs: len(rs) >= len(others) + 1,
    )
    assert sorted(k for k, _, _ in dead_letters(dlq)) == sorted([*others, f"dup-d-{tag}"])
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event["id"] in results_by_event(rs),
    )
    assert len(records) == 1


async def test_a_claim_is_taken_once_and_remembers_its_session(redis: Redis) -> None:
    store = SessionStore(redis, ttl_s=60)
    event_id = f"claim-{uuid.uuid4().hex[:6]}"
    assert await store.claim_event(event_id, "s-1") == ("new", "s-1")
    assert await store.claim_event(event_id, "s-2") == ("running", "s-1")
    assert await store.claim_event(event_id, "s-1") == ("running", "s-1")
    assert not await store.release_event(event_id, "s-2")  # not its claim
    await store.mark_event(event_id, "s-1", "published")
    assert not await store.release_event(event_id, "s-1")  # it has its result
    assert await store.claim_event(event_id, "s-2") == ("published", "s-1")
    other = f"claim-{uuid.uuid4().hex[:6]}"
    await store.claim_event(other, "s-1")
    assert await store.release_event(other, "s-1")
    assert await redis.exists(event_key(other)) == 0


# --- item 7: commands for sessions that do not exist -----------------------------------------


async def test_cancel_and_resume_for_unknown_sessions_are_dead_lettered_and_leave_nothing(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer, redis: Redis
) -> None:
    await start_worker(settings)
    tag = uuid.uuid4().hex[:6]
    cancel = example("status_requested", type="agentflow.cancel", data=None)
    resume = example("status_requested", type="agentflow.resume", data={"answer": "yes"})
    bare = example("status_requested", type="agentflow.resume", data={"nothing": 1})
    sent = {f"gone-c-{tag}": cancel, f"gone-r-{tag}": resume, f"gone-b-{tag}": bare}
    for key, event in sent.items():
        await send(producer, settings, {**event, "sessionid": key}, key)
    good = example("status_requested")
    await send(producer, settings, good, f"here-{tag}")
    await all_committed(settings, len(sent) + 1)

    dlq = await read_topic(
        settings.kafka_bootstrap or "", settings.topic_dlq, until=lambda rs: len(rs) >= 3
    )
    reasons = {key: reason for key, _, reason in dead_letters(dlq)}
    assert reasons[f"gone-c-{tag}"].startswith("unknown session for cancel")
    assert reasons[f"gone-r-{tag}"].startswith("unknown session for resume")
    assert reasons[f"gone-b-{tag}"] == "resume event without data.decision or data.answer"
    results = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: good["id"] in results_by_event(rs),
    )
    assert set(results_by_event(results)) == {good["id"]}  # no result for a dead letter
    for event in sent.values():
        assert await redis.exists(event_key(event["id"])) == 0
    for key in sent:
        assert await SessionStore(redis, ttl_s=60).get(key) is None


# --- item 6: control characters in subjects --------------------------------------------------


async def test_any_subject_keeps_its_own_notes_and_never_breaks_a_session(
    redis: Redis, make_event: Any
) -> None:
    store = await open_subject_store(redis)
    graph = build_graph(await open_checkpointer(redis), store=store)
    runner = SessionRunner(graph, WorkflowContext(library=InMemoryWorkflowLibrary()))
    tag = uuid.uuid4().hex[:6]
    hostile = f"C\x00\x07\x08\x0b\x0c\x1b\x1c|{{x}},*.-{tag}"
    subjects = [hostile, f"Claim-{tag}", f"claim-{tag}", f"claim-{tag}0"]
    first = {
        s: await runner.start(make_event(subject=s), f"subj-{i}-{tag}")
        for i, s in enumerate(subjects)
    }
    assert {s: r.status for s, r in first.items()} == dict.fromkeys(subjects, "completed")
    outputs = " ".join(s.output for s in first[hostile].workflow.steps)
    assert "No earlier sessions about" in outputs

    second = await runner.start(make_event("status_requested", subject=hostile), f"subj-x-{tag}")
    assert second.status == "completed"
    assert f"(session subj-0-{tag}, completed)" in " ".join(s.output for s in second.workflow.steps)
    for i, subject in enumerate(subjects):
        notes = await subject_notes(store, subject)
        expected = {f"subj-{i}-{tag}"} | ({f"subj-x-{tag}"} if subject == hostile else set())
        assert {n.session_id for n in notes} == expected, subject


# --- item 8: a session id matches its own session, byte for byte -----------------------------


def _family(tag: str) -> list[str]:
    """Session ids a case-insensitive, comma-splitting, prefix-matching lookup mixes up.

    `x,T...` breaks the session-id rule (no commas) and the Redis saver cannot list it at
    all; it is here so that `T...` must not find it.
    """
    return [f"Case-T{tag}", f"case-T{tag}", f"T{tag}", f"x,T{tag}", f"Case-T{tag}0"]


def valid(session_id: str) -> bool:
    """Whether a session id of `_family` is one a session can have."""
    return "," not in session_id


async def _run_sessions(
    graph: CompiledStateGraph[Any, Any, Any, Any], context: WorkflowContext, ids: list[str]
) -> dict[str, set[str]]:
    """Run one event per session; return each session's checkpoint ids, read by key."""
    runner = SessionRunner(graph, context)
    for n, session_id in enumerate(ids):
        for _ in range(n % 2 + 1):  # sessions of different lengths
            event = CloudEvent.wrap("claim.status_requested", {"claim_id": "C-1"}, source="t")
            assert (await runner.start(event, session_id)).status == "completed"
    own: dict[str, set[str]] = {}
    for session_id in ids:
        config = {"configurable": {"thread_id": session_id}}
        snapshot = await graph.aget_state(config)  # by key: the latest pointer
        chain: set[str] = set()
        while snapshot.config is not None and snapshot.parent_config is not None:
            chain.add(snapshot.config["configurable"]["checkpoint_id"])
            snapshot = await graph.aget_state(snapshot.parent_config)
        if snapshot.config is not None:
            chain.add(snapshot.config["configurable"]["checkpoint_id"])
        own[session_id] = chain
    return own


@pytest.fixture
async def family(
    settings: Settings, redis: Redis
) -> AsyncIterator[tuple[CompiledStateGraph[Any, Any, Any, Any], dict[str, set[str]]]]:
    """Sessions whose ids differ by case, a comma or a suffix, on the service's checkpointer."""
    graph = build_graph(await open_checkpointer(redis))
    context = WorkflowContext(library=InMemoryWorkflowLibrary())
    ids = _family(uuid.uuid4().hex[:6])
    store = SessionStore(redis, ttl_s=600)
    for session_id in ids:
        await store.open(session_id, event_id=f"e-{session_id}", event_type="t", subject=None)
    yield graph, await _run_sessions(graph, context, ids)


async def test_history_matches_exactly_one_session(
    family: tuple[CompiledStateGraph[Any, Any, Any, Any], dict[str, set[str]]],
) -> None:
    graph, own = family
    for session_id, checkpoints in own.items():
        if not valid(session_id):
            continue
        found = [
            s.config["configurable"]["checkpoint_id"]
            async for s in session_states(graph, session_id)
        ]
        assert set(found) == checkpoints, session_id
        limited = [
            s.config["configurable"]["checkpoint_id"]
            async for s in session_states(graph, session_id, limit=3)
        ]
        assert limited == found[:3]
    nobody = next(iter(own)).upper()
    assert [s async for s in session_states(graph, nobody)] == []


async def test_the_checkpointer_lists_one_thread_byte_for_byte(
    family: tuple[CompiledStateGraph[Any, Any, Any, Any], dict[str, set[str]]],
) -> None:
    graph, own = family
    for session_id, checkpoints in own.items():
        config = {"configurable": {"thread_id": session_id}}
        found = {
            s.config["configurable"]["checkpoint_id"]
            async for s in graph.aget_state_history(config)
        }
        assert found == checkpoints, session_id


async def test_finishing_a_session_expires_its_own_checkpoints_only(
    family: tuple[CompiledStateGraph[Any, Any, Any, Any], dict[str, set[str]]], redis: Redis
) -> None:
    graph, own = family
    first, *rest = own
    await expire_session(graph.checkpointer, first, 600)

    async def ttls(session_id: str) -> list[int]:
        keys = [f"agentflow:checkpoint:{{{session_id}}}:{part}" for part in ("i", "d")]
        assert await redis.exists(*keys) == 2, session_id
        return [await redis.ttl(k) for k in keys]

    assert all(0 < t <= 600 for t in await ttls(first))
    for session_id in rest:
        assert set(await ttls(session_id)) == {-1}, session_id


async def test_history_route_answers_for_the_session_asked_only(
    settings: Settings,
    family: tuple[CompiledStateGraph[Any, Any, Any, Any], dict[str, set[str]]],
) -> None:
    _graph, own = family
    server, task, url = await serve_gateway(settings, host="127.0.0.1", port=0)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for session_id, checkpoints in own.items():
                if not valid(session_id):
                    continue
                path = f"/sessions/{httpx.URL(session_id).raw_path.decode()}/history"
                answer = await http.get(path, params={"limit": 1000})
                assert answer.status_code == 200, (session_id, answer.text)
                found = {c["checkpoint_id"] for c in answer.json()["checkpoints"]}
                assert found == checkpoints, session_id
            upper = next(iter(own)).upper()
            for nobody in (upper, "a1", "x", "%00", "%0A", "%7C", "a%2Cb"):
                answer = await http.get(f"/sessions/{nobody}/history")
                assert answer.status_code == 404, (nobody, answer.text)
    finally:
        server.should_exit = True
        await task


# --- the library's queries by event type -----------------------------------------------------


async def test_library_lists_by_exact_event_type(redis: Redis) -> None:
    tag = uuid.uuid4().hex[:6]
    library = RedisWorkflowLibrary(redis, prefix=f"agentflow:test-ids-{tag}")
    await library.setup()
    types = [f"Claim.Filed{tag}", f"claim.filed{tag}", f"x,claim.filed{tag}", f"c\x00\x1b|{tag}"]
    for n, kind in enumerate(types):
        await library.put(
            SimilarWorkflow(id=f"w{n}", event_type=kind, intent="pay", verdict="approve")
        )
    for kind in types:
        total, items = await library.recent(event_type=kind)
        assert (total, [i.event_type for i in items]) == (1, [kind]), kind
        event = CloudEvent.wrap(kind, {"claim": "pay"}, source="t")
        found = await library.search(event, limit=5)
        assert found and found[0].event_type == kind
