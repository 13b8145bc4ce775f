"""Domain types: events, workflows, steps, reviews and results."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from nodes.errors import EventValidationError

__all__ = [
    "AgentChoice",
    "AssignmentDraft",
    "BasedOn",
    "CloudEvent",
    "PlanDraft",
    "ReuseMode",
    "ReviewDecision",
    "SessionNote",
    "SimilarWorkflow",
    "Step",
    "StepDraft",
    "StepStatus",
    "Usage",
    "Workflow",
    "WorkflowResult",
    "based_on",
    "format_validation_error",
    "subject_namespace",
    "utcnow",
]

StepStatus = Literal["pending", "running", "done", "failed", "skipped"]
ReuseMode = Literal["adapt", "direct"]
RESUME_EVENT_TYPE = "agentflow.resume"
CANCEL_EVENT_TYPE = "agentflow.cancel"


def utcnow() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def format_validation_error(exc: ValidationError, what: str = "event") -> str:
    """Turn a pydantic error into one sentence per problem, naming each field."""
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        problems.append(f"field '{field}': {err['msg']}")
    return f"invalid {what}: " + "; ".join(problems)


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 event in structured-mode JSON, with the `sessionid` extension."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"] = Field(description="CloudEvents spec version; must be 1.0.")
    id: str = Field(min_length=1, description="Event id, unique per source.")
    source: str = Field(min_length=1, description="URI-reference naming the event's producer.")
    type: str = Field(min_length=1, description="Event type, e.g. `claim.submitted`.")
    subject: str | None = Field(default=None, description="What the event is about.")
    time: datetime | None = Field(default=None, description="When the event happened.")
    datacontenttype: str | None = Field(default="application/json")
    data: Any = Field(default=None, description="The event payload.")
    sessionid: str | None = Field(
        default=None, description="Extension: continue this session instead of opening one."
    )

    @field_validator("sessionid")
    @classmethod
    def _session_id_is_safe(cls, value: str | None) -> str | None:
        if value is not None and (not value or len(value) > 200 or any(c.isspace() for c in value)):
            raise ValueError("must be 1-200 characters without whitespace")
        return value

    @classmethod
    def parse(cls, raw: bytes | str | dict[str, Any]) -> CloudEvent:
        """Parse and validate an event from JSON bytes, text or a dict.

        Raises:
            EventValidationError: the input is not JSON or not a valid CloudEvent;
                the message names the field and the problem.
        """
        try:
            if isinstance(raw, dict):
                return cls.model_validate(raw)
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                msg = exc.errors()[0]["msg"]
                raise EventValidationError(f"event is not valid JSON: {msg}") from None
            if any(e["type"] == "model_type" for e in exc.errors()):
                raise EventValidationError("event must be a JSON object") from None
            raise EventValidationError(format_validation_error(exc)) from None

    @classmethod
    def wrap(
        cls,
        type: str,
        data: Any = None,
        *,
        subject: str | None = None,
        session_id: str | None = None,
        source: str = "agentflow",
    ) -> CloudEvent:
        """Build a new event with a fresh id and the current time."""
        return cls(
            specversion="1.0",
            id=str(uuid.uuid4()),
            source=source,
            type=type,
            subject=subject,
            time=utcnow(),
            data=data,
            sessionid=session_id,
        )

    @property
    def is_resume(self) -> bool:
        """Whether this event answers an interrupted session."""
        return self.type == RESUME_EVENT_TYPE

    @property
    def is_cancel(self) -> bool:
        """Whether this event cancels a session."""
        return self.type == CANCEL_EVENT_TYPE

    def data_summary(self, limit: int = 400) -> str:
        """Return a short, single-line text rendering of the payload."""
        text = self.model_dump_json(include={"data"})[len('{"data":') : -1]
        return text if len(text) <= limit else text[: limit - 1] + "…"


class StepDraft(BaseModel):
    """One step as the planner proposes it."""

    id: str = Field(description="Short unique id, e.g. `s1`.")
    title: str = Field(description="Imperative title of the step.")
    description: str = Field(description="What the step must achieve and produce.")
    depends_on: list[str] = Field(
        default_factory=list, description="Ids of steps that must finish first."
    )


class StepLike(Protocol):
    """What `PlanDraft.of` reads of a step: a `Step`, a library or a template step."""

    @property
    def id(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def depends_on(self) -> list[str]: ...


class PlanDraft(BaseModel):
    """The planner's structured answer: intent, goals and steps."""

    intent: str = Field(description="One sentence: what the event asks for.")
    goals: list[str] = Field(description="Outcomes that make the workflow a success.")
    steps: list[StepDraft] = Field(description="Steps; dependencies must form no cycle.")

    @classmethod
    def of(cls, intent: str, goals: list[str], steps: Sequence[StepLike]) -> PlanDraft:
        """Restate a known workflow's steps as a plan, so `check_plan` can judge it."""
        return cls(
            intent=intent,
            goals=goals,
            steps=[
                StepDraft(
                    id=s.id, title=s.title, description=s.description, depends_on=s.depends_on
                )
                for s in steps
            ],
        )


class AgentChoice(BaseModel):
    """Agents chosen for one step."""

    step_id: str = Field(description="Id of the step.")
    agents: list[str] = Field(
        description="Names of one or more agents from the catalogue; several collaborate."
    )
    reason: str = Field(default="", description="Why these agents fit the step.")


class AssignmentDraft(BaseModel):
    """The assigner's structured answer: agents for every step."""

    assignments: list[AgentChoice]


class ReviewDecision(BaseModel):
    """The reviewer's verdict on the executed workflow."""

    verdict: Literal["approve", "revise", "escalate"] = Field(
        description="approve the result, revise some steps, or escalate to a human."
    )
    feedback: str = Field(default="", description="What is good or what must change.")
    steps_to_redo: list[str] = Field(
        default_factory=list, description="With revise: ids of the steps to run again."
    )
    question: str = Field(default="", description="With escalate: the question for the human.")


class Step(BaseModel):
    """One step of a workflow, with its agents and outcome."""

    id: str
    title: str
    description: str = ""
    depends_on: list[str] = Field(default_factory=list)
    agents: list[str] = Field(default_factory=list)
    status: StepStatus = "pending"
    output: str = ""
    attempts: int = 0
    duration_ms: int | None = None
    error: str | None = None


class SimilarWorkflow(BaseModel):
    """A workflow kept in the library; found by discovery, with its similarity score."""

    id: str
    score: float = Field(default=0.0, description="Similarity to the event, in [0, 1].")
    event_type: str
    intent: str
    goals: list[str] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    summary: str = Field(default="", description="The outcome: what the workflow produced.")
    data_summary: str = Field(default="", description="A short rendering of the event's data.")
    subject: str | None = Field(default=None, description="The subject of the event it handled.")
    verdict: str = Field(default="approve", description="`approve`, or `template` (by hand).")
    quality: float = Field(default=1.0, description="In [0, 1]; see `nodes.finalize.quality`.")
    source: Literal["session", "template"] = "session"
    created_at: datetime | None = None
    last_used: datetime | None = Field(default=None, description="When a run last built on it.")
    reuse_count: int = Field(default=0, description="How many runs were based on it.")
    reuse: ReuseMode | None = Field(
        default=None, description="Set by discovery on the workflow a run is based on."
    )


class BasedOn(TypedDict):
    """Which known workflow a run was based on, and how.

    A plain mapping rather than a model: checkpoints revive it without an allowlist entry.
    """

    id: str
    score: float
    mode: ReuseMode


def based_on(similar: list[SimilarWorkflow] | None) -> BasedOn | None:
    """Return the basis discovery chose among the similar workflows, if any."""
    for workflow in similar or []:
        if workflow.reuse is not None:
            return BasedOn(id=workflow.id, score=workflow.score, mode=workflow.reuse)
    return None


class SessionNote(BaseModel):
    """What one finished run did for a subject, kept in the long-term store."""

    session_id: str
    event_id: str
    event_type: str
    status: str
    intent: str = ""
    summary: str = ""
    finished_at: datetime


def subject_namespace(subject: str) -> tuple[str, ...]:
    """Return the long-term store namespace of a subject's session notes.

    The label is the subject's SHA-256, not the subject: the Redis store finds a
    namespace by a prefix search on a case-folded text field, where the subject itself
    would also match other subjects (`Claim-1` finds `claim-1` and `claim-10`) and
    control characters break the query. Any subject, byte for byte, gets its own label.
    """
    digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()
    return ("agentflow", "subjects", digest)


class Usage(BaseModel):
    """Model usage of a session."""

    llm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_calls: int = 0
    by_node: dict[str, int] = Field(default_factory=dict)

    def __add__(self, other: Usage) -> Usage:
        by_node = dict(self.by_node)
        for node, calls in other.by_node.items():
            by_node[node] = by_node.get(node, 0) + calls
        return Usage(
            llm_calls=self.llm_calls + other.llm_calls,
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_calls=self.cached_calls + other.cached_calls,
            by_node=by_node,
        )


class Workflow(BaseModel):
    """An event with its intent, goals, steps and review feedback."""

    event: CloudEvent
    intent: str = ""
    goals: list[str] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    feedback: list[str] = Field(default_factory=list)
    examples: list[SimilarWorkflow] = Field(default_factory=list)
    verdict: str | None = Field(default=None, description="The review's last verdict.")
    quality: float | None = Field(default=None, description="In [0, 1], set by finalize.")

    @classmethod
    def create_from_context(
        cls, event: CloudEvent, similar_workflows: list[SimilarWorkflow]
    ) -> Workflow:
        """Open a workflow for an event, with similar past workflows as examples."""
        return cls(event=event, examples=list(similar_workflows))

    def step(self, step_id: str) -> Step:
        """Return the step with this id.

        Raises:
            KeyError: no step has this id.
        """
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)


class ResultWorkflow(BaseModel):
    """The part of a workflow a result reports."""

    intent: str = ""
    goals: list[str] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)


class ResultReview(BaseModel):
    """The final review of a result."""

    verdict: str | None = None
    feedback: str = ""


class WorkflowResult(BaseModel):
    """What every entry point returns and prints for one event."""

    session_id: str
    event_id: str
    status: Literal["completed", "failed", "interrupted"]
    workflow: ResultWorkflow = Field(default_factory=ResultWorkflow)
    review: ResultReview = Field(default_factory=ResultReview)
    summary: str = ""
    usage: Usage = Field(default_factory=Usage)
    model: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    question: str | None = Field(
        default=None, description="With status interrupted: what the reviewer asks a human."
    )
    based_on: BasedOn | None = Field(
        default=None, description="The known workflow this run reused, its score and the mode."
    )
