"""Test-only crash points: the worker dies (exit 137, as after SIGKILL) right after a step.

`AGENTFLOW_TEST_CRASH_AT=<point>` arms one point; it is read once, when this module is
imported at start-up. Unset (production), `crash_point` is a comparison with None. The
points follow the steps of finishing an event, in order:

- `checkpoint`: the run's final checkpoint is written (the graph run returned);
- `finished`: the event is marked finished with its result, and where its messages go;
- `result`: Kafka acknowledged the result;
- `session_ended`: Kafka acknowledged `session.ended`;
- `published`: the event is marked published;
- `committed`: a commit of the event's offset succeeded.
"""

from __future__ import annotations

import logging
import os
import sys

from service.errors import ConfigError

__all__ = ["CRASH_AT_ENV", "CRASH_POINTS", "armed", "crash_point"]

logger = logging.getLogger(__name__)

CRASH_AT_ENV = "AGENTFLOW_TEST_CRASH_AT"
CRASH_POINTS = ("checkpoint", "finished", "result", "session_ended", "published", "committed")
"""Where a worker can be made to die, in the order an event passes them."""

_ARMED = os.environ.get(CRASH_AT_ENV) or None


def armed() -> str | None:
    """Return the armed crash point, if any.

    Raises:
        ConfigError: the variable names no crash point.
    """
    if _ARMED is not None and _ARMED not in CRASH_POINTS:
        raise ConfigError(
            f"{CRASH_AT_ENV}={_ARMED!r} is no crash point: use one of {', '.join(CRASH_POINTS)}"
        )
    return _ARMED


def crash_point(name: str) -> None:
    """Exit the process at once with 137 when `name` is the armed point."""
    if name == _ARMED:
        logger.warning("test crash point %s reached: exiting with 137", name)
        sys.stderr.flush()
        os._exit(137)
