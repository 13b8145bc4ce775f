"""One result per event: a result in doubt is read back, not resent; transactions wire up.

Kafka is faked here (a producer that records what it is asked, a reader that answers
what Kafka "has"); the real broker runs in tests/integration_tests/test_exactly_once.py.
Transactions cannot run on Tansu's memory storage, so their wiring is checked only here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord

from nodes.models import WorkflowResult
from service.config import load_settings
from service.errors import ConfigError
from service.kafka.consumer import EventConsumer, PartitionOffsets
from service.worker import crash_points
from service.worker.outbox import Outbox

SETTINGS = load_settings()
RESULTS, SESSIONS = SETTINGS.topic_results, SETTINGS.topic_sessions
SESSION = "s-1"
PARTITION = DefaultPartitioner()(SESSION.encode(), [0, 1, 2], [0, 1, 2])
"""Where the producer's default partitioner puts the session's messages (3 partitions)."""


def _record(
    topic: str, offset: int, headers: list[tuple[str, bytes]], partition: int = PARTITION
) -> ConsumerRecord:
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=SESSION.encode(),
        value=b"{}",
        checksum=None,
        serialized_key_size=len(SESSION),
        serialized_value_size=2,
        headers=headers,
    )


def _result(event_id: str = "e-1") -> WorkflowResult:
    return WorkflowResult(session_id=SESSION, event_id=event_id, status="completed")


class _Producer:
    """Stands in for `AIOKafkaProducer`: records sends and transactions; fails when told."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.fail_sends = False

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    async def send(
        self, topic: str, value: bytes, *, key: bytes, partition: int, headers: list[Any]
    ) -> asyncio.Future[None]:
        if self.fail_sends:
            raise KafkaConnectionError("broker away")
        kind = dict(headers).get("type", b"result").decode()
        self.calls.append(("send", topic, partition, kind))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.calls.append("begin")
        try:
            yield
        except BaseException:
            self.calls.append("abort")
            raise
        self.calls.append("commit")

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        self.calls.append(("offsets", dict(offsets), group_id))


class _Store:
    def __init__(self) -> None:
        self.marks: list[tuple[str, str]] = []

    async def mark_event(self, event_id: str, session_id: str, state: str, **kw: Any) -> None:
        self.marks.append((event_id, state))


class _Reader:
    """Stands in for `PartitionReader`: every partition ends at 5; Kafka has `records`."""

    def __init__(self, records: list[ConsumerRecord] | None = None) -> None:
        self.records = records or []
        self.asked: list[dict[TopicPartition, int]] = []

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 5)

    async def records_of(
        self, event_id: str, since: dict[TopicPartition, int]
    ) -> list[ConsumerRecord]:
        self.asked.append(since)
        return [r for r in self.records if dict(r.headers)["event_id"] == event_id.encode()]


def _outbox(
    producer: _Producer, reader: _Reader | None = None, transaction: Any = None
) -> tuple[Outbox, _Store]:
    store = _Store()
    outbox = Outbox(
        cast(Any, producer),
        cast(Any, store),
        SETTINGS,
        reader=cast(Any, reader or _Reader()),
        transaction=transaction,
    )
    return outbox, store


async def test_positions_are_the_ends_of_the_partitions_the_messages_go_to() -> None:
    producer = _Producer()
    outbox, _ = _outbox(producer)
    assert await outbox.positions(SESSION) == {RESULTS: (PARTITION, 5), SESSIONS: (PARTITION, 5)}
    await outbox.publish_result(_result())
    assert producer.calls == [  # one after the other, to the partitions recorded
        ("send", RESULTS, PARTITION, "result"),
        ("send", SESSIONS, PARTITION, "session.ended"),
    ]


async def test_a_result_in_doubt_that_kafka_has_is_not_sent_again() -> None:
    producer = _Producer()
    on_kafka = [
        _record(RESULTS, 3, [("event_id", b"e-1")]),
        _record(SESSIONS, 4, [("event_id", b"e-1"), ("type", b"session.started")]),
        _record(RESULTS, 4, [("event_id", b"e-2")]),  # another event's
    ]
    reader = _Reader(on_kafka)
    outbox, store = _outbox(producer, reader)
    await outbox.publish_result(_result(), sent_from={RESULTS: (PARTITION, 3), SESSIONS: (0, 4)})
    assert reader.asked == [{TopicPartition(RESULTS, PARTITION): 3, TopicPartition(SESSIONS, 0): 4}]
    # The result was there; a session.started is no session.ended: that one goes out.
    assert producer.calls == [("send", SESSIONS, PARTITION, "session.ended")]
    assert store.marks == [("e-1", "published")] and outbox.resolved == 1


async def test_a_result_in_doubt_that_kafka_lacks_is_sent() -> None:
    producer = _Producer()
    outbox, store = _outbox(producer, _Reader())
    await outbox.publish_result(_result(), sent_from={RESULTS: (PARTITION, 3)})
    assert [call[3] for call in producer.calls] == ["result", "session.ended"]
    assert store.marks == [("e-1", "published")] and outbox.resolved == 0


async def test_positions_of_other_topics_are_not_read() -> None:
    producer = _Producer()
    reader = _Reader([_record("old.results", 0, [("event_id", b"e-1")])])
    outbox, _ = _outbox(producer, reader)
    await outbox.publish_result(_result(), sent_from={"old.results": (0, 0)})
    assert reader.asked == []  # recorded under a topic no longer configured: not ours
    assert [call[3] for call in producer.calls] == ["result", "session.ended"]


def test_the_safe_offset_can_count_an_event_as_finished() -> None:
    offsets = PartitionOffsets()
    for offset in (0, 1, 2):
        offsets.take(offset)
    offsets.finish(1)
    assert offsets.safe() == 0
    assert offsets.safe(finishing=0) == 2  # 0 finishes in the commit's transaction
    offsets.committed = 0
    assert offsets.to_commit(finishing=2) is None  # 0 still runs: nothing past 0


class _Kafka:
    def __init__(self, partitions: list[TopicPartition]) -> None:
        self.partitions = partitions

    def assignment(self) -> set[TopicPartition]:
        return set(self.partitions)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        raise AssertionError("with transactions, offsets are committed through the producer")


def _transactional(producer: _Producer, p0: TopicPartition) -> EventConsumer:
    return EventConsumer(
        cast(Any, _Kafka([p0])),
        runs_of=lambda partitions: [],
        grace_s=0,
        transactions=cast(Any, producer),
        group_id="group-1",
    )


async def test_a_result_and_the_offsets_it_makes_safe_commit_in_one_transaction() -> None:
    p0 = TopicPartition(SETTINGS.topic_events, 0)
    producer = _Producer()
    consumer = _transactional(producer, p0)
    outbox, store = _outbox(producer, transaction=consumer.in_transaction)
    consumer.take(p0, 0)
    consumer.take(p0, 1)
    consumer.finish(p0, 1)
    event = _record(p0.topic, 0, [], partition=0)
    await outbox.publish_result(_result(), source=event)
    assert producer.calls == [
        "begin",
        ("send", RESULTS, PARTITION, "result"),
        ("send", SESSIONS, PARTITION, "session.ended"),
        ("offsets", {p0: 2}, "group-1"),  # offset 0 counted as finished with its result
        "commit",
    ]
    assert store.marks == [("e-1", "published")]
    producer.calls.clear()
    consumer.finish(p0, 0)  # the handler returns
    await consumer.commit(force=True)
    assert producer.calls == []  # nothing new to commit, no empty transaction
    consumer.take(p0, 2)
    consumer.finish(p0, 2)  # e.g. a dead letter: offsets alone, in a transaction too
    await consumer.commit(force=True)
    assert producer.calls == ["begin", ("offsets", {p0: 3}, "group-1"), "commit"]


async def test_a_failed_transaction_is_aborted_and_commits_nothing() -> None:
    p0 = TopicPartition(SETTINGS.topic_events, 0)
    producer = _Producer()
    consumer = _transactional(producer, p0)
    outbox, store = _outbox(producer, transaction=consumer.in_transaction)
    consumer.take(p0, 0)
    event = _record(p0.topic, 0, [], partition=0)
    producer.fail_sends = True
    with pytest.raises(KafkaConnectionError):
        await outbox.publish_result(_result(), source=event)
    assert producer.calls == ["begin", "abort"] and store.marks == []
    assert consumer.offsets(p0) == PartitionOffsets(pending={0}, highest=0, lowest=0)
    producer.fail_sends = False
    producer.calls.clear()
    await outbox.publish_result(_result(), source=event)  # the handler's retry
    assert producer.calls[-2:] == [("offsets", {p0: 1}, "group-1"), "commit"]


def test_transactions_need_acks_all() -> None:
    with pytest.raises(ConfigError, match="AGENTFLOW_KAFKA_TRANSACTIONS: .*ACKS=all"):
        load_settings(kafka_transactions=True, producer_acks="1")
    assert load_settings(kafka_transactions=True).kafka_transactions


def test_an_unknown_crash_point_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    assert crash_points.armed() is None  # not set for the tests: production paths
    monkeypatch.setattr(crash_points, "_ARMED", "after-lunch")
    with pytest.raises(ConfigError, match="AGENTFLOW_TEST_CRASH_AT='after-lunch' is no crash"):
        crash_points.armed()
