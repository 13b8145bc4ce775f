"""Throughput of the full path against plain LangGraph, measured in the same run.

Part 1: N events through Kafka -> worker -> graph on the Redis checkpointer -> pub/sub
transitions -> results on Kafka, against `graph.ainvoke` of the same events with the same
Redis checkpointer and the same concurrency, both on the offline model.

Part 2: a model that sleeps a fixed time per call and S sessions in flight: achieved
throughput against the ideal (in-flight / one session's run time), plain `graph.ainvoke`
at the same load, and the worker's peak memory.

Usage:
    .venv/bin/python bench/throughput.py [--events 300] [--sessions 500] [--latency 0.2]
        [--part 1|2]

The worker's log goes to /tmp/agentflow-bench-worker.log; BENCH_WORKER_PREFIX puts
arguments before `-m service.cli worker` (e.g. "-m cProfile -o /tmp/worker.prof").

Starts the local servers itself unless AGENTFLOW_KAFKA_BOOTSTRAP / AGENTFLOW_REDIS_URL
are set. The worker runs as its own process (`agentflow worker`), as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphs.workflow import build_graph  # noqa: E402
from nodes.models import CloudEvent  # noqa: E402
from service.bootstrap import redis_client  # noqa: E402
from service.config import Settings, load_settings  # noqa: E402
from service.devtools.servers import LocalServers  # noqa: E402
from service.storage.checkpoints import open_checkpointer  # noqa: E402
from service.storage.library import open_library  # noqa: E402
from service.storage.memory import open_subject_store  # noqa: E402

WORKER_LOG = Path("/tmp/agentflow-bench-worker.log")


class _Count(logging.Handler):
    """Counts log records instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


NO_LIBRARY = _Count()
"""Plain runs that planned without the workflow library (its search timed out)."""
logging.getLogger("nodes.discovery").addHandler(NO_LIBRARY)
logging.getLogger("nodes.discovery").propagate = False
EVENT = json.loads((ROOT / "examples/events/claim_submitted.json").read_text())


def event(i: int, tag: str) -> CloudEvent:
    raw = dict(EVENT, id=f"bench-{tag}-{i}")
    return CloudEvent.parse(raw)


def bench_settings(servers: LocalServers, model: str, in_flight: int) -> Settings:
    tag = uuid.uuid4().hex[:6]
    return load_settings(
        kafka_bootstrap=servers.kafka_bootstrap,
        redis_url=servers.redis_url,
        model=model,
        consumer_group=f"bench-{tag}",
        topic_events=f"bench.events.{tag}",
        topic_results=f"bench.results.{tag}",
        topic_sessions=f"bench.sessions.{tag}",
        topic_dlq=f"bench.dlq.{tag}",
        max_in_flight=in_flight,
    )


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFLOW_")}
    for name in (
        "kafka_bootstrap",
        "redis_url",
        "model",
        "consumer_group",
        "topic_events",
        "topic_results",
        "topic_sessions",
        "topic_dlq",
        "max_in_flight",
    ):
        env[f"AGENTFLOW_{name.upper()}"] = str(getattr(settings, name))
    return subprocess.Popen(
        [
            sys.executable,
            *os.environ.get("BENCH_WORKER_PREFIX", "").split(),
            "-m",
            "service.cli",
            "worker",
        ],
        cwd=ROOT,
        env=env,
        stdout=WORKER_LOG.open("ab"),
        stderr=subprocess.STDOUT,
    )


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def through_kafka(settings: Settings, events: list[CloudEvent]) -> tuple[float, float]:
    """Send the events, wait for every result; return (seconds, worker peak MiB)."""
    worker = start_worker(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    consumer = AIOKafkaConsumer(
        settings.topic_results,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await producer.start()
    try:
        # Warm up: one event, so group join and imports are outside the timing.
        warm = event(0, "warm-" + uuid.uuid4().hex[:4])
        await producer.send_and_wait(
            settings.topic_events, warm.model_dump_json().encode(), key=f"s-{warm.id}".encode()
        )
        await consumer.start()
        await wait_results(consumer, {warm.id}, 120)
        wanted = {e.id for e in events}
        started = time.perf_counter()
        sent = [
            await producer.send(
                settings.topic_events, e.model_dump_json().encode(), key=f"s-{e.id}".encode()
            )
            for e in events
        ]
        await asyncio.gather(*sent)
        await wait_results(consumer, wanted, 600)
        elapsed = time.perf_counter() - started
        return elapsed, peak_rss_mib(worker.pid)
    finally:
        await producer.stop()
        await consumer.stop()
        worker.terminate()
        worker.wait(60)


async def wait_results(consumer: AIOKafkaConsumer, wanted: set[str], limit_s: float) -> None:
    missing = set(wanted)
    async with asyncio.timeout(limit_s):
        while missing:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    result = json.loads(record.value)
                    if result["status"] != "completed":
                        raise RuntimeError(f"run failed: {result.get('error')}")
                    missing.discard(dict(record.headers)["event_id"].decode())


async def plain_langgraph(settings: Settings, events: list[CloudEvent], in_flight: int) -> float:
    """Run the same events with `graph.ainvoke` on the same Redis checkpointer."""
    redis = redis_client(settings.redis_url or "", max_connections=in_flight + 32)
    # The same graph the worker runs: Redis checkpointer, workflow library, subject memory.
    graph = build_graph(await open_checkpointer(redis), store=await open_subject_store(redis))
    context = settings.context(library=await open_library(redis, embeddings=settings.embeddings))
    gate = asyncio.Semaphore(in_flight)
    await graph.ainvoke(
        {"event": event(0, "plain-warm")}, {"configurable": {"thread_id": "w"}}, context=context
    )

    async def one(e: CloudEvent) -> None:
        async with gate:
            out = await graph.ainvoke(
                {"event": e}, {"configurable": {"thread_id": f"plain-{e.id}"}}, context=context
            )
            assert out["result"].status == "completed"

    started = time.perf_counter()
    await asyncio.gather(*(one(e) for e in events))
    elapsed = time.perf_counter() - started
    await redis.aclose()
    return elapsed


async def langgraph_alone(events: list[CloudEvent]) -> float:
    """Sessions/s of the graph with no checkpointer, no store and an instant model.

    What one process of plain LangGraph can do at most on this machine for this graph:
    any runner built on it, with checkpoints or not, stays below it.
    """
    graph = build_graph(None)
    context = load_settings(model="offline").context()
    started = time.perf_counter()
    await asyncio.gather(*(graph.ainvoke({"event": e}, context=context) for e in events))
    return len(events) / (time.perf_counter() - started)


async def one_session_time(settings: Settings) -> float:
    redis = redis_client(settings.redis_url or "", max_connections=36)
    graph = build_graph(await open_checkpointer(redis), store=await open_subject_store(redis))
    library = await open_library(redis, embeddings=settings.embeddings)
    times = []
    for i in range(3):
        started = time.perf_counter()
        await graph.ainvoke(
            {"event": event(i, "solo")},
            {"configurable": {"thread_id": f"solo-{uuid.uuid4()}"}},
            context=settings.context(library=library),
        )
        times.append(time.perf_counter() - started)
    await redis.aclose()
    return min(times)


async def part1(servers: LocalServers, args: Any, tag: str) -> None:
    """The full path against plain `graph.ainvoke`, both on the offline model."""
    settings = bench_settings(servers, "offline", 100)
    kafka_s, kafka_mem = await through_kafka(
        settings, [event(i, f"k{tag}") for i in range(args.events)]
    )
    plain_s = await plain_langgraph(
        settings, [event(i, f"p{tag}") for i in range(args.events)], 100
    )
    print(f"\n1) {args.events} events, 100 in flight")
    print(f"   plain graph.ainvoke + Redis checkpointer : {args.events / plain_s:8.1f} events/s")
    print(
        f"   full path (Kafka→worker→Redis→result)  : {args.events / kafka_s:8.1f} events/s"
        f"   (worker peak {kafka_mem:.0f} MiB)"
    )
    print(f"   ratio full/plain: {plain_s / kafka_s:.2f}   (target ≥ 0.80)")


async def part2(servers: LocalServers, args: Any, tag: str) -> None:
    """A slow model and many sessions in flight: achieved against ideal throughput.

    Plain `graph.ainvoke` runs the same sessions at the same concurrency in the same run,
    which shows how much of the ideal the runtime itself reaches on this machine.
    """
    settings = bench_settings(servers, f"offline:latency={args.latency}", args.sessions)
    solo = await one_session_time(settings)
    slow_s, slow_mem = await through_kafka(
        settings, [event(i, f"s{tag}") for i in range(args.sessions)]
    )
    NO_LIBRARY.count = 0
    plain_s = await plain_langgraph(
        settings, [event(i, f"q{tag}") for i in range(args.sessions)], args.sessions
    )
    skipped = NO_LIBRARY.count
    ceiling = await langgraph_alone([event(i, f"c{tag}") for i in range(100)])
    ideal, achieved, plain = args.sessions / solo, args.sessions / slow_s, args.sessions / plain_s
    print(
        f"\n2) model sleeping {args.latency * 1000:.0f} ms per call, "
        f"{args.sessions} sessions in flight"
    )
    print(f"   one session alone (plain ainvoke): {solo:.2f} s → ideal {ideal:.1f} sessions/s")
    print(
        f"   plain graph.ainvoke, same load    : {plain:.1f} sessions/s"
        f"  ({plain / ideal:.2f} of ideal)"
    )
    if skipped:
        print(f"     ({skipped} of them planned without the library: its search timed out)")
    print(
        f"   LangGraph alone (no checkpointer, instant model): {ceiling:.1f} sessions/s"
        f"  (≤ {ceiling / ideal:.2f} of ideal)"
    )
    print(f"   achieved through the worker       : {achieved:.1f} sessions/s in {slow_s:.1f} s")
    print(f"   ratio achieved/ideal: {achieved / ideal:.2f}   (target ≥ 0.90)")
    print(f"   ratio achieved/plain: {achieved / plain:.2f}")
    print(f"   worker peak memory: {slow_mem:.0f} MiB")


async def main(args: Any) -> None:
    async with LocalServers.from_env() as servers:
        tag = uuid.uuid4().hex[:6]
        print(f"agentflow throughput benchmark  (offline model, loopback, {os.cpu_count()} cores)")
        if args.part in (None, 1):
            await part1(servers, args, tag)
        if args.part in (None, 2):
            await part2(servers, args, tag)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--part", type=int, choices=[1, 2], help="run only part 1 or part 2")
    asyncio.run(main(parser.parse_args()))
