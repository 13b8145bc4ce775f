"""`agentflow dev`: local servers, a worker, the gateway and agent hosts, in one process."""

from __future__ import annotations

import asyncio
import signal

from rich.console import Console
from rich.markup import escape

from service.bootstrap import startup_summary
from service.config import Settings, redact_url
from service.devtools.hosting import HostedAgents, started_with_host
from service.devtools.servers import LocalServers
from service.gateway.app import serve_gateway
from service.worker import Worker

__all__ = ["run_dev"]


async def run_dev(
    settings: Settings, console: Console, *, hosted: HostedAgents | None = None
) -> None:
    """Start the local servers (unless URLs are set), a worker and the gateway; stop on Ctrl-C.

    Args:
        settings: the service's settings; its agents file is the user's.
        console: where the URLs and exports are printed.
        hosted: agents to host here (`--agents-host`): an agent host in this process
            serves them, and the worker reads the agents file in which they run over Kafka.
    """
    servers = LocalServers(kafka_bootstrap=settings.kafka_bootstrap, redis_url=settings.redis_url)
    await servers.astart()
    try:
        settings = settings.model_copy(
            update={"kafka_bootstrap": servers.kafka_bootstrap, "redis_url": servers.redis_url}
        )
        summary = startup_summary(settings)
        if hosted is not None:
            summary += f"\n  {hosted.describe()}"
            settings = hosted.settings_for(settings)
        worker = Worker(settings, name="dev-worker")
        async with started_with_host(worker, hosted, host_name="dev-agent-host"):
            server, serving, url = await serve_gateway(
                settings, host=settings.gateway_host, port=settings.gateway_port
            )
            console.print(
                "[bold]agentflow dev[/] running (Ctrl-C stops everything)\n"
                f"  {escape(summary)}\n"
                f"  gateway and web page: {url}\n"
                f"  export AGENTFLOW_KAFKA_BOOTSTRAP={servers.kafka_bootstrap}\n"
                f"  export AGENTFLOW_REDIS_URL={redact_url(servers.redis_url)}",
                soft_wrap=True,
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, worker.stop)
            try:
                await worker.run()
            finally:
                server.should_exit = True
                await serving
    finally:
        await servers.astop()
