"""`agentflow send` and `agentflow watch`: events in, a session's transitions out."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from nodes.models import CloudEvent, MultitaskStrategy
from service.bootstrap import require_services
from service.cli.console import EXIT_NO_RESULT, console, err_console, finish
from service.cli.inputs import (
    BadInput,
    configure_logging,
    read_event,
    read_settings,
)
from service.client import produce_event, send_and_follow, session_id_for, watch_session
from service.config import Settings
from service.errors import UnknownSessionError
from service.observe.terminal import print_transition

__all__ = ["send", "send_and_finish", "watch"]


def send(
    event_file: Annotated[Path, typer.Argument(help="CloudEvent JSON file.")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow it and print the result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --wait: only the result.")] = False,
    timeout: Annotated[
        float, typer.Option(min=0, help="With --wait: seconds to wait for the result.")
    ] = 300.0,
    multitask: Annotated[
        MultitaskStrategy | None,
        typer.Option(
            help="What the event does to its session if busy (sets its `multitask` attribute)."
        ),
    ] = None,
) -> None:
    """Produce an event to Kafka; with --wait, print its transitions and result.

    Exit codes with --wait: 0 completed, 1 failed, 2 bad input, 3 interrupted, 4 rejected
    (by a human), 5 refused, superseded or rolled back (a newer event's strategy; it did
    not run to an end of its own), 7 no result within --timeout (the event was sent and
    may still run: `agentflow watch` follows it).
    """
    configure_logging()
    settings = read_settings()
    require_services(settings)
    event = read_event(event_file, settings.event_limits())
    if multitask is not None:
        event.multitask = multitask
    if not wait:
        session_id = asyncio.run(produce_event(settings, event))
        console.print(f"sent event {event.id} to session {session_id}")
        return
    send_and_finish(settings, event, as_json=as_json, timeout_s=timeout)


def send_and_finish(
    settings: Settings, event: CloudEvent, *, as_json: bool, timeout_s: float
) -> NoReturn:
    """Send an event, print its run's transitions (unless `as_json`), then its result.

    Exits with the result's code, or 7 when no result comes within `timeout_s`.
    """
    show = None if as_json else (lambda transition: print_transition(console, transition))
    try:
        result = asyncio.run(
            send_and_follow(settings, event, timeout_s=timeout_s, on_transition=show)
        )
    except TimeoutError as exc:
        err_console.print(
            f"[bold red]no result:[/] {exc}; the event was sent and may still run "
            f"(`agentflow watch {session_id_for(event)}` follows it)",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_NO_RESULT) from None
    finish(result, as_json=as_json, service=True)


def watch(
    session_id: Annotated[str, typer.Argument(help="The session to follow.")],
    after: Annotated[int, typer.Option(help="Start after this seq.")] = 0,
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for a session that has not started.")
    ] = 30.0,
) -> None:
    """Catch up on a session's transitions from the log, then follow it until it ends.

    A session waiting for an answer is followed on through its resumed run. A session
    with no record and no transition yet (its event was just sent) is waited for up to
    --timeout seconds. Exit codes: 0 the session ended, 2 it is unknown.
    """
    configure_logging()
    settings = read_settings()
    require_services(settings)
    try:
        asyncio.run(_watch(settings, session_id, after, timeout))
    except UnknownSessionError as exc:
        raise BadInput(f"{exc}; `agentflow send` prints the session id of an event") from None


async def _watch(settings: Settings, session_id: str, after: int, wait_s: float) -> None:
    async for transition in watch_session(settings, session_id, after, wait_s=wait_s):
        print_transition(console, transition)
