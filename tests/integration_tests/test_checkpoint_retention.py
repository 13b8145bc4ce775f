"""Retention of finished sessions on `RedisSaver`: TTLs on every key, `latest` pruning."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from graphs.workflow import build_graph
from service.config import Settings
from service.gateway.app import serve_gateway
from service.storage.checkpoints import expire_session, open_checkpointer
from service.storage.publisher import read_log
from tests.integration_tests.conftest import example, read_topic, results_by_event, send


async def test_fifty_finished_sessions_leave_no_key_without_a_ttl(
    settings: Settings, start_worker: Any, producer: AIOKafkaProducer, redis: Redis
) -> None:
    pruning = settings.model_copy(update={"checkpoint_retention": "latest"})
    await start_worker(pruning)
    tag = uuid.uuid4().hex[:6]
    sent: dict[str, list[str]] = {}
    for i in range(50):
        session_id = f"ret-{tag}-{i:02d}"
        # Every fifth session handles a second event after its first finished.
        names = ["claim_submitted"] + (["status_requested"] if i % 5 == 0 else [])
        for name in names:
            event = example(name)
            sent.setdefault(session_id, []).append(event["id"])
            await send(producer, settings, event, session_id)
    event_ids = {e for ids in sent.values() for e in ids}
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event_ids <= set(results_by_event(rs)),
        timeout_s=180,
    )
    results = results_by_event(records)
    # Only this test's events: a worker also wakes other tests' sessions whose remote
    # agent's deadline passed (deadlines are global in Redis) and sends their results here.
    assert {results[e][0]["status"] for e in event_ids} == {"completed"}

    # A result goes out after the session's retention: every key is settled by now.
    saver = await open_checkpointer(redis)
    runs: set[str] = set()
    for session_id in sent:
        history = [t async for t in saver.alist({"configurable": {"thread_id": session_id}})]
        assert len(history) == 1, session_id  # pruned to its latest checkpoint
        runs |= {str(t.metadata["run_id"]) for t in history if t.metadata.get("run_id")}
    ours = (*sent, *event_ids, *runs)
    kinds: set[str] = set()
    without_ttl = []
    async for key in redis.scan_iter(count=1000):
        if not any(name in key for name in ours):
            continue
        kinds.add(key.split(":")[1])
        if await redis.ttl(key) < 0:
            without_ttl.append(key)
    print(
        f"\n{len(sent)} finished sessions: key kinds {sorted(kinds)}, without a TTL {without_ttl}"
    )
    # The scan saw each kind of key a session has (so it looked in the right place) ...
    assert {"session", "event", "checkpoint"} <= kinds
    # ... and none of them is kept for ever.
    assert without_ttl == []
    for session_id in sent:
        assert (await read_log(redis, session_id))[-1].type == "session.completed"


async def test_a_session_pruned_to_its_latest_checkpoint_keeps_its_whole_conversation(
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await start_worker(settings)  # AGENTFLOW_CHECKPOINT_RETENTION=all: every checkpoint kept
    session_id = f"pruned-{uuid.uuid4().hex[:6]}"
    event = example("document_uploaded")
    await send(producer, settings, event, session_id)
    await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event["id"] in results_by_event(rs),
    )
    from service.cli.app import main

    monkeypatch.setenv("AGENTFLOW_REDIS_URL", settings.redis_url or "")

    def history() -> list[dict[str, Any]]:
        with pytest.raises(SystemExit) as done:
            main(["sessions", "history", session_id, "--json"])
        out = capsys.readouterr()
        assert done.value.code in (0, None), out.err
        return list(json.loads(out.out))

    server, task, url = await serve_gateway(settings, host="127.0.0.1", port=0)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def gateway() -> tuple[dict[str, Any], list[dict[str, Any]]]:
                detail = (await http.get(f"/sessions/{session_id}")).json()
                answer = await http.get(f"/sessions/{session_id}/history")
                assert answer.status_code == 200, answer.text
                return detail["workflow"], answer.json()["checkpoints"]

            # the CLI runs its own event loop: keep it off this test's loop
            before = await asyncio.to_thread(history)
            workflow_before, checkpoints_before = await gateway()
            graph = build_graph(await open_checkpointer(redis))
            # What the worker does at a session's end with AGENTFLOW_CHECKPOINT_RETENTION=latest.
            await expire_session(graph.checkpointer, session_id, 600, retention="latest")
            after = await asyncio.to_thread(history)
            workflow_after, checkpoints_after = await gateway()
    finally:
        server.should_exit = True
        await task

    assert len(checkpoints_before) > 10 and len(checkpoints_after) == 1
    assert checkpoints_after[0] == checkpoints_before[0]  # the latest, as it was
    assert workflow_after == workflow_before
    (run,) = before
    conversation = {step: len(s["messages"]) for step, s in run["steps"].items()}
    assert conversation and all(n >= 2 for n in conversation.values()), conversation
    assert after == before  # every step's messages, whole
