"""The servers behind the API: one `Backends` per app, handed to routes as a dependency.

It holds the Kafka producer (connected lazily, replaced after a failure), the Redis
client, the session store and the workflow graph on the Redis checkpointer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated, Any, get_args

import redis.exceptions
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from fastapi import Depends, Request
from fastapi.exceptions import HTTPException

from graphs.workflow import build_graph
from nodes.models import CloudEvent
from service.bootstrap import kafka_producer, redis_client, require_services
from service.config import Settings
from service.errors import KafkaUnavailable
from service.gateway.schemas import Reachability
from service.observe import metrics
from service.storage.checkpoints import open_checkpointer
from service.storage.fanout import TransitionHub
from service.storage.keys import INDEX_KEY, session_key
from service.storage.sessions import SessionRecord, SessionStatus, SessionStore
from service.storage.workers import WorkerState, read_worker_states

__all__ = [
    "REDIS_ERRORS",
    "SEND_TIMEOUT_S",
    "Backends",
    "BackendsDep",
    "get_backends",
    "known_session",
]

SEND_TIMEOUT_S = 5.0
"""How long a request waits for Kafka to acknowledge an event before answering 503."""
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
"""The errors that mean Redis is unreachable (answered 503)."""
STATUSES: tuple[SessionStatus, ...] = get_args(SessionStatus)
"""Every status a session can be in, in `SessionStatus` order."""


_MAX_REDIS_CONNECTIONS = 100
"""Connections for requests in flight (streams share one pub/sub connection)."""


class Backends:
    """Kafka, Redis and the checkpointer, shared by all requests of one app."""

    def __init__(
        self, settings: Settings, *, keepalive_s: float, unknown_hold_s: float = 30.0
    ) -> None:
        """Build the clients; nothing connects until the first use.

        Raises:
            ConfigError: Kafka or Redis is not configured.
        """
        require_services(settings)
        assert settings.redis_url is not None
        self.settings = settings
        self.keepalive_s = keepalive_s
        self.unknown_hold_s = unknown_hold_s
        self.redis = redis_client(
            settings.redis_url,
            cluster=settings.redis_cluster,
            max_connections=_MAX_REDIS_CONNECTIONS,
            socket_connect_timeout=3,
        )
        self.hub = TransitionHub(self.redis)
        self.store = SessionStore(self.redis, ttl_s=settings.session_ttl_s)
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._graph: Any = None
        self._graph_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Backends(kafka={self.settings.kafka_bootstrap!r}, up={self._producer is not None})"

    async def producer(self) -> AIOKafkaProducer:
        """Return the long-lived producer, (re)connecting it when needed."""
        async with self._producer_lock:
            if self._producer is None:
                producer = kafka_producer(
                    self.settings, request_timeout_ms=int(SEND_TIMEOUT_S * 1000)
                )
                try:
                    await asyncio.wait_for(producer.start(), SEND_TIMEOUT_S)
                except BaseException:
                    await _quietly(producer.stop())
                    raise
                self._producer = producer
            return self._producer

    async def send(self, event: CloudEvent, session_id: str) -> None:
        """Produce an event keyed by its session and wait for Kafka's acknowledgement.

        Raises:
            KafkaUnavailable: Kafka did not acknowledge it within `SEND_TIMEOUT_S`.
        """
        value = event.model_dump_json(exclude_none=True).encode()
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            producer = None
            try:
                producer = await asyncio.wait_for(self.producer(), max(left, 0.01))
                await asyncio.wait_for(
                    producer.send_and_wait(
                        self.settings.topic_events, value, key=session_id.encode()
                    ),
                    max(deadline - time.monotonic(), 0.01),
                )
                break
            except (KafkaError, OSError, TimeoutError) as exc:
                await self._drop_producer(producer)
                left = deadline - time.monotonic()
                # Unreachable or out of time: answer now. Else (a broker-side error, e.g.
                # a topic being created after a restart) try again within the deadline.
                if isinstance(exc, KafkaConnectionError | OSError | TimeoutError) or left < 0.5:
                    raise KafkaUnavailable(
                        f"Kafka at {self.settings.kafka_bootstrap} did not acknowledge event "
                        f"{event.id} ({type(exc).__name__}: {exc or 'timed out'}); send it "
                        "again (an event id runs once)"
                    ) from exc
                await asyncio.sleep(0.25)
        metrics.EVENTS_RECEIVED.labels("gateway").inc()

    async def _drop_producer(self, failed: AIOKafkaProducer | None) -> None:
        """Forget a failed producer (the next request connects a new one); stop it aside."""
        async with self._producer_lock:
            if failed is None or failed is not self._producer:
                return  # never connected, or already replaced
            producer, self._producer = self._producer, None
        if producer is not None:
            task = asyncio.create_task(_quietly(producer.stop()))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def graph(self) -> Any:
        """Return the workflow graph on the Redis checkpointer (for state and history)."""
        async with self._graph_lock:
            if self._graph is None:
                # The saver's set-up wraps an unreachable Redis in redisvl's own error (a
                # 500): a ping first makes it the ConnectionError that is answered 503.
                await self.redis.ping()
                self._graph = build_graph(await open_checkpointer(self.redis))
            return self._graph

    async def kafka_health(self) -> Reachability:
        """Say whether Kafka answers a metadata request."""
        producer = None
        try:
            producer = await self.producer()
            await asyncio.wait_for(producer.client.fetch_all_metadata(), SEND_TIMEOUT_S)
        except Exception as exc:
            await self._drop_producer(producer)
            return Reachability(ok=False, error=f"{type(exc).__name__}: {exc or 'timed out'}")
        return Reachability(ok=True)

    async def redis_health(self) -> Reachability:
        """Say whether Redis answers a ping."""
        try:
            await asyncio.wait_for(self.redis.ping(), SEND_TIMEOUT_S)
        except Exception as exc:
            return Reachability(ok=False, error=f"{type(exc).__name__}: {exc or 'timed out'}")
        return Reachability(ok=True)

    async def worker_states(self) -> list[WorkerState]:
        """Return the states the workers reported lately (none if Redis does not answer)."""
        try:
            return await asyncio.wait_for(read_worker_states(self.redis), SEND_TIMEOUT_S)
        except Exception:
            return []

    async def count_by_status(self) -> dict[str, int]:
        """Count the indexed sessions by status (one pipelined read of all statuses)."""
        ids: list[Any] = list(await self.redis.zrange(INDEX_KEY, 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for raw_id in ids:
                pipe.hget(session_key(raw_id), "status")
            statuses = await pipe.execute() if ids else []
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for status in statuses:
            if status is not None:
                counts[status] = counts.get(status, 0) + 1
        return counts

    def stop_streams(self) -> None:
        """End the open streams (the server stops): they would hold the shutdown up."""
        self.hub.stop()

    async def close(self) -> None:
        """Stop the producer, the streams' pub/sub connection and the Redis client."""
        await self._drop_producer(self._producer)
        if self._closing:
            await asyncio.wait(self._closing)
        await self.hub.aclose()
        await self.redis.aclose()


async def _quietly(awaitable: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(awaitable, SEND_TIMEOUT_S)


def get_backends(request: Request) -> Backends:
    """Return the app's `Backends` (the dependency routes declare as `BackendsDep`)."""
    return request.app.state.backends  # type: ignore[no-any-return]


BackendsDep = Annotated[Backends, Depends(get_backends)]


async def known_session(backends: Backends, session_id: str) -> SessionRecord:
    """Return a session's record.

    Raises:
        HTTPException: 404, no such session.
    """
    record = await backends.store.get(session_id)
    if record is None:
        raise HTTPException(404, f"no session {session_id}")
    return record
