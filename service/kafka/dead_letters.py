"""Dead letters: records that cannot be handled, sent to `agentflow.events.dlq` with why.

Bad events (the worker), malformed replies (the worker) and malformed tasks (agent hosts)
go there, so no bad record holds up its partition and none is lost.
"""

from __future__ import annotations

import hashlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord

from service.bootstrap import max_request_bytes
from service.config import Settings
from service.observe import metrics

__all__ = ["send_dead_letter"]

logger = logging.getLogger(__name__)


async def send_dead_letter(
    producer: AIOKafkaProducer, settings: Settings, record: ConsumerRecord, reason: str
) -> None:
    """Send a record to the dead-letter topic, with the reason and where it came from.

    The record goes as it came (value, key, headers) when it fits in a request. One
    that does not carries a prefix of its value, with headers `truncated`,
    `original_size` and `original_sha256` (and `original_key_size`,
    `original_key_sha256` when the key was cut too). A broker that refuses the size
    gets a smaller prefix, at last none: every bad record gets its dead letter, so its
    offset can be committed.
    """
    ours = [
        ("reason", reason.encode()),
        ("source_topic", record.topic.encode()),
        ("partition", str(record.partition).encode()),
        ("offset", str(record.offset).encode()),
    ]
    limits = (max_request_bytes(settings), _SMALL_DEAD_LETTER_BYTES, 0)
    for limit in limits:
        key, value, headers = _fit(record, ours, limit)
        try:
            await producer.send_and_wait(settings.topic_dlq, value, key=key, headers=headers)
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
