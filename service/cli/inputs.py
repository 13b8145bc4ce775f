"""What commands do before they call the library: logging, settings, event files."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from nodes.errors import EventValidationError
from nodes.models import CloudEvent, EventLimits
from service.bootstrap import check_startup
from service.config import Settings, load_settings
from service.errors import ConfigError

__all__ = [
    "BadInput",
    "configure_logging",
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
