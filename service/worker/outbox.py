"""What the worker sends to Kafka: results, session lifecycle messages, dead letters."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from nodes.models import WorkflowResult, utcnow
from service.config import Settings
from service.observe import metrics
from service.storage.sessions import SessionStore

__all__ = ["Outbox"]

logger = logging.getLogger(__name__)


class Outbox:
    """Send results, session lifecycle messages and dead letters to Kafka.

    Results go to the results topic, lifecycle messages to the sessions topic, and events
    that cannot be processed to the dead-letter topic.
    """

    def __init__(self, producer: AIOKafkaProducer, store: SessionStore, settings: Settings) -> None:
        """Send through a started producer.

        Args:
            producer: made by `service.bootstrap.kafka_producer`.
            store: where a result's event is marked published once Kafka has it.
            settings: the topic names.
        """
        self.producer = producer
        self.store = store
        self.settings = settings
        self.dead_lettered = 0

    def __repr__(self) -> str:
        return f"Outbox(dead_lettered={self.dead_lettered})"

    async def publish_result(self, result: WorkflowResult) -> None:
        """Send an event's result (and `session.ended` unless it waits); mark it published."""
        sent = [
            await self.producer.send(
                self.settings.topic_results,
                result.model_dump_json().encode(),
                key=result.session_id.encode(),
                headers=[("event_id", result.event_id.encode())],
            )
        ]
        if result.status != "interrupted":
            sent.append(
                await self.session_message(
                    "session.ended", result.session_id, result.event_id, status=result.status
                )
            )
        await asyncio.gather(*sent)  # both acknowledged before the event counts as published
        await self.store.mark_event(result.event_id, result.session_id, "published")

    async def session_message(
        self, kind: str, session_id: str, event_id: str, **extra: Any
    ) -> asyncio.Future[Any]:
        """Send a lifecycle message to the sessions topic; return its delivery future."""
        body = {
            "type": kind,
            "session_id": session_id,
            "event_id": event_id,
            "ts": utcnow().isoformat(),
            **extra,
        }
        return await self.producer.send(
            self.settings.topic_sessions, json.dumps(body).encode(), key=session_id.encode()
        )

    async def dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        """Send a record as it came to the dead-letter topic, with the reason in a header."""
        headers = list(record.headers or []) + [
            ("reason", reason.encode()),
            ("source_topic", record.topic.encode()),
            ("partition", str(record.partition).encode()),
            ("offset", str(record.offset).encode()),
        ]
        await self.producer.send_and_wait(
            self.settings.topic_dlq, record.value, key=record.key, headers=headers
        )
        self.dead_lettered += 1
        metrics.DLQ_EVENTS.inc()
        logger.warning(
            "dead-lettered %s:%s:%s: %s", record.topic, record.partition, record.offset, reason
        )
