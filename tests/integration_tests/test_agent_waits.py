"""Sessions that wait for remote agents (`runs: kafka`), through a real worker and Kafka.

The test plays the agent's host with a plain consumer and producer: it reads the tasks
the worker sends and answers (or does not). Nothing waits for time except the deadline
test, which waits for the deadline's effect itself.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from langgraph.types import Interrupt
from redis.asyncio import Redis

from service.config import Settings
from service.devtools.servers import LocalServers
from service.storage.keys import DEADLINES_KEY
from service.storage.publisher import read_log
from service.storage.sessions import SessionStore
from service.worker.waits import AgentWaits
from service.worker.worker import Worker
from tests.integration_tests.conftest import (
    example,
    own_settings,
    read_topic,
    results_by_event,
    send,
    wait_until,
)
from tests.integration_tests.test_agent_host import Host as HostProcess
from tests.integration_tests.test_agent_host import serving
from tests.integration_tests.test_exactly_once import read_to_end, start_worker_process, stop

AGENTS = """
agents:
  - name: first
    description: Takes in, records and reviews claims, documents and eligibility.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    system_prompt: First.
  - name: second
    description: Takes in, records and reviews claims, documents and eligibility.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    system_prompt: Hosted elsewhere.
    runs: kafka
    timeout_s: {timeout_s}
    max_attempts: 2
"""


def _settings(servers: LocalServers, tmp_path: Path, timeout_s: float = 60, **kw: Any) -> Settings:
    path = tmp_path / "agents.yaml"
    path.write_text(AGENTS.format(timeout_s=timeout_s))
    return own_settings(servers, agents_file=path, **kw)


Answer = Callable[[dict[str, Any]], Awaitable[list[dict[str, Any]]]]
"""What the fake host sends for a task: the CloudEvents to produce on the replies topic."""


async def _host(settings: Settings, answer: Answer, seen: list[dict[str, Any]]) -> None:
    """Play the host of agent `second`: answer each task it reads, until cancelled."""
    consumer = AIOKafkaConsumer(
        settings.agent_topic("second"),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=f"agentflow-agent-second-{uuid.uuid4().hex[:6]}",
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    await producer.start()
    try:
        async for record in consumer:
            task = json.loads(record.value)
            seen.append(task)
            for reply in await answer(task):
                await producer.send_and_wait(
                    task["data"]["reply_to"], json.dumps(reply).encode(), key=record.key
                )
    finally:
        await consumer.stop()
        await producer.stop()


@pytest.fixture
async def host() -> AsyncIterator[Callable[[Settings, Answer], list[dict[str, Any]]]]:
    running: list[asyncio.Task[None]] = []

    def start(settings: Settings, answer: Answer) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        running.append(asyncio.create_task(_host(settings, answer, seen)))
        return seen

    yield start
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


def _envelope(kind: str, task: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "type": kind,
        "id": uuid.uuid4().hex,
        "source": "test/host",
        "sessionid": task["data"]["session_id"],
        "data": {"task_id": task["data"]["task_id"], "agent": "second", **data},
    }


async def _talks_and_answers(task: dict[str, Any]) -> list[dict[str, Any]]:
    step = task["data"]["step"]["id"]
    return [
        _envelope("agentflow.agent.message", task, {"content": f"looking at {step}"}),
        _envelope(
            "agentflow.agent.reply",
            task,
            {
                "status": "done",
                "output": f"remote answer for {step}",
                "usage": {"llm_calls": 1, "input_tokens": 7, "output_tokens": 3},
            },
        ),
    ]


async def _result(settings: Settings, event_id: str) -> list[dict[str, Any]]:
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event_id in results_by_event(rs),
    )
    return results_by_event(records)[event_id]


async def test_a_session_with_a_remote_agent_waits_and_completes_on_its_replies(
    servers: LocalServers,
    tmp_path: Path,
    start_worker: Callable[..., Awaitable[Worker]],
    producer: AIOKafkaProducer,
    redis: Redis,
    host: Callable[[Settings, Answer], list[dict[str, Any]]],
) -> None:
    settings = _settings(servers, tmp_path)
    worker = await start_worker(settings)
    event = example("claim_submitted", sessionid=f"remote-{uuid.uuid4().hex[:6]}")
    sid = event["sessionid"]
    store = SessionStore(redis, ttl_s=settings.session_ttl_s)
    await send(producer, settings, event, sid)
    # No host yet: the session waits, costs no slot, and its record says on what.
    await wait_until(
        lambda: _status(store, sid, "waiting"), "the session waits for the remote agent"
    )
    assert worker.in_flight == 0
    record = await store.get(sid)
    assert record is not None and record.waiting_on
    assert {w.agent for w in record.waiting_on} == {"second"}
    assert all(w.deadline is not None and w.since is not None for w in record.waiting_on)

    tasks = host(settings, _talks_and_answers)
    (result,) = await _result(settings, event["id"])
    assert result["status"] == "completed"
    outputs = {s["id"]: s["output"] for s in result["workflow"]["steps"]}
    assert all(f"second: remote answer for {step}" in out for step, out in outputs.items())
    assert all(t["type"] == "agentflow.agent.task" for t in tasks)
    first = tasks[0]["data"]
    assert first["agent"] == "second" and first["attempt"] == 1 and first["protocol_version"] == 1
    assert first["history"][0]["type"] == "human"  # the step's task opens the conversation
    assert [m["name"] for m in first["history"] if m["type"] == "ai"][0] == "first"
    log = await read_log(redis, sid)
    kinds = [t.type for t in log]
    assert "session.waiting" in kinds
    said = [t for t in log if t.type == "agent.message" and t.agent == "second"]
    assert {t.data["content"] for t in said if t.data} == {f"looking at {s}" for s in outputs}
    assert kinds.count("session.completed") == 1


async def _a_waiting_session(
    settings: Settings, producer: AIOKafkaProducer, store: SessionStore, prefix: str
) -> tuple[dict[str, Any], set[str]]:
    """Send an event of a new session; return it once it waits, with the task ids out."""
    sid = f"{prefix}-{uuid.uuid4().hex[:6]}"
    event = example("claim_submitted", sessionid=sid)
    await send(producer, settings, event, sid)
    await wait_until(lambda: _status(store, sid, "waiting"), "the session waits")
    record = await store.get(sid)
    assert record is not None
    return event, {w.task_id for w in record.waiting_on}


async def _status(store: SessionStore, sid: str, status: str) -> bool:
    record = await store.get(sid)
    return record is not None and record.status == status


async def test_a_task_with_no_reply_is_sent_again_then_its_step_fails_with_the_reason(
    servers: LocalServers,
    tmp_path: Path,
    start_worker: Callable[..., Awaitable[Worker]],
    producer: AIOKafkaProducer,
    host: Callable[[Settings, Answer], list[dict[str, Any]]],
) -> None:
    # A host that never answers; deadlines of one second, no revise rounds after.
    settings = _settings(servers, tmp_path, timeout_s=1, max_revise_rounds=0)
    await start_worker(settings)

    async def silent(task: dict[str, Any]) -> list[dict[str, Any]]:
        return []

    tasks = host(settings, silent)
    event = example("claim_submitted", sessionid=f"late-{uuid.uuid4().hex[:6]}")
    await send(producer, settings, event, event["sessionid"])
    (result,) = await _result(settings, event["id"])
    failed = [s for s in result["workflow"]["steps"] if s["status"] == "failed"]
    assert failed, result["workflow"]["steps"]
    assert {s["error"] for s in failed} == {"agent second did not answer within 1 s"}

    def attempts(step_id: str) -> list[int]:
        return [t["data"]["attempt"] for t in tasks if t["data"]["step"]["id"] == step_id]

    # The host reads the tasks at its own pace: wait until it has seen them.
    await wait_until(
        lambda: all(len(attempts(s["id"])) >= 2 for s in failed), "the host read every task"
    )
    assert all(attempts(s["id"]) == [1, 2] for s in failed), [t["data"] for t in tasks]


async def test_duplicate_unknown_and_malformed_replies_are_dropped_or_dead_lettered(
    servers: LocalServers,
    tmp_path: Path,
    start_worker: Callable[..., Awaitable[Worker]],
    producer: AIOKafkaProducer,
    redis: Redis,
    host: Callable[[Settings, Answer], list[dict[str, Any]]],
) -> None:
    settings = _settings(servers, tmp_path)
    worker = await start_worker(settings)

    async def twice(task: dict[str, Any]) -> list[dict[str, Any]]:
        replies = await _talks_and_answers(task)
        return [
            *replies,
            replies[-1],
            _envelope(
                "agentflow.agent.reply",
                task,
                {"status": "done", "output": "x", "task_id": "no-such-task"},
            ),
        ]

    host(settings, twice)
    event = example("claim_submitted", sessionid=f"dup-{uuid.uuid4().hex[:6]}")
    sid = event["sessionid"]
    await send(producer, settings, event, sid)
    (result,) = await _result(settings, event["id"])
    assert result["status"] == "completed"
    no_task = {
        "specversion": "1.0",
        "type": "agentflow.agent.reply",
        "id": "r-1",
        "source": "test/host",
        "sessionid": sid,
        "data": {"agent": "second", "status": "done"},
    }
    bad = [b"not json", json.dumps(no_task).encode()]
    for value in bad:
        await producer.send_and_wait(settings.topic_agent_replies, value, key=sid.encode())
    dead = await read_topic(
        settings.kafka_bootstrap or "", settings.topic_dlq, until=lambda rs: len(rs) >= 2
    )
    reasons = [dict(r.headers).get("reason", b"").decode() for r in dead]
    assert any("not valid JSON" in r for r in reasons), reasons
    assert any("'data.task_id'" in r for r in reasons), reasons
    await wait_until(lambda: worker.in_flight == 0, "every reply handled")
    log = await read_log(redis, sid)
    assert [t.type for t in log].count("session.completed") == 1
    results = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event["id"] in results_by_event(rs),
    )
    assert len(results_by_event(results)[event["id"]]) == 1


async def test_sessions_waiting_when_the_worker_stops_are_resumed_by_a_new_worker(
    servers: LocalServers,
    tmp_path: Path,
    producer: AIOKafkaProducer,
    redis: Redis,
    host: Callable[[Settings, Answer], list[dict[str, Any]]],
) -> None:
    settings = _settings(servers, tmp_path)
    store = SessionStore(redis, ttl_s=settings.session_ttl_s)
    first = Worker(settings)
    await first.start()
    running = asyncio.create_task(first.run())
    events = [
        example("claim_submitted", sessionid=f"restart-{i}-{uuid.uuid4().hex[:6]}")
        for i in range(3)
    ]
    for event in events:
        await send(producer, settings, event, event["sessionid"])
    for event in events:
        await wait_until(lambda e=event: _status(store, e["sessionid"], "waiting"), "waiting")
    first.stop()
    await asyncio.wait_for(running, 30)

    host(settings, _talks_and_answers)
    second = Worker(settings)
    await second.start()
    running = asyncio.create_task(second.run())
    try:
        for event in events:
            results = await _result(settings, event["id"])
            assert [r["status"] for r in results] == ["completed"]
    finally:
        second.stop()
        await asyncio.wait_for(running, 30)


@pytest.mark.parametrize(
    ("multitask", "status"), [("interrupt", "superseded"), ("rollback", "rolled_back")]
)
async def test_a_newer_event_stops_a_wait_and_the_tasks_out_are_cancelled(
    servers: LocalServers,
    tmp_path: Path,
    start_worker: Callable[..., Awaitable[Worker]],
    producer: AIOKafkaProducer,
    redis: Redis,
    multitask: str,
    status: str,
) -> None:
    settings = _settings(servers, tmp_path)
    await start_worker(settings)
    store = SessionStore(redis, ttl_s=settings.session_ttl_s)
    first, out = await _a_waiting_session(settings, producer, store, "stop")
    sid = first["sessionid"]
    second = example("claim_submitted", sessionid=sid, multitask=multitask)
    await send(producer, settings, second, sid)
    (result,) = await _result(settings, first["id"])
    assert result["status"] == status
    assert result["error"] == f"{status.replace('_', ' ')} by event {second['id']}"
    cancels = await read_topic(
        settings.kafka_bootstrap or "",
        settings.agent_topic("second"),
        until=lambda rs: out <= _cancelled(rs),
    )
    assert out <= _cancelled(cancels)
    # The newer event runs, and waits for the agent in its turn.
    await wait_until(lambda: _waits_for(store, sid, second["id"]), "the second event's run waits")
    log = await read_log(redis, sid)
    assert f"session.{status}" in [t.type for t in log]


def _cancelled(records: list[Any]) -> set[str]:
    values = [json.loads(r.value) for r in records]
    return {v["data"]["task_id"] for v in values if v["type"] == "agentflow.agent.cancel"}


async def _waits_for(store: SessionStore, sid: str, event_id: str) -> bool:
    record = await store.get(sid)
    return record is not None and record.status == "waiting" and record.waiting_event == event_id


async def test_a_worker_sigkilled_while_sessions_wait_loses_and_doubles_nothing(
    servers: LocalServers,
    tmp_path: Path,
    producer: AIOKafkaProducer,
    redis: Redis,
    host: Callable[[Settings, Answer], list[dict[str, Any]]],
) -> None:
    settings = _settings(servers, tmp_path)
    store = SessionStore(redis, ttl_s=settings.session_ttl_s)
    env = {"AGENTFLOW_AGENTS_FILE": str(settings.agents_file)}
    victim = start_worker_process(settings, tmp_path / "victim.log", **env)
    events = [
        example("claim_submitted", sessionid=f"kill-{i}-{uuid.uuid4().hex[:6]}") for i in range(5)
    ]
    try:
        for event in events:
            await send(producer, settings, event, event["sessionid"])
        for event in events:
            await wait_until(
                lambda e=event: _status(store, e["sessionid"], "waiting"), "every session waits"
            )
    finally:
        victim.kill()  # SIGKILL: no drain, no commit
        victim.wait(10)
    host(settings, _talks_and_answers)
    survivor = start_worker_process(settings, tmp_path / "survivor.log", **env)
    try:
        wanted = {e["id"] for e in events}
        records = await read_topic(
            settings.kafka_bootstrap or "",
            settings.topic_results,
            until=lambda rs: wanted <= set(results_by_event(rs)),
            timeout_s=120,
        )
    finally:
        stop(survivor)
    results = results_by_event(await read_to_end(settings, settings.topic_results))
    assert {e: [r["status"] for r in rs] for e, rs in results.items()} == {
        e: ["completed"] for e in wanted
    }, (tmp_path / "survivor.log").read_text()[-3000:]
    assert len(records) >= len(wanted)
    for event in events:
        log = await read_log(redis, event["sessionid"])
        assert [t.type for t in log].count("session.completed") == 1


async def test_local_and_hosted_agents_complete_a_session_through_kafka(
    servers: LocalServers,
    tmp_path: Path,
    start_worker: Callable[..., Awaitable[Worker]],
    producer: AIOKafkaProducer,
    redis: Redis,
) -> None:
    # The agents file of test_agent_host: `intake` runs here, `analyst` in its host process.
    # An agent name of its own: hosts of one agent share a consumer group, whatever the
    # topics, and a host killed by another test would hold up this group's rebalance.
    agent = f"analyst_{uuid.uuid4().hex[:6]}"
    settings = own_settings(servers)
    hosts = HostProcess(settings, tmp_path, agent=agent)
    settings = settings.model_copy(update={"agents_file": hosts.agents_file})
    hosts.settings = settings
    try:
        hosts.start()
        await serving(redis, settings, agent=agent)
        await start_worker(settings)
        event = example("claim_submitted", sessionid=f"mixed-{uuid.uuid4().hex[:6]}")
        await send(producer, settings, event, event["sessionid"])
        (result,) = await _result(settings, event["id"])
    finally:
        hosts.stop_all()
    assert result["status"] == "completed", result
    steps = result["workflow"]["steps"]
    remote = [s for s in steps if agent in s["agents"]]
    assert remote and all(s["status"] == "done" and s["output"] for s in remote), steps
    assert any("intake" in s["agents"] for s in steps), steps
    log = await read_log(redis, event["sessionid"])
    said = [t for t in log if t.type == "agent.message" and t.agent == agent]
    assert said and {t.step_id for t in said} <= {s["id"] for s in remote}
    assert "session.waiting" in [t.type for t in log]


async def test_cancelling_a_waiting_session_ends_its_event_and_calls_off_its_tasks(
    servers: LocalServers,
    tmp_path: Path,
    start_worker: Callable[..., Awaitable[Worker]],
    producer: AIOKafkaProducer,
    redis: Redis,
) -> None:
    settings = _settings(servers, tmp_path)
    await start_worker(settings)
    store = SessionStore(redis, ttl_s=settings.session_ttl_s)
    event, out = await _a_waiting_session(settings, producer, store, "cancel")
    sid = event["sessionid"]
    cancel = example("claim_submitted", sessionid=sid, type="agentflow.cancel")
    await send(producer, settings, cancel, sid)
    for event_id in (event["id"], cancel["id"]):
        (result,) = await _result(settings, event_id)
        assert (result["status"], result["error"]) == ("failed", "cancelled")
    cancels = await read_topic(
        settings.kafka_bootstrap or "",
        settings.agent_topic("second"),
        until=lambda rs: out <= _cancelled(rs),
    )
    assert out <= _cancelled(cancels)
    assert not await redis.hlen(f"agentflow:session:{{{sid}}}:waits")


async def test_a_deadline_swept_by_another_deployment_times_out_on_the_senders_topic(
    servers: LocalServers, tmp_path: Path, producer: AIOKafkaProducer, redis: Redis
) -> None:
    # Two deployments (topics of their own) on one Redis: whoever sweeps, the timeout goes
    # to the replies topic of the worker that sent the task.
    mine, theirs = _settings(servers, tmp_path), _settings(servers, tmp_path)
    sid = f"swept-{uuid.uuid4().hex[:6]}"
    task = {
        "task_id": uuid.uuid4().hex,
        "agent": "second",
        "attempt": 1,
        "timeout_s": 0.001,
        "step": {"id": "s1", "title": "Take in the claim", "description": ""},
        "intent": "",
        "event": example("claim_submitted", sessionid=sid),
        "inputs": {},
        "feedback": [],
        "history": [],
    }
    (wait,) = await AgentWaits(redis, producer, mine).send(
        sid, None, [Interrupt(value=task, id="i-1")]
    )
    other = AgentWaits(redis, producer, theirs)
    await wait_until(lambda: _swept(other, redis, wait.task_id), "the other deployment swept it")
    replies = await read_topic(
        servers.kafka_bootstrap, mine.topic_agent_replies, until=lambda rs: len(rs) >= 1
    )
    (reply,) = [json.loads(r.value) for r in replies]
    assert (reply["data"]["task_id"], reply["data"]["status"]) == (wait.task_id, "timeout")


async def _swept(waits: AgentWaits, redis: Redis, task_id: str) -> bool:
    await waits.sweep()
    return not [m for m in await redis.zrange(DEADLINES_KEY, 0, -1) if m.endswith(task_id)]


async def test_parallel_steps_waiting_on_the_agent_each_go_on_with_their_own_reply(
    servers: LocalServers,
    tmp_path: Path,
    start_worker: Callable[..., Awaitable[Worker]],
    producer: AIOKafkaProducer,
    redis: Redis,
    host: Callable[[Settings, Answer], list[dict[str, Any]]],
) -> None:
    # s2 and s3 run side by side after s1; the host answers every task but theirs, which
    # the test answers itself: s3's first, then s2's.
    settings = _settings(servers, tmp_path)
    await start_worker(settings)
    store = SessionStore(redis, ttl_s=settings.session_ttl_s)
    parallel = {"s2", "s3"}

    async def all_but_the_parallel_steps(task: dict[str, Any]) -> list[dict[str, Any]]:
        if task["data"]["step"]["id"] in parallel:
            return []
        return await _talks_and_answers(task)

    seen = host(settings, all_but_the_parallel_steps)
    event = example("claim_submitted", sessionid=f"parallel-{uuid.uuid4().hex[:6]}")
    sid = event["sessionid"]
    await send(producer, settings, event, sid)

    async def waits_on(steps: set[str]) -> bool:
        record = await store.get(sid)
        return (
            record is not None
            and record.status == "waiting"
            and {w.step_id for w in record.waiting_on} == steps
        )

    async def answer(step: str) -> None:
        [task] = [t for t in seen if t["data"]["step"]["id"] == step]
        for reply in await _talks_and_answers(task):
            await producer.send_and_wait(
                settings.topic_agent_replies, json.dumps(reply).encode(), key=sid.encode()
            )

    await wait_until(lambda: waits_on({"s2", "s3"}), "s2 and s3 to wait side by side")
    await wait_until(
        lambda: {t["data"]["step"]["id"] for t in seen} >= parallel, "the host to get both tasks"
    )
    await answer("s3")
    await wait_until(lambda: waits_on({"s2"}), "s3 to go on while s2 still waits")
    log = await read_log(redis, sid)
    done = [t.step_id for t in log if t.type == "step.completed"]
    assert "s3" in done and "s2" not in done

    await answer("s2")
    (result,) = await _result(settings, event["id"])
    assert result["status"] == "completed"
    log = await read_log(redis, sid)
    done = [t.step_id for t in log if t.type == "step.completed"]
    assert sorted(done) == ["s1", "s2", "s3", "s4"]  # each reply applied once
    assert len([t for t in seen if t["data"]["step"]["id"] in parallel]) == 2  # sent once each
