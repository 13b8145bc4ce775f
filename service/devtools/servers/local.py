"""The broker and Redis for development and tests, each started here or given from outside."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Self

from service.devtools.servers.kafka import KafkaBroker
from service.devtools.servers.process import ServerProcess, Started
from service.devtools.servers.redis import RedisServer

__all__ = ["LocalServers"]

logger = logging.getLogger(__name__)


class LocalServers(Started):
    """The broker and Redis for development and tests, started here or given from outside.

    Usable as a context manager, sync or async, or through `start()` and `stop()`. A server
    whose address is given is used as it is and never started, stopped or checked.

    Args:
        kafka_bootstrap: Bootstrap address of an existing Kafka; a Tansu broker is started
            when omitted.
        redis_url: URL of an existing Redis 8 or Redis Stack; a Redis 8 with the search and
            JSON modules is started when omitted.
        startup_timeout: Seconds to wait for each started server to answer.
    """

    def __init__(
        self,
        *,
        kafka_bootstrap: str | None = None,
        redis_url: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self._external_kafka = kafka_bootstrap
        self._external_redis = redis_url
        self.kafka: KafkaBroker | None = (
            None if kafka_bootstrap else KafkaBroker(startup_timeout=startup_timeout)
        )
        self.redis: RedisServer | None = (
            None if redis_url else RedisServer(startup_timeout=startup_timeout)
        )

    @classmethod
    def from_env(cls, *, startup_timeout: float = 30.0) -> Self:
        """Build from `AGENTFLOW_KAFKA_BOOTSTRAP` and `AGENTFLOW_REDIS_URL`, when set."""
        return cls(
            kafka_bootstrap=os.environ.get("AGENTFLOW_KAFKA_BOOTSTRAP") or None,
            redis_url=os.environ.get("AGENTFLOW_REDIS_URL") or None,
            startup_timeout=startup_timeout,
        )

    @property
    def kafka_bootstrap(self) -> str:
        """Bootstrap address of the broker in use, e.g. `127.0.0.1:40123`."""
        return self.kafka.bootstrap if self.kafka else str(self._external_kafka)

    @property
    def redis_url(self) -> str:
        """URL of the Redis in use, e.g. `redis://127.0.0.1:40124/0`."""
        return self.redis.url if self.redis else str(self._external_redis)

    def start(self) -> Self:
        """Start the servers this object owns and wait until both answer.

        Returns:
            The object itself, for chaining.

        Raises:
            ServerStartError: If a server cannot be started; the other one is stopped.
        """
        try:
            for server in self._owned():
                server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the servers this object owns and remove their temporary directories."""
        errors: list[BaseException] = []
        for server in self._owned():
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                logger.exception("Could not stop %s", server.name)
                errors.append(exc)
        if errors:
            raise errors[0]

    async def astart(self) -> Self:
        """Start both servers concurrently without blocking the event loop."""
        results = await asyncio.gather(
            *(server.astart() for server in self._owned()), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.astop()
            raise failures[0]
        return self

    async def astop(self) -> None:
        """Stop the servers without blocking the event loop; see `stop()`."""
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        kafka = repr(self.kafka) if self.kafka else f"external {self._external_kafka}"
        redis = repr(self.redis) if self.redis else f"external {self._external_redis}"
        return f"<LocalServers kafka={kafka} redis={redis}>"

    def _owned(self) -> list[ServerProcess]:
        return [server for server in (self.kafka, self.redis) if server is not None]
