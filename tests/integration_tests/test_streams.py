"""Many SSE streams on one gateway: one pub/sub connection, every transition to everyone."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from redis.asyncio import Redis

from service.config import Settings
from service.gateway.app import serve_gateway
from service.storage.keys import session_channel
from service.storage.publisher import TransitionPublisher
from service.storage.sessions import SessionStore
from service.storage.transitions import Transition
from tests.integration_tests.conftest import wait_until

STREAMS = 200
"""More streams than the gateway's Redis pool has connections (100)."""


@asynccontextmanager
async def gateway(settings: Settings, **kw: Any) -> AsyncIterator[str]:
    server, task, url = await serve_gateway(settings, host="127.0.0.1", port=0, **kw)
    try:
        yield url
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def open_session(redis: Redis, session_id: str) -> None:
    store = SessionStore(redis, ttl_s=3600)
    await store.open(session_id, event_id=f"e-{session_id}", event_type="t", subject="s")


def transition(session_id: str, kind: str = "node.started", **data: Any) -> Transition:
    return Transition(session_id=session_id, type=kind, node="plan", data=data or None)  # type: ignore[arg-type]


class Stream:
    """One SSE client: the transitions it got, by seq, and the events it saw."""

    def __init__(self, http: httpx.AsyncClient, session_id: str) -> None:
        self.http = http
        self.session_id = session_id
        self.opened = asyncio.Event()
        self.seqs: list[int] = []
        self.events: list[dict[str, str]] = []

    async def run(self) -> None:
        async with self.http.stream("GET", f"/sessions/{self.session_id}/stream") as response:
            assert response.status_code == 200, await response.aread()
            event: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    self.opened.set()
                elif line:
                    name, _, value = line.partition(": ")
                    event[name] = value
                elif "data" in event:  # not the `retry:` that comes with the first comment
                    self.events.append(event)
                    if "id" in event:
                        self.seqs.append(int(event["id"]))
                    event = {}
                else:
                    event = {}


async def subscribers(redis: Redis, session_id: str) -> int:
    channel = session_channel(session_id)
    return int(dict(await redis.pubsub_numsub(channel))[channel])


async def test_many_streams_share_one_subscription_and_each_gets_every_transition(
    settings: Settings, redis: Redis
) -> None:
    sessions = [f"fan-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for session_id in sessions:
        await open_session(redis, session_id)
    publisher = TransitionPublisher(redis, ttl_s=3600)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http,
    ):
        streams = [Stream(http, sessions[i % 2]) for i in range(STREAMS)]
        tasks = [asyncio.create_task(s.run()) for s in streams]
        try:
            await wait_until(lambda: all(s.opened.is_set() for s in streams), "every stream open")
            for session_id in sessions:  # one subscription per session, not per stream
                assert await subscribers(redis, session_id) == 1
            for i in range(20):
                for session_id in sessions:
                    await publisher.publish(transition(session_id, i=i))
                # Ordinary requests are answered while every stream is open.
                answered = await http.get(f"/sessions/{sessions[0]}")
                assert answered.status_code == 200, answered.text
            for session_id in sessions:
                await publisher.publish(transition(session_id, "session.completed"))
            await asyncio.wait_for(asyncio.gather(*tasks), 60)  # each ends by itself
        finally:
            for task in tasks:
                task.cancel()
    for stream in streams:
        assert stream.seqs == list(range(1, 22)), stream.session_id


async def test_a_stream_opened_before_its_session_starts_gets_it(
    settings: Settings, redis: Redis
) -> None:
    session_id = f"early-{uuid.uuid4().hex[:8]}"
    publisher = TransitionPublisher(redis, ttl_s=3600)
    async with (
        gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        stream = Stream(http, session_id)
        task = asyncio.create_task(stream.run())
        await wait_until(stream.opened.is_set, "the stream open")
        await wait_until(lambda: _subscribed(redis, session_id), "the gateway subscribed")
        await open_session(redis, session_id)  # the worker takes the event
        await publisher.publish(transition(session_id, "session.started"))
        await publisher.publish(transition(session_id, "session.completed"))
        await asyncio.wait_for(task, 60)
    assert stream.seqs == [1, 2]


async def test_a_stream_for_an_unknown_session_ends_with_an_error_event(
    settings: Settings, redis: Redis
) -> None:
    session_id = f"nobody-{uuid.uuid4().hex[:8]}"
    async with (
        gateway(settings, unknown_hold_s=0.5) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        stream = Stream(http, session_id)
        await asyncio.wait_for(stream.run(), 60)  # ends by itself, not held forever
        assert stream.events == [
            {
                "event": "error",
                "data": json.dumps({"error": "unknown session", "session_id": session_id}),
            }
        ]
        await wait_until(lambda: _subscribed(redis, session_id, 0), "the gateway unsubscribed")


async def test_streams_go_on_after_the_pubsub_connection_is_lost(
    settings: Settings, redis: Redis
) -> None:
    session_id = f"cut-{uuid.uuid4().hex[:8]}"
    await open_session(redis, session_id)
    publisher = TransitionPublisher(redis, ttl_s=3600)
    async with (
        gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        streams = [Stream(http, session_id) for _ in range(5)]
        tasks = [asyncio.create_task(s.run()) for s in streams]
        await wait_until(lambda: all(s.opened.is_set() for s in streams), "every stream open")
        await wait_until(lambda: _subscribed(redis, session_id), "the gateway subscribed")
        await publisher.publish(transition(session_id))
        await wait_until(lambda: all(s.seqs == [1] for s in streams), "the first transition")
        # Redis drops the gateway's pub/sub connection; what is published meanwhile is
        # read from the log once the gateway has subscribed again.
        killed = await redis.client_kill_filter(_type="pubsub")
        assert killed >= 1
        await publisher.publish(transition(session_id))
        await publisher.publish(transition(session_id, "session.completed"))
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for stream in streams:
        assert stream.seqs == [1, 2, 3]


async def _subscribed(redis: Redis, session_id: str, count: int = 1) -> bool:
    return await subscribers(redis, session_id) == count
