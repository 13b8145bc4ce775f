"""Domain types: events, workflows, steps, reviews and results."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import (
    Annotated,
    Any,
    Literal,
    Protocol,
    Self,  # pydantic needs TypedDict on Python < 3.12
    cast,
)

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from typing_extensions import TypedDict

from nodes.errors import AnswerError, EventValidationError

__all__ = [
    "AgentChoice",
    "AgentWait",
    "AnswerSource",
    "ApprovedCall",
    "AssignmentDraft",
    "BasedOn",
    "CloudEvent",
    "CLI_SOURCE",
    "CloudEventAttributes",
    "DECISIONS",
    "Decision",
    "EventLimits",
    "MULTITASK_STRATEGIES",
    "MultitaskStrategy",
    "PlanDraft",
    "ResultStatus",
    "ReuseMode",
    "ReviewDecision",
    "SessionId",
    "SessionNote",
    "SimilarWorkflow",
    "Step",
    "StepDraft",
    "StepStatus",
    "Usage",
    "Workflow",
    "WorkflowResult",
    "based_on",
    "check_session_id",
    "derived_session_id",
    "exceeds_json_depth",
    "GATEWAY_SOURCE",
    "answer_origin",
    "format_validation_error",
    "HumanAnswer",
    "HumanDecision",
    "InterruptKind",
    "session_id_problem",
    "subject_namespace",
    "utcnow",
]

StepStatus = Literal["pending", "running", "done", "failed", "skipped"]
ReuseMode = Literal["adapt", "direct"]
RESUME_EVENT_TYPE = "agentflow.resume"
MultitaskStrategy = Literal["reject", "enqueue", "interrupt", "rollback"]
"""What a new event does to a session that is busy (running, or waiting for a human)."""
MULTITASK_STRATEGIES: tuple[MultitaskStrategy, ...] = ("reject", "enqueue", "interrupt", "rollback")
ResultStatus = Literal[
    "completed",
    "failed",
    "rejected",
    "interrupted",
    "refused",
    "superseded",
    "rolled_back",
    "waiting",
]
"""How an event's run ended. `rejected`: a human rejected the workflow when asked.
`refused`, `superseded` and `rolled_back` are a double text's doing: the event was
refused, or its run was stopped by a newer event. `waiting` is never published: the
run waits for remote agents, and the event's result comes when a later run of it
(resumed by their replies) reaches one of the other ends."""
CANCEL_EVENT_TYPE = "agentflow.cancel"
GATEWAY_SOURCE = "agentflow/gateway"
"""The `source` of the command events the gateway sends."""
CLI_SOURCE = "agentflow/cli"
"""The `source` of the command events the CLI sends."""


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


SESSION_ID_RULE = "1 to 200 characters of A-Z a-z 0-9 . _ : @ -"
"""The one rule for session ids, wherever they come from: safe in Redis keys, URLs, topic keys."""
_SESSION_ID = re.compile(r"[A-Za-z0-9._:@-]{1,200}")
_NOT_SESSION_ID_CHAR = re.compile(r"[^A-Za-z0-9._:@-]")
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def session_id_problem(value: str) -> str | None:
    """Return why `value` breaks the session-id rule, or None when it keeps it."""
    if _SESSION_ID.fullmatch(value):
        return None
    if not value or len(value) > 200:
        return f"must be {SESSION_ID_RULE}, not {len(value)} characters"
    bad = _NOT_SESSION_ID_CHAR.search(value)
    assert bad is not None
    return f"must be {SESSION_ID_RULE}; {bad.group()!r} (at {bad.start()}) is not one of them"


def check_session_id(value: str) -> str:
    """Return `value` if it keeps the session-id rule.

    Raises:
        ValueError: it does not; the message says what the rule is.
    """
    if (problem := session_id_problem(value)) is not None:
        raise ValueError(problem)
    return value


SessionId = Annotated[
    str,
    AfterValidator(check_session_id),
    Field(json_schema_extra={"pattern": "^[A-Za-z0-9._:@-]{1,200}$"}),
]
"""A session id: 1 to 200 characters of `A-Z a-z 0-9 . _ : @ -`."""


def derived_session_id(event_id: str) -> str:
    """Return the session of an event without a session: `session-{id}`.

    When that would break the session-id rule (an id with other characters, or a long
    one), the session is `session-` and the first 32 hex digits of the id's SHA-256.
    """
    candidate = f"session-{event_id}"
    if session_id_problem(candidate) is None:
        return candidate
    return "session-" + hashlib.sha256(event_id.encode()).hexdigest()[:32]


@dataclass(frozen=True, kw_only=True)
class EventLimits:
    """How deep and how long what an incoming event holds may be (`CloudEvent.parse`)."""

    max_json_depth: int = 64
    """JSON nesting; the event object itself is level 1."""
    max_id_bytes: int = 256
    """Length of the event id, in bytes of UTF-8."""


_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)  # possessive: linear
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_OPENING = frozenset(b"[{")


def exceeds_json_depth(document: bytes | str | Any, limit: int) -> bool:
    """Whether JSON text, or a value parsed from JSON, nests deeper than `limit` levels.

    The outermost object or array is level 1. Neither form recurses, so no depth is too
    deep to measure: text is scanned (before any parser sees it), values are walked.
    """
    if isinstance(document, str):
        document = document.encode(errors="surrogatepass")
    if isinstance(document, bytes | bytearray):
        brackets = _JSON_STRING.sub(b"", document).translate(None, _NOT_BRACKET)
        if brackets.count(b"[") + brackets.count(b"{") <= limit:
            return False
        depth = 0
        for byte in brackets:
            depth += 1 if byte in _OPENING else -1
            if depth > limit:
                return True
        return False
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


class CloudEventAttributes(BaseModel):
    """The context attributes of a CloudEvents 1.0 event in structured-mode JSON.

    Other attributes (extensions) are kept as they come.
    """

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"] = Field(description="CloudEvents spec version; must be 1.0.")
    id: str = Field(min_length=1, description="Event id, unique per source.")
    source: str = Field(min_length=1, description="URI-reference naming the event's producer.")
    type: str = Field(min_length=1, description="Event type, e.g. `claim.submitted`.")
    subject: str | None = Field(default=None, description="What the event is about.")
    time: datetime | None = Field(default=None, description="When the event happened.")
    datacontenttype: str | None = Field(default="application/json")

    @field_validator("id")
    @classmethod
    def _id_has_no_control_characters(cls, value: str) -> str:
        if bad := _CONTROL_CHAR.search(value):
            raise ValueError(
                f"must not contain control characters ({bad.group()!r} at {bad.start()})"
            )
        return value


class CloudEvent(CloudEventAttributes):
    """A CloudEvents 1.0 event in structured-mode JSON, with the `sessionid` extension."""

    data: Any = Field(default=None, description="The event payload.")
    sessionid: SessionId | None = Field(
        default=None, description="Extension: continue this session instead of opening one."
    )
    multitask: MultitaskStrategy | None = Field(
        default=None,
        description=(
            "Extension: what this event does to its session when the session is busy: "
            "`reject` it, `enqueue` it (the default, `AGENTFLOW_MULTITASK`), `interrupt` "
            "the running run, or `rollback` the running run."
        ),
    )

    @classmethod
    def parse(
        cls, raw: bytes | str | dict[str, Any], limits: EventLimits | None = None
    ) -> CloudEvent:
        """Parse and validate an event from JSON bytes, text or a dict.

        Args:
            raw: the event.
            limits: how deep its JSON and how long its id may be; the defaults without.

        Raises:
            EventValidationError: the input is not JSON or not a valid CloudEvent;
                the message names the field and the problem, `problems` lists them.
        """
        limits = limits or EventLimits()
        if exceeds_json_depth(raw, limits.max_json_depth):
            reason = f"nests deeper than AGENTFLOW_MAX_JSON_DEPTH ({limits.max_json_depth} levels)"
            raise EventValidationError(f"event {reason}", [("(body)", reason)])
        try:
            if isinstance(raw, dict):
                event = cls.model_validate(raw)
            else:
                event = cls.model_validate_json(raw)
        except ValidationError as exc:
            errors = exc.errors()
            if any(e["type"] == "json_invalid" for e in errors):
                reason = f"not valid JSON: {errors[0]['msg']}"
                raise EventValidationError(f"event is {reason}", [("(body)", reason)]) from None
            if any(e["type"] == "model_type" for e in errors):
                reason = "must be a JSON object"
                raise EventValidationError(f"event {reason}", [("(body)", reason)]) from None
            problems = [(".".join(str(p) for p in e["loc"]) or "(body)", e["msg"]) for e in errors]
            raise EventValidationError(format_validation_error(exc), problems) from None
        size = len(event.id.encode(errors="surrogatepass"))
        if size > limits.max_id_bytes:
            reason = (
                f"is {size} bytes of UTF-8, over AGENTFLOW_MAX_ID_BYTES ({limits.max_id_bytes})"
            )
            raise EventValidationError(f"invalid event: field 'id': {reason}", [("id", reason)])
        return event

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


Decision = Literal["approve", "reject", "revise", "edit"]
"""What a human decides when a run asks: the same four words on every path."""
InterruptKind = Literal["review", "tool_approval"]
"""What a human interrupt asks: the review's question, or approval of a tool call."""
DECISIONS: dict[InterruptKind, tuple[Decision, ...]] = {
    "review": ("approve", "reject", "revise"),
    "tool_approval": ("approve", "edit", "reject"),
}
"""The decisions each kind of interrupt takes."""
_FREE_TEXT = re.compile(r"\s*(approve|reject|revise)\b[\s:;,.!-]*(.*)", re.IGNORECASE | re.DOTALL)


class HumanDecision(BaseModel):
    """A human's answer to an interrupt, as every entry point takes it."""

    model_config = ConfigDict(extra="forbid")

    interrupt_id: str | None = Field(
        default=None,
        min_length=1,
        description="The interrupt answered; may be left out when only one is pending.",
    )
    decision: Decision = Field(description="approve, reject, revise (a review) or edit (a tool).")
    feedback: str = Field(default="", description="Why, or what to change.")
    steps: list[str] = Field(
        default_factory=list, description="With revise: the steps to run again (none: all)."
    )
    args: dict[str, Any] | None = Field(
        default=None, description="With edit: the tool call's new arguments."
    )

    @classmethod
    def read(cls, value: Any) -> Self:
        """Read an answer: the structured form, or free text that starts with a decision.

        Free text is taken only when it starts with approve, reject or revise (`reject:
        manager did not approve`); the rest is the feedback. No model reads it.

        Args:
            value: a `HumanDecision`, a mapping of its fields, a mapping with free text
                under `answer` (and maybe `interrupt_id`), or the free text itself.

        Raises:
            AnswerError: the answer names no decision, or its fields are wrong.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, HumanDecision):
            value = value.model_dump(include=set(HumanDecision.model_fields))
        if isinstance(value, dict) and "decision" not in value and "answer" in value:
            extra = sorted(set(value) - {"answer", "interrupt_id"})
            if extra:
                raise AnswerError(
                    f"an answer in free text takes no other fields ({', '.join(extra)}): "
                    "send them with a decision instead"
                )
            decided = cls.read(value["answer"])
            return decided.model_copy(update={"interrupt_id": value.get("interrupt_id")})
        if isinstance(value, str):
            if (match := _FREE_TEXT.fullmatch(value)) is None:
                raise AnswerError(
                    f"the answer {_shorten(value)!r} names no decision: start it with approve, "
                    'reject or revise (e.g. "reject: manager did not approve"), or send '
                    '{"decision": "approve" | "reject" | "revise", "feedback": "..."}'
                )
            decision = cast(Decision, match.group(1).lower())
            return cls(decision=decision, feedback=match.group(2).strip())
        if not isinstance(value, dict):
            raise AnswerError(
                f"an answer is text or an object with a decision, not {type(value).__name__}"
            )
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            raise AnswerError(format_validation_error(exc, "answer")) from None

    def problem_with(self, kind: InterruptKind, payload: dict[str, Any]) -> str | None:
        """Why this decision does not fit an interrupt of `kind` asking `payload`, or None."""
        allowed = DECISIONS[kind]
        if self.decision not in allowed:
            names = ", ".join(allowed)
            return f"a {kind} interrupt takes {names}, not {self.decision}"
        if self.steps and self.decision != "revise":
            return "steps go with revise only"
        if self.args is not None and self.decision != "edit":
            return "args go with edit only"
        if self.decision == "edit" and self.args is None:
            return "edit needs args: the tool call's new arguments"
        known = [str(s) for s in payload.get("steps", [])]
        if unknown := [s for s in self.steps if s not in known]:
            return f"no step {', '.join(unknown)} to revise; the steps are {', '.join(known)}"
        return None


AnswerSource = Literal["kafka", "http", "cli"]
"""How an answer came: an `agentflow.resume` event on Kafka, the gateway, or the CLI."""


class HumanAnswer(HumanDecision):
    """A human's decision as a session keeps it: which interrupt, who, how and when."""

    model_config = ConfigDict(extra="ignore")

    interrupt_id: str | None = Field(default=None, description="The interrupt answered.")
    kind: InterruptKind = Field(default="review", description="What the interrupt asked.")
    source: AnswerSource | None = Field(default=None, description="How the answer came.")
    who: str = Field(
        default="", description="The gateway token's name, or the answering event's source."
    )
    event_id: str | None = Field(default=None, description="The event that carried it.")
    answered_at: datetime | None = None

    def line(self) -> str:
        """Render the answer on one line: decision, by whom, through what, why."""
        by = f" by {self.who}" if self.who else ""
        via = f" ({self.source})" if self.source else ""
        why = f": {self.feedback}" if self.feedback else ""
        steps = f" [{', '.join(self.steps)}]" if self.steps else ""
        return f"{self.decision}{steps}{by}{via}{why}"


def answer_origin(event: CloudEvent) -> tuple[AnswerSource, str]:
    """How a resume event came, and who answered.

    The gateway's events are `http`, by the name of the token used (the CloudEvents
    `authid` attribute it sets); the CLI's are `cli`; any other is `kafka`. Who is the
    token's name, else the event's `source`.
    """
    extra = event.model_extra or {}
    who = str(extra.get("authid") or event.source)
    if event.source == GATEWAY_SOURCE:
        return "http", who
    return ("cli" if event.source == CLI_SOURCE else "kafka"), who


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    turn: int = Field(
        default=0, description="The next of its agents to take a turn in this round (0: none yet)."
    )
    task_attempt: int = Field(
        default=1, description="The attempt of the remote agent task of that turn (1-based)."
    )
    awaiting: list[dict[str, Any]] | None = Field(
        default=None,
        description="While the turn's agent is part-way through its turn: the tool calls "
        "still waiting for a human's approval, first asked first (none left: the agent goes "
        "on). None: no turn is part-way.",
    )
    approved_calls: list[ApprovedCall] = Field(
        default_factory=list,
        description="The approved tool calls that ran, with their results: the same call is "
        "answered from here, never run twice in the session.",
    )


class ApprovedCall(TypedDict):
    """A tool call a human approved (or edited) that ran, and what it returned.

    A plain mapping rather than a model: checkpoints revive it without an allowlist entry.
    """

    agent: str
    tool: str
    proposed: dict[str, Any]
    """The arguments the agent proposed."""
    args: dict[str, Any]
    """The arguments it ran with (the human's, after an edit)."""
    result: str
    """What the tool returned, as the agent read it."""


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

    The label is the subject's SHA-256, not the subject: a namespace label may not hold
    `.` or NUL, stores name keys and search queries after it, and some match it loosely
    (a prefix search on a case-folded field finds `claim-1` and `claim-10` for `Claim-1`).
    Any subject, byte for byte, gets its own label of 64 hex digits.
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


class AgentWait(BaseModel):
    """A remote agent's task a session waits for (an interrupt of kind `agent_task`)."""

    task_id: str
    agent: str
    step_id: str
    attempt: int = 1
    timeout_s: float
    interrupt_id: str = Field(default="", description="The interrupt its reply resumes.")
    since: datetime | None = Field(default=None, description="When the task was first sent.")
    deadline: datetime | None = Field(default=None, description="When it times out.")


class WorkflowResult(BaseModel):
    """What every entry point returns and prints for one event."""

    session_id: str
    event_id: str
    status: ResultStatus
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
    waiting_on: list[AgentWait] = Field(
        default_factory=list, description="With status waiting: the remote agents' tasks."
    )
    based_on: BasedOn | None = Field(
        default=None, description="The known workflow this run reused, its score and the mode."
    )
