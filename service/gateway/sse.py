"""A session's transitions as Server-Sent Events, through sse-starlette.

The stream replays the session's Redis log after a given seq, then follows pub/sub, without
gap or duplicate; every stream of the gateway is served from one pub/sub connection
(`service.storage.fanout.TransitionHub`). Each transition is one event: `id`
its seq (what `EventSource` sends back as `Last-Event-ID` on reconnect), `event` its type,
`data` its JSON. sse-starlette frames the events, sends keep-alive comments and stops the
stream when the client goes; the stream ends after the session ends.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from sse_starlette import EventSourceResponse, ServerSentEvent

from service.gateway.backends import REDIS_ERRORS
from service.storage.fanout import Frame, TransitionHub

__all__ = ["session_stream"]

logger = logging.getLogger(__name__)

RETRY_MS = 2000
"""How long `EventSource` waits before it reconnects a broken stream."""
SEP = "\n"
"""Line separator of the events (the spec allows \\r\\n too; plain \\n is what curl users read)."""
UNKNOWN_HOLD_S = 30.0
"""How long a stream waits for a session that has no record and no log yet."""


def session_stream(
    hub: TransitionHub,
    session_id: str,
    after: int,
    *,
    keepalive_s: float,
    known: Callable[[], Awaitable[bool]],
    hold_s: float = UNKNOWN_HOLD_S,
) -> EventSourceResponse:
    """Return the response that streams a session's transitions after seq `after`.

    Args:
        hub: The gateway's one pub/sub connection, fanned out to every stream.
        session_id: The session to follow.
        after: Start after this seq (0: from the first transition).
        keepalive_s: Seconds between keep-alive comments, so proxies keep an idle stream.
        known: Whether the session has a record or a log by now. A stream for a session
            that has neither waits up to `hold_s` for its first transition (the page
            opens it right after posting the event), then ends with an `error` event
            `unknown session`.
        hold_s: How long to wait for an unknown session.
    """
    return EventSourceResponse(
        _transition_events(hub, session_id, after, known, hold_s),
        headers={"Cache-Control": "no-cache"},
        ping=keepalive_s,
        ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep=SEP),
        sep=SEP,
    )


@functools.lru_cache(maxsize=256)
def _event(frame: Frame) -> bytes:
    """The event of a transition, encoded once for all the streams a live frame goes to."""
    transition = frame.transition
    event = ServerSentEvent(frame.json, id=str(transition.seq), event=transition.type, sep=SEP)
    return event.encode()


async def _transition_events(
    hub: TransitionHub,
    session_id: str,
    after: int,
    known: Callable[[], Awaitable[bool]],
    hold_s: float,
) -> AsyncIterator[ServerSentEvent | bytes]:
    """Yield a session's transitions after seq `after`, until the session ends."""
    with hub.follow(session_id, after) as follower:
        yield ServerSentEvent(comment="following session", retry=RETRY_MS, sep=SEP)
        try:
            frames = await follower.next()
            if not frames and not follower.stopped and not await known():
                try:
                    async with asyncio.timeout(hold_s):
                        frames = await follower.next()
                except TimeoutError:
                    if not await known():
                        yield _unknown(session_id)
                        return
            while True:
                # What queued up goes in one write: a stream that fell behind catches up.
                for end, frame in enumerate(frames, 1):
                    if await follower.ended_at(frame):
                        yield b"".join(map(_event, frames[:end]))
                        return
                if frames:
                    yield b"".join(map(_event, frames))
                if follower.stopped:  # the gateway stops
                    return
                frames = await follower.next()
        except REDIS_ERRORS as exc:
            logger.warning("stream of session %s broke: %s", session_id, exc)
            # the client reconnects with Last-Event-ID


def _unknown(session_id: str) -> ServerSentEvent:
    body = {"error": "unknown session", "session_id": session_id}
    return ServerSentEvent(json.dumps(body), event="error", sep=SEP)
