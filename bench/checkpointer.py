"""What the checkpointer costs a session: none, InMemorySaver, AsyncRedisSaver, RedisSaver.

The agentflow graph (`graphs.workflow.build_graph`) on the offline model, one process,
`durability="sync"` (a checkpoint after every step, as the worker runs it), S sessions with
N in flight, under each checkpointer in turn; every configuration runs R rounds, taken in
rotation so that load from elsewhere on the machine falls on all of them alike, and its
best round counts. `RedisSaver` runs fenced, as the worker runs it: each session takes
a fencing epoch (`SessionStore.take`) and every checkpoint write carries it. Printed per
checkpointer: sessions/s, this process's CPU per session
and Redis's own CPU per session; for the two Redis savers, Redis memory per finished
session (`MEMORY USAGE` summed over the session's keys). Then the ratios against the
targets, all from this one run.

Usage:
    .venv/bin/python bench/checkpointer.py [--sessions 200] [--in-flight 50] [--rounds 3]

Starts the local Redis (with the modules AsyncRedisSaver needs) unless
AGENTFLOW_REDIS_URL is set. The sessions' keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402

from graphs.workflow import build_graph  # noqa: E402
from nodes.library import InMemoryWorkflowLibrary  # noqa: E402
from nodes.models import CloudEvent  # noqa: E402
from service.bootstrap import redis_client  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.devtools.servers import LocalServers  # noqa: E402
from service.runtime.runner import TakeSession  # noqa: E402
from service.storage._redis import quiet_index_setup  # noqa: E402
from service.storage.checkpointer import EPOCH_CONFIG_KEY, RedisSaver  # noqa: E402
from service.storage.checkpoints import CHECKPOINT_TYPES, checkpoint_serde  # noqa: E402
from service.storage.sessions import SessionStore  # noqa: E402

EVENT = json.loads((ROOT / "examples/events/claim_submitted.json").read_text())
CHECKPOINTERS = ("none", "InMemorySaver", "AsyncRedisSaver", "RedisSaver")


def event(i: int, tag: str) -> CloudEvent:
    return CloudEvent.parse(dict(EVENT, id=f"bench-{tag}-{i}"))


async def async_redis_saver(redis: Redis) -> Any:
    """langgraph-checkpoint-redis's saver, set up as agentflow ran it before RedisSaver."""
    from langgraph.checkpoint.redis.aio import AsyncRedisSaver
    from langgraph.checkpoint.redis.jsonplus_redis import JsonPlusRedisSerializer

    saver = AsyncRedisSaver(redis_client=redis)
    saver.serde = JsonPlusRedisSerializer(
        allowed_msgpack_modules=CHECKPOINT_TYPES,
        allowed_json_modules=[(*m.split("."), n) for m, n in CHECKPOINT_TYPES],
    )
    with quiet_index_setup():
        await saver.asetup()
    return saver


async def redis_cpu_s(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def run_round(
    graph: Any,
    sessions: list[str],
    tag: str,
    in_flight: int,
    redis: Redis,
    take: TakeSession | None = None,
) -> tuple[float, float, float]:
    """Run the sessions, fenced with `take` if given; return (seconds, CPU s, Redis's CPU s)."""
    context = load_settings(model="offline").context(library=InMemoryWorkflowLibrary())
    gate = asyncio.Semaphore(in_flight)
    # LangGraph 1.2 fails a sync-durability run without a checkpointer: nothing to wait for.
    options: dict[str, Any] = {"durability": "sync"} if graph.checkpointer else {}

    async def one(i: int, session_id: str) -> None:
        async with gate:
            configurable: dict[str, Any] = {"thread_id": session_id}
            if take is not None:
                configurable[EPOCH_CONFIG_KEY] = await take(session_id)
            out = await graph.ainvoke(
                {"event": event(i, tag)},
                {"configurable": configurable},
                context=context,
                **options,
            )
            assert out["result"].status == "completed", out["result"].error

    redis_before, cpu_before = await redis_cpu_s(redis), time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    return elapsed, cpu, await redis_cpu_s(redis) - redis_before


async def memory_per_session(redis: Redis, sessions: list[str]) -> float:
    """Bytes of Redis memory per session: MEMORY USAGE of every key naming the session."""
    wanted = set(sessions)
    prefix = os.path.commonprefix(sessions)
    per: dict[str, int] = {}
    async for key in redis.scan_iter(match=f"*{prefix}*", count=5000):
        owner = next((s for s in _candidates(key, prefix) if s in wanted), None)
        if owner is not None:
            per[owner] = per.get(owner, 0) + int(await redis.memory_usage(key, samples=0) or 0)
    return sum(per.values()) / len(sessions)


def _candidates(key: str, prefix: str) -> list[str]:
    """The session ids a key may name: the prefix plus the digits that follow it."""
    start = key.index(prefix) + len(prefix)
    end = start
    while end < len(key) and key[end].isdigit():
        end += 1
    return [key[key.index(prefix) : end]]


async def main(args: Any) -> None:
    logging.basicConfig(level=logging.WARNING)
    async with LocalServers.from_env() as servers:
        # The service's client: text replies, a pool that waits for a free connection.
        redis = redis_client(servers.redis_url, max_connections=args.in_flight + 32)
        savers: dict[str, Callable[[], Awaitable[Any]]] = {
            "none": lambda: _none(),
            "InMemorySaver": lambda: _memory(),
            "AsyncRedisSaver": lambda: async_redis_saver(redis),
            "RedisSaver": lambda: _redis_saver(redis),
        }
        fenced = {"RedisSaver": SessionStore(redis, ttl_s=3600).take}
        tag = uuid.uuid4().hex[:6]
        best: dict[str, tuple[float, float, float]] = {}
        last: dict[str, list[str]] = {}
        print(
            f"agentflow checkpointer benchmark  (offline model, durability=sync, "
            f"{args.sessions} sessions, {args.in_flight} in flight, best of {args.rounds} "
            f"rounds, {os.cpu_count()} cores)"
        )
        for round_ in range(args.rounds):
            for name in CHECKPOINTERS:
                graph = build_graph(await savers[name]())
                warm = [f"bw{tag}{name[:2]}{round_}x{i}" for i in range(3)]
                take = fenced.get(name)
                await run_round(graph, warm, f"w{tag}", 3, redis, take)
                sessions = [f"bs{tag}{name[:2]}{round_}x{i}" for i in range(args.sessions)]
                took = await run_round(graph, sessions, f"r{tag}", args.in_flight, redis, take)
                if name not in best or took[0] < best[name][0]:
                    best[name] = took
                last[name] = sessions
        memory = {
            name: await memory_per_session(redis, last[name])
            for name in ("AsyncRedisSaver", "RedisSaver")
        }
        rate = {name: args.sessions / best[name][0] for name in CHECKPOINTERS}
        print()
        for name in CHECKPOINTERS:
            seconds, cpu, redis_cpu = best[name]
            line = (
                f"  {name:16s} {rate[name]:7.1f} sessions/s   "
                f"CPU {1000 * cpu / args.sessions:5.1f} ms/session"
            )
            if name.endswith("RedisSaver"):
                line += (
                    f" + Redis {1000 * redis_cpu / args.sessions:4.1f} ms"
                    f"   memory {memory[name] / 1024:6.1f} KiB/session"
                )
            print(line)
        print()
        versus_async = rate["RedisSaver"] / rate["AsyncRedisSaver"]
        versus_none = rate["RedisSaver"] / rate["none"]
        memory_ratio = memory["RedisSaver"] / memory["AsyncRedisSaver"]
        print(f"  RedisSaver / AsyncRedisSaver sessions/s : {versus_async:5.2f}  (target ≥ 2.0)")
        print(f"  RedisSaver / no checkpointer sessions/s : {versus_none:5.2f}  (target ≥ 0.6)")
        inmem = rate["InMemorySaver"] / rate["none"]
        print(f"  InMemorySaver / no checkpointer         : {inmem:5.2f}")
        print(f"  RedisSaver / AsyncRedisSaver memory     : {memory_ratio:5.2f}  (target ≤ 0.5)")
        async for key in redis.scan_iter(match=f"*{tag}*", count=5000):  # this run's sessions
            await redis.delete(key)
        await redis.aclose()


async def _none() -> None:
    return None


async def _memory() -> InMemorySaver:
    return InMemorySaver(serde=checkpoint_serde())


async def _redis_saver(redis: Redis) -> RedisSaver:
    saver = RedisSaver(redis_client=redis, serde=checkpoint_serde())
    await saver.asetup()
    return saver


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
