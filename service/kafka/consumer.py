"""A consumer-group member's side of a topic: poll, track offsets, commit what is safe, pause.

The worker consumes events with it, agent hosts their tasks. Records are handled
concurrently and finish out of order, so an offset is committed only when every earlier
offset of its partition has finished (for the worker: reached a terminal or
checkpointed-interrupted state): committing past a record still being handled would
lose it if the process crashed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

__all__ = ["EventConsumer", "PartitionOffsets"]

logger = logging.getLogger(__name__)


@dataclass
class PartitionOffsets:
    """Offsets of one partition: taken but not finished, and how far it is committed."""

    pending: set[int] = field(default_factory=set)
    """Offsets taken whose events have not finished."""
    highest: int = -1
    """The highest offset taken; -1 before the first."""
    committed: int = -1
    """The offset last committed (the next one to read); -1 before the first commit."""
    lowest: int = -1
    """The lowest offset taken; -1 before the first."""

    def take(self, offset: int) -> None:
        """Remember an offset whose event starts."""
        self.pending.add(offset)
        self.highest = max(self.highest, offset)
        self.lowest = offset if self.lowest < 0 else min(self.lowest, offset)

    def finish(self, offset: int) -> None:
        """Remember that an offset's event finished."""
        self.pending.discard(offset)

    def safe(self, finishing: int | None = None) -> int | None:
        """Return the offset to commit: every earlier one has finished; None if none taken.

        Args:
            finishing: an offset to count as finished already (its event's result goes
                out in the same transaction as this commit).
        """
        if self.highest < 0:
            return None
        pending = self.pending - {finishing} if finishing is not None else self.pending
        return min(pending) if pending else self.highest + 1

    def to_commit(self, finishing: int | None = None) -> int | None:
        """Return the safe offset if it is past the committed one, else None."""
        safe = self.safe(finishing)
        return safe if safe is not None and safe > self.committed else None


class EventConsumer:
    """A consumer-group member that commits only offsets whose earlier events all finished.

    The worker takes each record's offset when it starts the event and finishes it when
    the event is done; `commit` sends what is safe. While the worker is full or degraded,
    `hold(True)` pauses fetching. On revocation the partitions' runs get the grace period
    to reach a checkpoint, what is safe is committed, and the rest are cancelled (their
    events are redelivered to the partitions' next owner).

    With a transactional producer (`AGENTFLOW_KAFKA_TRANSACTIONS`), offsets are committed
    through it: alone, or together with an event's result (`in_transaction`).
    """

    def __init__(
        self,
        kafka: AIOKafkaConsumer,
        *,
        runs_of: Callable[[Collection[TopicPartition]], list[asyncio.Task[None]]],
        grace_s: float,
        commit_interval_s: float = 0.5,
        transactions: AIOKafkaProducer | None = None,
        group_id: str | None = None,
        on_committed: Callable[[], None] | None = None,
    ) -> None:
        """Wrap a consumer made by `service.bootstrap.kafka_consumer`.

        Args:
            kafka: the consumer, not started.
            runs_of: returns the in-flight runs of events of the given partitions.
            grace_s: how long revoked partitions' runs may take to finish.
            commit_interval_s: `commit(force=False)` sends at most this often.
            transactions: a producer made with a `transactional_id`, started: every
                commit goes through it in a transaction.
            group_id: the consumer group (needed with `transactions`).
            on_committed: called after a commit that covers a record finished here
                (the worker's `committed` crash point).
        """
        if transactions is not None and not group_id:
            raise ValueError("a transactional commit needs the consumer group")
        self.kafka = kafka
        self.paused = False
        self._runs_of = runs_of
        self._grace_s = grace_s
        self._commit_interval_s = commit_interval_s
        self._transactions = transactions
        self._group_id = group_id or ""
        self._on_committed = on_committed
        self._commit_lock = asyncio.Lock()
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._last_commit = 0.0

    def __repr__(self) -> str:
        pending = sum(len(o.pending) for o in self._offsets.values())
        return (
            f"EventConsumer(partitions={len(self._offsets)} pending={pending} paused={self.paused})"
        )

    def offsets(self, tp: TopicPartition) -> PartitionOffsets | None:
        """Return the offsets tracked for a partition, if it is assigned."""
        return self._offsets.get(tp)

    async def start(self, *topics: str) -> None:
        """Join the group on topics."""
        self.kafka.subscribe(list(topics), listener=_Rebalance(self))
        await self.kafka.start()

    async def stop(self) -> None:
        """Leave the group."""
        await self.kafka.stop()

    async def poll(self, max_records: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Fetch what is there within 100 ms.

        Raises:
            KafkaError: Kafka cannot be reached.
        """
        return await self.kafka.getmany(timeout_ms=100, max_records=max_records)  # type: ignore[no-any-return]

    def take(self, tp: TopicPartition, offset: int) -> None:
        """Remember that a record's event starts."""
        self._offsets.setdefault(tp, PartitionOffsets()).take(offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        """Remember that a record's event is done (unless its partition was released)."""
        if tp in self._offsets:
            self._offsets[tp].finish(offset)

    def hold(self, full: bool) -> None:
        """Pause fetching while `full` (the worker is at its limit or degraded), else resume."""
        assigned = list(self.kafka.assignment())
        if full and not self.paused:
            self.kafka.pause(*assigned)
            self.paused = True
        elif not full and self.paused:
            self.kafka.resume(*assigned)
            self.paused = False
        elif self.paused:
            self.kafka.pause(*assigned)  # partitions assigned since the pause

    async def commit(self, *, force: bool, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit each partition's safe offset; unless `force`, at most every interval.

        A failed commit is logged and tried again on the next call.
        """
        now = time.monotonic()
        if not force and now - self._last_commit < self._commit_interval_s:
            return
        self._last_commit = now
        try:
            if self._transactions is not None:
                await self.in_transaction(None, None, only=only)
                return
            offsets = self._to_commit(only)
            if not offsets:
                return
            await self.kafka.commit(offsets)
        except KafkaError as exc:
            logger.warning("commit failed, will retry: %s", exc)
            return
        self._committed(offsets)

    async def in_transaction(
        self,
        send: Callable[[], Awaitable[None]] | None,
        source: ConsumerRecord | None,
        *,
        only: Iterable[TopicPartition] | None = None,
    ) -> None:
        """Send what `send` sends and commit the safe offsets, in one Kafka transaction.

        Transactions of this worker run one at a time, so committed offsets only grow.

        Args:
            send: sends an event's messages (with the transactional producer); None
                commits offsets alone.
            source: the event's record: its offset counts as finished.
            only: the partitions whose offsets to commit; all assigned ones by default.

        Raises:
            KafkaError: the transaction failed (it was aborted: nothing of it is visible
                to consumers that read committed records).
        """
        producer = self._transactions
        assert producer is not None, "in_transaction needs a transactional producer"
        finishing = None
        if source is not None:
            finishing = (TopicPartition(source.topic, source.partition), source.offset)
        async with self._commit_lock:
            offsets = self._to_commit(only, finishing)
            if send is None and not offsets:
                return
            async with producer.transaction():
                if send is not None:
                    await send()
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, self._group_id)
            self._committed(offsets)

    def _to_commit(
        self,
        only: Iterable[TopicPartition] | None,
        finishing: tuple[TopicPartition, int] | None = None,
    ) -> dict[TopicPartition, int]:
        """Return the safe offsets past the committed ones (`finishing` counted finished)."""
        wanted = set(only) if only is not None else set(self.kafka.assignment())
        if finishing is not None:
            wanted.add(finishing[0])
        offsets = {}
        for tp in wanted:
            tracker = self._offsets.get(tp)
            done = finishing[1] if finishing is not None and finishing[0] == tp else None
            offset = tracker.to_commit(done) if tracker else None
            if offset is not None:
                offsets[tp] = offset
        return offsets

    def _committed(self, offsets: dict[TopicPartition, int]) -> None:
        covered = False  # whether the commit covers a record finished here
        for tp, offset in offsets.items():
            tracker = self._offsets.get(tp)
            if tracker is not None:  # not released while the commit was on its way
                covered = covered or 0 <= tracker.lowest < offset
                tracker.committed = offset
        if covered and self._on_committed is not None:
            self._on_committed()

    async def release(self, partitions: list[TopicPartition]) -> None:
        """On revocation: let their runs reach a checkpoint, commit, cancel the rest."""
        runs = self._runs_of(partitions)
        if runs:
            await asyncio.wait(runs, timeout=self._grace_s)
        await self.commit(force=True, only=partitions)
        for run in runs:
            run.cancel()
        for tp in partitions:
            self._offsets.pop(tp, None)
        if partitions:
            logger.info("released partitions %s", sorted(tp.partition for tp in partitions))

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Start tracking newly assigned partitions."""
        partitions = list(partitions)
        for tp in partitions:
            self._offsets.setdefault(tp, PartitionOffsets())
        logger.info("assigned partitions %s", sorted(tp.partition for tp in partitions))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: EventConsumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.consumer.release(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.consumer.assign(assigned)
