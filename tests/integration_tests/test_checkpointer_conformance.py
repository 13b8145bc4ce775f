"""LangGraph's checkpointer conformance suite against `RedisSaver` on the test Redis.

The suite (`langgraph-checkpoint-conformance`) is the one LangGraph maintains for every
checkpointer; each capability runs on a saver of its own key prefix, so the suite's fixed
thread ids (`thread-0`, ...) meet no other test's data. Its report is printed in the test
output whether the test passes or fails.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES
from langgraph.checkpoint.conformance.report import ProgressCallbacks
from redis.asyncio import Redis

from service.storage.checkpointer import RedisSaver
from service.storage.checkpoints import checkpoint_serde


async def _delete_prefix(redis: Redis, prefix: str) -> None:
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        await redis.delete(key)


async def test_redis_saver_passes_the_langgraph_conformance_suite(
    redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
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
            print("\nLangGraph checkpointer conformance (langgraph-checkpoint-conformance):")
            report = await validate(redis_saver, progress=ProgressCallbacks.default())
            report.print_report()
    finally:
        for prefix in prefixes:
            await _delete_prefix(redis, prefix)
    # Every capability, extended ones included, was detected and run: none was skipped.
    assert {name for name, r in report.results.items() if r.detected} == {
        c.value for c in ALL_CAPABILITIES
    }
    failures = [f for r in report.results.values() for f in r.failures]
    assert report.passed_all(), failures
    assert report.conformance_level() == "FULL"
