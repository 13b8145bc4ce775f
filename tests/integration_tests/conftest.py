"""Fixtures that start real servers: the Tansu Kafka broker and Redis 8 with modules.

`AGENTFLOW_KAFKA_BOOTSTRAP` / `AGENTFLOW_REDIS_URL` point the suite at existing servers.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition
from redis.asyncio import Redis, RedisCluster

from nodes.chat_models import make_chat_model
from service.config import Settings, load_settings
from service.devtools.servers import LocalRedisCluster, LocalServers
from service.worker import Worker
from tests.openai_server import Hold, OpenAICompatibleServer

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this directory `integration` (a conftest's `pytestmark` does not)."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def servers() -> Iterator[LocalServers]:
    """One broker and one Redis for the whole run."""
    with LocalServers.from_env() as started:
        yield started


def own_settings(servers: LocalServers, **overrides: object) -> Settings:
    """Settings with topics and a consumer group of their own."""
    tag = uuid.uuid4().hex[:8]
    return load_settings(
        kafka_bootstrap=servers.kafka_bootstrap,
        redis_url=servers.redis_url,
        consumer_group=f"agentflow-workers-{tag}",
        topic_events=f"agentflow.events.{tag}",
        topic_results=f"agentflow.results.{tag}",
        topic_sessions=f"agentflow.sessions.{tag}",
        topic_dlq=f"agentflow.events.dlq.{tag}",
        topic_agents_prefix=f"agentflow.agents.{tag}.",
        topic_agent_replies=f"agentflow.agents.{tag}.replies",
        topic_partitions=3,
        shutdown_grace_s=5,
        **overrides,
    )


@pytest.fixture
def openai_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAICompatibleServer]:
    """Start an OpenAI-compatible server on loopback and point `openai:` models at it."""
    with OpenAICompatibleServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
        make_chat_model.cache_clear()
        yield server
    make_chat_model.cache_clear()  # the cached clients point at a closed port now


@pytest.fixture
def settings(servers: LocalServers) -> Settings:
    """Settings with topics and a consumer group of this test's own."""
    return own_settings(servers)


@pytest.fixture
async def redis(servers: LocalServers) -> AsyncIterator[Redis]:
    client = Redis.from_url(servers.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A Redis Cluster of three plain `redis-server` primaries, started for the first test."""
    with LocalRedisCluster() as started:
        yield started


@pytest.fixture
async def cluster_redis(redis_cluster: LocalRedisCluster) -> AsyncIterator[RedisCluster]:
    """A cluster client of `redis_cluster`, text replies."""
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Start workers in this process; each is stopped and closed at the end."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(settings: Settings, **kw: Any) -> Worker:
        worker = Worker(settings, **kw)
        await worker.start()
        running.append((worker, asyncio.create_task(worker.run())))
        return worker

    yield start
    for worker, _task in running:
        worker.stop()
    for _worker, task in running:
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def producer(servers: LocalServers) -> AsyncIterator[AIOKafkaProducer]:
    client = AIOKafkaProducer(bootstrap_servers=servers.kafka_bootstrap, acks="all")
    await client.start()
    yield client
    await client.stop()


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], what: str, *, timeout_s: float = 60.0
) -> None:
    """Poll `condition` (sync or async) until it holds.

    The bound only catches a hang: a test waits for the condition itself, never for time.

    Raises:
        TimeoutError: naming `what` was awaited, when the condition does not hold in time.
    """
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                held = condition()
                if inspect.isawaitable(held):
                    held = await held
                if held:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise TimeoutError(f"not within {timeout_s:g} s: {what}") from None


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list[ConsumerRecord]], bool],
    timeout_s: float = 60.0,
) -> list[ConsumerRecord]:
    """Read a topic from the start until `until(records)` holds.

    Raises:
        TimeoutError: with what was read, when the condition does not hold in time.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not until(records):
                batch = await consumer.getmany(timeout_ms=200)
                for part in batch.values():
                    records.extend(part)
    except TimeoutError:
        raise TimeoutError(f"{topic}: condition not met; read {len(records)} record(s)") from None
    finally:
        await consumer.stop()
    return records


EVENTS = HERE.parents[1] / "examples" / "events"


def example(name: str, **overrides: Any) -> dict[str, Any]:
    """An example event as a dict, with a fresh id and overrides."""
    raw = json.loads((EVENTS / f"{name}.json").read_text())
    raw["id"] = f"{raw['id']}-{uuid.uuid4().hex[:6]}"
    raw.update(overrides)
    return raw


def marked_event(session_id: str, multitask: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A claim event of the session, with a marker of its own in its data (see `hold`)."""
    event = example("claim_submitted", sessionid=session_id, **overrides)
    event["data"] = {**event["data"], "marker": f"marker-{uuid.uuid4().hex}"}
    if multitask is not None:
        event["multitask"] = multitask
    return event


def hold_answers(server: OpenAICompatibleServer, event: dict[str, Any]) -> Hold:
    """Hold back the answers to the model calls of a `marked_event`'s runs."""
    marker = event["data"]["marker"]
    return server.hold_when(lambda body: marker in json.dumps(body))


async def send(
    producer: AIOKafkaProducer, settings: Settings, event: dict[str, Any], key: str
) -> None:
    """Produce an event dict to the events topic, keyed by session id."""
    await producer.send_and_wait(
        settings.topic_events, json.dumps(event).encode(), key=key.encode()
    )


def results_by_event(records: list[ConsumerRecord]) -> dict[str, list[dict[str, Any]]]:
    """Group result records by their `event_id` header."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        event_id = dict(record.headers)["event_id"].decode()
        grouped.setdefault(event_id, []).append(json.loads(record.value))
    return grouped


def cli_env(settings: Settings | None, **extra: str) -> dict[str, str]:
    """The environment of a user who exported the service's settings (nothing else)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTFLOW_", "OPENAI_")) and k != "CI"
    }
    env.update({"COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
    if settings is not None:
        env.update(
            {
                "AGENTFLOW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap or "",
                "AGENTFLOW_REDIS_URL": settings.redis_url or "",
                "AGENTFLOW_CONSUMER_GROUP": settings.consumer_group,
                "AGENTFLOW_TOPIC_EVENTS": settings.topic_events,
                "AGENTFLOW_TOPIC_RESULTS": settings.topic_results,
                "AGENTFLOW_TOPIC_SESSIONS": settings.topic_sessions,
                "AGENTFLOW_TOPIC_DLQ": settings.topic_dlq,
                "AGENTFLOW_TOPIC_AGENTS_PREFIX": settings.topic_agents_prefix,
                "AGENTFLOW_TOPIC_AGENT_REPLIES": settings.topic_agent_replies,
                "AGENTFLOW_TOPIC_PARTITIONS": str(settings.topic_partitions),
            }
        )
    env.update(extra)
    return env


async def offsets(settings: Settings) -> tuple[int, int]:
    """Return the worker group's committed offsets and the end offsets, summed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic_events, p) for p in range(settings.topic_partitions)]
        committed = [await consumer.committed(tp) or 0 for tp in tps]
        ends = await consumer.end_offsets(tps)
        return sum(committed), sum(ends.values())
    finally:
        await consumer.stop()
