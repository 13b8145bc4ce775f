"""`AgentHost`: agents served to the worker over Kafka (`agentflow agents serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from langchain_core.messages import AIMessage, BaseMessage
from redis.asyncio import Redis

from nodes.agents import AgentRegistry
from nodes.errors import ProtocolError
from nodes.models import utcnow
from nodes.protocol import (
    CANCEL,
    TASK,
    AgentCancel,
    AgentEvent,
    AgentMessage,
    AgentReply,
    CancelEvent,
    MessageToolCall,
    TaskEvent,
    encode,
    envelope,
    parse_agent_event,
)
from service.agents.turns import TaskTurns
from service.bootstrap import (
    ensure_topics,
    is_infra_error,
    kafka_consumer,
    kafka_producer,
    redis_client,
    require_services,
    serve_until_signal,
)
from service.config import Settings
from service.kafka.consumer import EventConsumer
from service.kafka.dead_letters import send_dead_letter
from service.storage.hosts import AnsweredTasks, HostState, RecordedReply, write_host_state
from service.storage.keys import agent_host_key

__all__ = ["AgentHost", "agent_group"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_EVERY_S = 2.0
"""How often a host records its heartbeat in Redis."""
HEARTBEAT_TTL_S = 10
"""How long a heartbeat lasts: a host that stopped reporting is gone from `agents list`."""
_CANCELLED_KEPT = 10_000
"""How many cancelled task ids a host remembers, so a late copy of one does not run."""


def agent_group(agent: str) -> str:
    """Return the consumer group of an agent's hosts: together they share its tasks."""
    return f"agentflow-agent-{agent}"


class AgentHost:
    """Serve agents' tasks from Kafka: each task is one agent turn, answered once.

    Each agent's task topic is consumed in its own group (`agentflow-agent-<name>`), so
    hosts of one agent share its tasks. A task is parsed as it is taken; a malformed one
    is dead-lettered with its reason. The agent's turn streams its answers as
    `agentflow.agent.message` events and ends with one `agentflow.agent.reply` to the
    task's `reply_to`, recorded in Redis first: a task delivered again gets the recorded
    reply, its tools do not run again. An `agentflow.agent.cancel` stops the task and
    nothing is sent. A task whose deadline passes is stopped too (the worker sends it
    again). Offsets are committed only past finished records, as the worker's are.

    Lifecycle as the worker's: `start()` connects, `run()` serves until `stop()` (or a
    signal), `close()` gives running tasks the grace period, commits what is safe and
    disconnects.
    """

    def __init__(
        self,
        settings: Settings,
        registry: AgentRegistry,
        *,
        name: str | None = None,
        redis: Redis | None = None,
    ) -> None:
        """Make a host of `registry.hosted`; nothing connects until `start()`.

        Args:
            settings: what to connect to, the models, the in-flight limit.
            registry: the agents file, loaded with the agents to serve as `hosted`.
            name: the Kafka client id and the name in logs and heartbeats.
            redis: a client to use instead of one from `service.bootstrap.redis_client`;
                the caller closes it.
        """
        if not registry.hosted:
            raise ValueError("an agent host needs agents to serve (AgentRegistry.hosted)")
        self.settings = settings
        self.agents = list(registry.hosted)
        self.name = name or f"agent-host-{uuid.uuid4().hex[:6]}"
        self.source = f"agentflow/agent-host/{self.name}"
        """The `source` of the events it sends."""
        self.turns = TaskTurns(settings, registry)
        self.received = self.answered = self.failed = self.resent = 0
        self.cancelled = self.expired = self.dead_lettered = 0
        self._redis = redis
        self._owns_redis = redis is None
        self._answers: AnsweredTasks | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumers: dict[str, EventConsumer] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._handlers: dict[asyncio.Task[None], TopicPartition] = {}
        """Records being handled, with their partitions."""
        self._running: dict[str, asyncio.Task[AgentReply]] = {}
        """Agent turns under way, by task id: what a cancel stops."""
        self._cancelled: deque[str] = deque(maxlen=_CANCELLED_KEPT)
        self._stopping = asyncio.Event()
        self._since = utcnow()
        self._heartbeat: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"AgentHost({self.name} agents={','.join(self.agents)} received={self.received} "
            f"answered={self.answered} failed={self.failed} resent={self.resent} "
            f"cancelled={self.cancelled} expired={self.expired} dlq={self.dead_lettered} "
            f"running={len(self._running)})"
        )

    @property
    def in_flight(self) -> int:
        """Records taken from Kafka that have not finished."""
        return len(self._handlers)

    async def start(self) -> None:
        """Connect to Redis and Kafka, make the topics, join each agent's group."""
        s = self.settings
        require_services(s)
        assert s.redis_url is not None
        if self._redis is None:
            self._redis = redis_client(s.redis_url, max_connections=s.max_in_flight + 8)
        await self._redis.ping()
        self._answers = AnsweredTasks(self._redis, ttl_s=s.session_ttl_s)
        if s.create_topics:
            await ensure_topics(s, agents=self.agents)
        self._producer = kafka_producer(s)
        await self._producer.start()
        for agent in self.agents:
            consumer = EventConsumer(
                kafka_consumer(s, group_id=agent_group(agent), client_id=self.name),
                runs_of=self._handlers_of,
                grace_s=s.shutdown_grace_s,
            )
            await consumer.start(s.agent_topic(agent))
            self._consumers[agent] = consumer
        self._heartbeat = asyncio.create_task(self._beat(), name="agent host heartbeat")
        logger.info(
            "%s serving %s from %s",
            self.name,
            ", ".join(self.agents),
            ", ".join(s.agent_topic(a) for a in self.agents),
        )

    def stop(self) -> None:
        """Ask the host to stop taking tasks; `close()` drains and disconnects."""
        self._stopping.set()

    async def serve(self) -> None:
        """Start, run until SIGTERM or SIGINT, then drain and close: the host's whole life."""
        await serve_until_signal(self)

    async def run(self) -> None:
        """Take tasks of every agent until `stop()`; then drain and close."""
        self._loops = [
            asyncio.create_task(self._consume(agent, consumer), name=f"tasks of {agent}")
            for agent, consumer in self._consumers.items()
        ]
        try:
            await self._stopping.wait()
        finally:
            await self.close()

    async def _consume(self, agent: str, consumer: EventConsumer) -> None:
        """Poll one agent's task topic and start a handler per record."""
        limit = self.settings.max_in_flight
        while not self._stopping.is_set():
            consumer.hold(self.in_flight >= limit)
            try:
                batch = await consumer.poll(max_records=max(1, limit - self.in_flight))
            except KafkaError as exc:
                logger.warning("%s: Kafka unavailable, retrying: %s", self.name, exc)
                await asyncio.sleep(1)
                continue
            for tp, records in batch.items():
                for record in records:
                    self._take(agent, consumer, tp, record)
            await consumer.commit(force=False)

    def _take(
        self, agent: str, consumer: EventConsumer, tp: TopicPartition, record: ConsumerRecord
    ) -> None:
        """Read a record of an agent's topic: apply a cancel now, handle anything else."""
        self.received += 1
        consumer.take(tp, record.offset)
        event: AgentEvent | None = None
        try:
            event = parse_agent_event(record.value or b"", accept=(TASK, CANCEL))
            problem = None
            if isinstance(event, TaskEvent) and event.data.agent != agent:
                problem = f"a task for agent {event.data.agent!r} on the task topic of {agent!r}"
        except ProtocolError as exc:
            problem = str(exc)
        if isinstance(event, CancelEvent) and problem is None:
            self._cancel(event.data)
            consumer.finish(tp, record.offset)
            return
        handler = asyncio.create_task(
            self._handle(consumer, tp, record, event, problem),
            name=f"task record {tp.topic}:{tp.partition}:{record.offset}",
        )
        self._handlers[handler] = tp

    async def _handle(
        self,
        consumer: EventConsumer,
        tp: TopicPartition,
        record: ConsumerRecord,
        event: AgentEvent | None,
        problem: str | None,
    ) -> None:
        """Dead-letter a malformed record or serve a task; its offset finishes either way."""
        me = asyncio.current_task()
        done = False
        try:
            if isinstance(event, TaskEvent) and problem is None:
                await self._serve(event)
            else:
                assert self._producer is not None
                reason = problem or "not a task"
                await self._retrying(
                    send_dead_letter, self._producer, self.settings, record, reason
                )
                self.dead_lettered += 1
            done = True
        except asyncio.CancelledError:
            logger.info("task record %s:%s left for redelivery", tp.partition, record.offset)
            raise
        except Exception:
            # Never a record that pins its partition: logged with its traceback, and
            # the worker's deadline answers for a task that got no reply.
            logger.exception("task record %s:%s failed unexpectedly", tp.partition, record.offset)
            done = True
        finally:
            if done:
                consumer.finish(tp, record.offset)
            self._handlers.pop(me, None)  # type: ignore[arg-type]

    async def _serve(self, event: TaskEvent) -> None:
        """Answer a task once: send its recorded reply, or take the turn and record it."""
        task = event.data
        assert self._answers is not None
        recorded = await self._retrying(self._answers.get, task.task_id)
        if recorded is not None:
            await self._retrying(self._send, recorded)
            self.resent += 1
            logger.info("task %s was answered before: its reply was sent again", task.task_id)
            return
        if task.task_id in self._running or task.task_id in self._cancelled:
            logger.info("task %s is running or was cancelled: this copy is dropped", task.task_id)
            return
        left_s = (task.deadline - utcnow()).total_seconds()
        if left_s <= 0:
            self.expired += 1
            logger.warning("task %s came after its deadline: not taken", task.task_id)
            return
        work = asyncio.create_task(
            self.turns.reply(task, lambda message: self._tell(event, message)),
            name=f"task {task.task_id}",
        )
        self._running[task.task_id] = work
        try:
            async with asyncio.timeout(left_s):
                reply = await work
        except TimeoutError:
            self.expired += 1
            logger.warning("task %s passed its deadline: stopped, no reply", task.task_id)
            return
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the host is closing: the task is left for redelivery
            self.cancelled += 1
            logger.info("task %s stopped: cancelled by the worker, no reply", task.task_id)
            return
        finally:
            self._running.pop(task.task_id, None)
        answer = envelope(
            reply, session_id=task.session_id, source=self.source, subject=event.subject
        )
        recorded = RecordedReply(
            topic=task.reply_to, key=task.session_id, value=encode(answer).decode()
        )
        await self._retrying(self._answers.put, task.task_id, recorded)
        await self._retrying(self._send, recorded)
        if reply.status == "done":
            self.answered += 1
        else:
            self.failed += 1

    def _cancel(self, cancel: AgentCancel) -> None:
        """Stop a task if it runs here; remember it, so a later copy does not run."""
        self._cancelled.append(cancel.task_id)
        work = self._running.get(cancel.task_id)
        if work is not None:
            logger.info("cancelling task %s: %s", cancel.task_id, cancel.reason or "no reason")
            work.cancel()

    async def _tell(self, event: TaskEvent, message: BaseMessage) -> None:
        """Send an agent's answer as an `agentflow.agent.message`, without waiting for Kafka.

        Messages are for people watching: one Kafka does not take is logged, not retried.
        """
        if not isinstance(message, AIMessage):
            return
        task = event.data
        data = AgentMessage(
            task_id=task.task_id,
            agent=task.agent,
            content=message.text,
            tool_calls=[
                MessageToolCall(name=c["name"], args=c["args"], id=c.get("id"))
                for c in message.tool_calls
            ]
            or None,
        )
        told = envelope(data, session_id=task.session_id, source=self.source, subject=event.subject)
        assert self._producer is not None
        try:
            sent = await self._producer.send(
                task.reply_to, encode(told), key=task.session_id.encode()
            )
        except KafkaError as exc:
            logger.warning("a message of task %s was not sent: %s", task.task_id, exc)
            return
        sent.add_done_callback(_log_lost_message)

    async def _send(self, reply: RecordedReply) -> None:
        assert self._producer is not None
        await self._producer.send_and_wait(
            reply.topic, reply.value.encode(), key=reply.key.encode()
        )

    async def _retrying(self, call: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run `call` until Redis and Kafka take it: they may be away for a while."""
        delay = 0.25
        while True:
            try:
                return await call(*args)
            except Exception as exc:
                if not is_infra_error(exc) and not isinstance(exc, KafkaError):
                    raise
                logger.warning("%s: Redis or Kafka unavailable, retrying: %s", self.name, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _beat(self) -> None:
        """Keep this host's heartbeat in Redis for `agentflow agents list`."""
        assert self._redis is not None
        while True:
            state = HostState(
                name=self.name,
                agents=self.agents,
                topics=[self.settings.agent_topic(a) for a in self.agents],
                since=self._since,
                running=len(self._running),
                answered=self.answered + self.failed,
            )
            try:
                async with asyncio.timeout(HEARTBEAT_EVERY_S):
                    await write_host_state(self._redis, state, ttl_s=HEARTBEAT_TTL_S)
            except Exception as exc:  # Redis away: the heartbeat comes back with it
                if not is_infra_error(exc) and not isinstance(exc, TimeoutError):
                    logger.exception("%s: could not record its heartbeat", self.name)
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    def _handlers_of(self, partitions: Collection[TopicPartition]) -> list[asyncio.Task[None]]:
        return [task for task, tp in self._handlers.items() if tp in partitions]

    async def close(self) -> None:
        """Give running tasks the grace period, commit what is safe, disconnect."""
        self._stopping.set()
        background = [t for t in (*self._loops, self._heartbeat) if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)  # out of their polls
        handlers = list(self._handlers)
        if handlers:
            logger.info("%s draining %d task record(s)", self.name, len(handlers))
            await asyncio.wait(handlers, timeout=self.settings.shutdown_grace_s)
        for consumer in self._consumers.values():
            await consumer.commit(force=True)
        for handler in list(self._handlers):
            handler.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        for consumer in self._consumers.values():
            await consumer.stop()
        self._consumers.clear()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._redis is not None:
            with contextlib.suppress(Exception):  # best effort: its TTL ends it anyway
                async with asyncio.timeout(2):
                    await self._redis.delete(agent_host_key(self.name))
        if self._redis is not None and self._owns_redis:
            await self._redis.aclose()
            self._redis = None
        logger.info("%s closed: %r", self.name, self)


def _log_lost_message(sent: asyncio.Future[object]) -> None:
    if not sent.cancelled() and (exc := sent.exception()) is not None:
        logger.warning("an agent message was not delivered: %s", exc)
