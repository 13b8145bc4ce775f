"""The worker's commit logic: an offset is committed only once every earlier one finished."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Collection

from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from service.kafka.consumer import EventConsumer, PartitionOffsets


def test_nothing_taken_nothing_to_commit() -> None:
    offsets = PartitionOffsets()
    assert offsets.safe() is None
    assert offsets.to_commit() is None


def test_the_safe_offset_waits_for_the_earliest_unfinished() -> None:
    offsets = PartitionOffsets()
    for offset in (0, 1, 2):
        offsets.take(offset)
    assert offsets.safe() == 0  # nothing finished: commit nothing past offset 0
    offsets.finish(2)
    assert offsets.safe() == 0  # 2 finished first, but 0 and 1 still run
    offsets.finish(0)
    assert offsets.safe() == 1
    offsets.finish(1)
    assert offsets.safe() == 3  # all done: the next offset to read


def test_offsets_with_gaps_commit_past_the_gap() -> None:
    offsets = PartitionOffsets()  # compaction and transaction markers leave gaps
    offsets.take(5)
    offsets.take(9)
    offsets.finish(5)
    assert offsets.safe() == 9
    offsets.finish(9)
    assert offsets.safe() == 10


def test_to_commit_only_moves_forward() -> None:
    offsets = PartitionOffsets()
    offsets.take(0)
    offsets.finish(0)
    assert offsets.to_commit() == 1
    offsets.committed = 1
    assert offsets.to_commit() is None  # already committed
    offsets.take(1)
    offsets.take(2)
    offsets.finish(2)
    assert offsets.safe() == 1 and offsets.to_commit() is None  # 1 still runs
    offsets.finish(1)
    assert offsets.to_commit() == 3


def test_any_finishing_order_never_commits_an_unfinished_offset() -> None:
    rng = random.Random(7)
    for _ in range(200):
        offsets = PartitionOffsets()
        taken = list(range(rng.randrange(1, 30)))
        for offset in taken:
            offsets.take(offset)
        finished: set[int] = set()
        for offset in rng.sample(taken, len(taken)):
            offsets.finish(offset)
            finished.add(offset)
            safe = offsets.safe()
            assert safe is not None
            assert all(o in finished for o in range(safe))  # everything before it finished
            assert safe == len(taken) or safe not in finished  # and it stops at the first not
        assert offsets.safe() == len(taken)


class _Kafka:
    """Stands in for `AIOKafkaConsumer`: records commits, fails them when told."""

    def __init__(self, partitions: list[TopicPartition]) -> None:
        self.partitions = partitions
        self.commits: list[dict[TopicPartition, int]] = []
        self.fail_next = False

    def assignment(self) -> set[TopicPartition]:
        return set(self.partitions)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise KafkaConnectionError("broker away")
        self.commits.append(dict(offsets))


def _no_runs(partitions: Collection[TopicPartition]) -> list[asyncio.Task[None]]:
    return []


async def test_the_consumer_commits_each_safe_offset_once_and_retries_a_failed_commit() -> None:
    p0, p1 = TopicPartition("events", 0), TopicPartition("events", 1)
    kafka = _Kafka([p0, p1])
    consumer = EventConsumer(kafka, runs_of=_no_runs, grace_s=0)  # type: ignore[arg-type]
    for offset in (0, 1):
        consumer.take(p0, offset)
    consumer.take(p1, 0)
    consumer.finish(p0, 1)
    await consumer.commit(force=True)
    assert kafka.commits == [{p0: 0, p1: 0}]  # offset 1 finished, but 0 of each still runs
    kafka.commits.clear()

    consumer.finish(p0, 0)
    kafka.fail_next = True
    await consumer.commit(force=True)
    assert kafka.commits == []  # failed: logged, tried again next time
    await consumer.commit(force=True)
    assert kafka.commits == [{p0: 2}]  # p1's offset 0 still runs: nothing for p1
    await consumer.commit(force=True)
    assert kafka.commits == [{p0: 2}]  # nothing new

    consumer.finish(p1, 0)
    await consumer.commit(force=False)  # within the commit interval: waits
    assert kafka.commits == [{p0: 2}]
    await consumer.commit(force=True, only=[p1])
    assert kafka.commits == [{p0: 2}, {p1: 1}]


async def test_released_partitions_stop_counting() -> None:
    p0 = TopicPartition("events", 0)
    kafka = _Kafka([p0])
    consumer = EventConsumer(kafka, runs_of=_no_runs, grace_s=0)  # type: ignore[arg-type]
    consumer.take(p0, 0)
    await consumer.release([p0])
    assert kafka.commits == [{p0: 0}]  # what was safe: nothing past the event still running
    assert consumer.offsets(p0) is None
    consumer.finish(p0, 0)  # an event that ends after its partition went to another worker
    await consumer.commit(force=True)
    assert kafka.commits == [{p0: 0}]  # its offset is the next owner's to commit
