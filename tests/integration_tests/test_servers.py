"""The local dev servers: a real Tansu broker and a real Redis 8 with search and JSON."""

from __future__ import annotations

import os
import uuid

import pytest
import redis
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.devtools.servers import KafkaBroker, LocalServers, RedisServer
from service.errors import ServerStartError

# Tansu holds a group join for about half the session timeout; keep joins short.
_FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_addresses_are_loopback_or_as_given(servers: LocalServers) -> None:
    # Servers the suite started listen on loopback; external ones are used as given.
    if servers.kafka is not None:
        assert servers.kafka_bootstrap == f"127.0.0.1:{servers.kafka.port}"
        assert servers.kafka.running
    else:
        assert servers.kafka_bootstrap == os.environ["AGENTFLOW_KAFKA_BOOTSTRAP"]
    if servers.redis is not None:
        assert servers.redis_url == f"redis://127.0.0.1:{servers.redis.port}/0"
        assert servers.redis.running
    else:
        assert servers.redis_url == os.environ["AGENTFLOW_REDIS_URL"]


async def test_kafka_produce_consume_commit_with_headers(servers: LocalServers) -> None:
    topic, group = _unique("servers-test"), _unique("servers-group")
    admin = AIOKafkaAdminClient(bootstrap_servers=servers.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=servers.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        assert await producer.partitions_for(topic) == {0, 1, 2}
        for i in range(9):
            await producer.send_and_wait(
                topic,
                key=f"session-{i % 3}".encode(),
                value=f"event-{i}".encode(),
                headers=[("ce_type", b"test.event"), ("ce_id", str(i).encode())],
            )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers.kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **_FAST_GROUP,
    )
    await consumer.start()
    try:
        received = []
        for _ in range(100):
            batches = await consumer.getmany(timeout_ms=500)
            received += [record for records in batches.values() for record in records]
            if len(received) >= 9:
                break
        assert sorted(record.value for record in received) == [
            f"event-{i}".encode() for i in range(9)
        ]
        first = next(record for record in received if record.value == b"event-0")
        assert first.key == b"session-0"
        assert dict(first.headers) == {"ce_type": b"test.event", "ce_id": b"0"}
        by_key: dict[bytes, set[int]] = {}
        for record in received:
            by_key.setdefault(record.key, set()).add(record.partition)
        assert all(len(partitions) == 1 for partitions in by_key.values())

        await consumer.commit()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(3)])
        for tp, end in ends.items():
            assert await consumer.committed(tp) == end
        assert sum(ends.values()) == 9
    finally:
        await consumer.stop()


def test_redis_has_search_and_json(servers: LocalServers) -> None:
    client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
    try:
        modules = {module["name"].lower() for module in client.execute_command("MODULE", "LIST")}
        assert {"search", "rejson"} <= modules
        key = _unique("servers-test:doc")
        assert client.execute_command("JSON.SET", key, "$", '{"title": "refund", "n": 1}')
        assert client.execute_command("JSON.GET", key, "$.title") == '["refund"]'
        index = _unique("servers-test-idx")
        client.execute_command(
            "FT.CREATE", index, "ON", "JSON", "PREFIX", "1", key,
            "SCHEMA", "$.title", "AS", "title", "TEXT",
        )  # fmt: skip
        assert index in client.execute_command("FT._LIST")
        client.execute_command("FT.DROPINDEX", index)
        client.delete(key)
    finally:
        client.close()


async def test_redis_saver_round_trips_a_checkpoint(servers: LocalServers) -> None:
    from langgraph.checkpoint.base import empty_checkpoint

    from service.storage.checkpointer import RedisSaver

    thread = _unique("servers-test-thread")
    config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    async with RedisSaver.from_conn_string(servers.redis_url) as saver:
        checkpoint = empty_checkpoint()
        stored = await saver.aput(config, checkpoint, {"source": "input", "step": -1}, {})
        found = await saver.aget_tuple(stored)
        await saver.adelete_thread(thread)
    assert found is not None and found.checkpoint["id"] == checkpoint["id"]


async def test_redis_restart_keeps_port_and_comes_back_empty() -> None:
    server = RedisServer()
    await server.astart()
    try:
        port, pid, workdir = server.port, server.pid, server.workdir
        client = aioredis.from_url(server.url, decode_responses=True)
        await client.set("servers-test:key", "value")

        await server.arestart()

        assert server.running
        assert server.port == port
        assert server.pid != pid
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert server.workdir == workdir
        # The pooled connection died with the old process, so the first call may fail once.
        try:
            value = await client.get("servers-test:key")
        except redis.ConnectionError:
            value = await client.get("servers-test:key")
        assert value is None
        assert await client.execute_command("JSON.SET", "servers-test:doc", "$", "{}")
        await client.aclose()
    finally:
        await server.astop()
    assert not server.running
    assert workdir is not None and not workdir.exists()


async def test_kafka_broker_restart_keeps_port() -> None:
    broker = KafkaBroker()
    await broker.astart()
    try:
        port = broker.port
        topic = _unique("servers-restart")
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
        await admin.close()

        await broker.arestart()

        assert broker.running and broker.port == port
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            assert topic not in await admin.list_topics()  # memory storage starts empty
        finally:
            await admin.close()
    finally:
        await broker.astop()
    assert not broker.running


def test_kill_then_start_comes_back_on_the_same_port() -> None:
    with RedisServer() as server:
        port, workdir = server.port, server.workdir
        server.kill()
        assert not server.running and server.workdir == workdir
        server.start()
        assert server.running and server.port == port
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()


def test_sync_start_stop_is_idempotent_and_cleans_up() -> None:
    with RedisServer() as server:
        workdir = server.workdir
        assert workdir is not None and (workdir / "redis.log").exists()
        assert server.start() is server  # already running: no second process
    assert not server.running
    assert not workdir.exists()
    server.stop()


@pytest.mark.parametrize("server_type", [RedisServer, KafkaBroker])
def test_port_held_by_another_server_fails_with_log_tail(
    server_type: type[RedisServer] | type[KafkaBroker],
) -> None:
    with server_type() as holder:
        intruder = server_type(port=holder.port, startup_timeout=10)
        with pytest.raises(ServerStartError, match="in use") as info:
            intruder.start()
        assert "Last lines of its log" in str(info.value)
        assert not intruder.running and intruder.workdir is None
        assert holder.running
