"""What a session waiting for a remote agent costs the worker, against one in flight locally.

Part 1 (memory): N sessions whose steps all go to a remote agent (`runs: kafka`) whose host
answers only once every session waits, against N sessions in flight at once on a local
agent whose model sleeps (`offline:latency=...`), in the same run. Printed: the worker's
RSS growth for each (from after start-up and one warm-up session, to when all N wait or
are in flight), their ratio, Redis memory per parked session, and the time from the last
reply to the last result. The parked worker's RSS is read once it has given its memory
back (it logs that after `service.worker.idle.IDLE_AFTER_S` with nothing in flight).

Part 2 (throughput): the same sessions with the agent local, and remote (hosted by
`agentflow agents serve`), offline model: sessions/s of each and their ratio.

Usage:
    .venv/bin/python bench/remote_agents.py [--sessions 2000] [--latency 60] [--part 1|2]

Starts the local servers itself unless AGENTFLOW_KAFKA_BOOTSTRAP / AGENTFLOW_REDIS_URL
are set. The worker (and the host) run as their own processes, as in production; their
logs go to /tmp/agentflow-bench-*.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes.protocol import WORKER_SOURCE, AgentReply, encode, envelope  # noqa: E402
from service.config import Settings, load_settings  # noqa: E402
from service.devtools.servers import LocalServers  # noqa: E402

EVENT = json.loads((ROOT / "examples/events/claim_submitted.json").read_text())
AGENTS = """
agents:
  - name: analyst
    description: Takes in, records, reviews and assesses claims, documents and eligibility.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    {where}
"""
LOCAL = "system_prompt: You analyse claims.\n    model: {model}"
REMOTE = "runs: kafka"


def settings_for(servers: LocalServers, agents: Path, in_flight: int) -> Settings:
    tag = uuid.uuid4().hex[:6]
    return load_settings(
        kafka_bootstrap=servers.kafka_bootstrap,
        redis_url=servers.redis_url,
        model="offline",
        agents_file=agents,
        consumer_group=f"bench-{tag}",
        topic_events=f"bench.events.{tag}",
        topic_results=f"bench.results.{tag}",
        topic_sessions=f"bench.sessions.{tag}",
        topic_dlq=f"bench.dlq.{tag}",
        topic_agents_prefix=f"bench.agents.{tag}.",
        topic_agent_replies=f"bench.agents.replies.{tag}",
        max_in_flight=in_flight,
        reuse="off",
    )


def environment(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFLOW_")}
    for name in (
        "kafka_bootstrap",
        "redis_url",
        "model",
        "agents_file",
        "consumer_group",
        "topic_events",
        "topic_results",
        "topic_sessions",
        "topic_dlq",
        "topic_agents_prefix",
        "topic_agent_replies",
        "max_in_flight",
        "reuse",
    ):
        env[f"AGENTFLOW_{name.upper()}"] = str(getattr(settings, name))
    return env


def start(settings: Settings, *command: str, log: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *command],
        cwd=ROOT,
        env=environment(settings),
        stdout=Path(f"/tmp/agentflow-bench-{log}.log").open("ab"),
        stderr=subprocess.STDOUT,
    )


def log_size(log: str) -> int:
    path = Path(f"/tmp/agentflow-bench-{log}.log")
    return path.stat().st_size if path.exists() else 0


async def given_back(log: str, since: int) -> None:
    """Wait until the worker, idle, gave its memory back (logged after byte `since`)."""

    def said() -> bool:
        with Path(f"/tmp/agentflow-bench-{log}.log").open("rb") as out:
            out.seek(since)
            return b"idle: gave memory back" in out.read()

    async def logged() -> bool:
        return await asyncio.to_thread(said)

    await until(logged, 120)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def event(i: int, tag: str) -> bytes:
    return json.dumps(dict(EVENT, id=f"bench-{tag}-{i}", sessionid=f"s-{tag}-{i}")).encode()


class Results:
    """Reads the results topic: which events have their result, and when the last came."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = AIOKafkaConsumer(
            settings.topic_results,
            bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        self.seen: set[str] = set()
        self.last = 0.0

    async def wait(self, wanted: set[str], limit_s: float = 1800) -> None:
        """Read results until every wanted event has one (a failed run stops the bench)."""
        async with asyncio.timeout(limit_s):
            while not wanted <= self.seen:
                batch = await self.consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        result = json.loads(record.value)
                        if result["status"] != "completed":
                            raise RuntimeError(f"run failed: {result.get('error')}")
                        self.seen.add(dict(record.headers)["event_id"].decode())
                        self.last = time.perf_counter()


async def send_all(
    settings: Settings, producer: AIOKafkaProducer, tag: str, n: int, *, start: int = 0
) -> set[str]:
    """Send events start..n-1 of a run (session `s-<tag>-<i>`); return their ids."""
    sent = [
        await producer.send(settings.topic_events, event(i, tag), key=f"s-{tag}-{i}".encode())
        for i in range(start, n)
    ]
    await asyncio.gather(*sent)
    return {f"bench-{tag}-{i}" for i in range(start, n)}


async def until(condition: Callable[[], Awaitable[bool]], limit_s: float = 1800) -> None:
    async with asyncio.timeout(limit_s):
        while not await condition():  # noqa: ASYNC110 (a condition in other processes)
            await asyncio.sleep(0.5)


async def warmed_worker(
    settings: Settings,
    producer: AIOKafkaProducer,
    results: Results,
    answer: Any = None,
    *,
    redis: Redis | None = None,
) -> subprocess.Popen[bytes]:
    """A worker that has run one session: imports, group join and pools are in its RSS.

    With `redis`, the warm-up session only has to reach a step (its agent's model sleeps
    for long), not its end.
    """
    worker = start(settings, "worker", log="worker")
    tag = "warm-" + uuid.uuid4().hex[:4]
    warm = await send_all(settings, producer, tag, 1)
    if answer is not None:
        answer.release()
    if redis is None:
        await results.wait(warm, 300)
    else:

        async def at_a_step() -> bool:
            assert redis is not None
            return await _count(redis, tag, 1, "current_node", "execute_step") >= 1

        await until(at_a_step, 300)
    if answer is not None:
        answer.hold()
    return worker


class Host:
    """Plays the remote agent's host in this process: holds every task until released."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.held: list[dict[str, Any]] = []
        self.sessions: set[str] = set()
        self.open = False
        self.last_reply = 0.0
        self.consumer = AIOKafkaConsumer(
            settings.agent_topic("analyst"),
            bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            group_id=f"bench-host-{uuid.uuid4().hex[:6]}",
        )
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
        self.task: asyncio.Task[None] | None = None

    def hold(self) -> None:
        """Keep tasks from now on."""
        self.open = False

    def release(self) -> None:
        """Answer every task kept, and every later one at once."""
        self.open = True

    async def start(self) -> None:
        """Connect and serve."""
        await self.consumer.start()
        await self.producer.start()
        self.task = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        """Stop serving and disconnect."""
        if self.task is not None:
            self.task.cancel()
        await self.consumer.stop()
        await self.producer.stop()

    async def _serve(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for record in records:
                    task = json.loads(record.value)
                    if task["type"] == "agentflow.agent.task":
                        self.held.append(task)
                        self.sessions.add(task["data"]["session_id"])
            if self.open and self.held:
                todo, self.held = self.held, []
                sent = [await self._reply(task) for task in todo]
                await asyncio.gather(*sent)
                self.last_reply = time.perf_counter()

    async def _reply(self, task: dict[str, Any]) -> Any:
        data = task["data"]
        reply = AgentReply(
            task_id=data["task_id"],
            agent="analyst",
            status="done",
            output=f"analysed {data['step']['id']}",
        )
        value = encode(envelope(reply, session_id=data["session_id"], source=WORKER_SOURCE))
        return await self.producer.send(data["reply_to"], value, key=data["session_id"].encode())


async def redis_used(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def parked(servers: LocalServers, folder: Path, n: int) -> dict[str, float]:
    agents = folder / "remote.yaml"
    agents.write_text(AGENTS.format(where=REMOTE))
    settings = settings_for(servers, agents, 100)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    results = Results(settings)
    await results.consumer.start()
    host = Host(settings)
    redis = Redis.from_url(settings.redis_url or "", decode_responses=True)
    worker: subprocess.Popen[bytes] | None = None
    try:
        await host.start()
        mark = log_size("worker")
        worker = await warmed_worker(settings, producer, results, host)
        await given_back("worker", mark)  # idle after its warm-up session
        before, redis_before = rss_mib(worker.pid), await redis_used(redis)
        tag = uuid.uuid4().hex[:6]
        half = n // 2
        # In two halves: what the second half adds is the cost of a parked session itself,
        # without the working set of the sessions in flight while events arrive.
        mark = log_size("worker")
        wanted = await send_all(settings, producer, tag, half)

        async def all_wait(count: int) -> bool:
            return await _count(redis, tag, count, "status", "waiting") >= count

        await until(lambda: all_wait(half))
        await given_back("worker", mark)
        halfway = rss_mib(worker.pid)
        mark = log_size("worker")
        wanted |= await send_all(settings, producer, tag, n, start=half)
        await until(lambda: all_wait(n))
        await given_back("worker", mark)  # nothing in flight: every session is parked
        waiting = rss_mib(worker.pid)
        redis_per = (await redis_used(redis) - redis_before) / n
        host.release()
        await results.wait(wanted)
        return {
            "growth": waiting - before,
            "per_session_kib": (waiting - halfway) * 1024 / (n - half),
            "before": before,
            "redis_per_session": redis_per,
            "last_reply_to_last_result": results.last - host.last_reply,
        }
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        await host.stop()
        await producer.stop()
        await results.consumer.stop()
        await redis.aclose()


async def in_flight(
    servers: LocalServers, folder: Path, n: int, latency: float
) -> dict[str, float]:
    agents = folder / "local.yaml"
    agents.write_text(AGENTS.format(where=LOCAL.format(model=f"offline:latency={latency}")))
    settings = settings_for(servers, agents, n + 10)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    results = Results(settings)
    await results.consumer.start()
    redis = Redis.from_url(settings.redis_url or "", decode_responses=True)
    worker: subprocess.Popen[bytes] | None = None
    try:
        worker = await warmed_worker(settings, producer, results, redis=redis)
        before = rss_mib(worker.pid)
        tag = uuid.uuid4().hex[:6]
        await send_all(settings, producer, tag, n)
        peak = before

        async def all_in_flight() -> bool:
            nonlocal peak
            peak = max(peak, rss_mib(worker.pid))
            return await _count(redis, tag, n, "current_node", "execute_step") >= n

        await until(all_in_flight)
        peak = max(peak, rss_mib(worker.pid))
        # Not waited to the end: each of their steps sleeps `latency`; the memory is read.
        return {"growth": peak - before, "before": before}
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        await producer.stop()
        await results.consumer.stop()
        await redis.aclose()


async def _count(redis: Redis, tag: str, n: int, field: str, value: str) -> int:
    """How many of the run's n sessions have `value` in their record's `field`."""
    pipe = redis.pipeline(transaction=False)
    for i in range(n):
        pipe.hget(f"agentflow:session:{{s-{tag}-{i}}}", field)
    return sum(1 for found in await pipe.execute() if found == value)


async def throughput(servers: LocalServers, folder: Path, n: int) -> tuple[float, float]:
    """Sessions/s with the agent local, then remote (hosted by `agentflow agents serve`)."""
    rates = []
    for where in ("local", "remote"):
        agents = folder / f"{where}-fast.yaml"
        spec = LOCAL.format(model="offline") if where == "local" else REMOTE
        agents.write_text(AGENTS.format(where=spec))
        settings = settings_for(servers, agents, 100)
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
        await producer.start()
        results = Results(settings)
        await results.consumer.start()
        host = None
        if where == "remote":
            hosted = folder / "hosted.yaml"
            hosted.write_text(AGENTS.format(where=LOCAL.format(model="offline")))
            host_settings = settings.model_copy(update={"agents_file": hosted})
            host = start(host_settings, "agents", "serve", "--agent", "analyst", log="host")
        worker = None
        try:
            worker = await warmed_worker(settings, producer, results)
            started = time.perf_counter()
            await results.wait(await send_all(settings, producer, uuid.uuid4().hex[:6], n))
            rates.append(n / (time.perf_counter() - started))
        finally:
            for process in (worker, host):
                if process is not None:
                    process.terminate()
                    process.wait(60)
            await producer.stop()
            await results.consumer.stop()
    return rates[0], rates[1]


async def main(args: Any) -> None:
    async with LocalServers.from_env() as servers:
        folder = Path(tempfile.mkdtemp(prefix="agentflow-bench-"))
        print(
            f"agentflow remote agents benchmark  (offline model, loopback, {os.cpu_count()} cores)"
        )
        if args.part in (None, 1):
            print(f"\n1) {args.sessions} sessions, worker RSS growth from after a warm-up session")
            waiting = await parked(servers, folder, args.sessions)
            print(
                f"   parked on a remote agent : {waiting['growth']:8.1f} MiB"
                f"   (from {waiting['before']:.0f} MiB; the second {args.sessions // 2} added"
                f" {waiting['per_session_kib']:.1f} KiB per session)",
                flush=True,
            )
            busy = await in_flight(servers, folder, args.sessions, args.latency)
            print(
                f"   in flight on a local agent (model sleeping {args.latency:g} s):"
                f" {busy['growth']:8.1f} MiB   (from {busy['before']:.0f} MiB)"
            )
            print(
                f"   ratio parked/in-flight: {waiting['growth'] / busy['growth']:.3f}"
                "   (target ≤ 0.05)"
            )
            print(
                f"   Redis memory per parked session: {waiting['redis_per_session'] / 1024:.1f} KiB"
            )
            print(f"   last reply → last result: {waiting['last_reply_to_last_result']:.1f} s")
        if args.part in (None, 2):
            local, remote = await throughput(servers, folder, args.throughput_sessions)
            print(f"\n2) {args.throughput_sessions} sessions, offline model, 100 in flight")
            print(f"   agent local                          : {local:8.1f} sessions/s")
            print(f"   agent remote (agentflow agents serve): {remote:8.1f} sessions/s")
            print(f"   ratio remote/local: {remote / local:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--throughput-sessions", type=int, default=300)
    parser.add_argument("--latency", type=float, default=60.0)
    parser.add_argument("--part", type=int, choices=[1, 2], help="run only part 1 or part 2")
    asyncio.run(main(parser.parse_args()))
