"""LangGraph's checkpointer conformance suite against `RedisSaver`, on one Redis and a cluster.

The suite (`langgraph-checkpoint-conformance`) is the one LangGraph maintains for every
checkpointer; each capability runs on a saver of its own key prefix, so the suite's fixed
thread ids (`thread-0`, ...) meet no other test's data. It runs on the test Redis and on the
three-node Redis Cluster (a `RedisCluster` client: threads spread over the nodes). Its report
is printed in the test output whether the test passes or fails.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES
from langgraph.checkpoint.conformance.report import ProgressCallbacks
from redis.asyncio import Redis, RedisCluster

from service.bootstrap import redis_client
from service.storage.checkpointer import RedisSaver
from service.storage.checkpoints import checkpoint_serde


async def _delete_prefix(redis: Redis | RedisCluster, prefix: str) -> None:
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        await redis.delete(key)


@pytest.fixture(params=["redis", "cluster"])
def where(request: pytest.FixtureRequest) -> tuple[str, str, bool]:
    """The Redis to run the suite on: its name, URL, and whether it is a cluster."""
    if request.param == "redis":
        return "redis", request.getfixturevalue("servers").redis_url, False
    return "cluster", request.getfixturevalue("redis_cluster").url, True


async def test_redis_saver_passes_the_langgraph_conformance_suite(
    where: tuple[str, str, bool], capsys: pytest.CaptureFixture[str]
) -> None:
    name, url, cluster = where
    redis = redis_client(url, cluster=cluster)
    prefixes: list[str] = []

    @checkpointer_test(name="agentflow RedisSaver")
    async def redis_saver() -> AsyncIterator[RedisSaver]:
        prefix = f"conformance-{uuid.uuid4().hex[:8]}:checkpoint"
        prefixes.append(prefix)
        saver = RedisSaver(redis_client=redis, serde=checkpoint_serde(), key_prefix=prefix)
        await saver.asetup()
        yield saver

    try:
        with capsys.disabled():
            print(
                f"\nLangGraph checkpointer conformance (langgraph-checkpoint-conformance), {name}:"
            )
            report = await validate(redis_saver, progress=ProgressCallbacks.default())
            report.print_report()
    finally:
        for prefix in prefixes:
            await _delete_prefix(redis, prefix)
        await redis.aclose()
    # Every capability, extended ones included, was detected and run: none was skipped.
    assert {name for name, r in report.results.items() if r.detected} == {
        c.value for c in ALL_CAPABILITIES
    }
    failures = [f for r in report.results.values() for f in r.failures]
    assert report.passed_all(), failures
    assert report.conformance_level() == "FULL"
