"""What the worker sends to Kafka: results, session lifecycle messages, dead letters."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord

from nodes.models import WorkflowResult, utcnow
from service.config import Settings
from service.kafka.dead_letters import send_dead_letter
from service.storage.sessions import SentFrom, SessionStore
from service.storage.transitions import ENDED_STATUSES
from service.worker.crash_points import crash_point
from service.worker.readback import PartitionReader

__all__ = ["ENDED", "RESULT", "Outbox", "Transaction"]

logger = logging.getLogger(__name__)

_PARTITIONER = DefaultPartitioner()


Transaction = Callable[[Callable[[], Awaitable[None]], "ConsumerRecord | None"], Awaitable[None]]
"""Runs a send in one Kafka transaction with the offsets it makes safe (`EventConsumer`)."""

RESULT, ENDED = "result", "session.ended"
"""What an event sends when it finishes: its result, and `session.ended` when its run
completed or failed."""


class Outbox:
    """Send results, session lifecycle messages and dead letters to Kafka.

    Results go to the results topic, lifecycle messages to the sessions topic, and events
    that cannot be processed to the dead-letter topic. An event's result and its
    `session.ended` go out at most once each, across crashes: before they are sent, the
    ends of the partitions they go to are recorded with the event (`positions`), and a
    redelivery whose result is in doubt reads those partitions back before sending again.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        store: SessionStore,
        settings: Settings,
        *,
        reader: PartitionReader | None = None,
        transaction: Transaction | None = None,
    ) -> None:
        """Send through a started producer.

        Args:
            producer: made by `service.bootstrap.kafka_producer`.
            store: where a result's event is marked published once Kafka has it.
            settings: the topic names.
            reader: reads the results and sessions partitions back (started); without
                one, a result in doubt is sent again.
            transaction: with `AGENTFLOW_KAFKA_TRANSACTIONS`, sends an event's messages in
                one transaction with the offsets that its end makes safe.
        """
        self.producer = producer
        self.store = store
        self.settings = settings
        self.reader = reader
        self.transaction = transaction
        self.dead_lettered = 0
        self.resolved = 0
        """Results in doubt that were found on Kafka, so not sent again."""
        self._landed: dict[str, set[str]] = {}
        """What Kafka took of events not yet marked published: a retry (Redis went away)
        sends only the rest."""

    def __repr__(self) -> str:
        return f"Outbox(dead_lettered={self.dead_lettered} resolved={self.resolved})"

    async def positions(self, session_id: str) -> SentFrom:
        """Return where a session's next result and `session.ended` land: the ends now.

        The finished event records them before its messages go out (`SessionStore.close`).
        """
        if self.reader is None:
            return {}
        tps = [await self._partition(topic, session_id) for topic in self._topics]
        ends = await self.reader.end_offsets(tps)
        return {tp.topic: (tp.partition, ends[tp]) for tp in tps}

    async def landed(self, event_id: str, sent_from: SentFrom) -> dict[str, bytes]:
        """Read back what Kafka has of an event's messages since `sent_from`.

        Returns:
            The values found, by kind (`result`, `session.ended`).
        """
        since = {
            TopicPartition(topic, partition): offset
            for topic, (partition, offset) in sent_from.items()
            if topic in self._topics
        }
        if self.reader is None or not since:
            return {}
        found: dict[str, bytes] = {}
        for record in await self.reader.records_of(event_id, since):
            if record.topic == self.settings.topic_results:
                found[RESULT] = record.value or b""
            elif dict(record.headers or ()).get("type") == ENDED.encode():
                found[ENDED] = record.value or b""
        return found

    async def publish_result(
        self,
        result: WorkflowResult,
        *,
        sent_from: SentFrom | None = None,
        source: ConsumerRecord | None = None,
    ) -> None:
        """Send an event's result (and `session.ended` unless it waits); mark it published.

        Args:
            result: the event's result.
            sent_from: given when the result is in doubt (a redelivery of a finished
                event): what Kafka already has since then is not sent again.
            source: the event's record; in a transaction its offset counts as finished.

        When marking fails (Redis went away after Kafka took the result), the caller
        retries the event: this outbox remembers what Kafka has and only marks it then.
        """
        event_id = result.event_id
        landed = self._landed.setdefault(event_id, set())
        if sent_from:
            found = set(await self.landed(event_id, sent_from)) - landed
            if found:
                self.resolved += 1
                logger.info("event %s: Kafka already has its %s", event_id, ", ".join(found))
            landed |= found
        # A session ends only when its run completes, fails or is rejected: a run that
        # waits, or gave way to a newer event (refused, superseded, rolled back), leaves
        # it going.
        wanted = [RESULT, ENDED] if result.status in ENDED_STATUSES else [RESULT]
        missing = [kind for kind in wanted if kind not in landed]
        if missing:
            if self.transaction is not None:
                await self.transaction(lambda: self._send(result, missing, landed), source)
                landed.update(missing)
            else:
                await self._send(result, missing, landed)
        await self.store.mark_event(event_id, result.session_id, "published")
        crash_point("published")
        self._landed.pop(event_id, None)

    async def _send(self, result: WorkflowResult, kinds: list[str], landed: set[str]) -> None:
        """Send the result, then `session.ended`, each acknowledged before the next."""
        for kind in kinds:
            if kind == RESULT:
                tp = await self._partition(self.settings.topic_results, result.session_id)
                sent = await self.producer.send(
                    tp.topic,
                    result.model_dump_json().encode(),
                    key=result.session_id.encode(),
                    partition=tp.partition,
                    headers=[("event_id", result.event_id.encode())],
                )
            else:
                sent = await self.session_message(
                    ENDED, result.session_id, result.event_id, status=result.status
                )
            await sent
            if self.transaction is None:  # in a transaction it counts once committed
                landed.add(kind)
            crash_point("result" if kind == RESULT else "session_ended")

    async def session_message(
        self, kind: str, session_id: str, event_id: str, **extra: Any
    ) -> asyncio.Future[Any]:
        """Send a lifecycle message to the sessions topic; return its delivery future.

        Headers `event_id` and `type` say whose and what it is without parsing it.
        """
        body = {
            "type": kind,
            "session_id": session_id,
            "event_id": event_id,
            "ts": utcnow().isoformat(),
            **extra,
        }
        tp = await self._partition(self.settings.topic_sessions, session_id)
        return await self.producer.send(
            tp.topic,
            json.dumps(body).encode(),
            key=session_id.encode(),
            partition=tp.partition,
            headers=[("event_id", event_id.encode()), ("type", kind.encode())],
        )

    @property
    def _topics(self) -> tuple[str, str]:
        return (self.settings.topic_results, self.settings.topic_sessions)

    async def _partition(self, topic: str, session_id: str) -> TopicPartition:
        """Return the partition a session's messages go to: the producer's default choice.

        Chosen here (and passed to `send`) so the end offset recorded beforehand is the
        one of the partition the message lands in.
        """
        partitions = sorted(await self.producer.partitions_for(topic))
        return TopicPartition(topic, _PARTITIONER(session_id.encode(), partitions, partitions))

    async def dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        """Send a record to the dead-letter topic with the reason (`send_dead_letter`)."""
        await send_dead_letter(self.producer, self.settings, record, reason)
        self.dead_lettered += 1
