"""`agentflow dev`: local servers plus a worker, in one process."""

from __future__ import annotations

import asyncio
import signal

from rich.console import Console

from service.servers import LocalServers
from service.settings import Settings
from service.worker import Worker

__all__ = ["run_dev"]


async def run_dev(settings: Settings, console: Console) -> None:
    """Start the local servers (unless URLs are set) and a worker; stop on Ctrl-C."""
    servers = LocalServers(kafka_bootstrap=settings.kafka_bootstrap, redis_url=settings.redis_url)
    await servers.astart()
    try:
        settings = settings.model_copy(
            update={"kafka_bootstrap": servers.kafka_bootstrap, "redis_url": servers.redis_url}
        )
        worker = Worker(settings, name="dev-worker")
        await worker.start()
        console.print(
            "[bold]agentflow dev[/] running (Ctrl-C stops everything)\n"
            f"  export AGENTFLOW_KAFKA_BOOTSTRAP={servers.kafka_bootstrap}\n"
            f"  export AGENTFLOW_REDIS_URL={servers.redis_url}"
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()
    finally:
        await servers.astop()
