"""One result per event across crashes: killed at each step of finishing, and by SIGKILL.

Against the real broker and Redis. A crash point (`AGENTFLOW_TEST_CRASH_AT`) makes an
`agentflow worker` process exit 137 right after one step of finishing an event; the worker
started after it must neither lose the event's result nor send it a second time. Then two
worker processes run 200 sessions while one of them is SIGKILLed again and again.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from graphs.workflow import build_graph
from nodes.library import InMemoryWorkflowLibrary
from nodes.models import CloudEvent
from service.bootstrap import ensure_topics
from service.config import Settings
from service.devtools.servers import LocalServers
from service.runtime.runner import SessionRunner
from service.storage.checkpointer import RedisSaver
from service.storage.checkpoints import checkpoint_serde, open_checkpointer
from service.storage.keys import event_key
from service.storage.publisher import read_log
from service.storage.transitions import Transition
from service.worker import Worker
from service.worker.crash_points import CRASH_AT_ENV, CRASH_POINTS
from tests.integration_tests.conftest import cli_env, example, own_settings, wait_until

ROOT = Path(__file__).resolve().parents[2]
AGENTS_FILE = ROOT / "examples" / "agents.yaml"


def start_worker_process(settings: Settings, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start `agentflow worker` with the settings' servers and topics, output to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        cwd=ROOT,
        env=cli_env(settings, **{"AGENTFLOW_AGENTS_FILE": str(AGENTS_FILE), **env}),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a worker with SIGTERM (it drains and commits), killing it if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def read_to_end(settings: Settings, topic: str) -> list[ConsumerRecord]:
    """Read every partition of a topic from the start to its end offset now.

    Fetches return whole batches: a batch whose end Tansu reports short is still read
    to its last record.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None)
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        await consumer.topics()  # loads the metadata of every topic
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        ends = await consumer.end_offsets(tps)
        left = {tp for tp in tps if ends[tp] > 0}
        consumer.assign(list(left))
        await consumer.seek_to_beginning(*left)
        while left:
            batch = await consumer.getmany(*left, timeout_ms=200)
            for part in batch.values():
                records.extend(part)
            for tp in list(left):
                if await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()
    return records


def event_ids(records: list[ConsumerRecord], kind: str | None = None) -> Counter[str]:
    """Count records by their `event_id` header (of one `type` header, if given)."""
    counts: Counter[str] = Counter()
    for record in records:
        headers = dict(record.headers or ())
        if kind is None or headers.get("type") == kind.encode():
            counts[headers["event_id"].decode()] += 1
    return counts


async def produce(
    settings: Settings, events: dict[str, dict[str, Any]]
) -> dict[TopicPartition, int]:
    """Send events (by session id) to the events topic; return the partitions' ends after them.

    The ends come from the acknowledged offsets: Tansu reports the end of a partition
    whose last batch holds several records as the batch's base offset + 1.
    """
    async with AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap) as producer:
        sent = [
            await producer.send(
                settings.topic_events, json.dumps(event).encode(), key=session_id.encode()
            )
            for session_id, event in events.items()
        ]
        acked = await asyncio.gather(*sent)
    ends: dict[TopicPartition, int] = {}
    for metadata in acked:
        tp = TopicPartition(metadata.topic, metadata.partition)
        ends[tp] = max(ends.get(tp, 0), metadata.offset + 1)
    return ends


async def published(redis: Redis, event_ids: list[str]) -> int:
    """Count the events marked published."""
    marks = await redis.mget([event_key(event_id) for event_id in event_ids])
    return sum(mark is not None and json.loads(mark)["state"] == "published" for mark in marks)


async def settled(
    redis: Redis, settings: Settings, event_ids: list[str], ends: dict[TopicPartition, int]
) -> bool:
    """Whether every event is marked published and the group committed every offset."""
    if await published(redis, event_ids) < len(event_ids):
        return False
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group
    )
    await consumer.start()
    try:
        return all([await consumer.committed(tp) == end for tp, end in ends.items()])
    finally:
        await consumer.stop()


@dataclass
class CrashRun:
    """What happened to one event whose worker died at a crash point, then restarted."""

    point: str
    event_id: str
    session_id: str
    exit_code: int | None
    results: list[dict[str, Any]]
    session_ended: int
    restarted: dict[str, int]
    """What the restarted worker did: counters of its handler and outbox."""
    log: str
    """The killed worker's output."""


async def crash_and_restart(servers: LocalServers, redis: Redis, point: str, log: Path) -> CrashRun:
    """Kill a worker at `point` while it finishes an event, restart it, read what it sent."""
    settings = own_settings(servers)
    await ensure_topics(settings)
    event = example("claim_submitted")
    session_id = f"crash-at-{point}-{event['id'][-6:]}"
    first = start_worker_process(settings, log, **{CRASH_AT_ENV: point})
    try:
        ends = await produce(settings, {session_id: event})
        await wait_until(
            lambda: first.poll() is not None, f"the worker died at {point}", timeout_s=120
        )
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    # Restarted in this process, where the hook is off: one start-up of a worker process
    # costs ~4 s of CPU, and six of them side by side double the test's time.
    second = Worker(settings, name=f"restarted-{point}")
    await second.start()
    running = asyncio.create_task(second.run())
    try:
        await wait_until(
            lambda: settled(redis, settings, [event["id"]], ends),
            f"{point}: the event published and its offset committed after the restart",
            timeout_s=150,
        )
    finally:
        second.stop()
        await asyncio.wait_for(running, 60)
    assert second.handler is not None and second.outbox is not None
    restarted = {
        "received": second.received,
        "ran": second.handler.completed,
        "read back": second.outbox.reader.reads if second.outbox.reader else 0,
        "found on Kafka": second.outbox.resolved,
        "skipped": second.handler.duplicates,
    }
    results = await read_to_end(settings, settings.topic_results)
    sessions = await read_to_end(settings, settings.topic_sessions)
    return CrashRun(
        point=point,
        event_id=event["id"],
        session_id=session_id,
        exit_code=first.returncode,
        results=[json.loads(r.value) for r in results if event_ids([r])[event["id"]]],
        session_ended=event_ids(sessions, "session.ended")[event["id"]],
        restarted=restarted,
        log=log.read_text(),
    )


@pytest.fixture(scope="module")
async def crash_runs(
    servers: LocalServers, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, CrashRun | BaseException]:
    """Every crash point at once, each with topics and workers of its own.

    Run side by side: each needs two worker start-ups and two group joins (about 20 s
    alone), which would add up to minutes one after the other.
    """
    folder = tmp_path_factory.mktemp("crash-points")
    async with Redis.from_url(servers.redis_url, decode_responses=True) as redis:
        runs = await asyncio.gather(
            *(
                crash_and_restart(servers, redis, point, folder / f"{point}.log")
                for point in CRASH_POINTS
            ),
            return_exceptions=True,
        )
    return dict(zip(CRASH_POINTS, runs, strict=True))


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_worker_killed_after_any_step_of_finishing_sends_one_result(
    point: str, crash_runs: dict[str, CrashRun | BaseException]
) -> None:
    run = crash_runs[point]
    if isinstance(run, BaseException):
        raise run
    print(
        f"crash at {point}: results {len(run.results)}, session.ended {run.session_ended}; "
        f"restarted worker: {run.restarted}"
    )
    assert run.exit_code == 137, run.log[-3000:]
    assert f"test crash point {point} reached" in run.log
    assert (len(run.results), run.session_ended) == (1, 1), run.log[-3000:]
    [result] = run.results
    assert result["status"] == "completed" and result["session_id"] == run.session_id
    # How the restarted worker got there: the path each point must take.
    assert run.restarted == EXPECTED_PATH[point]


EXPECTED_PATH = {
    # never marked finished: the redelivery finds the run's result in its checkpoint
    "checkpoint": {"received": 1, "ran": 1, "read back": 0, "found on Kafka": 0, "skipped": 0},
    # in doubt: read back, nothing found, both sent
    "finished": {"received": 1, "ran": 0, "read back": 1, "found on Kafka": 0, "skipped": 0},
    # in doubt: read back, the result found (only session.ended sent), or both found
    "result": {"received": 1, "ran": 0, "read back": 1, "found on Kafka": 1, "skipped": 0},
    "session_ended": {"received": 1, "ran": 0, "read back": 1, "found on Kafka": 1, "skipped": 0},
    # published: skipped; committed: not redelivered
    "published": {"received": 1, "ran": 0, "read back": 0, "found on Kafka": 0, "skipped": 1},
    "committed": {"received": 0, "ran": 0, "read back": 0, "found on Kafka": 0, "skipped": 0},
}


FORCE_SESSIONS = 200
KILL_FOR_S = 50.0
"""How long one of the two workers is killed and restarted, again and again."""
KILL_AFTER = 10
"""Events published after the victim took its partitions, before it is killed."""
IN_FLIGHT = "20"
"""Sessions a worker runs at once: events flow through, so each kill lands mid-run."""


async def test_two_workers_one_sigkilled_again_and_again_every_event_one_result(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"topic_partitions": 6})
    await ensure_topics(settings)
    await open_checkpointer(redis)  # its search indexes: two workers would race to make them
    tag = uuid.uuid4().hex[:6]
    events = {f"force-{tag}-{i:03d}": example("claim_submitted") for i in range(FORCE_SESSIONS)}
    ids = [event["id"] for event in events.values()]
    logs: list[Path] = []

    def start(log: Path) -> subprocess.Popen[bytes]:
        logs.append(log)
        return start_worker_process(settings, log, AGENTFLOW_MAX_IN_FLIGHT=IN_FLIGHT)

    steady = start(tmp_path / "steady.log")
    victim = start(tmp_path / "victim-0.log")
    loop = asyncio.get_running_loop()
    kills = 0
    try:
        ends = await produce(settings, events)
        deadline = loop.time() + KILL_FOR_S
        while loop.time() < deadline and await published(redis, ids) < len(ids):
            await wait_until(
                lambda: "assigned partitions" in logs[-1].read_text(),
                f"victim {kills} took partitions",
                timeout_s=120,
            )
            target = min(await published(redis, ids) + KILL_AFTER, len(ids))

            async def progressed(target: int = target) -> bool:
                return await published(redis, ids) >= target

            await wait_until(progressed, f"{target} events published", timeout_s=120)
            victim.kill()  # SIGKILL: no drain, no commit, no leaving the group
            victim.wait(10)
            kills += 1
            victim = start(tmp_path / f"victim-{kills}.log")
        await wait_until(
            lambda: settled(redis, settings, ids, ends),
            "every event published and every offset committed",
            timeout_s=240,
        )
    finally:
        await asyncio.gather(asyncio.to_thread(stop, victim), asyncio.to_thread(stop, steady))

    results = event_ids(await read_to_end(settings, settings.topic_results))
    ended = event_ids(await read_to_end(settings, settings.topic_sessions), "session.ended")
    gapless = completions = restored = reran = resumed = 0
    for session_id in events:
        log = await read_log(redis, session_id)
        gapless += [t.seq for t in log] == list(range(1, len(log) + 1))
        resumed += any(t.type == "session.started" and (t.data or {}).get("resumed") for t in log)
        ran: Counter[str | None] = Counter()  # runs to completion, by LangGraph task
        for t in log:
            if t.type != "node.completed":
                continue
            if (t.data or {}).get("restored"):  # its saved writes handed back: not run
                restored += 1
            else:
                ran[t.task_id] += 1
        completions += sum(ran.values())
        reran += sum(count - 1 for count in ran.values())
    text = "".join(log.read_text() for log in logs)
    counts = {
        "events": len(ids),
        "with one result": sum(results[i] == 1 for i in ids),
        "with one session.ended": sum(ended[i] == 1 for i in ids),
        "results": sum(results[i] for i in ids),
        "sessions with gapless seq": gapless,
        "node completions": completions,
        "restored from checkpoints": restored,
        "finished nodes run again": reran,
        "sessions resumed after a kill": resumed,
        "results in doubt read back": text.count("service.worker.readback: read back event"),
        "found on Kafka, not sent again": text.count(": Kafka already has its"),
        "kills": kills,
    }
    print("SIGKILL loop:", json.dumps(counts, indent=1))
    assert kills >= 3, "the victim was killed a few times while events ran"
    assert counts["with one result"] == counts["with one session.ended"] == len(ids), counts
    assert counts["sessions with gapless seq"] == len(ids), counts
    assert counts["finished nodes run again"] == 0, counts


class _SlowWritesSaver(RedisSaver):
    """Lets the event loop run a while before storing each task's writes.

    Records which tasks had been announced (`node.completed`) by then.
    """

    def __init__(self, redis: Redis, announced: list[Transition]) -> None:
        super().__init__(redis_client=redis, serde=checkpoint_serde())
        self.announced = announced
        self.early: list[str] = []
        self.stored: list[str] = []

    async def aput_writes(
        self, config: Any, writes: Any, task_id: str, task_path: str = ""
    ) -> None:
        for _ in range(50):  # a crash would land in this window
            await asyncio.sleep(0)
        if any(t.type == "node.completed" and t.task_id == task_id for t in self.announced):
            self.early.append(task_id)
        await super().aput_writes(config, writes, task_id, task_path)
        self.stored.append(task_id)


async def test_a_task_is_announced_finished_only_once_its_writes_are_stored(
    settings: Settings, redis: Redis
) -> None:
    # LangGraph streams a task's end while its writes are still being stored; a worker
    # killed in between had announced a task that the next run of the session runs again.
    announced: list[Transition] = []
    saver = _SlowWritesSaver(redis, announced)
    await saver.asetup()

    async def sink(transition: Transition) -> None:
        announced.append(transition)

    context = settings.context(library=InMemoryWorkflowLibrary())
    runner = SessionRunner(build_graph(saver), context, sink=sink)
    session_id = f"announce-{uuid.uuid4().hex[:6]}"
    result = await runner.start(CloudEvent.parse(example("claim_submitted")), session_id)

    assert result.status == "completed"
    completed = [t.task_id for t in announced if t.type == "node.completed"]
    assert len(completed) >= 6 and set(completed) <= set(saver.stored)
    assert saver.early == []
