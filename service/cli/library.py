"""`agentflow library ...`: the workflow library in Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from nodes.agents import load_agents
from service.bootstrap import redis_client, require_services
from service.cli.console import console, print_workflow, print_workflows
from service.cli.inputs import BadInput, configure_logging, read_settings
from service.config import Settings
from service.errors import CorruptWorkflowError, TemplateError
from service.storage.library import RedisWorkflowLibrary, load_templates, open_library

__all__ = ["app", "delete", "list_workflows", "load", "search", "show"]

app = typer.Typer(help="Manage the workflow library.", no_args_is_help=True)

T = TypeVar("T")


def _settings() -> Settings:
    settings = read_settings()
    require_services(settings, kafka=False)
    return settings


def _with_library(settings: Settings, use: Callable[[RedisWorkflowLibrary], Awaitable[T]]) -> T:
    """Open the Redis workflow library, run `use(library)` and close the connection.

    The library is on `AGENTFLOW_LIBRARY_REDIS_URL`, else on `AGENTFLOW_REDIS_URL`.

    Raises:
        BadInput: the library has no Redis (a cluster's cannot hold it), or
            `AGENTFLOW_EMBEDDINGS` cannot be made.
    """
    url = settings.library_url()
    if url is None:
        raise BadInput(
            "the workflow library cannot live on the Redis Cluster of AGENTFLOW_REDIS_URL: "
            "set AGENTFLOW_LIBRARY_REDIS_URL to a Redis (not a cluster) with the query engine"
        )

    async def go() -> T:
        client = redis_client(url, socket_connect_timeout=5)
        try:
            return await use(await open_library(client, embeddings=settings.embeddings))
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except ValueError as exc:  # AGENTFLOW_EMBEDDINGS cannot be made
        raise BadInput(str(exc)) from None


@app.command()
def load(
    path: Annotated[Path, typer.Argument(help="A template YAML file or a folder of them.")],
) -> None:
    """Load hand-written workflow templates into the library (same id: replaced)."""
    configure_logging()
    settings = _settings()
    try:
        templates = load_templates(path, load_agents(settings.agents_file))
    except TemplateError as exc:
        raise BadInput(str(exc)) from None

    async def put(library: RedisWorkflowLibrary) -> list[str]:
        return [await library.put(t) for t in templates]

    ids = _with_library(settings, put)
    console.print(f"loaded {len(ids)} workflow template(s): {', '.join(ids)}", soft_wrap=True)


@app.command("list")
def list_workflows(
    event_type: Annotated[str | None, typer.Option(help="Only this event type.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many to show.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List the library's workflows, last used first.

    On a terminal, aligned columns; piped, tab-separated lines under a header. Ids are
    printed whole either way.
    """
    configure_logging()
    settings = _settings()
    total, items = _with_library(
        settings, lambda library: library.recent(event_type=event_type, limit=limit)
    )
    if as_json:
        for item in items:
            typer.echo(item.model_dump_json(exclude={"score", "reuse"}))
        return
    print_workflows(items, total)


@app.command()
def show(
    workflow_id: Annotated[str, typer.Argument(help="The workflow's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the document as JSON.")] = False,
) -> None:
    """Show one workflow: what it handled, its steps and agents, and how it did."""
    configure_logging()
    settings = _settings()
    try:
        item = _with_library(settings, lambda library: library.get(workflow_id))
    except CorruptWorkflowError as exc:
        raise BadInput(f"{exc}; remove it with `agentflow library delete {workflow_id}`") from None
    if item is None:
        raise BadInput(f"no workflow {workflow_id!r} in the library (see `agentflow library list`)")
    if as_json:
        typer.echo(item.model_dump_json(indent=2, exclude={"score", "reuse"}))
        return
    print_workflow(item)


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="Words to look for.")],
    event_type: Annotated[str | None, typer.Option(help="Score this event type up.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many to show.")] = 5,
) -> None:
    """Search the library the way discovery does, and print the scores."""
    configure_logging()
    settings = _settings()
    found = _with_library(
        settings, lambda library: library.search_text(text, event_type=event_type, limit=limit)
    )
    for w in found:
        console.print(
            f"{w.score:.4f}  {w.id:<24} {w.event_type:<24} {w.intent}", markup=False, soft_wrap=True
        )
    if not found:
        console.print("no matching workflow")


@app.command()
def delete(workflow_id: Annotated[str, typer.Argument(help="The workflow's id.")]) -> None:
    """Remove a workflow from the library."""
    configure_logging()
    settings = _settings()
    if not _with_library(settings, lambda library: library.delete(workflow_id)):
        raise BadInput(f"no workflow {workflow_id!r} in the library (see `agentflow library list`)")
    console.print(f"deleted {workflow_id}")
