"""The gateway's request and response models, and the error answers in the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Self
from urllib.parse import quote

from fastapi.exceptions import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nodes.models import (
    Decision,
    HumanAnswer,
    HumanDecision,
    MultitaskStrategy,
    ResultWorkflow,
    SessionId,
    WorkflowResult,
)
from service.storage.questions import PendingInterrupt
from service.storage.sessions import SessionRecord, SessionStatus
from service.storage.workers import WorkerState

__all__ = [
    "KAFKA_DOWN",
    "REDIS_DOWN",
    "CheckpointSummary",
    "EventAccepted",
    "EventRequest",
    "FieldProblem",
    "Health",
    "Links",
    "Problem",
    "Reachability",
    "ResumeRequest",
    "SessionDetail",
    "SessionHistory",
    "SessionInterrupts",
    "SessionPage",
    "SessionReview",
    "SessionSummary",
    "unprocessable",
]


class FieldProblem(BaseModel):
    """One problem of a request, and the field it is in."""

    field: str = Field(description="Dotted path of the field, e.g. `data` or `source`.")
    reason: str


class Problem(BaseModel):
    """An error answer."""

    detail: str = Field(description="What went wrong, in one sentence.")
    errors: list[FieldProblem] = Field(default_factory=list)


def unprocessable(detail: str, errors: list[FieldProblem]) -> HTTPException:
    """Return a 422 whose detail names each field and what is wrong with it."""
    text = "; ".join(f"field '{e.field}': {e.reason}" for e in errors)
    return HTTPException(422, {"detail": f"{detail}: {text}" if text else detail, "errors": errors})


REDIS_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "Redis is unreachable."}
}
KAFKA_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "Kafka did not acknowledge the event."}
}


class EventRequest(BaseModel):
    """A short form of an event; the gateway wraps it into a CloudEvent."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, description="Event type, e.g. `claim.submitted`.")
    data: Any = Field(default=None, description="The event payload.")
    subject: str | None = Field(default=None, description="What the event is about.")
    session_id: SessionId | None = Field(
        default=None,
        description="Continue this session instead of opening one: 1-200 of `A-Za-z0-9._:@-`.",
    )
    multitask: MultitaskStrategy | None = Field(
        default=None,
        description=(
            "What the event does to its session when the session is busy (a run going, or "
            "waiting for a human): `reject`, `enqueue`, `interrupt` or `rollback`; default "
            "the worker's `AGENTFLOW_MULTITASK`."
        ),
    )


class Links(BaseModel):
    """Where to follow an accepted event."""

    self: str = Field(description="The session.")
    stream: str = Field(description="The session's transitions as Server-Sent Events.")
    result: str = Field(description="The event's result, once there is one.")


class EventAccepted(BaseModel):
    """An event that Kafka acknowledged; the worker will run it."""

    session_id: str
    event_id: str
    links: Links

    @classmethod
    def of(cls, session_id: str, event_id: str) -> EventAccepted:
        """Return the answer for an accepted event, with the links to follow it."""
        base = f"/sessions/{quote(session_id, safe='')}"
        return cls(
            session_id=session_id,
            event_id=event_id,
            links=Links(
                self=base,
                stream=f"{base}/stream",
                result=f"{base}/result?event_id={quote(event_id, safe='')}",
            ),
        )


class ResumeRequest(BaseModel):
    """A human's answer to a session's interrupt: a decision, or free text that starts with one.

    `{"decision": "reject", "feedback": "manager did not approve"}`, or
    `{"answer": "reject: manager did not approve"}`.
    """

    model_config = ConfigDict(extra="forbid")

    interrupt_id: str | None = Field(
        default=None,
        min_length=1,
        description="The interrupt answered; may be left out when only one is pending.",
    )
    decision: Decision | None = Field(
        default=None, description="approve, reject, revise (a review) or edit (a tool approval)."
    )
    feedback: str = Field(default="", description="Why, or what to change.")
    steps: list[str] = Field(
        default_factory=list, description="With revise: the steps to run again (none: all)."
    )
    args: dict[str, Any] | None = Field(
        default=None, description="With edit: the tool call's new arguments."
    )
    answer: str | None = Field(
        default=None,
        min_length=1,
        description="Instead of `decision`: free text that starts with approve, reject or "
        "revise, e.g. `reject: manager did not approve`.",
    )

    @model_validator(mode="after")
    def _one_way_to_decide(self) -> Self:
        if (self.decision is None) == (self.answer is None):
            raise ValueError("give either decision or answer (free text), exactly one")
        if self.answer is not None and (self.feedback or self.steps or self.args is not None):
            raise ValueError("an answer in free text takes no feedback, steps or args")
        return self

    def read(self) -> HumanDecision:
        """The decision this request makes.

        Raises:
            AnswerError: its free text names no decision.
        """
        return HumanDecision.read(self.model_dump(exclude_none=True, exclude_defaults=True))


class SessionInterrupts(BaseModel):
    """The interrupts a session waits on a human for, oldest first."""

    session_id: str
    interrupts: list[PendingInterrupt]


class SessionSummary(BaseModel):
    """A session as listed."""

    session_id: str
    status: SessionStatus
    current_node: str | None = None
    event_type: str | None = None
    subject: str | None = None
    created_at: datetime
    updated_at: datetime
    question: str | None = None

    @classmethod
    def of(cls, record: SessionRecord) -> SessionSummary:
        """Return the listed fields of a session's record."""
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


class SessionPage(BaseModel):
    """One page of sessions, newest first."""

    sessions: list[SessionSummary]
    total: int = Field(description="Sessions with this status (all sessions without a filter).")
    limit: int
    offset: int


class SessionReview(BaseModel):
    """The latest review of a session."""

    verdict: str | None = None
    feedback: str = ""
    question: str | None = None


class SessionDetail(SessionSummary):
    """A session: where it is, its workflow, its review and its result."""

    event_ids: list[str] = Field(default_factory=list)
    next: list[str] = Field(default_factory=list, description="Nodes that run next.")
    workflow: ResultWorkflow = Field(default_factory=ResultWorkflow)
    review: SessionReview = Field(default_factory=SessionReview)
    answers: list[HumanAnswer] = Field(
        default_factory=list, description="The humans' answers, oldest first: who decided what."
    )
    result: WorkflowResult | None = None


class CheckpointSummary(BaseModel):
    """One checkpoint of a session's thread."""

    checkpoint_id: str
    parent_checkpoint_id: str | None = None
    created_at: datetime | None = None
    step: int | None = Field(default=None, description="The superstep that wrote it.")
    source: str | None = Field(default=None, description="input, loop, update or fork.")
    next: list[str] = Field(default_factory=list, description="Nodes due to run after it.")
    tasks: list[str] = Field(default_factory=list, description="Tasks pending at it.")
    interrupts: list[Any] = Field(default_factory=list)
    steps: dict[str, str] = Field(default_factory=dict, description="Step id to status.")


class SessionHistory(BaseModel):
    """A session's checkpoints, newest first."""

    session_id: str
    checkpoints: list[CheckpointSummary]


class Reachability(BaseModel):
    """Whether one server answered."""

    ok: bool
    error: str | None = None


class Health(BaseModel):
    """Whether the gateway can reach Kafka and Redis, and whether the workers take events."""

    status: Literal["ok", "unavailable", "degraded"]
    kafka: Reachability
    redis: Reachability
    workers: list[WorkerState] = Field(
        default_factory=list,
        description=(
            "The workers that reported lately; `degraded` ones take no new events "
            "(Redis or Kafka away), since `since`."
        ),
    )
