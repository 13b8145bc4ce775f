"""`agentflow worker`, `dev`, `gateway` and `health`: running the service and checking it."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated, Any

import typer

from service.bootstrap import require_services
from service.cli.console import console, err_console
from service.cli.inputs import BadInput, configure_logging, read_settings
from service.client import health_problems
from service.config import Settings
from service.devtools.dev import run_dev
from service.devtools.hosting import host_agents
from service.errors import ConfigError
from service.gateway.app import serve_gateway
from service.worker import Worker

__all__ = ["dev", "gateway", "health", "worker"]


def worker(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log agentflow's own loggers at DEBUG.")
    ] = False,
) -> None:
    """Consume events from Kafka and run their workflows until SIGTERM."""
    configure_logging(logging.INFO, debug=verbose)
    settings = read_settings(check=True)
    require_services(settings)
    asyncio.run(_serve_worker(settings))


async def _serve_worker(settings: Settings) -> None:
    await Worker(settings).serve()


def dev(
    agents_host: Annotated[
        list[str] | None,
        typer.Option(
            "--agents-host",
            metavar="NAME",
            help="Also host this agent of the agents file, as `agentflow agents serve` does "
            "(repeat for more): the worker treats it as `runs: kafka`.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Start local Kafka and Redis, a worker and the gateway (HTTP API and web page).

    Kafka and Redis are started here unless AGENTFLOW_KAFKA_BOOTSTRAP and
    AGENTFLOW_REDIS_URL name running ones. Prints the gateway's URL and the two exports
    that point other commands at them; runs until Ctrl-C, then cleans up.

    With --agents-host, an agent host in the same process serves those agents over Kafka,
    and the worker reads a copy of the agents file (under AGENTFLOW_DATA_DIR) in which
    they say `runs: kafka`; the agents file itself is not changed.
    """
    configure_logging(logging.INFO if verbose else logging.WARNING)
    settings = read_settings(check=True)
    try:
        hosted = host_agents(settings, agents_host) if agents_host else None
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    asyncio.run(run_dev(settings, console, hosted=hosted))


def gateway(
    host: Annotated[str | None, typer.Option(help="Address (AGENTFLOW_GATEWAY_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (AGENTFLOW_GATEWAY_PORT).")] = None,
) -> None:
    """Serve the HTTP API and the live web page until Ctrl-C or SIGTERM."""
    configure_logging(logging.INFO)
    settings = read_settings(check=True)
    require_services(settings)
    serving = _serve_gateway(
        settings,
        host=host or settings.gateway_host,
        port=settings.gateway_port if port is None else port,
    )
    # uvloop where it is installed: every open stream's writes go through the loop.
    uvloop = _uvloop()
    uvloop.run(serving) if uvloop is not None else asyncio.run(serving)


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


async def _serve_gateway(settings: Settings, *, host: str, port: int) -> None:
    try:
        server, task, url = await serve_gateway(settings, host=host, port=port)
    except OSError as exc:
        raise BadInput(f"{exc.strerror or exc}; set AGENTFLOW_GATEWAY_PORT") from None
    console.print(f"agentflow gateway on {url}  (API docs: {url}/docs)", soft_wrap=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, setattr, server, "should_exit", True)
    await task


def health() -> None:
    """Check that Kafka and Redis answer and that no worker is degraded.

    Exit codes: 0 both answer and every worker takes events, 1 one of them does not or a
    worker is degraded (why and since when is printed), 2 AGENTFLOW_KAFKA_BOOTSTRAP or
    AGENTFLOW_REDIS_URL is not set.
    """
    configure_logging()
    settings = read_settings()
    require_services(settings)
    problems = asyncio.run(health_problems(settings))
    for problem in problems:
        err_console.print(f"[red]unhealthy[/] {problem}", soft_wrap=True)
    if not problems:
        console.print("healthy: Kafka and Redis answer, no worker is degraded")
    raise typer.Exit(1 if problems else 0)
