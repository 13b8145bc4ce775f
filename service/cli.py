"""The `agentflow` command line: thin wrappers over the library."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from nodes.models import CloudEvent, EventValidationError, WorkflowResult
from service.settings import ConfigError, Settings, load_settings

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
        settings.check()
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
    from service.embedded import run_embedded

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


def _finish(result: WorkflowResult, as_json: bool) -> None:
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        from service.console import print_result

        print_result(console, result)
        if result.status == "interrupted":
            console.print(
                f'\nanswer with: agentflow run --resume {result.session_id} --answer "..."'
            )
    raise typer.Exit(EXIT_CODES[result.status])


@app.command()
def graph(
    fmt: Annotated[str, typer.Option("--format", help="mermaid | ascii")] = "mermaid",
) -> None:
    """Print the workflow graph."""
    from graphs.workflow import graph as compiled

    drawable = compiled.get_graph()
    if fmt == "mermaid":
        typer.echo(drawable.draw_mermaid())
    elif fmt == "ascii":
        typer.echo(drawable.draw_ascii())
    else:
        raise BadInput(f"unknown format {fmt!r}; use mermaid or ascii")


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
    from service.devserver import run_dev

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
    from service.client import produce_event, wait_for_result, watch_session
    from service.console import print_transition

    async def go() -> WorkflowResult | None:
        session_id = await produce_event(settings, event)
        if not wait:
            console.print(f"sent event {event.id} to session {session_id}")
            return None
        waiting = asyncio.create_task(wait_for_result(settings, session_id, event.id, timeout))
        if not as_json:
            async for transition in watch_session(settings, session_id):
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
        _finish(result, as_json)


@app.command()
def watch(
    session_id: Annotated[str, typer.Argument(help="The session to follow.")],
    after: Annotated[int, typer.Option(help="Start after this seq.")] = 0,
) -> None:
    """Catch up on a session's transitions from the log, then follow it live."""
    _configure_logging(False)
    settings = _service_settings()
    from service.client import watch_session
    from service.console import print_transition

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
