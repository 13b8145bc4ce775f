"""A session's transitions as Server-Sent Events, through sse-starlette.

The stream replays the session's Redis log after a given seq, then follows pub/sub, without
gap or duplicate (`service.storage.publisher.follow`). Each transition is one event: `id`
its seq (what `EventSource` sends back as `Last-Event-ID` on reconnect), `event` its type,
`data` its JSON. sse-starlette frames the events, sends keep-alive comments and stops the
stream when the client goes; the stream ends after the session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from redis.asyncio import Redis
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.gateway.backends import REDIS_ERRORS
from service.storage.publisher import ended_at, follow
from service.storage.transitions import Transition

__all__ = ["session_stream"]

logger = logging.getLogger(__name__)

RETRY_MS = 2000
"""How long `EventSource` waits before it reconnects a broken stream."""
SEP = "\n"
"""Line separator of the events (the spec allows \\r\\n too; plain \\n is what curl users read)."""


def session_stream(
    redis: Redis,
    session_id: str,
    after: int,
    *,
    keepalive_s: float,
    stopping: asyncio.Event,
) -> EventSourceResponse:
    """Return the response that streams a session's transitions after seq `after`.

    Args:
        redis: Where the session's log and channel are.
        session_id: The session to follow.
        after: Start after this seq (0: from the first transition).
        keepalive_s: Seconds between keep-alive comments, so proxies keep an idle stream.
        stopping: Set when the gateway stops: the stream ends (the client reconnects with
            `Last-Event-ID`) instead of holding the shutdown up.
    """
    return EventSourceResponse(
        _transition_events(redis, session_id, after, stopping),
        headers={"Cache-Control": "no-cache"},
        ping=keepalive_s,
        ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep=SEP),
        sep=SEP,
    )


def _event(transition: Transition) -> ServerSentEvent:
    return ServerSentEvent(
        transition.model_dump_json(), id=str(transition.seq), event=transition.type, sep=SEP
    )


async def _transition_events(
    redis: Redis, session_id: str, after: int, stopping: asyncio.Event
) -> AsyncIterator[ServerSentEvent]:
    """Yield a session's transitions after seq `after`, until the session ends."""
    # `follow` runs in a task of its own: when the client goes, this generator is
    # cancelled at every await, and `follow` must still get to unsubscribe.
    queue: asyncio.Queue[Transition | BaseException] = asyncio.Queue(maxsize=1000)

    async def pump() -> None:
        try:
            async for transition in follow(redis, session_id, after):
                await queue.put(transition)
        except Exception as exc:
            await queue.put(exc)

    task = asyncio.create_task(pump(), name=f"stream {session_id}")
    stop = asyncio.create_task(stopping.wait())
    get: asyncio.Task[Transition | BaseException] | None = None
    try:
        yield ServerSentEvent(comment="following session", retry=RETRY_MS, sep=SEP)
        while True:
            get = asyncio.create_task(queue.get())
            await asyncio.wait((get, stop), return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                return  # the gateway stops
            item = get.result()
            if isinstance(item, BaseException):
                logger.warning("stream of session %s broke: %s", session_id, item)
                return  # the client reconnects with Last-Event-ID
            yield _event(item)
            try:
                if await ended_at(redis, item):
                    return
            except REDIS_ERRORS as exc:
                logger.warning("stream of session %s broke: %s", session_id, exc)
                return
    finally:
        for pending in (get, stop, task):
            if pending is not None:
                pending.cancel()
        with anyio.move_on_after(5, shield=True), contextlib.suppress(asyncio.CancelledError):
            await task
