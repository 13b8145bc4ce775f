"""A worker killed with SIGKILL mid-run, then restarted: nothing lost, nothing twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from graphs.workflow import build_graph
from service.config import Settings
from service.storage.checkpoints import open_checkpointer
from service.storage.publisher import read_log
from tests.integration_tests.conftest import cli_env, read_topic, results_by_event, wait_until

ROOT = Path(__file__).resolve().parents[2]

SLOW_TOOLS = '''
import asyncio
from pathlib import Path

GATE = Path(GATE_PATH)

async def slow_check(claim_id: str) -> str:
    """Check a claim; held until the gate file exists."""
    while not GATE.exists():
        await asyncio.sleep(0.05)
    return f"checked {claim_id}"
'''

SLOW_AGENTS = """
agents:
  - name: clerk
    description: Takes in, records, reviews, assesses and reports on claims and documents.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    system_prompt: You are a careful clerk.
    tools: [crash_tools.slow_check]
"""


def start_worker_process(
    settings: Settings, agents_file: Path, log: Path
) -> subprocess.Popen[bytes]:
    env = cli_env(settings, AGENTFLOW_AGENTS_FILE=str(agents_file))
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def test_sigkill_mid_run_then_restart(
    settings: Settings, producer: AIOKafkaProducer, redis: Redis, tmp_path: Path
) -> None:
    # The first worker's runs are held in their first tool call until the gate file exists,
    # so the kill lands mid-run however fast the machine is; the gate opens for the second.
    gate = tmp_path / "gate"
    (tmp_path / "crash_tools.py").write_text(SLOW_TOOLS.replace("GATE_PATH", repr(str(gate))))
    agents_file = tmp_path / "agents.yaml"
    agents_file.write_text(SLOW_AGENTS)
    log = tmp_path / "worker.log"
    tag = uuid.uuid4().hex[:6]
    sessions = [f"crash-{tag}-{i}" for i in range(6)]
    events = {}
    first = start_worker_process(settings, agents_file, log)
    try:
        for session_id in sessions:
            event = json.loads((ROOT / "examples/events/claim_submitted.json").read_text())
            event["id"] = f"evt-{session_id}"
            events[session_id] = event["id"]
            await producer.send_and_wait(
                settings.topic_events, json.dumps(event).encode(), key=session_id.encode()
            )

        async def some_planned() -> bool:
            done = 0
            for session_id in sessions:
                log_entries = await read_log(redis, session_id)
                done += any(t.node == "plan" and t.type == "node.completed" for t in log_entries)
            return done >= 3

        await wait_until(some_planned, "sessions got planned before the kill", timeout_s=90)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    # What the checkpoints hold after the kill: these plans must never run again.
    graph = build_graph(await open_checkpointer(redis))
    planned_before = {}
    for session_id in sessions:
        snapshot = await graph.aget_state({"configurable": {"thread_id": session_id}})
        planned_before[session_id] = bool(snapshot.values.get("intent"))
    assert any(planned_before.values())

    gate.touch()
    second = start_worker_process(settings, agents_file, log)
    try:
        records = await read_topic(
            settings.kafka_bootstrap or "",
            settings.topic_results,
            until=lambda rs: set(events.values()) <= set(results_by_event(rs)),
            timeout_s=150,
        )
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(30)
        except subprocess.TimeoutExpired:
            second.kill()
    results = results_by_event(records)
    resumed = 0
    for session_id, event_id in events.items():
        assert len(results[event_id]) == 1, f"{event_id}: {len(results[event_id])} results"
        assert results[event_id][0]["status"] == "completed", results[event_id][0]["error"]
        entries = await read_log(redis, session_id)
        assert [t.seq for t in entries] == list(range(1, len(entries) + 1)), session_id
        resumed += any(
            t.type == "session.started" and (t.data or {}).get("resumed") for t in entries
        )
        if planned_before[session_id]:
            plan_starts = sum(t.node == "plan" and t.type == "node.started" for t in entries)
            trace = "\n".join(f"{t.seq} {t.ts} {t.type} {t.node} {t.step_id}" for t in entries[:12])
            wlog = "\n".join(line for line in log.read_text().splitlines() if "service." in line)
            assert plan_starts == 1, f"{session_id}: a finished plan ran again:\n{trace}\n{wlog}"
    assert resumed >= 1, "some session continued from its checkpoint"
    assert "closed" in log.read_text()  # the second worker drained and left cleanly
