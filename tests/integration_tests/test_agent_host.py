"""`agentflow agents serve` as its own process against Tansu and Redis; the test plays the worker.

Tasks are produced by hand (as the worker will), replies and messages are read from the
replies topic, and the host is started, killed and run twice like a user runs it.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from nodes.agents import load_agents
from nodes.models import CloudEvent, utcnow
from nodes.protocol import (
    MESSAGE,
    REPLY,
    AgentCancel,
    AgentEvent,
    AgentTask,
    ConversationMessage,
    TaskStep,
    encode,
    envelope,
    parse_agent_event,
)
from service.agents import agent_places
from service.bootstrap import ensure_topics
from service.config import Settings
from service.storage.hosts import read_host_states
from tests.integration_tests.conftest import cli_env, read_topic, wait_until
from tests.openai_server import OpenAICompatibleServer

ROOT = Path(__file__).resolve().parents[2]

TOOLS = '''
from pathlib import Path

RUNS = Path(RUNS_PATH)


async def check_claim(claim_id: str) -> str:
    """Check a claim against the benefit rules."""
    with RUNS.open("a") as runs:
        runs.write(claim_id + "\\n")
    return f"claim {claim_id}: eligible"
'''

AGENTS = """
agents:
  - name: intake
    description: Takes in claims.
    system_prompt: You take in claims.
  - name: analyst
    description: Assesses claims against the benefit rules.
    capabilities: [assess, eligibility]
    runs: kafka
    system_prompt: You apply the benefit rules to the claim.
    tools: [host_tools.check_claim]
"""


class Host:
    """An `agentflow agents serve` process, its log, and the file its tools count runs in."""

    def __init__(
        self,
        settings: Settings,
        tmp_path: Path,
        *,
        model: str | None = None,
        agent: str = "analyst",
    ) -> None:
        self.settings = settings
        self.agent = agent
        self.runs = tmp_path / "tool-runs.txt"
        (tmp_path / "host_tools.py").write_text(TOOLS.replace("RUNS_PATH", repr(str(self.runs))))
        body = AGENTS.replace("name: analyst", f"name: {agent}")
        body += f"    model: {model}\n" if model else ""
        self.agents_file = tmp_path / "agents.yaml"
        self.agents_file.write_text(body)
        self.tmp_path = tmp_path
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp_path / f"host-{len(self.processes)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "agents", "serve"]
            + ["--agents-file", str(self.agents_file), "--agent", self.agent],
            cwd=ROOT,
            env=cli_env(self.settings, **env),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.processes.append((process, log))
        return process, log

    def tool_runs(self) -> list[str]:
        return self.runs.read_text().split() if self.runs.exists() else []

    def stop_all(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def host(settings: Settings, tmp_path: Path) -> Iterator[Host]:
    hosts = Host(settings, tmp_path)
    yield hosts
    hosts.stop_all()


async def serving(
    redis: Redis, settings: Settings, count: int = 1, *, agent: str = "analyst"
) -> None:
    """Wait until `count` hosts of this test's agent made their topics (their heartbeats)."""
    topic = settings.agent_topic(agent)

    async def beating() -> bool:
        return sum(topic in h.topics for h in await read_host_states(redis)) >= count

    await wait_until(beating, f"{count} agent host(s) serving", timeout_s=90)


def a_task(
    settings: Settings, session_id: str, *, description: str = "Check claim C-7", **kw: Any
) -> AgentTask:
    values: dict[str, Any] = {
        "task_id": f"{session_id}:s2:1:0",
        "session_id": session_id,
        "agent": "analyst",
        "step": TaskStep(id="s2", title="Assess eligibility", description=description),
        "intent": "Handle the claim",
        "event": CloudEvent.wrap("claim.submitted", {"claim_id": "C-7"}, subject="claim-C-7"),
        "inputs": {"s1": "recorded"},
        "attempt": 1,
        "deadline": utcnow() + timedelta(minutes=5),
        "reply_to": settings.topic_agent_replies,
        "protocol_version": 1,
    }
    values.update(kw)
    return AgentTask.model_validate(values)


async def send_task(producer: AIOKafkaProducer, settings: Settings, task: AgentTask) -> None:
    """Produce a task as the worker does: CloudEvent, agent topic, key = session id."""
    event = envelope(
        task, session_id=task.session_id, source="agentflow/worker", subject=task.event.subject
    )
    await producer.send_and_wait(
        settings.agent_topic(task.agent), encode(event), key=task.session_id.encode()
    )


def agent_events(records: list[ConsumerRecord]) -> list[AgentEvent]:
    return [parse_agent_event(r.value) for r in records]


def replies_of(records: list[ConsumerRecord], task_id: str) -> list[AgentEvent]:
    return [e for e in agent_events(records) if e.type == REPLY and e.data.task_id == task_id]


async def read_replies(settings: Settings, *task_ids: str) -> list[ConsumerRecord]:
    """Read the replies topic until every task named has a reply."""
    return await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_agent_replies,
        until=lambda rs: all(replies_of(rs, t) for t in task_ids),
        timeout_s=120,
    )


async def test_a_task_is_answered_with_messages_and_one_reply_even_when_delivered_twice(
    settings: Settings, host: Host, producer: AIOKafkaProducer, redis: Redis
) -> None:
    _, log = host.start()
    await serving(redis, settings)
    task = a_task(settings, f"host-{uuid.uuid4().hex[:6]}")
    await send_task(producer, settings, task)
    records = await read_replies(settings, task.task_id)
    events = agent_events(records)
    said = [e for e in events if e.type == MESSAGE]
    (reply,) = replies_of(records, task.task_id)
    assert [r.key for r in records] == [task.session_id.encode()] * len(records)
    assert events.index(reply) == len(events) - 1  # the messages came first
    assert [(m.data.content, [c.name for c in m.data.tool_calls or []]) for m in said] == [
        ("", ["check_claim"]),
        ("Assess eligibility: claim C-7: eligible", []),
    ]
    data = reply.data
    assert (data.status, data.agent, data.output) == (
        "done",
        "analyst",
        "Assess eligibility: claim C-7: eligible",
    )
    assert [m.type for m in data.messages or []] == ["ai", "tool", "ai"]
    assert data.usage is not None and data.usage.llm_calls == 2
    assert reply.sessionid == task.session_id and reply.subject == "claim-C-7"
    assert host.tool_runs() == ["C-7"]

    # Delivered again (the worker or Kafka sent it twice): the same reply, no tool runs.
    await send_task(producer, settings, task)
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_agent_replies,
        until=lambda rs: len(replies_of(rs, task.task_id)) == 2,
    )
    first, again = [r for r in records if parse_agent_event(r.value).type == REPLY]
    assert again.value == first.value
    assert host.tool_runs() == ["C-7"]
    assert "its reply was sent again" in log.read_text()

    # `agents list`: where each agent runs, its live host, nothing left on its topic.
    registry = load_agents(host.agents_file)

    async def caught_up() -> bool:
        places = {p.name: p for p in await agent_places(settings, registry)}
        return places["analyst"].lag == 0

    await wait_until(caught_up, "the host committed its tasks")
    listing = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "service.cli", "agents", "list", "--agents-file", str(host.agents_file)),
        cwd=ROOT,
        env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, _ = await listing.communicate()
    assert listing.returncode == 0
    listed = out.decode().splitlines()
    host_name = reply.source.rsplit("/", 1)[-1]
    assert listed == [
        "agent\truns\tlag\ttopic\thosts",
        "intake\tlocal\t–\t–\t–",
        f"analyst\tkafka\t0\t{settings.agent_topic('analyst')}\t{host_name}",
    ]


async def test_malformed_tasks_go_to_the_dead_letter_topic_and_the_host_goes_on(
    settings: Settings, host: Host, producer: AIOKafkaProducer, redis: Redis
) -> None:
    host.start()
    await serving(redis, settings)
    session_id = f"bad-{uuid.uuid4().hex[:6]}"
    topic = settings.agent_topic("analyst")
    good = json.loads(
        encode(envelope(a_task(settings, session_id), session_id=session_id, source="w"))
    )
    no_task_id = json.loads(json.dumps(good))
    del no_task_id["data"]["task_id"]
    later_version = json.loads(json.dumps(good))
    later_version["data"]["protocol_version"] = 2
    other_agent = json.loads(json.dumps(good))
    other_agent["data"]["agent"] = "intake"
    bad = {
        b"not json": "not valid JSON",
        json.dumps({**good, "type": "claim.submitted"}).encode(): "unknown event type",
        json.dumps(no_task_id).encode(): "field 'data.task_id': Field required",
        json.dumps(later_version).encode(): "field 'data.protocol_version'",
        json.dumps(other_agent).encode(): "a task for agent 'intake' on the task topic of",
    }
    for value in bad:
        await producer.send_and_wait(topic, value, key=session_id.encode())
    task = a_task(settings, session_id, task_id=f"{session_id}:after")
    await send_task(producer, settings, task)

    await read_replies(settings, task.task_id)  # the host went on
    letters = await read_topic(
        settings.kafka_bootstrap or "", settings.topic_dlq, until=lambda rs: len(rs) >= len(bad)
    )
    reasons = {}
    for letter in letters:  # handled concurrently: in any order
        headers = {k: v.decode() for k, v in letter.headers}
        assert letter.key == session_id.encode() and headers["source_topic"] == topic
        reasons[letter.value] = headers["reason"]
    assert reasons.keys() == bad.keys()
    for value, reason in bad.items():
        assert reason in reasons[value], reasons[value]


@pytest.fixture
def model_host(
    settings: Settings, tmp_path: Path, openai_server: OpenAICompatibleServer
) -> Iterator[Host]:
    """Hosts whose agent's model is `openai:` on the loopback server (so it can be held)."""
    hosts = Host(settings, tmp_path, model="openai:gpt-4.1-mini")
    yield hosts
    hosts.stop_all()


@contextlib.asynccontextmanager
async def a_held_task(
    settings: Settings,
    hosts: Host,
    server: OpenAICompatibleServer,
    producer: AIOKafkaProducer,
    redis: Redis,
    session_id: str,
) -> AsyncIterator[tuple[AgentTask, subprocess.Popen[bytes], Path]]:
    """Start a host and give it a task held in its first model call; released at the end."""
    hold = server.hold_when(lambda body: "hold-me" in json.dumps(body))
    process, log = hosts.start(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=server.api_key)
    try:
        await serving(redis, settings)
        task = a_task(settings, session_id, description="Check claim C-7 (hold-me)")
        await send_task(producer, settings, task)
        await wait_until(hold.held.is_set, "the task is inside its model call")
        yield task, process, log
    finally:
        hold.release()


async def test_a_cancel_stops_a_running_task_and_nothing_is_sent(
    settings: Settings,
    model_host: Host,
    openai_server: OpenAICompatibleServer,
    producer: AIOKafkaProducer,
    redis: Redis,
) -> None:
    session_id = f"cancel-{uuid.uuid4().hex[:6]}"
    held = a_held_task(settings, model_host, openai_server, producer, redis, session_id)
    async with held as (task, _, log):
        cancel = AgentCancel(task_id=task.task_id, session_id=session_id, reason="cancelled")
        await producer.send_and_wait(
            settings.agent_topic("analyst"),
            encode(envelope(cancel, session_id=session_id, source="agentflow/worker")),
            key=session_id.encode(),
        )
        await wait_until(lambda: "cancelled by the worker" in log.read_text(), "the task stopped")
    after = a_task(settings, session_id, task_id=f"{session_id}:after")
    await send_task(producer, settings, after)
    records = await read_replies(settings, after.task_id)  # the session's partition, in order
    assert [e.data.task_id for e in agent_events(records)] == [after.task_id] * 3
    assert model_host.tool_runs() == ["C-7"]  # the cancelled task never reached its tool
    assert f"cancelling task {task.task_id}: cancelled" in log.read_text()


async def test_a_host_killed_mid_task_answers_the_redelivered_task_once(
    settings: Settings,
    model_host: Host,
    openai_server: OpenAICompatibleServer,
    producer: AIOKafkaProducer,
    redis: Redis,
) -> None:
    session_id = f"kill-{uuid.uuid4().hex[:6]}"
    held = a_held_task(settings, model_host, openai_server, producer, redis, session_id)
    async with held as (task, first, _):
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    model_host.start(OPENAI_BASE_URL=openai_server.base_url, OPENAI_API_KEY=openai_server.api_key)
    await read_replies(settings, task.task_id)
    sentinel = a_task(settings, session_id, task_id=f"{session_id}:sentinel")
    await send_task(producer, settings, sentinel)
    records = await read_replies(settings, sentinel.task_id)  # after any second reply
    (reply,) = replies_of(records, task.task_id)
    assert reply.data.status == "done"
    assert model_host.tool_runs() == ["C-7", "C-7"]  # the task, then the sentinel


def keys_on_every_partition(count: int, partitions: int) -> list[str]:
    """Session ids whose tasks spread over every partition, round robin."""
    chooser = DefaultPartitioner()
    by_partition: dict[int, list[str]] = {p: [] for p in range(partitions)}
    tag = uuid.uuid4().hex[:6]
    n = 0
    while min(len(keys) for keys in by_partition.values()) < count // partitions + 1:
        key = f"share-{tag}-{n}"
        all_partitions = list(range(partitions))
        by_partition[chooser(key.encode(), all_partitions, all_partitions)].append(key)
        n += 1
    return [key for keys in zip(*by_partition.values(), strict=False) for key in keys][:count]


async def test_two_hosts_of_one_agent_share_its_tasks(
    settings: Settings, host: Host, producer: AIOKafkaProducer, redis: Redis
) -> None:
    _, first_log = host.start()
    await serving(redis, settings, 1)
    _, second_log = host.start()
    await serving(redis, settings, 2)
    # Both in the group: the second host was given partitions (the first gave some up).
    await wait_until(
        lambda: re.search(r"assigned partitions \[\d", second_log.read_text()) is not None,
        "the second host has partitions",
    )
    tasks = [
        a_task(settings, key) for key in keys_on_every_partition(40, settings.topic_partitions)
    ]
    await asyncio.gather(*(send_task(producer, settings, t) for t in tasks))
    records = await read_replies(settings, *(t.task_id for t in tasks))
    replies = [e for e in agent_events(records) if e.type == REPLY]
    assert sorted(r.data.task_id for r in replies) == sorted(t.task_id for t in tasks)
    by_host: dict[str, int] = {}
    for reply in replies:
        by_host[reply.source] = by_host.get(reply.source, 0) + 1
    assert len(by_host) == 2 and sum(by_host.values()) == 40, by_host
    assert len(host.tool_runs()) == 40


def test_the_foreign_agent_imports_nothing_of_agentflow() -> None:
    tree = ast.parse((ROOT / "tests" / "foreign_agent.py").read_text())
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {"__future__", "argparse", "asyncio", "json", "sys", "uuid", "datetime",
                     "pathlib", "typing", "jsonschema", "aiokafka"}, roots  # fmt: skip


async def test_a_foreign_agent_that_follows_the_schema_files_answers_a_task(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    await ensure_topics(settings, agents=["analyst"])
    foreign = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "tests" / "foreign_agent.py"),
        "--bootstrap",
        settings.kafka_bootstrap or "",
        "--topic",
        settings.agent_topic("analyst"),
        "--schemas",
        str(ROOT / "docs" / "protocol"),
        "--timeout",
        "120",
        stderr=asyncio.subprocess.PIPE,
    )
    task = a_task(settings, f"foreign-{uuid.uuid4().hex[:6]}")
    await send_task(producer, settings, task)
    async with asyncio.timeout(150):
        _, err = await foreign.communicate()
    assert foreign.returncode == 0, err.decode()
    records = await read_replies(settings, task.task_id)
    said, reply = agent_events(records)  # read with agentflow's own parser
    assert said.type == MESSAGE and said.data.content == "on it"
    assert reply.type == REPLY and reply.data.status == "done"
    assert reply.data.output == "Assess eligibility: checked by team B (s1 said 'recorded')"
    assert reply.data.messages == [
        ConversationMessage(type="ai", content=reply.data.output, name="analyst")
    ]
    assert reply.sessionid == task.session_id and reply.subject == "claim-C-7"
