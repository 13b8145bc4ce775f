"""`agentflow dev`: local servers, a worker and the gateway, in one process."""

from __future__ import annotations

import asyncio
import signal

from rich.console import Console

from service.bootstrap import startup_summary
from service.config import Settings, redact_url
from service.devtools.servers import LocalServers
from service.gateway.app import serve_gateway
from service.worker import Worker

__all__ = ["run_dev"]


async def run_dev(settings: Settings, console: Console) -> None:
    """Start the local servers (unless URLs are set), a worker and the gateway; stop on Ctrl-C."""
    servers = LocalServers(kafka_bootstrap=settings.kafka_bootstrap, redis_url=settings.redis_url)
    await servers.astart()
    try:
        settings = settings.model_copy(
            update={"kafka_bootstrap": servers.kafka_bootstrap, "redis_url": servers.redis_url}
        )
        worker = Worker(settings, name="dev-worker")
        await worker.start()
        server, serving, url = await serve_gateway(
            settings, host=settings.gateway_host, port=settings.gateway_port
        )
        console.print(
            "[bold]agentflow dev[/] running (Ctrl-C stops everything)\n"
            f"  {startup_summary(settings)}\n"
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
