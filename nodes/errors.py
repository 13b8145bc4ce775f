"""The errors nodes raise on purpose: one base class, each a subclass of the closest built-in.

Every message names the file, field or node at fault and what to fix, so the CLI, the
worker and the gateway can show it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AgentConfigError",
    "EventValidationError",
    "ModelConfigError",
    "PlanError",
    "StructuredOutputError",
    "WorkflowError",
]


class WorkflowError(Exception):
    """Base of the errors the workflow's nodes and their inputs raise on purpose."""


class EventValidationError(WorkflowError, ValueError):
    """An event is not a valid CloudEvents 1.0 structured-mode JSON object."""

    def __init__(self, message: str, problems: Sequence[tuple[str, str]] = ()) -> None:
        """Say what is wrong.

        Args:
            message: the whole story, naming each field.
            problems: `(field, reason)` pairs, the field a dotted path or `(body)`.
        """
        super().__init__(message)
        self.problems = list(problems)


class AgentConfigError(WorkflowError, ValueError):
    """The agents file is missing, malformed, or names something that does not exist."""


class ModelConfigError(WorkflowError, ValueError):
    """A model spec cannot be turned into a chat model."""


class StructuredOutputError(WorkflowError, ValueError):
    """A model answered, but not in the requested structure."""


class PlanError(WorkflowError, ValueError):
    """The planner's plan is invalid and could not be repaired."""
