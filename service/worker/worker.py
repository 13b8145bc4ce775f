"""The Kafka worker: events in, graph runs on a Redis checkpointer, results out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
)
from aiokafka.structs import ConsumerRecord
from redis.asyncio import BlockingConnectionPool, Redis

from graphs.workflow import build_graph
from nodes.errors import EventValidationError
from nodes.models import CANCEL_EVENT_TYPE, CloudEvent, WorkflowResult, utcnow
from service.config import Settings
from service.errors import UnknownSessionError
from service.observe import metrics
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import expire_session, open_checkpointer
from service.storage.publisher import BackgroundPublisher, TransitionPublisher
from service.storage.sessions import SessionStore
from service.storage.transitions import Transition

__all__ = ["INFRA_ERRORS", "is_infra_error", "Worker"]

logger = logging.getLogger(__name__)

INFRA_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    KafkaConnectionError,
    KafkaTimeoutError,
    ConnectionError,
)
"""Errors that mean Redis or Kafka is away: retried with backoff, never a failed run."""


def is_infra_error(exc: BaseException) -> bool:
    """Whether an error, or one it was raised from, means Redis or Kafka is away.

    Libraries wrap connection errors (redisvl raises `RedisVLError` from them), so the
    whole cause chain counts.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, INFRA_ERRORS):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class DeadLetter(Exception):
    """An event that cannot be processed; it goes to the dead-letter topic."""


def redis_pool(url: str, max_in_flight: int) -> Redis:
    """Open a Redis client whose pool waits instead of failing when all are busy."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_in_flight + 32,
        timeout=30,
        health_check_interval=10,
        decode_responses=True,
    )
    return Redis(connection_pool=pool)


@dataclass
class _Offsets:
    """Offsets of one partition that were taken but have not finished."""

    pending: set[int] = field(default_factory=set)
    highest: int = -1
    committed: int = -1

    def take(self, offset: int) -> None:
        self.pending.add(offset)
        self.highest = max(self.highest, offset)

    def finish(self, offset: int) -> None:
        self.pending.discard(offset)

    def safe(self) -> int | None:
        """The offset to commit: every earlier one has finished."""
        if self.highest < 0:
            return None
        return min(self.pending) if self.pending else self.highest + 1


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker._release(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        for tp in assigned:
            self.worker._offsets.setdefault(tp, _Offsets())
        logger.info("assigned partitions %s", sorted(tp.partition for tp in assigned))


class Worker:
    """Consume events, run one graph per session, publish results.

    Lifecycle: `start()` connects and sets up, `run()` loops until `stop()` (or a
    signal), `close()` drains in-flight runs within the grace period, commits what is
    safe and disconnects. Per-session order, cross-session concurrency up to
    `max_in_flight`; the poll loop never waits for a run.
    """

    def __init__(self, settings: Settings, *, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or f"worker-{uuid.uuid4().hex[:6]}"
        self.received = self.completed = self.failed = self.dead_lettered = 0
        self.duplicates = 0
        self._offsets: dict[TopicPartition, _Offsets] = {}
        self._tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._paused = False
        self._degraded: str | None = None
        self._last_commit = 0.0
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._redis: Redis | None = None
        self.runner: SessionRunner | None = None
        self.store: SessionStore | None = None
        self._stop_metrics: Any = None
        self._publisher: BackgroundPublisher | None = None

    def __repr__(self) -> str:
        return (
            f"Worker({self.name} received={self.received} completed={self.completed} "
            f"failed={self.failed} dlq={self.dead_lettered} duplicates={self.duplicates} "
            f"in_flight={self.in_flight} paused={self._paused} degraded={self._degraded!r})"
        )

    @property
    def in_flight(self) -> int:
        """Events taken from Kafka that have not finished."""
        return len(self._tasks)

    async def start(self) -> None:
        """Connect to Redis and Kafka, set up the checkpointer and the topics."""
        s = self.settings
        if not s.kafka_bootstrap or not s.redis_url:
            raise RuntimeError(
                "the worker needs AGENTFLOW_KAFKA_BOOTSTRAP and AGENTFLOW_REDIS_URL "
                "(or run `agentflow dev`, which starts local servers)"
            )
        self._redis = redis_pool(s.redis_url, s.max_in_flight)
        await self._redis.ping()
        checkpointer = await open_checkpointer(self._redis)
        from service.storage.library import open_library
        from service.storage.memory import install_llm_cache, open_subject_store

        library = await open_library(self._redis, embeddings=s.embeddings)
        subject_store = await open_subject_store(self._redis)
        install_llm_cache(s)
        self.store = SessionStore(self._redis, ttl_s=s.session_ttl_s)
        self._publisher = BackgroundPublisher(
            TransitionPublisher(self._redis, ttl_s=s.session_ttl_s, maxlen=s.transition_log_maxlen)
        )
        publisher = self._publisher

        async def sink(transition: Transition) -> None:
            await publisher.publish(transition)  # also sets the record's current node
            metrics.observe_transition(transition)

        self.runner = SessionRunner(
            build_graph(checkpointer, store=subject_store),
            s.context(library=library),
            sink=sink,
            sequence=None,
            is_infra_error=is_infra_error,
        )
        if s.create_topics:
            await self._create_topics()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            acks="all" if s.producer_acks == "all" else int(s.producer_acks),
            enable_idempotence=s.producer_idempotence,
            max_request_size=max(s.max_event_bytes * 2, 1024 * 1024),
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max(s.max_event_bytes * 2, 1024 * 1024),
            fetch_max_bytes=max(s.max_event_bytes * 4, 8 * 1024 * 1024),
            client_id=self.name,
        )
        self._consumer.subscribe([s.topic_events], listener=_Rebalance(self))
        await self._consumer.start()
        if s.metrics_port is not None and self._stop_metrics is None:
            self._stop_metrics = metrics.serve_metrics(s.metrics_port)
        logger.info("%s started: group %s on %s", self.name, s.consumer_group, s.topic_events)

    async def _create_topics(self) -> None:
        s = self.settings
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            wanted = [s.topic_events, s.topic_results, s.topic_sessions, s.topic_dlq]
            missing = [
                NewTopic(t, num_partitions=s.topic_partitions, replication_factor=1)
                for t in wanted
                if t not in existing
            ]
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(missing)
                logger.info("created topics %s", [t.name for t in missing])
        finally:
            await admin.close()

    def stop(self) -> None:
        """Ask the run loop to stop fetching; `close()` drains and disconnects."""
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        """Stop gracefully on SIGTERM and SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> None:
        """Fetch and dispatch events until `stop()`; then drain and close."""
        assert self._consumer is not None
        consumer = self._consumer
        try:
            while not self._stopping.is_set():
                self._flow_control()
                room = max(1, self.settings.max_in_flight - self.in_flight)
                try:
                    batch = await consumer.getmany(timeout_ms=100, max_records=room)
                except KafkaError as exc:
                    self._set_degraded(f"Kafka unavailable ({exc})")
                    await asyncio.sleep(1)
                    continue
                for tp, records in batch.items():
                    for record in records:
                        self._take(tp, record)
                await self._commit(force=False)
        finally:
            await self.close()

    def _flow_control(self) -> None:
        assert self._consumer is not None
        full = self.in_flight >= self.settings.max_in_flight or self._degraded is not None
        assigned = list(self._consumer.assignment())
        if full and not self._paused:
            self._consumer.pause(*assigned)
            self._paused = True
        elif not full and self._paused:
            self._consumer.resume(*assigned)
            self._paused = False
        elif self._paused:
            self._consumer.pause(*assigned)  # partitions assigned since the pause

    def _take(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        self.received += 1
        metrics.EVENTS_RECEIVED.labels("worker").inc()
        self._offsets.setdefault(tp, _Offsets()).take(record.offset)
        session_id, event, problem = self._parse(record)
        previous = self._tails.get(session_id)
        if event is not None and event.is_cancel and previous is not None:
            previous.cancel(msg=CANCEL_EVENT_TYPE)  # stop the session's run now
        task = asyncio.create_task(
            self._handle(tp, record, session_id, event, problem, previous),
            name=f"event {tp.partition}:{record.offset}",
        )
        self._tasks[task] = tp
        self._tails[session_id] = task

    def _parse(self, record: ConsumerRecord) -> tuple[str, CloudEvent | None, str | None]:
        key = record.key.decode(errors="replace") if record.key else None
        value: bytes = record.value or b""
        if len(value) > self.settings.max_event_bytes:
            return (
                key or "",
                None,
                (
                    f"event of {len(value)} bytes exceeds AGENTFLOW_MAX_EVENT_BYTES "
                    f"({self.settings.max_event_bytes})"
                ),
            )
        try:
            event = CloudEvent.parse(value)
        except EventValidationError as exc:
            return key or "", None, str(exc)
        session_id = event.sessionid or key or f"session-{event.id}"
        if event.is_resume and not (event.sessionid or key):
            return session_id, None, "resume event without a sessionid attribute"
        return session_id, event, None

    async def _handle(
        self,
        tp: TopicPartition,
        record: ConsumerRecord,
        session_id: str,
        event: CloudEvent | None,
        problem: str | None,
        previous: asyncio.Task[None] | None,
    ) -> None:
        me = asyncio.current_task()
        assert me is not None
        done = cancelled = False
        try:
            while True:
                try:
                    if previous is not None:
                        await asyncio.wait([previous])  # per-session order
                    if event is None:
                        await self._retrying(self._dead_letter, record, problem or "invalid event")
                    elif cancelled and not event.is_cancel:
                        await self._retrying(self._cancel, session_id, event)
                    else:
                        await self._retrying(self._process, record, session_id, event)
                    break
                except asyncio.CancelledError as exc:
                    if exc.args != (CANCEL_EVENT_TYPE,):
                        raise
                    # An agentflow.cancel event of this session: the run ends as cancelled
                    # (not redelivered), and so do the session's events queued before it.
                    me.uncancel()
                    cancelled = True
                    if previous is not None and not previous.done():
                        previous.cancel(msg=CANCEL_EVENT_TYPE)
            done = True
        except asyncio.CancelledError:
            logger.info("event %s:%s left for redelivery", tp.partition, record.offset)
            raise
        finally:
            if done and tp in self._offsets:
                self._offsets[tp].finish(record.offset)
            self._tasks.pop(me, None)  # type: ignore[arg-type]
            if self._tails.get(session_id) is me:
                del self._tails[session_id]

    async def _retrying(self, func: Any, *args: Any) -> None:
        """Run `func` until it gets through Redis and Kafka outages."""
        delay = 0.25
        while True:
            try:
                await func(*args)
                self._set_degraded(None)
                return
            except Exception as exc:
                if not is_infra_error(exc):
                    raise
                self._set_degraded(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _set_degraded(self, reason: str | None) -> None:
        if reason is None and self._degraded is not None:
            logger.warning("%s: Redis and Kafka reachable again, taking new events", self.name)
        elif reason is not None and self._degraded is None:
            logger.warning("%s: stopped taking new events, retrying: %s", self.name, reason)
        self._degraded = reason

    async def _process(self, record: ConsumerRecord, session_id: str, event: CloudEvent) -> None:
        assert self.runner is not None and self.store is not None
        claim, session_id = await self.store.claim_event(event.id, session_id)
        if claim == "published":
            self.duplicates += 1
            logger.info("event %s already has its result; skipped", event.id)
            return
        if claim == "finished":  # crashed between the result and its publication
            result = await self._stored_result(session_id, event.id)
            if result is not None:
                await self._publish_result(result)
                return
        if event.is_resume:
            await self._resume(record, session_id, event, redelivered=claim != "new")
            return
        if event.is_cancel:
            await self._cancel(session_id, event)
            return
        await self.store.open(
            session_id, event_id=event.id, event_type=event.type, subject=event.subject
        )
        if claim == "new":
            await (await self._session_message("session.started", session_id, event.id))
        with metrics.timed_run() as run:
            result = await self.runner.start(event, session_id)
            run.status = result.status
        await self._finish(result)

    async def _resume(
        self, record: ConsumerRecord, session_id: str, event: CloudEvent, *, redelivered: bool
    ) -> None:
        assert self.runner is not None and self.store is not None
        answer = event.data.get("answer") if isinstance(event.data, dict) else event.data
        if answer is None:
            await self._dead_letter(record, "resume event without data.answer")
            return
        try:
            with metrics.timed_run() as run:
                try:
                    result = await self.runner.resume(session_id, answer, event_id=event.id)
                except UnknownSessionError:
                    # A redelivered answer whose run was under way: continue that run.
                    if not redelivered:
                        raise
                    result = await self.runner.continue_run(session_id, event_id=event.id)
                run.status = result.status
        except UnknownSessionError as exc:
            await self._dead_letter(record, f"unknown session for resume: {exc}")
            return
        await self._finish(result)

    async def _cancel(self, session_id: str, event: CloudEvent) -> None:
        """Cancel a session for an `agentflow.cancel` event, or for the run it stopped."""
        assert self.runner is not None and self.store is not None
        if not event.is_cancel:  # a run stopped by a cancel: it may have finished already
            state, _ = await self.store.claim_event(event.id, session_id)
            if state == "published":
                return
            if state == "finished" and (done := await self._stored_result(session_id, event.id)):
                await self._publish_result(done)
                return
        snapshot = await self.runner.graph.aget_state(self.runner.config(session_id))
        from nodes.finalize import build_result

        record = await self.store.get(session_id)
        status = record.status if record is not None else None
        live = status in ("running", "interrupted")
        ended = status in ("completed", "failed")
        error = f"nothing to cancel: session {status}" if ended else "cancelled"
        result = build_result(
            snapshot.values or {}, session_id=session_id, status="failed", error=error
        )
        result.event_id = event.id
        if live:
            checkpointer = self.runner.graph.checkpointer
            await expire_session(checkpointer, session_id, self.settings.session_ttl_s)
            await self.store.close(result, status="cancelled")
            await self.runner.emit(
                Transition(
                    session_id=session_id,
                    type="session.failed",
                    data={
                        "status": "failed",
                        "error": error,
                        "result": result.model_dump(mode="json"),
                    },
                )
            )
        await self.store.mark_event(event.id, session_id, "finished")
        await self._publish_result(result)

    async def _finish(self, result: WorkflowResult) -> None:
        assert self.store is not None and self.runner is not None
        if result.status != "interrupted":
            checkpointer = self.runner.graph.checkpointer
            await expire_session(checkpointer, result.session_id, self.settings.session_ttl_s)
        await self.store.close(result, finished_event=result.event_id)
        await self._publish_result(result)
        if result.status == "failed":
            self.failed += 1
        else:
            self.completed += 1

    async def _stored_result(self, session_id: str, event_id: str) -> WorkflowResult | None:
        assert self.store is not None
        record = await self.store.get(session_id)
        if record and record.result and record.result.event_id == event_id:
            return record.result
        return None

    async def _publish_result(self, result: WorkflowResult) -> None:
        assert self._producer is not None and self.store is not None
        sent = [
            await self._producer.send(
                self.settings.topic_results,
                result.model_dump_json().encode(),
                key=result.session_id.encode(),
                headers=[("event_id", result.event_id.encode())],
            )
        ]
        if result.status != "interrupted":
            sent.append(
                await self._session_message(
                    "session.ended", result.session_id, result.event_id, status=result.status
                )
            )
        await asyncio.gather(*sent)  # both acknowledged before the event counts as published
        await self.store.mark_event(result.event_id, result.session_id, "published")

    async def _session_message(
        self, kind: str, session_id: str, event_id: str, **extra: Any
    ) -> asyncio.Future[Any]:
        """Send a lifecycle message to the sessions topic; return its delivery future."""
        assert self._producer is not None
        body = {
            "type": kind,
            "session_id": session_id,
            "event_id": event_id,
            "ts": utcnow().isoformat(),
            **extra,
        }
        return await self._producer.send(
            self.settings.topic_sessions, json.dumps(body).encode(), key=session_id.encode()
        )

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        assert self._producer is not None
        headers = list(record.headers or []) + [
            ("reason", reason.encode()),
            ("source_topic", record.topic.encode()),
            ("partition", str(record.partition).encode()),
            ("offset", str(record.offset).encode()),
        ]
        await self._producer.send_and_wait(
            self.settings.topic_dlq, record.value, key=record.key, headers=headers
        )
        self.dead_lettered += 1
        metrics.DLQ_EVENTS.inc()
        logger.warning(
            "dead-lettered %s:%s:%s: %s", record.topic, record.partition, record.offset, reason
        )

    async def _commit(self, *, force: bool, only: Iterable[TopicPartition] | None = None) -> None:
        if self._consumer is None:
            return
        now = time.monotonic()
        if not force and now - self._last_commit < 0.5:
            return
        self._last_commit = now
        wanted = set(only) if only is not None else set(self._consumer.assignment())
        offsets = {}
        for tp in wanted:
            tracker = self._offsets.get(tp)
            safe = tracker.safe() if tracker else None
            if tracker and safe is not None and safe > tracker.committed:
                offsets[tp] = safe
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            logger.warning("commit failed, will retry: %s", exc)
            return
        for tp, offset in offsets.items():
            self._offsets[tp].committed = offset

    async def _release(self, partitions: list[TopicPartition]) -> None:
        """On revocation: let their runs reach a checkpoint, commit, cancel the rest."""
        tasks = [t for t, tp in self._tasks.items() if tp in partitions]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
        await self._commit(force=True, only=partitions)
        for task in tasks:
            task.cancel()
        for tp in partitions:
            self._offsets.pop(tp, None)
        if partitions:
            logger.info("released partitions %s", sorted(tp.partition for tp in partitions))

    async def close(self) -> None:
        """Drain in-flight runs within the grace period, commit, leave the group."""
        self._stopping.set()
        tasks = list(self._tasks)
        if tasks:
            logger.info("%s draining %d in-flight event(s)", self.name, len(tasks))
            await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
        await self._commit(force=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._publisher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publisher.close(), timeout=10)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._stop_metrics is not None:
            await asyncio.to_thread(self._stop_metrics)
            self._stop_metrics = None
        logger.info("%s closed: %r", self.name, self)

    async def health(self) -> bool:
        """Whether Redis and Kafka answer."""
        try:
            assert self._redis is not None and self._producer is not None
            await self._redis.ping()
            await self._producer.partitions_for(self.settings.topic_results)
        except Exception:
            return False
        return True
