"""What the worker sends to Kafka: results, session lifecycle messages, dead letters."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord

from nodes.models import WorkflowResult, utcnow
from service.bootstrap import max_request_bytes
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
        self._unmarked: set[str] = set()
        """Events whose result Kafka has, not yet marked published (Redis was down)."""

    def __repr__(self) -> str:
        return f"Outbox(dead_lettered={self.dead_lettered})"

    async def publish_result(self, result: WorkflowResult) -> None:
        """Send an event's result (and `session.ended` unless it waits); mark it published.

        When marking fails (Redis went away after Kafka took the result), the caller
        retries the event: this outbox remembers that Kafka has the result and only
        marks it then, so the event still has one result.
        """
        if result.event_id not in self._unmarked:
            await self._send_result(result)
            self._unmarked.add(result.event_id)
        await self.store.mark_event(result.event_id, result.session_id, "published")
        self._unmarked.discard(result.event_id)

    async def _send_result(self, result: WorkflowResult) -> None:
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
        """Send a record to the dead-letter topic, with the reason and where it came from.

        The record goes as it came (value, key, headers) when it fits in a request. One
        that does not carries a prefix of its value, with headers `truncated`,
        `original_size` and `original_sha256` (and `original_key_size`,
        `original_key_sha256` when the key was cut too). A broker that refuses the size
        gets a smaller prefix, at last none: every bad event gets its dead letter, so its
        offset is committed.
        """
        ours = [
            ("reason", reason.encode()),
            ("source_topic", record.topic.encode()),
            ("partition", str(record.partition).encode()),
            ("offset", str(record.offset).encode()),
        ]
        limits = (max_request_bytes(self.settings), _SMALL_DEAD_LETTER_BYTES, 0)
        for limit in limits:
            key, value, headers = _fit(record, ours, limit)
            try:
                await self.producer.send_and_wait(
                    self.settings.topic_dlq, value, key=key, headers=headers
                )
                break
            except (MessageSizeTooLargeError, RecordListTooLargeError) as exc:
                if limit == limits[-1]:
                    raise
                logger.warning(
                    "dead letter of %s:%s:%s refused (%s); sending a smaller one",
                    record.topic,
                    record.partition,
                    record.offset,
                    type(exc).__name__,
                )
        self.dead_lettered += 1
        metrics.DLQ_EVENTS.inc()
        logger.warning(
            "dead-lettered %s:%s:%s: %s", record.topic, record.partition, record.offset, reason
        )


_SMALL_DEAD_LETTER_BYTES = 64 * 1024
"""What a dead letter is cut to when the broker refuses the producer's largest request."""
_KEY_KEPT_BYTES = 1024
"""How much of a key an oversized dead letter keeps (a session id is at most 200)."""


def _fit(
    record: ConsumerRecord, ours: list[tuple[str, bytes]], limit: int
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """Return key, value and headers of a dead letter within `limit` bytes, marked if cut.

    Cut in this order: the value to a prefix (and a long key), then the record's own
    headers; `ours` (the reason, where the record came from) are always kept.
    """
    key, value = record.key, record.value
    headers = list(record.headers or []) + ours
    if DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers) <= limit:
        return key, value, headers
    value = value or b""
    marks = [
        ("truncated", b"true"),
        ("original_size", str(len(value)).encode()),
        ("original_sha256", hashlib.sha256(value).hexdigest().encode()),
    ]
    if key is not None and len(key) > _KEY_KEPT_BYTES:
        marks += [
            ("original_key_size", str(len(key)).encode()),
            ("original_key_sha256", hashlib.sha256(key).hexdigest().encode()),
        ]
        key = key[:_KEY_KEPT_BYTES]
    headers += marks
    if DefaultRecordBatchBuilder.estimate_size_in_bytes(key, b"", headers) > limit:
        headers = ours + marks
    # less what the value's length adds to the record's varints (5 bytes each at most)
    room = limit - DefaultRecordBatchBuilder.estimate_size_in_bytes(key, b"", headers) - 10
    return key, value[: max(room, 0)], headers
