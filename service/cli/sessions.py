"""`agentflow sessions ...`: replay, read and answer sessions."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated

import typer

from graphs.workflow import build_graph
from nodes.models import CLI_SOURCE
from service.bootstrap import open_session_checkpointer, require_services
from service.cli.console import console, finish, print_history, print_table
from service.cli.follow import send_and_finish
from service.cli.inputs import (
    Approve,
    BadInput,
    Edit,
    Feedback,
    InterruptId,
    Reject,
    Revise,
    Steps,
    configure_logging,
    read_decision,
    read_settings,
)
from service.client import pending_interrupts, produce_event, resume_event, waiting_session
from service.config import Settings
from service.errors import ReplayError, UnknownSessionError
from service.observe.terminal import print_transition
from service.runtime.replay import parse_edits, replay_session
from service.storage.memory import RunConversation, session_history
from service.storage.transitions import Transition

__all__ = ["answer", "app", "history", "pending", "replay"]

app = typer.Typer(help="Inspect, replay and answer sessions.", no_args_is_help=True)


@app.command()
def replay(
    session_id: Annotated[str, typer.Argument(help="The session to fork.")],
    from_checkpoint: Annotated[
        str, typer.Option("--from", help="The checkpoint to fork from.", show_default=False)
    ],
    edits: Annotated[
        list[str] | None,
        typer.Option("--set", help="Edit the state first: KEY=JSON (repeatable)."),
    ] = None,
    as_session: Annotated[
        str | None,
        typer.Option(
            "--as",
            help="Run the branch as this new session (a copy of the whole history); "
            "the original session stays as it was.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the result JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Fork a session from one of its checkpoints and run it on as a new branch.

    The original checkpoints stay as they were; the session's head moves to the branch,
    or with --as NEW_SESSION_ID the branch is a new session that starts as a copy of this
    one. Sessions are read from AGENTFLOW_REDIS_URL when set, else from `agentflow run`'s
    checkpoints. Exit codes as for `run`.
    """
    configure_logging(logging.INFO if verbose else logging.WARNING)
    settings = read_settings(check=True)

    async def show(transition: Transition) -> None:
        if not as_json:
            print_transition(console, transition)

    try:
        changes = parse_edits(edits or [])
        outcome = asyncio.run(
            replay_session(
                settings,
                session_id,
                from_checkpoint,
                changes,
                as_session=as_session,
                on_transition=show,
            )
        )
    except ReplayError as exc:
        raise BadInput(str(exc)) from None
    if not as_json:
        edited = f" with {', '.join(changes)} edited" if changes else ""
        if as_session is None:
            where = f"branch of session {session_id}"
            kept = "the original checkpoints are kept"
        else:
            where = f"new session {as_session}, a copy of session {session_id}"
            kept = f"session {session_id} is unchanged"
        console.print(
            f"\n{where} forked at {outcome.from_checkpoint}{edited}; "
            f"head {outcome.head_checkpoint} ({kept})"
        )
    # On Redis the branch is a service session: the worker takes its answer.
    finish(outcome.result, as_json=as_json, service=settings.redis_url is not None)


@app.command()
def history(
    session_id: Annotated[str, typer.Argument(help="The session to show.")],
    full: Annotated[bool, typer.Option("--full", help="Do not shorten messages.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the messages as JSON.")] = False,
) -> None:
    """Print a session's conversation, per event, per step, per agent, from its checkpoints.

    Sessions are read from AGENTFLOW_REDIS_URL when set, else from `agentflow run`'s
    checkpoints under AGENTFLOW_DATA_DIR.
    """
    configure_logging()
    settings = read_settings()
    try:
        runs, where = asyncio.run(_read_history(settings, session_id))
    except FileNotFoundError as exc:
        raise BadInput(
            f"no checkpoints at {exc.args[0]}: run an event with `agentflow run` first, "
            "or set AGENTFLOW_REDIS_URL to read the worker's sessions"
        ) from None
    if not runs:
        raise BadInput(f"session {session_id!r} has no checkpoints in {where}")
    print_history(runs, full=full, as_json=as_json)


async def _read_history(settings: Settings, session_id: str) -> tuple[list[RunConversation], str]:
    async with open_session_checkpointer(settings) as sessions:
        return await session_history(build_graph(sessions.saver), session_id), sessions.where


@app.command()
def answer(
    session_id: Annotated[str, typer.Argument(help="The session waiting for an answer.")],
    text: Annotated[
        str | None,
        typer.Argument(
            help="The answer in free text, starting with approve, reject or revise.",
            show_default=False,
        ),
    ] = None,
    approve: Approve = False,
    reject: Reject = False,
    revise: Revise = False,
    edit: Edit = None,
    feedback: Feedback = None,
    steps: Steps = None,
    interrupt: InterruptId = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the resumed run and print the result.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --wait: only the result.")] = False,
    timeout: Annotated[
        float, typer.Option(min=0, help="With --wait: seconds to wait for the result.")
    ] = 300.0,
) -> None:
    """Answer a service session that waits for a human: an `agentflow.resume` event to Kafka.

    Decide with --approve, --reject or --revise [--steps S1,S2] (--edit ARGS_JSON for a
    tool approval), with --feedback TEXT; or in free text that starts with one of the
    three (`"reject: manager did not approve"`). --interrupt names the interrupt when more
    than one waits (`agentflow sessions pending` lists them).

    The same as the gateway's POST /sessions/{id}/resume. Exit codes: 2 the session is
    unknown or not waiting for an answer, or the answer names no decision; with --wait,
    as for `run` (0 completed, 1 failed, 3 interrupted again, 4 rejected) and 7 no result
    within --timeout.
    """
    configure_logging()
    decision = read_decision(
        text,
        approve=approve,
        reject=reject,
        revise=revise,
        edit=edit,
        feedback=feedback,
        steps=steps,
        interrupt=interrupt,
    )
    if decision is None:
        raise BadInput(
            "give a decision: --approve, --reject or --revise (with --feedback TEXT), or a "
            'text that starts with one of them ("reject: why")'
        )
    settings = read_settings()
    require_services(settings)
    event = resume_event(session_id, decision, source=CLI_SOURCE)
    try:
        asyncio.run(waiting_session(settings, session_id))
    except UnknownSessionError as exc:
        raise BadInput(str(exc)) from None
    if not wait:
        asyncio.run(produce_event(settings, event))
        console.print(f"sent the answer to session {session_id} (event {event.id})")
        return
    send_and_finish(settings, event, as_json=as_json, timeout_s=timeout)


_PENDING_COLUMNS = ("session", "interrupt", "kind", "since", "deadline", "asks")


@app.command()
def pending(
    session_id: Annotated[
        str | None,
        typer.Argument(help="Only this session's (default: every session's).", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print them as JSON.")] = False,
) -> None:
    """List the interrupts waiting for a human: id, kind, since when, what they ask.

    `agentflow sessions answer SESSION_ID --interrupt ID ...` answers one. Piped, the
    lines are tab-separated. Exit code 2: the session does not exist.
    """
    configure_logging()
    settings = read_settings()
    require_services(settings, kafka=False)
    try:
        found = asyncio.run(pending_interrupts(settings, session_id))
    except UnknownSessionError as exc:
        raise BadInput(str(exc)) from None
    if as_json:
        typer.echo(
            json.dumps([{"session_id": s, **p.model_dump(mode="json")} for s, p in found], indent=2)
        )
        return
    rows = [
        (
            session,
            p.id,
            p.kind,
            f"{p.since:%Y-%m-%d %H:%M:%S}",
            f"{p.deadline:%Y-%m-%d %H:%M:%S}" if p.deadline else "–",
            " ".join(str(p.payload.get("question") or p.payload.get("tool") or "").split()),
        )
        for session, p in found
    ]
    print_table(_PENDING_COLUMNS, rows)
