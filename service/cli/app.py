"""The `agentflow` command line: thin wrappers over the library."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from nodes.errors import EventValidationError
from nodes.models import CloudEvent, WorkflowResult
from service.bootstrap import check_startup
from service.config import Settings, load_settings
from service.errors import ConfigError

__all__ = ["app", "main"]

app = typer.Typer(
    name="agentflow",
    help="Turn events into LangGraph agent workflows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
sessions_app = typer.Typer(help="Inspect and replay sessions.", no_args_is_help=True)
library_app = typer.Typer(help="Manage the workflow library.", no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")
app.add_typer(library_app, name="library")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

EXIT_CODES = {"completed": 0, "failed": 1, "interrupted": 3}
EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """A user-facing problem: printed as one paragraph, exit code 2."""


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _settings() -> Settings:
    try:
        settings = load_settings()
        check_startup(settings)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    return settings


def read_event(path: Path) -> CloudEvent:
    """Read and validate an event file.

    Raises:
        BadInput: the file is missing or the event is invalid.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read event file {path}: {exc.strerror}") from None
    try:
        return CloudEvent.parse(raw)
    except EventValidationError as exc:
        raise BadInput(f"{path}: {exc}") from None


@app.command()
def run(
    event_file: Annotated[Path | None, typer.Argument(help="CloudEvent JSON file.")] = None,
    memory: Annotated[bool, typer.Option("--memory", help="Keep checkpoints in memory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the result JSON.")] = False,
    resume: Annotated[str | None, typer.Option(help="Continue this interrupted session.")] = None,
    answer: Annotated[str | None, typer.Option(help="The answer that resumes a session.")] = None,
    session: Annotated[str | None, typer.Option(help="Session id for a new run.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run one event in this process, printing each transition, then the result.

    Exit codes: 0 completed, 1 failed, 2 bad input, 3 interrupted.
    """
    _configure_logging(verbose)
    if resume is None and event_file is None:
        raise BadInput("give an EVENT_FILE to run, or --resume SESSION_ID --answer TEXT")
    if resume is not None and answer is None:
        raise BadInput("--resume needs --answer TEXT: the answer to the session's question")
    if resume is not None and memory:
        raise BadInput("--resume needs the on-disk checkpoints; drop --memory")
    settings = _settings()
    event = read_event(event_file) if event_file is not None and resume is None else None
    from service.runtime.embedded import run_embedded

    result = asyncio.run(
        run_embedded(
            settings,
            event=event,
            session_id=resume
            or session
            or (event.sessionid if event else None)
            or str(uuid.uuid4()),
            answer=answer,
            memory=memory,
            console=None if as_json else console,
        )
    )
    _finish(result, as_json)


def _finish(result: WorkflowResult, as_json: bool, *, embedded: bool = True) -> None:
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        from service.cli.console import print_result

        print_result(console, result)
        if result.status == "interrupted" and embedded:
            console.print(
                f'\nanswer with: agentflow run --resume {result.session_id} --answer "..."'
            )
        elif result.status == "interrupted":
            console.print(
                "\nanswer with an agentflow.resume event (sessionid "
                f"{result.session_id}, data.answer) or POST /sessions/{result.session_id}/resume"
            )
    raise typer.Exit(EXIT_CODES[result.status])


@app.command()
def graph(
    fmt: Annotated[str, typer.Option("--format", help="mermaid | ascii | svg | png")] = "mermaid",
    session: Annotated[
        str | None, typer.Option("--session", help="Highlight the path this session took.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (png needs one).")
    ] = None,
) -> None:
    """Print the workflow graph, offline; with --session, the path a session took.

    Sessions are read from AGENTFLOW_REDIS_URL when set, else from `agentflow run`'s
    checkpoints.
    """
    from service.observe.drawing import FORMATS, render_graph

    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}; use {', '.join(FORMATS)}")
    if fmt == "png" and output is None and sys.stdout.isatty():
        raise BadInput("png is binary: give --output FILE (or pipe stdout to a file)")
    path = None
    if session is not None:
        from service.errors import ReplayError
        from service.runtime.replay import load_session_path

        try:
            path = asyncio.run(load_session_path(_settings(), session))
        except ReplayError as exc:
            raise BadInput(str(exc)) from None
    drawing = render_graph(fmt, path)
    if output is not None:
        try:
            if isinstance(drawing, bytes):
                output.write_bytes(drawing)
            else:
                output.write_text(drawing, encoding="utf-8")
        except OSError as exc:
            raise BadInput(f"cannot write {output}: {exc.strerror}") from None
        err_console.print(f"wrote {fmt} to {output}")
    elif isinstance(drawing, bytes):
        sys.stdout.buffer.write(drawing)
        sys.stdout.buffer.flush()
    else:
        typer.echo(drawing, nl=not drawing.endswith("\n"))


def _service_settings() -> Settings:
    settings = _settings()
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise BadInput(
            "set AGENTFLOW_KAFKA_BOOTSTRAP and AGENTFLOW_REDIS_URL to reach Kafka and Redis "
            "(`agentflow dev` starts local ones and prints both)"
        )
    return settings


@app.command()
def worker(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Consume events from Kafka and run their workflows until SIGTERM."""
    _configure_logging(True)
    settings = _service_settings()
    from service.worker import Worker

    async def serve() -> None:
        w = Worker(settings)
        await w.start()
        w.install_signal_handlers()
        await w.run()

    asyncio.run(serve())


@app.command()
def dev(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Start local Kafka and Redis and a worker; run until Ctrl-C, then clean up."""
    _configure_logging(verbose)
    from service.devtools.dev import run_dev

    asyncio.run(run_dev(_settings(), console))


@app.command()
def send(
    event_file: Annotated[Path, typer.Argument(help="CloudEvent JSON file.")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow it and print the result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --wait: only the result.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 300.0,
) -> None:
    """Produce an event to Kafka; with --wait, print its transitions and result."""
    _configure_logging(False)
    settings = _service_settings()
    event = read_event(event_file)
    from service.cli.console import print_transition
    from service.client import (
        last_seq,
        produce_event,
        session_id_for,
        wait_for_result,
        watch_session,
    )

    async def go() -> WorkflowResult | None:
        after = await last_seq(settings, session_id_for(event)) if wait else 0
        session_id = await produce_event(settings, event)
        if not wait:
            console.print(f"sent event {event.id} to session {session_id}")
            return None
        waiting = asyncio.create_task(wait_for_result(settings, session_id, event.id, timeout))
        if not as_json:
            async for transition in watch_session(settings, session_id, after):
                print_transition(console, transition)
                if (
                    transition.terminal
                    and transition.data
                    and (transition.data.get("result", {}).get("event_id") == event.id)
                ):
                    break
        return await waiting

    result = asyncio.run(go())
    if result is not None:
        _finish(result, as_json, embedded=False)


@app.command()
def watch(
    session_id: Annotated[str, typer.Argument(help="The session to follow.")],
    after: Annotated[int, typer.Option(help="Start after this seq.")] = 0,
) -> None:
    """Catch up on a session's transitions from the log, then follow it live."""
    _configure_logging(False)
    settings = _service_settings()
    from service.cli.console import print_transition
    from service.client import watch_session

    async def go() -> None:
        async for transition in watch_session(settings, session_id, after):
            print_transition(console, transition)

    asyncio.run(go())


@app.command()
def health() -> None:
    """Exit 0 if Kafka and Redis answer, 1 otherwise."""
    settings = _service_settings()

    async def check() -> list[str]:
        from aiokafka.admin import AIOKafkaAdminClient
        from redis.asyncio import Redis

        problems = []
        redis = Redis.from_url(settings.redis_url or "", socket_connect_timeout=3)
        try:
            await redis.ping()
        except Exception as exc:
            problems.append(f"Redis at {settings.redis_url}: {exc}")
        finally:
            await redis.aclose()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=3000
        )
        try:
            await asyncio.wait_for(admin.start(), 5)
            await admin.list_topics()
        except Exception as exc:
            problems.append(f"Kafka at {settings.kafka_bootstrap}: {exc!r}")
        finally:
            await admin.close()
        return problems

    problems = asyncio.run(check())
    for problem in problems:
        err_console.print(f"[red]unhealthy[/] {problem}")
    if not problems:
        console.print("healthy: Kafka and Redis answer")
    raise typer.Exit(1 if problems else 0)


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="Address (AGENTFLOW_GATEWAY_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (AGENTFLOW_GATEWAY_PORT).")] = None,
) -> None:
    """Serve the HTTP API and the live web page until Ctrl-C or SIGTERM."""
    _configure_logging(True)
    settings = _service_settings()
    from service.gateway.app import serve_gateway

    async def serve() -> None:
        import signal

        try:
            server, task, url = await serve_gateway(
                settings,
                host=host or settings.gateway_host,
                port=settings.gateway_port if port is None else port,
            )
        except OSError as exc:
            raise BadInput(f"{exc.strerror or exc}; set AGENTFLOW_GATEWAY_PORT") from None
        console.print(f"agentflow gateway on {url}  (API docs: {url}/docs)", soft_wrap=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, setattr, server, "should_exit", True)
        await task

    asyncio.run(serve())


@sessions_app.command("replay")
def sessions_replay(
    session_id: Annotated[str, typer.Argument(help="The session to fork.")],
    from_checkpoint: Annotated[
        str, typer.Option("--from", help="The checkpoint to fork from.", show_default=False)
    ],
    edits: Annotated[
        list[str] | None,
        typer.Option("--set", help="Edit the state first: KEY=JSON (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the result JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Fork a session from one of its checkpoints and run it on as a new branch.

    The original checkpoints stay as they were; the session's head moves to the branch.
    Sessions are read from AGENTFLOW_REDIS_URL when set, else from `agentflow run`'s
    checkpoints. Exit codes as for `run`.
    """
    _configure_logging(verbose)
    settings = _settings()
    from service.cli.console import print_transition
    from service.errors import ReplayError
    from service.runtime.replay import parse_edits, replay_session
    from service.storage.transitions import Transition

    async def show(transition: Transition) -> None:
        if not as_json:
            print_transition(console, transition)

    try:
        changes = parse_edits(edits or [])
        outcome = asyncio.run(
            replay_session(settings, session_id, from_checkpoint, changes, on_transition=show)
        )
    except ReplayError as exc:
        raise BadInput(str(exc)) from None
    if not as_json:
        edited = f" with {', '.join(changes)} edited" if changes else ""
        console.print(
            f"\nbranch of session {session_id} forked at {outcome.from_checkpoint}{edited}; "
            f"head {outcome.head_checkpoint} (the original checkpoints are kept)"
        )
    _finish(outcome.result, as_json)


def _library_settings() -> Settings:
    settings = _settings()
    if not settings.redis_url:
        raise BadInput(
            "the workflow library lives in Redis: set AGENTFLOW_REDIS_URL "
            "(`agentflow dev` starts a local Redis and prints it)"
        )
    return settings


def _with_library(settings: Settings, use: Callable[[Any], Awaitable[Any]]) -> Any:
    """Open the Redis workflow library, run `use(library)` and close the connection."""
    import redis.exceptions
    from redis.asyncio import Redis

    from service.storage.library import open_library

    async def go() -> Any:
        client = Redis.from_url(settings.redis_url or "", socket_connect_timeout=5)
        try:
            return await use(await open_library(client, embeddings=settings.embeddings))
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        err_console.print(f"[bold red]error:[/] cannot reach Redis at {settings.redis_url}: {exc}")
        raise typer.Exit(1) from None
    except ValueError as exc:  # AGENTFLOW_EMBEDDINGS cannot be made
        raise BadInput(str(exc)) from None


def _when(moment: Any) -> str:
    return f"{moment:%Y-%m-%d %H:%M}" if moment is not None else "–"


@library_app.command("load")
def library_load(
    path: Annotated[Path, typer.Argument(help="A template YAML file or a folder of them.")],
) -> None:
    """Load hand-written workflow templates into the library (same id: replaced)."""
    _configure_logging(False)
    settings = _library_settings()
    from nodes.agents import load_agents
    from service.errors import TemplateError
    from service.storage.library import load_templates

    try:
        templates = load_templates(path, load_agents(settings.agents_file))
    except TemplateError as exc:
        raise BadInput(str(exc)) from None

    async def put(library: Any) -> list[str]:
        return [await library.put(t) for t in templates]

    ids = _with_library(settings, put)
    console.print(f"loaded {len(ids)} workflow template(s): {', '.join(ids)}")


@library_app.command("list")
def library_list(
    event_type: Annotated[str | None, typer.Option(help="Only this event type.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many to show.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List the library's workflows, last used first."""
    _configure_logging(False)
    settings = _library_settings()

    async def page(library: Any) -> Any:
        return await library.recent(event_type=event_type, limit=limit)

    total, items = _with_library(settings, page)
    if as_json:
        for item in items:
            typer.echo(item.model_dump_json(exclude={"score", "reuse"}))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    for column in ("id", "event type", "source", "quality", "reused", "last used"):
        table.add_column(column, no_wrap=True)
    table.add_column("intent", overflow="fold")
    for w in items:
        cells = (w.id, w.event_type, w.source, f"{w.quality:.2f}", str(w.reuse_count))
        table.add_row(*(Text(c) for c in (*cells, _when(w.last_used), w.intent)))
    console.print(table)
    console.print(f"{len(items)} of {total} workflow(s)")


@library_app.command("show")
def library_show(
    workflow_id: Annotated[str, typer.Argument(help="The workflow's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the document as JSON.")] = False,
) -> None:
    """Show one workflow: what it handled, its steps and agents, and how it did."""
    _configure_logging(False)
    settings = _library_settings()
    from service.errors import CorruptWorkflowError

    async def get(library: Any) -> Any:
        return await library.get(workflow_id)

    try:
        item = _with_library(settings, get)
    except CorruptWorkflowError as exc:
        raise BadInput(f"{exc}; remove it with `agentflow library delete {workflow_id}`") from None
    if item is None:
        raise BadInput(f"no workflow {workflow_id!r} in the library (see `agentflow library list`)")
    if as_json:
        typer.echo(item.model_dump_json(indent=2, exclude={"score", "reuse"}))
        return
    lines = [
        f"{item.id}  {item.event_type}  {item.source}, {item.verdict}  "
        f"quality {item.quality:.2f}  reused {item.reuse_count}×  "
        f"last used {_when(item.last_used)}",
        f"intent  {item.intent}",
        *(f"goal    {goal}" for goal in item.goals),
    ]
    if item.data_summary:
        lines.append(f"data    {item.data_summary}")
    for step in item.steps:
        after = f"  (after {', '.join(step.depends_on)})" if step.depends_on else ""
        lines.append(f"  {step.id:<4} {'+'.join(step.agents):<24} {step.title}{after}")
    if item.summary:
        lines.append(f"summary {item.summary}")
    for line in lines:
        console.print(line, markup=False)


@library_app.command("search")
def library_search(
    text: Annotated[str, typer.Argument(help="Words to look for.")],
    event_type: Annotated[str | None, typer.Option(help="Score this event type up.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many to show.")] = 5,
) -> None:
    """Search the library the way discovery does, and print the scores."""
    _configure_logging(False)
    settings = _library_settings()

    async def search(library: Any) -> Any:
        return await library.search_text(text, event_type=event_type, limit=limit)

    found = _with_library(settings, search)
    for w in found:
        console.print(f"{w.score:.4f}  {w.id:<24} {w.event_type:<24} {w.intent}", markup=False)
    if not found:
        console.print("no matching workflow")


@library_app.command("delete")
def library_delete(workflow_id: Annotated[str, typer.Argument(help="The workflow's id.")]) -> None:
    """Remove a workflow from the library."""
    _configure_logging(False)
    settings = _library_settings()

    async def delete(library: Any) -> bool:
        return bool(await library.delete(workflow_id))

    if not _with_library(settings, delete):
        raise BadInput(f"no workflow {workflow_id!r} in the library (see `agentflow library list`)")
    console.print(f"deleted {workflow_id}")


@sessions_app.command("history")
def sessions_history(
    session_id: Annotated[str, typer.Argument(help="The session to show.")],
    full: Annotated[bool, typer.Option("--full", help="Do not shorten messages.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the messages as JSON.")] = False,
) -> None:
    """Print a session's conversation, per event, per step, per agent, from its checkpoints.

    Sessions are read from AGENTFLOW_REDIS_URL when set, else from `agentflow run`'s
    checkpoints under AGENTFLOW_DATA_DIR.
    """
    _configure_logging(False)
    settings = _settings()
    from graphs.workflow import build_graph
    from service.storage.memory import open_history_checkpointer, session_history

    async def read() -> tuple[list[Any], str]:
        async with open_history_checkpointer(settings) as (checkpointer, where):
            return await session_history(build_graph(checkpointer), session_id), where

    try:
        runs, where = asyncio.run(read())
    except FileNotFoundError as exc:
        raise BadInput(
            f"no checkpoints at {exc.args[0]}: run an event with `agentflow run` first, "
            "or set AGENTFLOW_REDIS_URL to read the worker's sessions"
        ) from None
    if not runs:
        raise BadInput(f"session {session_id!r} has no checkpoints in {where}")
    if as_json:
        from langchain_core.messages import messages_to_dict

        typer.echo(
            json.dumps(
                [
                    {
                        "event": run.event.model_dump(mode="json", exclude_none=True),
                        "steps": {
                            step.id: {
                                "title": step.title,
                                "agents": step.agents,
                                "status": step.status,
                                "messages": messages_to_dict(run.conversations.get(step.id, [])),
                            }
                            for step in run.steps
                        },
                    }
                    for run in runs
                ],
                indent=2,
                default=str,
            )
        )
        return
    width = None if full else 160
    for run in runs:
        subject = f"  subject {run.event.subject}" if run.event.subject else ""
        console.print(f"event {run.event.id}  {run.event.type}{subject}", markup=False)
        for step in run.steps:
            agents = "+".join(step.agents)
            console.print(f"  {step.id} {step.title}  ({agents})  {step.status}", markup=False)
            for message in run.conversations.get(step.id, []):
                console.print("      " + _message_line(message, width), markup=False)


def _message_line(message: Any, width: int | None) -> str:
    """Render one message as `who: what`, shortened to `width` characters."""
    if message.type == "ai":
        who = message.name or "agent"
        calls = [
            f"{c['name']}({', '.join(f'{k}={v}' for k, v in c['args'].items())})"
            for c in message.tool_calls
        ]
        what = "calls " + ", ".join(calls) if calls else message.text
    elif message.type == "tool":
        who, what = f"tool {message.name or ''}".strip(), message.text
    else:
        who, what = message.type, message.text
    line = f"{who:<22} {' '.join(what.split())}"
    return line if width is None or len(line) <= width else line[: width - 1] + "…"


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, turning user-facing errors into one paragraph and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except BadInput as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(EXIT_BAD_INPUT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click's usage errors
            exc.show()
            sys.exit(EXIT_BAD_INPUT)
        raise


if __name__ == "__main__":
    main()
