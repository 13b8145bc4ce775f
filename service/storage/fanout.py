"""Follow many sessions live over one Redis pub/sub connection, fanned out in process.

A gateway with a thousand open streams holds one pub/sub connection, not a thousand: the
`TransitionHub` keeps one channel subscription per followed session, reads each message
once and hands it to every follower of that session. A `Follower` turns that into a
session's transitions in seq order, without gap or duplicate: the log first, then live
messages; a gap (a slow follower, a reconnect) is filled from the log.

How no transition is lost although a subscription takes effect some time after a follower
joins: every confirmation of a channel's subscription (the first, and each one after a
reconnect) tells the channel's followers to read the log again after their last seq.

On a Redis Cluster the connection is redis-py's `ClusterPubSub`, to one node: a classic
PUBLISH reaches every node of a cluster, so one connection anywhere hears every session.
Sharded pub/sub would keep each message on its slot's node but need a connection per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from redis import exceptions as redis_errors
from redis.asyncio.client import PubSub

from service.storage._redis import RedisClient, require_text_client
from service.storage.keys import session_channel
from service.storage.publisher import ended_at, read_log
from service.storage.transitions import ENDED, Transition

__all__ = ["Follower", "Frame", "TransitionHub"]

logger = logging.getLogger(__name__)

_RESYNC: Final = "resync"
"""Queued to a follower: read the log again after your last seq (messages may be lost)."""
_STOP: Final = "stop"
"""Queued to a follower: the hub stops, end the stream."""
_QUEUE_SIZE = 1000
"""Live transitions a follower may lag behind; beyond, it reads the log instead."""
_RETRY_S = (0.1, 5.0)
"""First and longest pause between attempts to reach Redis again."""


@dataclass(frozen=True, eq=False)
class Frame:
    """A transition and its JSON as published (encoded once for every follower).

    Compared and hashed by identity: one live frame goes to every follower, so what a
    follower makes of it can be cached by the frame.
    """

    transition: Transition
    json: str

    @classmethod
    def of(cls, transition: Transition) -> Frame:
        """Frame a transition read from the log."""
        return cls(transition, transition.model_dump_json())


_Item = Frame | str


@dataclass(eq=False)
class _Channel:
    """One session's channel: who follows it, and whether its end was checked."""

    followers: set[asyncio.Queue[_Item]] = field(default_factory=set)
    ended: dict[int, asyncio.Task[bool]] = field(default_factory=dict)


class TransitionHub:
    """One pub/sub connection serving every follower of every session in this process.

    Nothing connects until the first follower joins. Call `stop` to end every follower,
    then `aclose`.
    """

    def __init__(self, redis: RedisClient) -> None:
        """Follow through `redis`, a client made with `decode_responses=True`.

        Raises:
            TypeError: the client answers bytes.
        """
        require_text_client(redis, "TransitionHub")
        self.redis = redis
        self._pubsub: PubSub | None = None
        self._channels: dict[str, _Channel] = {}
        self._changed = asyncio.Event()
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    def __repr__(self) -> str:
        return f"TransitionHub(sessions={len(self._channels)}, followers={self.followers})"

    @property
    def followers(self) -> int:
        """How many followers are joined, over all sessions."""
        return sum(len(c.followers) for c in self._channels.values())

    @contextlib.contextmanager
    def follow(self, session_id: str, after_seq: int = 0) -> Iterator[Follower]:
        """Follow a session's transitions after seq `after_seq`, for as long as the block runs.

        Joining and leaving never wait for Redis (a client that goes cancels its stream at
        any await): the hub subscribes and unsubscribes in the background.
        """
        name = session_channel(session_id)
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel()
            self._changed.set()
        queue: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_SIZE)
        if self._stopped:
            queue.put_nowait(_STOP)
        channel.followers.add(queue)
        self._start()
        try:
            yield Follower(self, session_id, after_seq, queue, channel)
        finally:
            channel.followers.discard(queue)
            if not channel.followers and self._channels.get(name) is channel:
                del self._channels[name]
                for task in channel.ended.values():
                    task.cancel()
                self._changed.set()

    def stop(self) -> None:
        """End every follower, now and later (the gateway stops)."""
        self._stopped = True
        for channel in self._channels.values():
            for queue in channel.followers:
                _put(queue, _STOP)

    async def aclose(self) -> None:
        """Stop the background tasks and give the connection back."""
        self.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None

    def _start(self) -> None:
        if self._tasks or self._stopped:
            return
        self._pubsub = self.redis.pubsub()
        self._tasks = [
            asyncio.create_task(self._subscriptions(), name="hub subscriptions"),
            asyncio.create_task(self._messages(), name="hub messages"),
        ]

    async def _subscriptions(self) -> None:
        """Keep the connection subscribed to exactly the followed sessions' channels."""
        assert self._pubsub is not None
        pubsub, pause = self._pubsub, _RETRY_S[0]
        while True:
            await self._changed.wait()
            self._changed.clear()
            wanted = set(self._channels)
            leaving = set(map(str, pubsub.pending_unsubscribe_channels))
            have = {str(c) for c in pubsub.channels} - leaving
            try:
                if wanted - have:
                    await pubsub.subscribe(*sorted(wanted - have))
                    self._connected.set()
                if have - wanted:
                    await pubsub.unsubscribe(*sorted(have - wanted))
                pause = _RETRY_S[0]
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                logger.warning("live transitions: cannot subscribe (%s); retrying", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_S[1])
                self._changed.set()

    async def _messages(self) -> None:
        """Read every message once and queue it to the followers of its session."""
        assert self._pubsub is not None
        pubsub, pause = self._pubsub, _RETRY_S[0]
        await self._connected.wait()  # the first subscription is on its way
        while True:
            try:
                # A timeout, not a blocking read: the health check (a PING every few
                # seconds) notices a connection that died without a word.
                message = await pubsub.get_message(timeout=1.0)
                pause = _RETRY_S[0]
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                logger.warning("live transitions: Redis connection lost (%s); retrying", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_S[1])
                continue
            if message is None:
                continue
            channel = self._channels.get(str(message["channel"]))
            if channel is None or not channel.followers:
                continue
            if message["type"] == "subscribe":  # in effect from now: catch up from the log
                for queue in channel.followers:
                    _put(queue, _RESYNC)
            elif message["type"] == "message":
                raw = str(message["data"])
                frame = Frame(Transition.model_validate_json(raw), raw)
                channel.ended.clear()  # asked about an older transition
                for queue in channel.followers:
                    _put(queue, frame)

    def ended_at(self, channel: _Channel, transition: Transition) -> asyncio.Task[bool]:
        """Whether the session ended at this transition, asked once for all its followers."""
        task = channel.ended.get(transition.seq)
        if task is None:
            task = channel.ended[transition.seq] = asyncio.create_task(
                ended_at(self.redis, transition)
            )
        return task


def _put(queue: asyncio.Queue[_Item], item: _Item) -> None:
    """Queue without waiting; a follower too far behind reads the log instead."""
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_STOP if item == _STOP else _RESYNC)


class Follower:
    """One follower's view of a session: its transitions after a seq, in order, once each."""

    def __init__(
        self,
        hub: TransitionHub,
        session_id: str,
        after_seq: int,
        queue: asyncio.Queue[_Item],
        channel: _Channel,
    ) -> None:
        """Made by `TransitionHub.follow`."""
        self.hub = hub
        self.session_id = session_id
        self.last = after_seq
        self._queue = queue
        self._channel = channel
        self._replayed = False
        self.stopped = False

    def __repr__(self) -> str:
        return f"Follower({self.session_id!r}, last={self.last})"

    async def next(self) -> list[Frame]:
        """Wait for the next transitions after the last one returned, in seq order.

        The first call returns the logged ones (possibly none). Later calls return all
        that queued up meanwhile: a follower that falls behind catches up in one go. When
        the hub stops, `stopped` is set and what is left is returned (possibly nothing).

        Raises:
            redis.exceptions.ConnectionError: Redis did not answer a read of the log.
        """
        if not self._replayed:
            self._replayed = True
            return await self._from_log()
        frames: list[Frame] = []
        while not frames and not self.stopped:
            frames += await self._take(await self._queue.get())
            while not self._queue.empty() and not self.stopped:
                frames += await self._take(self._queue.get_nowait())
        return frames

    async def _take(self, item: _Item) -> list[Frame]:
        """What one queued item adds after the last transition returned."""
        if item == _STOP:
            self.stopped = True
            return []
        if item == _RESYNC:
            return await self._from_log()
        assert isinstance(item, Frame)
        seq = item.transition.seq
        if seq <= self.last:
            return []
        if seq > self.last + 1:  # missed some: the log has them, and this one
            frames = await self._from_log()
            if frames and frames[-1].transition.seq >= seq:
                return frames
            self.last = seq  # the log was trimmed or is gone: go on from here
            return [*frames, item]
        self.last = seq
        return [item]

    async def ended_at(self, frame: Frame) -> bool:
        """Whether the session ended at this transition (nothing was logged after it)."""
        if frame.transition.type not in ENDED:
            return False
        return await asyncio.shield(self.hub.ended_at(self._channel, frame.transition))

    async def _from_log(self) -> list[Frame]:
        frames = [Frame.of(t) for t in await read_log(self.hub.redis, self.session_id, self.last)]
        if frames:
            self.last = frames[-1].transition.seq
        return frames
