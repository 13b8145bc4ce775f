"""`agentflow run` and `agentflow graph`: the graph in this process, no broker."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from pathlib import Path
from typing import Annotated

import typer

from nodes.errors import AnswerError
from nodes.models import session_id_problem
from service.cli.console import console, err_console, finish
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
    read_event,
    read_settings,
)
from service.errors import ReplayError, UnknownSessionError
from service.observe.drawing import FORMATS, render_graph
from service.runtime.embedded import run_embedded
from service.runtime.replay import load_session_path

__all__ = ["graph", "run"]


def run(
    event_file: Annotated[Path | None, typer.Argument(help="CloudEvent JSON file.")] = None,
    memory: Annotated[bool, typer.Option("--memory", help="Keep checkpoints in memory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the result JSON.")] = False,
    resume: Annotated[str | None, typer.Option(help="Continue this interrupted session.")] = None,
    answer: Annotated[
        str | None,
        typer.Option(help="The answer in free text, starting with approve, reject or revise."),
    ] = None,
    approve: Approve = False,
    reject: Reject = False,
    revise: Revise = False,
    edit: Edit = None,
    feedback: Feedback = None,
    steps: Steps = None,
    interrupt: InterruptId = None,
    session: Annotated[str | None, typer.Option(help="Session id for a new run.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Run one event in this process, printing each transition, then the result.

    With --resume SESSION_ID, answer the session's question instead: --approve, --reject,
    --revise [--steps S1,S2] (or --answer "reject: why"), with --feedback TEXT.

    Exit codes: 0 completed, 1 failed, 2 bad input, 3 interrupted, 4 rejected.
    """
    configure_logging(logging.INFO if verbose else logging.WARNING)
    decision = read_decision(
        answer,
        approve=approve,
        reject=reject,
        revise=revise,
        edit=edit,
        feedback=feedback,
        steps=steps,
        interrupt=interrupt,
    )
    if resume is None and event_file is None:
        raise BadInput("give an EVENT_FILE to run, or --resume SESSION_ID --approve|--reject|...")
    if resume is None and decision is not None:
        raise BadInput("a decision answers a session: give --resume SESSION_ID with it")
    if resume is not None and decision is None:
        raise BadInput(
            "--resume needs a decision: --approve, --reject or --revise (with --feedback "
            'TEXT), or --answer "reject: why"'
        )
    if resume is not None and memory:
        raise BadInput("--resume needs the on-disk checkpoints; drop --memory")
    settings = read_settings(check=True)
    limits = settings.event_limits()
    event = read_event(event_file, limits) if event_file is not None and resume is None else None
    if session is not None and (problem := session_id_problem(session)) is not None:
        raise BadInput(f"--session {session!r}: {problem}")
    session_id = resume or session or (event.sessionid if event else None) or str(uuid.uuid4())
    try:
        result = asyncio.run(
            run_embedded(
                settings,
                event=event,
                session_id=session_id,
                decision=decision,
                memory=memory,
                console=None if as_json else console,
            )
        )
    except UnknownSessionError as exc:
        raise BadInput(
            f"cannot resume: {exc} (looked in `agentflow run`'s checkpoints under "
            f"{settings.data_dir}; a session of the service is answered with "
            "`agentflow sessions answer`)"
        ) from None
    except AnswerError as exc:
        raise BadInput(f"cannot resume: {exc}") from None
    finish(result, as_json=as_json, service=False)


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
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}; use {', '.join(FORMATS)}")
    if fmt == "png" and output is None and sys.stdout.isatty():
        raise BadInput("png is binary: give --output FILE (or pipe stdout to a file)")
    path = None
    if session is not None:
        try:
            path = asyncio.run(load_session_path(read_settings(), session))
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
