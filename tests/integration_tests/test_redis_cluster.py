"""The session path on a Redis Cluster: three plain `redis-server` primaries, slots spread.

With `AGENTFLOW_REDIS_CLUSTER=true` the worker and the gateway connect with redis-py's
cluster client. Checkpoints, transitions, session records and subject memory live on the
cluster, every key of a session in its session's slot; sessions spread over the nodes. The
workflow library sits on a Redis of its own (`AGENTFLOW_LIBRARY_REDIS_URL`), or is off. The
conformance suite on the cluster is in `test_checkpointer_conformance.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import uuid
from typing import Annotated, Any, TypedDict

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from langgraph.graph import START, StateGraph
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot

from nodes.models import WorkflowResult, subject_namespace, utcnow
from service.config import Settings
from service.devtools.servers import LocalRedisCluster, LocalServers
from service.storage.checkpointer import RedisSaver
from service.storage.checkpoints import checkpoint_serde
from service.storage.keys import WORKFLOW_PREFIX, event_key, memory_keys, parked_key, worker_key
from service.storage.publisher import follow, read_log
from service.storage.sessions import SessionStore
from service.storage.transitions import Transition
from service.storage.workers import WorkerState, read_worker_states, write_worker_state
from tests.integration_tests.conftest import (
    example,
    read_topic,
    results_by_event,
    send,
    wait_until,
)
from tests.integration_tests.test_streams import gateway


def _on_cluster(settings: Settings, cluster: LocalRedisCluster, **update: Any) -> Settings:
    return settings.model_copy(update={"redis_url": cluster.url, "redis_cluster": True, **update})


async def _spread(client: RedisCluster, prefix: str, count: int) -> list[str]:
    """Return `count` ids `prefix-...` whose hash tags fall on `count` different nodes."""
    await client.ping()  # the client learns the slots
    found: dict[str, str] = {}
    for i in range(1000):
        candidate = f"{prefix}-{uuid.uuid4().hex[:6]}-{i}"
        found.setdefault(client.get_node_from_key(f"{{{candidate}}}").name, candidate)
        if len(found) == count:
            return list(found.values())
    raise AssertionError(f"the cluster has fewer than {count} nodes")


async def _results(settings: Settings, *event_ids: str) -> dict[str, list[WorkflowResult]]:
    wanted = set(event_ids)
    records = await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: wanted <= set(results_by_event(rs)),
    )
    return {
        event_id: [WorkflowResult.model_validate(r) for r in results]
        for event_id, results in results_by_event(records).items()
        if event_id in wanted
    }


async def _keys_of(client: RedisCluster, session_id: str) -> list[str]:
    return [key async for key in client.scan_iter(match=f"*{{{session_id}}}*")]


async def _stream(http: httpx.AsyncClient, session_id: str, opened: asyncio.Event) -> list[int]:
    """Follow a session's SSE stream until it ends; return the seqs it got."""
    seqs: list[int] = []
    async with http.stream("GET", f"/sessions/{session_id}/stream") as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith(":"):
                opened.set()
            elif line.startswith("id: "):
                seqs.append(int(line.removeprefix("id: ")))
    return seqs


async def _follow(client: RedisCluster, session_id: str) -> list[Transition]:
    """`follow` a session (as `agentflow send --wait` does) until it completes."""
    seen: list[Transition] = []
    async for transition in follow(client, session_id):
        seen.append(transition)
        if transition.type == "session.completed":
            return seen
    return seen


async def test_sessions_run_on_the_cluster_with_the_library_elsewhere(
    settings: Settings,
    servers: LocalServers,
    redis_cluster: LocalRedisCluster,
    cluster_redis: RedisCluster,
    redis: Redis,
    start_worker: Any,
    producer: AIOKafkaProducer,
) -> None:
    settings = _on_cluster(
        settings, redis_cluster, library_redis_url=servers.redis_url, reuse="direct"
    )
    worker = await start_worker(settings)
    first_id, second_id = await _spread(cluster_redis, "cl", 2)
    subject = f"C-{uuid.uuid4().hex[:6]}"
    first = example("claim_submitted", subject=subject)
    second = example("claim_submitted", subject=subject, data={"claim_id": "C-3001"})
    await send(producer, settings, first, first_id)
    await _results(settings, first["id"])

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http,
    ):
        opened = asyncio.Event()
        streamed = asyncio.create_task(_stream(http, second_id, opened))
        followed = asyncio.create_task(_follow(cluster_redis, second_id))
        await wait_until(opened.is_set, "the stream open")
        # Many sessions at once, four on each node: checkpoint scripts and transitions go
        # out in pipelines that the cluster client splits by node.
        crowd = {
            session_id: example("status_requested")
            for _ in range(4)
            for session_id in await _spread(cluster_redis, "cl-crowd", 3)
        }
        for session_id, event in crowd.items():
            await send(producer, settings, event, session_id)
        await send(producer, settings, second, second_id)
        ids = [second["id"], *(e["id"] for e in crowd.values())]
        results = await _results(settings, *ids)
        seqs = await asyncio.wait_for(streamed, 60)
        live = await asyncio.wait_for(followed, 60)

        listed = (await http.get("/sessions", params={"status": "completed"})).json()
        history = (await http.get(f"/sessions/{second_id}/history")).json()
        health = await http.get("/healthz")

    # One result each; every session's transitions numbered without gap, streamed whole.
    assert all(len(results[i]) == 1 and results[i][0].status == "completed" for i in ids)
    for session_id in [second_id, *crowd]:
        log = await read_log(cluster_redis, session_id)
        assert [t.seq for t in log] == list(range(1, len(log) + 1)), session_id
    log = await read_log(cluster_redis, second_id)
    assert seqs == [t.seq for t in log] == [t.seq for t in live]
    assert log[-1].type == "session.completed"

    # The library on the other Redis; the subject's memory on the cluster.
    done = results[second["id"]][0]
    assert done.based_on is not None
    assert await redis.json().get(f"{WORKFLOW_PREFIX}:{done.based_on['id']}") is not None  # type: ignore[misc]
    assert [k async for k in cluster_redis.scan_iter(match=f"{WORKFLOW_PREFIX}:*")] == []
    outputs = " ".join(s.output for s in done.workflow.steps)
    assert f"Earlier sessions about {subject}:" in outputs and first_id in outputs
    for key in memory_keys(subject_namespace(subject)):
        assert await cluster_redis.ttl(key) > 0

    # The session record, its checkpoints: on the cluster, read through the gateway too.
    record = await SessionStore(cluster_redis, ttl_s=60).get(second_id)
    assert record is not None and record.status == "completed"
    assert record.current_node == "finalize" and record.event_ids == [second["id"]]
    assert {first_id, second_id} <= {s["session_id"] for s in listed["sessions"]}
    assert listed["total"] >= 2 + len(crowd)
    assert history["checkpoints"] and history["checkpoints"][0]["next"] == []
    saver = RedisSaver(redis_client=cluster_redis, serde=checkpoint_serde())
    latest = await saver.aget_tuple({"configurable": {"thread_id": second_id}})
    assert latest is not None and latest.checkpoint["channel_values"]["result"] is not None
    assert health.status_code == 200, health.text
    assert worker.name in {w["name"] for w in health.json()["workers"]}

    # Every key of a finished session: in its one slot, with a TTL.
    keys = await _keys_of(cluster_redis, second_id)
    tagged = f"{{{second_id}}}"
    assert {f"agentflow:session:{tagged}", f"agentflow:session:{tagged}:log"} <= set(keys)
    assert {f"agentflow:checkpoint:{tagged}:i", f"agentflow:checkpoint:{tagged}:d"} <= set(keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1
    for key in [*keys, event_key(second["id"])]:
        assert await cluster_redis.ttl(key) > 0, key
    mark = json.loads(await cluster_redis.get(event_key(second["id"])))
    assert mark == {"session_id": second_id, "state": "published"}


async def test_a_waiting_session_parks_the_next_event_on_the_cluster(
    settings: Settings,
    redis_cluster: LocalRedisCluster,
    cluster_redis: RedisCluster,
    start_worker: Any,
    producer: AIOKafkaProducer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = _on_cluster(settings, redis_cluster)
    with caplog.at_level(logging.WARNING, logger="service.bootstrap"):
        await start_worker(settings)
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.bootstrap"]
    assert len(warnings) == 1, warnings
    assert "workflow library off, sessions plan without examples" in warnings[0]
    assert "set AGENTFLOW_LIBRARY_REDIS_URL" in warnings[0]

    (session_id,) = await _spread(cluster_redis, "cl-wait", 1)
    escalating = example("claim_needs_review", sessionid=session_id)
    await send(producer, settings, escalating, session_id)
    waiting = (await _results(settings, escalating["id"]))[escalating["id"]]
    assert [r.status for r in waiting] == ["interrupted"]
    new = example("claim_submitted", sessionid=session_id)
    await send(producer, settings, new, session_id)

    async def parked() -> bool:
        return any(t.type == "event.parked" for t in await read_log(cluster_redis, session_id))

    await wait_until(parked, "the new event parked behind the question")
    answer = {
        "specversion": "1.0",
        "id": f"answer-{uuid.uuid4().hex[:6]}",
        "source": "test",
        "type": "agentflow.resume",
        "sessionid": session_id,
        "data": {"answer": "approve: discharge confirmed"},
    }
    await send(producer, settings, answer, session_id)
    results = await _results(settings, answer["id"], new["id"])

    assert [r.status for r in results[answer["id"]]] == ["completed"]
    assert [r.status for r in results[new["id"]]] == ["completed"]
    assert await cluster_redis.exists(parked_key(session_id)) == 0
    log = await read_log(cluster_redis, session_id)
    assert [t.seq for t in log] == list(range(1, len(log) + 1))
    discovered = [t for t in log if t.node == "discover" and t.data]
    assert discovered[-1].data["note"] == (
        "workflow library unavailable: AGENTFLOW_LIBRARY_REDIS_URL is not set on a Redis Cluster"
    )


class _Count(TypedDict):
    steps: Annotated[list[str], operator.add]


async def test_delete_for_runs_finds_a_run_on_every_node(cluster_redis: RedisCluster) -> None:
    saver = RedisSaver(redis_client=cluster_redis, serde=checkpoint_serde())
    await saver.asetup()
    builder = StateGraph(_Count)
    builder.add_node("step", lambda state: {"steps": ["step"]})
    builder.add_edge(START, "step")
    graph = builder.compile(checkpointer=saver)
    threads = await _spread(cluster_redis, "cl-runs", 3)
    doomed, kept = f"run-{uuid.uuid4().hex}", f"run-{uuid.uuid4().hex}"
    for thread, run in [*((t, doomed) for t in threads), (threads[0], kept)]:
        config = {"configurable": {"thread_id": thread, "run_id": run}}
        await graph.ainvoke({"steps": []}, config)  # type: ignore[arg-type]

    await saver.adelete_for_runs([doomed])

    async def runs(thread: str) -> set[str]:
        config = {"configurable": {"thread_id": thread}}
        return {str(t.metadata.get("run_id")) async for t in saver.alist(config)}  # type: ignore[arg-type]

    assert await runs(threads[0]) == {kept}
    for thread in threads[1:]:
        assert await runs(thread) == set()
    # The run's index of threads is gone with its checkpoints; the other run's stays.
    assert await cluster_redis.exists(f"agentflow:checkpoint_run:{{{doomed}}}") == 0
    assert await cluster_redis.smembers(f"agentflow:checkpoint_run:{{{kept}}}") == {threads[0]}  # type: ignore[misc]
    await saver.adelete_thread(threads[0])


async def test_worker_states_are_read_from_every_node(cluster_redis: RedisCluster) -> None:
    names = await _spread(cluster_redis, "cl-worker", 3)
    for name in names:
        state = WorkerState(name=name, state="running", since=utcnow())
        await write_worker_state(cluster_redis, state, ttl_s=30)
    assert set(names) <= {s.name for s in await read_worker_states(cluster_redis)}
    for name in names:
        await cluster_redis.delete(worker_key(name))
