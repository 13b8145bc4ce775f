"""What commands do before they call the library: logging, settings, event files."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from nodes.errors import AnswerError, EventValidationError
from nodes.models import CloudEvent, EventLimits, HumanDecision
from service.bootstrap import check_startup
from service.config import Settings, load_settings
from service.errors import ConfigError

__all__ = [
    "Approve",
    "BadInput",
    "Edit",
    "Feedback",
    "InterruptId",
    "Reject",
    "Revise",
    "Steps",
    "configure_logging",
    "read_decision",
    "read_event",
    "read_settings",
]

AGENTFLOW_LOGGERS = ("service", "nodes", "graphs")
"""The loggers of agentflow's own packages: DEBUG with `agentflow worker --verbose`."""
QUIET_LOGGERS = ("aiokafka",)
"""Libraries whose INFO lines are start-up noise: aiokafka's group joins and partition
assignments."""


class BadInput(Exception):
    """A user-facing problem: printed as one paragraph, exit code 2."""


def configure_logging(level: int = logging.WARNING, *, debug: bool = False) -> None:
    """Log to stderr at `level`; `debug` turns agentflow's own loggers to DEBUG."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    if debug:
        for name in AGENTFLOW_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)


def read_settings(*, check: bool = False) -> Settings:
    """Read the settings; with `check`, also what running the graph here needs.

    Commands that only talk to a running service (send, watch, health, library,
    sessions history) do not check: they never read the agents file.

    Raises:
        BadInput: a setting cannot be used.
    """
    try:
        settings = load_settings()
        if check:
            check_startup(settings)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    return settings


def read_event(path: Path, limits: EventLimits | None = None) -> CloudEvent:
    """Read and validate an event file, within the limits (`Settings.event_limits`).

    Raises:
        BadInput: the file is missing or the event is invalid.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read event file {path}: {exc.strerror}") from None
    try:
        return CloudEvent.parse(raw, limits)
    except EventValidationError as exc:
        raise BadInput(f"{path}: {exc}") from None


Approve = Annotated[bool, typer.Option("--approve", help="Decide: approve.")]
Reject = Annotated[bool, typer.Option("--reject", help="Decide: reject (the run ends rejected).")]
Revise = Annotated[
    bool, typer.Option("--revise", help="Decide: run steps again (--steps, else all).")
]
Edit = Annotated[
    str | None,
    typer.Option(
        "--edit", metavar="ARGS_JSON", help="Decide on a tool approval: run it with these args."
    ),
]
Feedback = Annotated[
    str | None, typer.Option("--feedback", metavar="TEXT", help="Why, or what to change.")
]
Steps = Annotated[
    str | None, typer.Option("--steps", metavar="S1,S2", help="With --revise: the steps.")
]
InterruptId = Annotated[
    str | None,
    typer.Option(
        "--interrupt", metavar="ID", help="The interrupt answered (when more than one waits)."
    ),
]


def read_decision(
    text: str | None,
    *,
    approve: bool = False,
    reject: bool = False,
    revise: bool = False,
    edit: str | None = None,
    feedback: str | None = None,
    steps: str | None = None,
    interrupt: str | None = None,
) -> HumanDecision | None:
    """Read the decision of the answering options; None when none is given.

    Exactly one of free text (which must start with approve, reject or revise) and the
    flags `--approve`, `--reject`, `--revise`, `--edit ARGS_JSON` decides.

    Raises:
        BadInput: more than one decides, an option goes with another decision, the
            text names no decision, or ARGS_JSON is not a JSON object.
    """
    chosen = [
        name
        for name, given in (
            ("--approve", approve),
            ("--reject", reject),
            ("--revise", revise),
            ("--edit", edit is not None),
            ("the answer text", text is not None),
        )
        if given
    ]
    if not chosen:
        if feedback is not None or steps is not None or interrupt is not None:
            raise BadInput("give a decision: --approve, --reject, --revise or --edit ARGS_JSON")
        return None
    if len(chosen) > 1:
        raise BadInput(f"give one decision, not {' and '.join(chosen)}")
    try:
        if text is not None:
            if feedback is not None or steps is not None:
                raise BadInput(
                    "an answer text carries its own feedback: use --feedback and --steps "
                    "with --approve, --reject or --revise instead"
                )
            return HumanDecision.read({"answer": text, "interrupt_id": interrupt})
        args = None
        if edit is not None:
            try:
                args = json.loads(edit)
            except json.JSONDecodeError as exc:
                raise BadInput(f"--edit ARGS_JSON is not valid JSON: {exc}") from None
        return HumanDecision.read(
            {
                "interrupt_id": interrupt,
                "decision": chosen[0].removeprefix("--"),
                "feedback": feedback or "",
                "steps": [s.strip() for s in (steps or "").split(",") if s.strip()],
                "args": args,
            }
        )
    except AnswerError as exc:
        raise BadInput(str(exc)) from None
