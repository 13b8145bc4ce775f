"""Read back what Kafka already has of the worker's output: end offsets, an event's records.

Tansu's memory storage has no transactions, so whether a result went out before a crash
is settled by reading: before the worker sends an event's messages it records the end
offsets of the partitions they go to; a redelivery whose result is in doubt reads those
partitions from there for records with the event's `event_id` header.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import ConsumerRecord

from service.bootstrap import kafka_consumer
from service.config import Settings

__all__ = ["PartitionReader"]

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 30.0
"""How long reading a partition back to its end may take before it counts as an outage."""


class PartitionReader:
    """End offsets of partitions, and the records of one event in them since given offsets.

    End offsets come from a consumer that is never assigned a partition: an assigned one
    queues the request behind its long-polling fetch (500 ms a call on Tansu). Reading
    back uses a consumer of its own per read; it is rare (only a redelivered event whose
    result is in doubt).
    """

    def __init__(self, settings: Settings) -> None:
        """Read the Kafka the settings name (`AGENTFLOW_KAFKA_BOOTSTRAP`)."""
        self.settings = settings
        self.reads = 0
        self._ends: AIOKafkaConsumer | None = None

    def __repr__(self) -> str:
        return f"PartitionReader(reads={self.reads})"

    async def start(self) -> None:
        """Connect the consumer that asks for end offsets."""
        self._ends = kafka_consumer(self.settings)
        await self._ends.start()

    async def stop(self) -> None:
        """Disconnect."""
        if self._ends is not None:
            await self._ends.stop()
            self._ends = None

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Return where the next record of each partition will land, or before it.

        Tansu reports the end of a partition whose last batch holds several records as
        that batch's base offset + 1: lower than the true end, which only means reading
        back from it reads a little more.
        """
        assert self._ends is not None, "start() first"
        ends: dict[TopicPartition, int] = await self._ends.end_offsets(partitions)
        return ends

    async def records_of(
        self, event_id: str, since: dict[TopicPartition, int], *, timeout_s: float = READ_TIMEOUT_S
    ) -> list[ConsumerRecord]:
        """Return the records with header `event_id` from each partition's offset to its end.

        The end is the one reported when the read starts. Fetches return whole batches, so
        a batch whose end was reported short (Tansu) is read to its last record.

        Raises:
            KafkaTimeoutError: the ends were not reached within `timeout_s` (an outage:
                the caller retries).
        """
        self.reads += 1
        wanted = event_id.encode()
        ends = await self.end_offsets(list(since))
        left = {tp for tp, offset in since.items() if offset < ends[tp]}
        found: list[ConsumerRecord] = []
        if not left:
            return found
        consumer = kafka_consumer(self.settings)
        await consumer.start()
        try:
            consumer.assign(list(left))
            for tp in left:
                consumer.seek(tp, since[tp])
            async with asyncio.timeout(timeout_s):
                while left:
                    batch = await consumer.getmany(*left, timeout_ms=200)
                    for records in batch.values():
                        found += [r for r in records if _event_id(r) == wanted]
                    for tp in list(left):
                        if await consumer.position(tp) >= ends[tp]:
                            left.discard(tp)
        except TimeoutError:
            raise KafkaTimeoutError(
                f"reading back {sorted(str(tp) for tp in left)} did not reach the end "
                f"within {timeout_s:g} s"
            ) from None
        finally:
            await consumer.stop()
        logger.info(
            "read back event %s: %d record(s) since %s",
            event_id,
            len(found),
            {f"{tp.topic}:{tp.partition}": offset for tp, offset in since.items()},
        )
        return found


def _event_id(record: ConsumerRecord) -> bytes | None:
    return next((value for key, value in record.headers or () if key == "event_id"), None)
