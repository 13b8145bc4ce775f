"""Redis stopped and restarted under load: the worker waits, then finishes everything."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

import service.worker.worker as worker_module
from service.client import health_problems
from service.config import Settings
from service.devtools.servers import RedisServer
from service.gateway.app import serve_gateway
from service.storage.keys import workflow_index
from service.storage.publisher import read_log
from tests.integration_tests.conftest import read_topic, results_by_event, wait_until

ROOT = Path(__file__).resolve().parents[2]

GATED_TOOLS = '''
import asyncio

held = 0
GATE = asyncio.Event()

async def careful_check(claim_id: str) -> str:
    """Check a claim; held until the test opens the gate."""
    global held
    held += 1
    await GATE.wait()
    return f"checked {claim_id}"
'''

AGENTS = """
agents:
  - name: clerk
    description: Takes in, records, reviews, assesses and reports on claims and documents.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    system_prompt: You are a careful clerk.
    tools: [outage_tools.careful_check]
"""


def gated_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Write the gated tools and their agents file; return the tools module with a fresh gate.

    The worker runs in this process: it imports the same module, so the test holds its gate.
    """
    (tmp_path / "outage_tools.py").write_text(GATED_TOOLS)
    (tmp_path / "agents.yaml").write_text(AGENTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "outage_tools", raising=False)
    return importlib.import_module("outage_tools")


async def test_redis_restart_under_load(
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tools = gated_tools(tmp_path, monkeypatch)
    redis_server = RedisServer(persistent=True)
    await redis_server.astart()
    try:
        settings = settings.model_copy(
            update={"redis_url": redis_server.url, "agents_file": tmp_path / "agents.yaml"}
        )
        caplog.set_level(logging.WARNING, logger="service.worker.worker")
        worker = await start_worker(settings)
        events = {}
        for i in range(10):
            event = json.loads((ROOT / "examples/events/claim_submitted.json").read_text())
            event["id"] = f"outage-{i}-{tmp_path.name}"
            events[f"outage-{i}"] = event["id"]
            await producer.send_and_wait(
                settings.topic_events, json.dumps(event).encode(), key=f"outage-{i}".encode()
            )
        # Every run is held inside its first step's tool call: all ten are mid-run.
        await wait_until(lambda: tools.held >= len(events), "every run reached its tool call")
        assert worker.in_flight == len(events)

        await asyncio.to_thread(redis_server.kill)
        tools.GATE.set()  # the runs go on and meet the dead Redis

        def outage_seen() -> bool:
            return any("stopped taking new events" in r.getMessage() for r in caplog.records)

        await wait_until(outage_seen, "the worker noticed Redis was gone")
        await redis_server.astart()

        records = await read_topic(
            settings.kafka_bootstrap or "",
            settings.topic_results,
            until=lambda rs: set(events.values()) <= set(results_by_event(rs)),
            timeout_s=180,
        )
        results = results_by_event(records)
        for event_id in events.values():
            assert len(results[event_id]) == 1, event_id
            assert results[event_id][0]["status"] == "completed", results[event_id][0]["error"]
        messages = [r.getMessage() for r in caplog.records]
        assert any("reachable again" in m for m in messages), messages

        client = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            for session_id in events:
                log = await read_log(client, session_id)
                assert [t.seq for t in log] == list(range(1, len(log) + 1)), session_id
        finally:
            await client.aclose()
    finally:
        await redis_server.astop()


async def test_redis_back_empty_sets_up_again_and_takes_new_events(
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tools = gated_tools(tmp_path, monkeypatch)
    redis_server = RedisServer()  # no persistence, as `agentflow dev` runs it
    await redis_server.astart()
    try:
        settings = settings.model_copy(
            update={"redis_url": redis_server.url, "agents_file": tmp_path / "agents.yaml"}
        )
        caplog.set_level(logging.WARNING, logger="service.worker.worker")
        await start_worker(settings)

        async def send_claims(prefix: str, count: int) -> dict[str, str]:
            sent = {}
            for i in range(count):
                event = json.loads((ROOT / "examples/events/claim_submitted.json").read_text())
                event["id"] = f"{prefix}-{i}-{tmp_path.name}"
                sent[f"{prefix}-{i}"] = event["id"]
                await producer.send_and_wait(
                    settings.topic_events, json.dumps(event).encode(), key=f"{prefix}-{i}".encode()
                )
            return sent

        in_flight = await send_claims("empty-before", 3)
        await wait_until(lambda: tools.held >= len(in_flight), "every run reached its tool call")

        await asyncio.to_thread(redis_server.kill)
        tools.GATE.set()

        def outage_seen() -> bool:
            return any("stopped taking new events" in r.getMessage() for r in caplog.records)

        await wait_until(outage_seen, "the worker noticed Redis was gone")
        await redis_server.astart()  # empty: no data, no search indexes
        client = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            later = await send_claims("empty-after", 3)

            wanted = set(in_flight.values()) | set(later.values())
            records = await read_topic(
                settings.kafka_bootstrap or "",
                settings.topic_results,
                until=lambda rs: wanted <= set(results_by_event(rs)),
                timeout_s=180,
            )
            results = results_by_event(records)
            for event_id in wanted:
                assert len(results[event_id]) == 1, event_id
                assert results[event_id][0]["status"] == "completed", results[event_id][0]
            messages = [r.getMessage() for r in caplog.records]
            assert any("reachable again" in m for m in messages), messages
            # The workflow library's index is back (the checkpointer has none to restore).
            assert workflow_index() in set(await client.execute_command("FT._LIST"))
        finally:
            await client.aclose()
    finally:
        await redis_server.astop()


async def test_health_says_a_worker_is_degraded_and_since_when(
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tools = gated_tools(tmp_path, monkeypatch)
    # Setting Redis up again after the outage waits for the test: the worker stays degraded.
    setup_gate = asyncio.Event()
    restore = worker_module.restore_setup

    async def held_restore(*args: Any, **kwargs: Any) -> None:
        await setup_gate.wait()
        await restore(*args, **kwargs)

    monkeypatch.setattr(worker_module, "restore_setup", held_restore)
    redis_server = RedisServer()
    await redis_server.astart()
    server = None
    try:
        settings = settings.model_copy(
            update={"redis_url": redis_server.url, "agents_file": tmp_path / "agents.yaml"}
        )
        caplog.set_level(logging.WARNING, logger="service.worker.worker")
        worker = await start_worker(settings)
        server, serving, url = await serve_gateway(settings, host="127.0.0.1", port=0)
        event = json.loads((ROOT / "examples/events/claim_submitted.json").read_text())
        event["id"] = f"health-{tmp_path.name}"
        await producer.send_and_wait(settings.topic_events, json.dumps(event).encode(), key=b"h")
        await wait_until(lambda: tools.held >= 1, "the run reached its tool call")
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert await health_problems(settings) == []

            await asyncio.to_thread(redis_server.kill)
            tools.GATE.set()
            await wait_until(lambda: worker.degraded is not None, "the worker noticed")
            await redis_server.astart()  # Redis answers; the worker is not set up again yet

            async def says_degraded() -> bool:
                return any("degraded since" in p for p in await health_problems(settings))

            await wait_until(says_degraded, "agentflow health says the worker is degraded")
            problem = next(p for p in await health_problems(settings) if "degraded" in p)
            assert worker.name in problem and "taking no new events" in problem

            async def healthz_degraded() -> bool:
                # The gateway's pooled connection may fail once after the restart.
                return (await http.get("/healthz")).json()["status"] == "degraded"

            await wait_until(healthz_degraded, "/healthz says a worker is degraded")
            health = await http.get("/healthz")
            assert health.status_code == 503
            body = health.json()
            assert body["kafka"]["ok"] is True and body["redis"]["ok"] is True, body
            (state,) = body["workers"]
            assert state["name"] == worker.name and state["state"] == "degraded"
            assert state["since"] and state["reason"]

            setup_gate.set()

            async def healthy() -> bool:
                return (await http.get("/healthz")).status_code == 200

            await wait_until(healthy, "/healthz is ok once the worker takes events again")
            assert await health_problems(settings) == []
            records = await read_topic(
                settings.kafka_bootstrap or "",
                settings.topic_results,
                until=lambda rs: event["id"] in results_by_event(rs),
            )
            assert results_by_event(records)[event["id"]][0]["status"] == "completed"
    finally:
        if server is not None:
            server.should_exit = True
            await asyncio.wait_for(serving, 15)
        await redis_server.astop()
