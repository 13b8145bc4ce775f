"""Graph state: what a session carries from node to node."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.channels.delta import DeltaChannel

from nodes.models import (
    CloudEvent,
    HumanAnswer,
    ReviewDecision,
    SimilarWorkflow,
    Step,
    Usage,
    Workflow,
    WorkflowResult,
)

__all__ = [
    "InputState",
    "OutputState",
    "StepTask",
    "WorkflowState",
    "add_usage",
    "merge_conversations",
    "merge_steps",
    "workflow_of",
]


def merge_steps(current: list[Step] | None, update: list[Step] | None) -> list[Step]:
    """Replace steps by id, keeping the plan's order; new ids are appended."""
    merged = {s.id: s for s in current or []}
    order = [s.id for s in current or []]
    for step in update or []:
        step = Step.model_validate(step)
        if step.id not in merged:
            order.append(step.id)
        merged[step.id] = step
    return [merged[i] for i in order]


def merge_conversations(
    current: dict[str, list[AnyMessage]] | None,
    updates: Sequence[dict[str, list[AnyMessage]]],
) -> dict[str, list[AnyMessage]]:
    """Append each step's new messages to that step's conversation (a batch of updates)."""
    merged = dict(current or {})
    for update in updates:
        for step_id, messages in (update or {}).items():
            merged[step_id] = [*merged.get(step_id, []), *messages]
    return merged


def add_usage(current: Usage | None, update: Usage | None) -> Usage:
    """Sum model usage."""
    return (current or Usage()) + (update or Usage())


class InputState(TypedDict):
    """What a run starts from."""

    event: CloudEvent | dict[str, Any]
    """The CloudEvent that opened the session (a dict is validated by `discover`)."""


class OutputState(TypedDict, total=False):
    """What a run hands back."""

    result: WorkflowResult
    """The session's result, written by `finalize`."""


class WorkflowState(TypedDict, total=False):
    """Everything a session carries between nodes."""

    event: CloudEvent
    """The CloudEvent that opened the session."""
    started_at: datetime
    """When the session's first node ran."""
    similar_workflows: list[SimilarWorkflow]
    """Past workflows found by discovery, best first, with scores."""
    discovery_note: str
    """Why discovery found nothing, when it could not search."""
    intent: str
    """One sentence: what the event asks for."""
    goals: list[str]
    """Outcomes that make the workflow a success."""
    steps: Annotated[list[Step], merge_steps]
    """The plan's steps with their agents, status and output."""
    conversations: Annotated[
        dict[str, list[AnyMessage]], DeltaChannel(merge_conversations, snapshot_frequency=1)
    ]
    """Each step's agent conversation, by step id. The largest part of the state, so only
    the checkpoints of steps that add messages store it; the others point back to those.
    (With rarer snapshots, reading a checkpoint walks back through every run before it.)"""
    review: ReviewDecision
    """The latest review decision."""
    review_rounds: int
    """How many reviews sent the workflow back or asked a human."""
    feedback: Annotated[list[str], lambda a, b: [*(a or []), *(b or [])]]
    """Review and human feedback, oldest first."""
    answers: Annotated[list[HumanAnswer], lambda a, b: [*(a or []), *(b or [])]]
    """The humans' answers to this run's interrupts, oldest first: who decided what."""
    usage: Annotated[Usage, add_usage]
    """Model calls and tokens spent so far."""
    models: Annotated[list[str], lambda a, b: sorted({*(a or []), *(b or [])})]
    """Names of the chat models that answered, for the result's `model` field."""
    result: WorkflowResult
    """The session's result, written by `finalize`."""


class StepTask(TypedDict):
    """What `execute` sends to one `execute_step` task."""

    step: Step
    """The step to run."""
    event: CloudEvent
    """The session's event."""
    intent: str
    """The workflow's intent."""
    feedback: list[str]
    """Review and human feedback so far."""
    inputs: dict[str, str]
    """Outputs of the steps this one depends on, by step id."""
    history: list[AnyMessage]
    """The step's conversation from earlier rounds."""


def workflow_of(state: WorkflowState) -> Workflow:
    """Assemble the `Workflow` view of a state."""
    return Workflow(
        event=state["event"],
        intent=state.get("intent", ""),
        goals=state.get("goals", []),
        steps=state.get("steps", []),
        feedback=state.get("feedback", []),
        examples=state.get("similar_workflows", []),
    )
