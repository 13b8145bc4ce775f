"""The errors nodes raise on purpose: one base class, each a subclass of the closest built-in.

Every message names the file, field or node at fault and what to fix, so the CLI, the
worker and the gateway can show it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AgentConfigError",
    "AnswerError",
    "EventValidationError",
    "ModelCallError",
    "ModelConfigError",
    "PlanError",
    "RemoteAgentError",
    "ProtocolError",
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


class AnswerError(WorkflowError, ValueError):
    """A human's answer cannot be taken: it names no decision, or one its interrupt refuses."""


class AgentConfigError(WorkflowError, ValueError):
    """The agents file is missing, malformed, or names something that does not exist."""


class ModelConfigError(WorkflowError, ValueError):
    """A model spec cannot be turned into a chat model."""


class ModelCallError(WorkflowError, RuntimeError):
    """A model call gave no usable answer: the provider failed, or its answer cannot be read.

    The message names the node, the reason and how many attempts the node made, e.g.
    `plan: the provider returned an empty answer (5 attempts)`. `retryable` tells the
    node's retry policy whether another attempt may succeed.
    """

    def __init__(self, node: str, reason: str, attempts: int = 1, retryable: bool = True) -> None:
        """Describe a failed model call of `node` at its `attempts`-th attempt."""
        self.node = node
        self.reason = reason
        self.attempts = attempts
        self.retryable = retryable
        tries = f"{attempts} attempt" + ("" if attempts == 1 else "s")
        super().__init__(f"{node}: {reason} ({tries})")

    def __reduce__(self) -> tuple[type[ModelCallError], tuple[str, str, int, bool]]:
        # Pickled with its fields (the message alone would not rebuild it).
        return type(self), (self.node, self.reason, self.attempts, self.retryable)


class StructuredOutputError(ModelCallError, ValueError):
    """A model answered, but not in the requested structure (worth another attempt)."""


class PlanError(WorkflowError, ValueError):
    """The planner's plan is invalid and could not be repaired."""


class RemoteAgentError(WorkflowError, RuntimeError):
    """A remote agent answered a step's task with a failure, or did not answer in time."""


class ProtocolError(WorkflowError, ValueError):
    """A message of the agents protocol cannot be read; the message says what is wrong.

    It is the reason its record is dead-lettered with.
    """
