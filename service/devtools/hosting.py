"""Agents hosted beside a local worker: `agentflow dev --agents-host` and `make demo`.

The user's agents file stays as it is. The worker and the host read a copy of it under
the data dir in which the hosted agents say `runs: kafka`: every reader of the agents
file (assign, execute, the start-up checks, topic making) sees them as remote with no
setting of its own, and the copy can be read like any agents file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodes.agents import AgentRegistry, load_agents, remote_copy
from nodes.errors import AgentConfigError
from service.agents import AgentHost
from service.bootstrap import check_hosting
from service.config import Settings
from service.errors import ConfigError
from service.worker import Worker

__all__ = ["HostedAgents", "host_agents", "started_with_host"]

COPIES_DIR = "hosted-agents"
"""The folder of the data dir that holds the agents files with hosted agents."""


@dataclass(frozen=True)
class HostedAgents:
    """Agents hosted here over Kafka, and the agents file the worker and the host read."""

    names: list[str]
    source: Path
    """The user's agents file, untouched."""
    agents_file: Path
    """Its copy, in which `names` run over Kafka."""
    registry: AgentRegistry
    """The copy, loaded with `names` hosted (their tools ready)."""

    def settings_for(self, settings: Settings) -> Settings:
        """Return `settings` with the copy as the agents file."""
        return settings.model_copy(update={"agents_file": self.agents_file})

    def describe(self) -> str:
        """Say which agents are hosted here and which agents file says so."""
        return (
            f"hosted here over Kafka: {', '.join(self.names)} (an agent host, as `agentflow "
            f"agents serve` runs, answers their tasks; the worker reads {self.agents_file}, a "
            f"copy of {self.source} in which they say `runs: kafka`)"
        )


def host_agents(settings: Settings, names: Sequence[str]) -> HostedAgents:
    """Check that the agents can be hosted here, and write the agents file that says so.

    Args:
        settings: `AGENTFLOW_AGENTS_FILE` lists the agents; the copy goes under
            `AGENTFLOW_DATA_DIR`.
        names: the agents to host (at least one); each must be in the agents file.

    Raises:
        ConfigError: with a sentence: an agent is not in the file or cannot be hosted
            (its tools, its model), or the data dir cannot be written.
    """
    names = list(dict.fromkeys(names))
    check_hosting(settings, names)  # its sentences name the user's file, not the copy
    source = settings.agents_file
    digest = hashlib.sha256(f"{source.resolve()}\0{','.join(sorted(names))}".encode())
    copy = settings.data_dir / COPIES_DIR / f"{source.stem}-{digest.hexdigest()[:10]}.yaml"
    header = (
        f"# Written by agentflow from {source.resolve()} at each start: edit that file, not\n"
        f"# this copy. Hosted beside the worker, these agents run over Kafka: {', '.join(names)}.\n"
    )
    try:
        _write_atomically(copy, header + remote_copy(source, names))
        registry = load_agents(copy, hosted=names)
    except AgentConfigError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot write {copy} ({exc.strerror}); set AGENTFLOW_DATA_DIR to a writable folder"
        ) from None
    return HostedAgents(names=names, source=source, agents_file=copy, registry=registry)


def _write_atomically(path: Path, text: str) -> None:
    """Write a file that a reader sees whole or not at all: another start may be reading it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


@contextlib.asynccontextmanager
async def started_with_host(
    worker: Worker, hosted: HostedAgents | None, *, host_name: str
) -> AsyncIterator[AgentHost | None]:
    """Start a worker and, beside it, a host of the hosted agents; stop the host at the end.

    The two start at once: each waits seconds for its consumer groups to be joined. The
    host shares the caller's event loop, as the worker and the gateway of `agentflow dev`
    do, so one Ctrl-C stops them all. Running and closing the worker stay the caller's.

    Args:
        worker: the worker, its agents file the hosted copy (`HostedAgents.settings_for`).
        hosted: the agents to serve, from `host_agents`; None: the worker alone.
        host_name: the host's name in logs, heartbeats and `agentflow agents list`.
    """
    if hosted is None:
        await worker.start()
        yield None
        return
    host = AgentHost(worker.settings, hosted.registry, name=host_name)
    starting = [asyncio.ensure_future(worker.start()), asyncio.ensure_future(host.start())]
    try:
        await asyncio.gather(*starting)
    except BaseException:
        for start in starting:
            start.cancel()
        await asyncio.wait(starting)
        await host.close()
        raise
    serving = asyncio.create_task(host.run(), name=host_name)
    try:
        yield host
    finally:
        host.stop()
        await serving
