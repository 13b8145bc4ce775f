"""`agentflow agents serve` and `agents list`: hosting agents over Kafka, seeing where they run."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from nodes.agents import load_agents
from service.agents import AgentHost, agent_places
from service.bootstrap import check_hosting, require_services
from service.cli.console import print_table
from service.cli.inputs import BadInput, configure_logging, read_settings
from service.config import Settings
from service.errors import ConfigError

__all__ = ["app", "list_agents", "serve"]

app = typer.Typer(
    help="Host agents for the worker over Kafka, and see where agents run.",
    no_args_is_help=True,
)

AgentsFile = Annotated[
    Path | None,
    typer.Option(
        "--agents-file", metavar="FILE", help="The agents file (default AGENTFLOW_AGENTS_FILE)."
    ),
]


def _settings(agents_file: Path | None) -> Settings:
    settings = read_settings()
    require_services(settings)
    if agents_file is not None:
        settings = settings.model_copy(update={"agents_file": agents_file})
    return settings


@app.command()
def serve(
    agents_file: AgentsFile = None,
    agent: Annotated[
        list[str] | None,
        typer.Option(
            "--agent",
            metavar="NAME",
            help="An agent to serve (repeat for more); default: every `runs: kafka` agent "
            "of the file.",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log agentflow's own loggers at DEBUG.")
    ] = False,
) -> None:
    """Serve agents' tasks from Kafka with their prompts, tools and models, until SIGTERM.

    Each agent's tasks come from its topic (AGENTFLOW_TOPIC_AGENTS_PREFIX and its name) in
    consumer group agentflow-agent-NAME: hosts of one agent share its tasks.
    """
    configure_logging(logging.INFO, debug=verbose)
    settings = _settings(agents_file)
    try:
        registry = check_hosting(settings, agent or [])
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    asyncio.run(AgentHost(settings, registry).serve())


@app.command("list")
def list_agents(
    agents_file: AgentsFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List each agent, where it runs, its live hosts and its task topic's lag.

    The lag is how many tasks on the agent's topic its hosts' group has not committed
    yet (taken and running, or not taken). On a terminal, aligned columns; piped,
    tab-separated lines under a header.
    """
    configure_logging()
    settings = _settings(agents_file)
    places = asyncio.run(agent_places(settings, load_agents(settings.agents_file)))
    if as_json:
        for place in places:
            typer.echo(json.dumps(asdict(place)))
        return
    print_table(
        ("agent", "runs", "lag", "topic", "hosts"),
        [
            (
                p.name,
                p.runs,
                "–" if p.lag is None else str(p.lag),
                p.topic or "–",
                " ".join(p.hosts) or "–",
            )
            for p in places
        ],
    )
