"""The Kafka worker: events in, graph runs on a Redis checkpointer, results out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Collection
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from nodes.agents import load_agents
from nodes.finalize import build_result
from nodes.models import CloudEvent, utcnow
from service.bootstrap import (
    RedisClient,
    ensure_topics,
    is_infra_error,
    kafka_consumer,
    kafka_producer,
    log_startup,
    open_graph,
    redis_client,
    require_services,
    restore_setup,
    serve_until_signal,
)
from service.config import Settings
from service.errors import StaleWriter
from service.kafka.consumer import EventConsumer
from service.observe import metrics
from service.runtime.runner import SessionRunner
from service.storage.keys import worker_key
from service.storage.publisher import BackgroundPublisher, TransitionPublisher
from service.storage.questions import QuestionStore
from service.storage.sessions import SessionStore
from service.storage.transitions import Transition
from service.storage.workers import WorkerState, write_worker_state
from service.worker.crash_points import armed, crash_point
from service.worker.handler import EventHandler
from service.worker.idle import IdleTrim
from service.worker.outbox import Outbox
from service.worker.readback import PartitionReader
from service.worker.waits import AgentWaits, HumanWaits

__all__ = ["Worker"]

logger = logging.getLogger(__name__)

STATE_EVERY_S = 2.0
"""How often a worker records its state in Redis."""
STATE_TTL_S = 10
"""How long a recorded state lasts: a worker that stopped reporting is gone from health."""
SWEEP_EVERY_S = 1.0
"""How often a worker looks for remote agents' tasks and humans' questions past their deadline."""


class Worker:
    """Consume events, run one graph per session, publish results.

    Lifecycle: `start()` connects and sets up, `run()` loops until `stop()` (or a
    signal), `close()` drains in-flight runs within the grace period, commits what is
    safe and disconnects. Per-session order, cross-session concurrency up to
    `max_in_flight`; the poll loop never waits for a run.

    Collaborators, once started: `consumer` (offsets, commits, flow control), `handler`
    (runs each event), `outbox` (results, session messages, dead letters), `runner` and
    `store`.
    """

    def __init__(
        self, settings: Settings, *, name: str | None = None, redis: RedisClient | None = None
    ) -> None:
        """Make a worker; nothing connects until `start()`.

        Args:
            settings: what to connect to and how much to run at once.
            name: the Kafka client id and the name in logs; a random one by default.
            redis: a client to use instead of one from `service.bootstrap.redis_client`;
                the caller closes it.
        """
        self.settings = settings
        self.name = name or f"worker-{uuid.uuid4().hex[:6]}"
        self.received = 0
        self.consumer: EventConsumer | None = None
        self.handler: EventHandler | None = None
        self.outbox: Outbox | None = None
        self.runner: SessionRunner | None = None
        self.store: SessionStore | None = None
        self._redis = redis
        self._owns_redis = redis is None
        self._library_redis: Redis | None = None  # AGENTFLOW_LIBRARY_REDIS_URL's, if its own
        self._producer: AIOKafkaProducer | None = None
        self._reader: PartitionReader | None = None
        self._publisher: BackgroundPublisher | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self._tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._sessions: dict[str, list[tuple[asyncio.Task[None], CloudEvent | None]]] = {}
        """Each session's events in flight here, in order (its runs and queued events)."""
        self._told: dict[str, asyncio.Task[None]] = {}
        """Each session's last remote agent message in flight: the next one waits for it."""
        self._stopping = asyncio.Event()
        self._degraded: str | None = None
        self._outages = 0  # outages seen: a recovery clears only the one it probed
        self._poll_failed = False
        self._recovery: asyncio.Task[None] | None = None
        self._setup_lock = asyncio.Lock()
        self._since = utcnow()  # when the worker entered its state (running or degraded)
        self._reporter: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.waits: AgentWaits | None = None
        self.human_waits: HumanWaits | None = None
        self.idle = IdleTrim(lambda: not self._tasks and not self._stopping.is_set())
        """Gives memory back once nothing is in flight: a burst's heap does not stay."""

    def __repr__(self) -> str:
        handler, outbox = self.handler, self.outbox
        return (
            f"Worker({self.name} received={self.received} "
            f"completed={handler.completed if handler else 0} "
            f"failed={handler.failed if handler else 0} "
            f"dlq={outbox.dead_lettered if outbox else 0} "
            f"duplicates={handler.duplicates if handler else 0} "
            f"in_flight={self.in_flight} paused={self.consumer.paused if self.consumer else False} "
            f"degraded={self._degraded!r})"
        )

    @property
    def in_flight(self) -> int:
        """Events taken from Kafka that have not finished."""
        return len(self._tasks)

    @property
    def degraded(self) -> str | None:
        """Why Redis or Kafka is away (no new events are taken meanwhile), or None."""
        return self._degraded

    async def start(self) -> None:
        """Connect to Redis and Kafka, set up the checkpointer and the topics."""
        s = self.settings
        require_services(s)
        assert s.redis_url is not None
        log_startup(s, self.name)
        if (point := armed()) is not None:
            logger.warning("%s: test crash point %r armed: exits with 137 there", self.name, point)
        if self._redis is None:
            self._redis = redis_client(
                s.redis_url, cluster=s.redis_cluster, max_connections=s.max_in_flight + 32
            )
        await self._redis.ping()
        library_url = s.library_url()
        if library_url and library_url != s.redis_url and self._library_redis is None:
            self._library_redis = redis_client(library_url, max_connections=s.max_in_flight + 8)
        graph, context = await open_graph(self._redis, s, library_redis=self._library_redis)
        self.store = SessionStore(self._redis, ttl_s=s.session_ttl_s)
        self._publisher = BackgroundPublisher(
            TransitionPublisher(self._redis, ttl_s=s.session_ttl_s, maxlen=s.transition_log_maxlen)
        )
        publisher = self._publisher

        async def sink(transition: Transition) -> None:
            await publisher.publish(transition)  # also sets the record's current node
            metrics.observe_transition(transition)

        self.runner = SessionRunner(
            graph,
            context,
            sink=sink,
            sequence=None,
            is_infra_error=is_infra_error,
            take=self.store.take,
        )
        if s.create_topics:
            await ensure_topics(s, agents=load_agents(s.agents_file).remote_names)
        if s.kafka_transactions:
            # One transactional id per worker: a broker fences an older producer with it.
            transactional_id = f"{s.consumer_group}.{self.name}"
            self._producer = kafka_producer(s, transactional_id=transactional_id)
        else:
            self._producer = kafka_producer(s)
        await self._producer.start()
        self._reader = PartitionReader(s)
        await self._reader.start()
        self.consumer = EventConsumer(
            kafka_consumer(
                s,
                group_id=s.consumer_group,
                client_id=self.name,
                # Partition N of the events and of the replies topic go to one worker: a
                # session's events and its agents' replies meet in one queue.
                partition_assignment_strategy=(RangePartitionAssignor,),
            ),
            runs_of=self._runs_of,
            grace_s=s.shutdown_grace_s,
            transactions=self._producer if s.kafka_transactions else None,
            group_id=s.consumer_group,
            on_committed=partial(crash_point, "committed"),
        )
        self.outbox = Outbox(
            self._producer,
            self.store,
            s,
            reader=self._reader,
            transaction=self.consumer.in_transaction if s.kafka_transactions else None,
        )
        self.waits = AgentWaits(self._redis, self._producer, s)
        questions = QuestionStore(self._redis, topic=s.topic_events)
        self.human_waits = HumanWaits(questions, self._producer)
        self.handler = EventHandler(
            self.runner,
            self.store,
            self.outbox,
            s,
            on_degraded=self._set_degraded,
            restore_setup=self.restore_setup,
            waits=self.waits,
            questions=questions,
        )
        await self.consumer.start(s.topic_events, s.topic_agent_replies)
        self._reporter = asyncio.create_task(self._report_state(), name="worker state")
        self._sweeper = asyncio.create_task(self._sweep_deadlines(), name="agent deadlines")
        if s.metrics_port is not None and self._stop_metrics is None:
            self._stop_metrics = metrics.serve_metrics(s.metrics_port, s.metrics_host)
        logger.info("%s started: group %s on %s", self.name, s.consumer_group, s.topic_events)

    def stop(self) -> None:
        """Ask the run loop to stop fetching; `close()` drains and disconnects."""
        self._stopping.set()

    async def serve(self) -> None:
        """Start, run until SIGTERM or SIGINT, then drain and close: the worker's whole life."""
        await serve_until_signal(self)

    async def run(self) -> None:
        """Fetch and dispatch events until `stop()`; then drain and close."""
        assert self.consumer is not None
        consumer = self.consumer
        limit = self.settings.max_in_flight
        try:
            while not self._stopping.is_set():
                consumer.hold(self.in_flight >= limit or self._degraded is not None)
                try:
                    batch = await consumer.poll(max_records=max(1, limit - self.in_flight))
                except KafkaError as exc:
                    self._poll_failed = True
                    self._set_degraded(f"Kafka unavailable ({exc})")
                    await asyncio.sleep(1)
                    continue
                if self._poll_failed:
                    self._poll_failed = False
                    self._set_degraded(None)
                for tp, records in batch.items():
                    for record in records:
                        self._take(tp, record)
                await consumer.commit(force=False)
        finally:
            await self.close()

    def _take(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        """Start an event's task, chained after the session's previous event.

        A remote agent's reply joins its session's chain like an event; its messages are
        published as they come.

        A new event for a session with a run going here applies its `multitask` strategy:
        `interrupt` and `rollback` stop the session's earlier events, `reject` is refused
        at once (outside the chain), `enqueue` waits its turn.
        """
        assert self.consumer is not None and self.handler is not None
        self.received += 1
        metrics.EVENTS_RECEIVED.labels("worker").inc()
        self.consumer.take(tp, record.offset)
        if record.topic == self.settings.topic_agent_replies:
            self._take_reply(tp, record)
            return
        session_id, event, problem = self.handler.parse(record)
        earlier = self._sessions.get(session_id, [])
        previous = earlier[-1][0] if earlier else None
        strategy = self.handler.strategy(event) if event is not None else "enqueue"
        new = event is not None and not event.is_cancel and not event.is_resume
        if event is not None and event.is_cancel and previous is not None:
            self.handler.stop_for_cancel(previous)  # stop the session's run now
        elif new and event is not None and strategy in ("interrupt", "rollback"):
            for task, of in earlier:
                if of is not None and not of.is_cancel:
                    self.handler.supersede(task, strategy, event.id)
        task = asyncio.create_task(
            self._run_event(tp, record, session_id, event, problem, previous),
            name=f"event {tp.partition}:{record.offset}",
        )
        self._tasks[task] = tp
        if not (new and strategy == "reject" and previous is not None):
            self._sessions.setdefault(session_id, []).append((task, event))

    def _take_reply(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        """Chain a reply after its session's events, a message after its session's messages.

        Messages do not wait for runs (they are shown live while a session waits), but
        they are published in the order the agent said them, and before its reply's run.
        """
        assert self.handler is not None
        session_id, kind, data, problem = self.handler.parse_agent(record)
        chained = kind == "agentflow.agent.reply"
        earlier = self._sessions.get(session_id, []) if chained else []
        previous = earlier[-1][0] if earlier else self._told.get(session_id)
        task = asyncio.create_task(
            self._run_event(tp, record, session_id, None, problem, previous, agent=(kind, data)),
            name=f"reply {tp.partition}:{record.offset}",
        )
        self._tasks[task] = tp
        if chained:
            self._sessions.setdefault(session_id, []).append((task, None))
        else:
            self._told[session_id] = task

    async def _run_event(
        self,
        tp: TopicPartition,
        record: ConsumerRecord,
        session_id: str,
        event: CloudEvent | None,
        problem: str | None,
        previous: asyncio.Task[None] | None,
        *,
        agent: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        consumer, handler = self.consumer, self.handler
        assert consumer is not None and handler is not None
        me = asyncio.current_task()
        done = False
        try:
            if agent is not None:
                await handler.handle_agent(record, session_id, *agent, problem, previous)
            else:
                await handler.handle(
                    record, session_id, event, problem, previous, busy=previous is not None
                )
            done = True
        except asyncio.CancelledError:
            logger.info("event %s:%s left for redelivery", tp.partition, record.offset)
            raise
        except StaleWriter as exc:
            # Another worker took the session (its partition moved): that worker runs
            # this event. No result here, and the offset stays unfinished on this side.
            logger.warning(
                "event %s:%s left to the session's new owner: %s", tp.partition, record.offset, exc
            )
        except Exception as exc:
            # Never a task that dies unobserved with its offset pinned: the event ends
            # failed with the reason, and its offset is committed like any other's.
            logger.exception(
                "event %s:%s of session %s failed unexpectedly",
                tp.partition,
                record.offset,
                session_id,
            )
            await self._fail_event(record, session_id, event, exc)
            done = True
        finally:
            if done:  # only a finished event lets its offset be committed
                consumer.finish(tp, record.offset)
            self._tasks.pop(me, None)  # type: ignore[arg-type]
            queue = self._sessions.get(session_id, [])
            queue[:] = [entry for entry in queue if entry[0] is not me]
            if not queue:
                self._sessions.pop(session_id, None)
            if self._told.get(session_id) is me:
                del self._told[session_id]
            self.idle.idle()

    async def _fail_event(
        self, record: ConsumerRecord, session_id: str, event: CloudEvent | None, exc: Exception
    ) -> None:
        """Give an event whose handling raised a failed result that says why.

        Retried through Redis and Kafka outages; an event that was not even parsed, or a
        failure that fails again, is only logged.
        """
        handler = self.handler
        assert handler is not None
        if event is None:
            return  # no event id to answer to; the traceback is logged
        error = f"internal error: {type(exc).__name__}: {exc}"
        result = build_result({}, session_id=session_id, status="failed", error=error)
        result.event_id = event.id
        try:
            await handler._retrying(handler.finish, result, record)
        except Exception:
            logger.exception("event %s: its failed result could not be sent either", event.id)

    async def restore_setup(self) -> None:
        """Run start-up's Redis setup again (search indexes): Redis may have come back empty."""
        assert self.runner is not None
        async with self._setup_lock:
            await restore_setup(
                self.runner.graph, self.runner.context, with_library=self._library_redis is None
            )

    async def _report_state(self) -> None:
        """Keep this worker's state in Redis for `agentflow health` and `/healthz`."""
        assert self._redis is not None
        while True:
            state = WorkerState(
                name=self.name,
                state="running" if self._degraded is None else "degraded",
                since=self._since,
                reason=self._degraded,
            )
            try:
                await asyncio.wait_for(
                    write_worker_state(self._redis, state, ttl_s=STATE_TTL_S), STATE_EVERY_S
                )
            except Exception as exc:  # Redis away: the state says so once it is back
                if not is_infra_error(exc) and not isinstance(exc, TimeoutError):
                    logger.exception("%s: could not record its state", self.name)
            await asyncio.sleep(STATE_EVERY_S)

    async def _sweep_deadlines(self) -> None:
        """Wake the sessions whose remote agents' tasks or humans' questions passed their deadline.

        Every worker does it; one at a time sweeps each kind.
        """
        assert self.waits is not None and self.human_waits is not None
        while True:
            for waits in (self.waits, self.human_waits):
                try:
                    await waits.sweep()
                except Exception as exc:  # Redis or Kafka away: the next sweep catches up
                    if not is_infra_error(exc):
                        logger.exception("%s: sweeping %r failed", self.name, waits)
            await asyncio.sleep(SWEEP_EVERY_S)

    def _runs_of(self, partitions: Collection[TopicPartition]) -> list[asyncio.Task[None]]:
        return [task for task, tp in self._tasks.items() if tp in partitions]

    def _set_degraded(self, reason: str | None) -> None:
        """Stop taking new events while Redis or Kafka is away; None: they answered again.

        New events are taken again only after a recovery has set Redis up again (it may
        have come back empty, without the search indexes).
        """
        if reason is None:
            if self._degraded is not None and (self._recovery is None or self._recovery.done()):
                self._recovery = asyncio.create_task(self._recover(), name="recover from outage")
            return
        if self._degraded is None:
            logger.warning("%s: stopped taking new events, retrying: %s", self.name, reason)
            self._since = utcnow()
        self._outages += 1
        self._degraded = reason

    async def _recover(self) -> None:
        """Set Redis up again and take new events, once Redis answers; retry until then."""
        delay = 0.25
        while self._degraded is not None and not self._stopping.is_set():
            seen = self._outages
            try:
                await self.restore_setup()
            except Exception as exc:
                if not is_infra_error(exc):
                    logger.exception("%s: setting Redis up again failed", self.name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._outages == seen:  # no new failure while setting up
                logger.warning(
                    "%s: Redis and Kafka reachable again, set up again, taking new events",
                    self.name,
                )
                self._degraded = None
                self._since = utcnow()
                return
            await asyncio.sleep(delay)  # it failed again meanwhile: not back yet

    async def close(self) -> None:
        """Drain in-flight runs within the grace period, commit, leave the group."""
        self._stopping.set()
        self.idle.close()
        for background in (self._recovery, self._reporter, self._sweeper):
            if background is not None:
                background.cancel()
        tasks = list(self._tasks)
        if tasks:
            logger.info("%s draining %d in-flight event(s)", self.name, len(tasks))
            await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
        if self.consumer is not None:
            await self.consumer.commit(force=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None
        if self._publisher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publisher.close(), timeout=10)
        if self._redis is not None:
            with contextlib.suppress(Exception):  # best effort: its TTL ends it anyway
                await asyncio.wait_for(self._redis.delete(worker_key(self.name)), 2)
        if self._redis is not None and self._owns_redis:
            await self._redis.aclose()
            self._redis = None
        if self._library_redis is not None:
            await self._library_redis.aclose()
            self._library_redis = None
        if self._stop_metrics is not None:
            await asyncio.to_thread(self._stop_metrics)
            self._stop_metrics = None
        logger.info("%s closed: %r", self.name, self)
