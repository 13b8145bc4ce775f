"""The transition message: one thing that happened in a session, as stored and sent."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from nodes.models import utcnow

__all__ = [
    "ENDED",
    "ENDED_BY_STATUS",
    "ENDED_STATUSES",
    "TERMINAL",
    "Transition",
    "TransitionType",
]

TransitionType = Literal[
    "session.started",
    "node.started",
    "node.completed",
    "node.failed",
    "step.started",
    "step.completed",
    "agent.message",
    "session.interrupted",
    "session.answered",
    "session.waiting",
    "session.completed",
    "session.failed",
    "session.rejected",
    "session.superseded",
    "session.rolled_back",
    "event.refused",
    "event.parked",
]
TERMINAL: frozenset[str] = frozenset(
    {
        "session.interrupted",
        "session.completed",
        "session.failed",
        "session.rejected",
        "session.superseded",
        "session.rolled_back",
        "event.refused",
    }
)
"""Transitions that end an event's run (an interrupted session goes on when answered; a
superseded or rolled back run gives way to a newer event; a refused one never ran)."""
ENDED: frozenset[str] = frozenset({"session.completed", "session.failed", "session.rejected"})
"""Transitions that end a session's run for good."""
ENDED_BY_STATUS: dict[str, TransitionType] = {
    "completed": "session.completed",
    "failed": "session.failed",
    "rejected": "session.rejected",
}
"""The transition that ends a run of each final status."""
ENDED_STATUSES: frozenset[str] = frozenset(ENDED_BY_STATUS)
"""The statuses of a session that ended for good (not waiting, not given way)."""


class Transition(BaseModel):
    """One thing that happened in a session."""

    session_id: str
    seq: int = 0
    ts: datetime = Field(default_factory=utcnow)
    type: TransitionType
    node: str | None = None
    step_id: str | None = None
    task_id: str | None = None
    """The LangGraph task a `node.*` transition is about; it runs again under the same id."""
    agent: str | None = None
    duration_ms: int | None = None
    data: dict[str, Any] | None = None
    epoch: int | None = Field(default=None, exclude=True)
    """The fencing epoch of the run that emitted it (not sent): a newer run's refuses it."""

    @property
    def terminal(self) -> bool:
        """Whether the session stops after this transition (until resumed)."""
        return self.type in TERMINAL
