"""The agents protocol: how the worker and agent hosts talk over Kafka (version 1).

A contract other services implement, in any language: these names do not change. Every
message is a CloudEvents 1.0 structured-mode JSON object with the `sessionid` extension,
keyed by the session id on Kafka:

- `agentflow.agent.task` (worker → host, topic `agentflow.agents.<agent>`): a step for
  an agent to work on; the event's `id` is the task id.
- `agentflow.agent.cancel` (worker → host, the same topic): stop that task, send nothing.
- `agentflow.agent.message` (host → worker, the task's `reply_to`): what the agent says
  while it works.
- `agentflow.agent.reply` (host → worker, `reply_to`): the task's outcome.

Compatibility: readers ignore fields they do not know; a change that breaks readers gets
a new major `protocol_version` and new topic names. `python -m nodes.protocol DIR` writes
the JSON Schema of each message to `DIR/<type>.schema.json` (the repository keeps them in
`docs/protocol/`).
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import pydantic_core
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from pydantic import AwareDatetime, BaseModel, Field, ValidationError

from nodes.errors import ProtocolError
from nodes.models import (
    CloudEvent,
    CloudEventAttributes,
    SessionId,
    Usage,
    format_validation_error,
    utcnow,
)

__all__ = [
    "AGENT_NAME_RULE",
    "CANCEL",
    "MESSAGE",
    "PROTOCOL_VERSION",
    "REPLY",
    "RESERVED_AGENT_NAMES",
    "TASK",
    "WORKER_SOURCE",
    "AgentCancel",
    "AgentEvent",
    "AgentMessage",
    "AgentReply",
    "AgentTask",
    "AgentUsage",
    "CancelEvent",
    "ConversationMessage",
    "MessageEvent",
    "MessageToolCall",
    "ReplyEvent",
    "TaskEvent",
    "TaskStep",
    "agent_name_problem",
    "encode",
    "envelope",
    "json_schemas",
    "parse_agent_event",
    "render_schema",
    "write_schemas",
]

PROTOCOL_VERSION = 1
"""The protocol's major version; a change that breaks readers raises it."""
TASK = "agentflow.agent.task"
REPLY = "agentflow.agent.reply"
CANCEL = "agentflow.agent.cancel"
MESSAGE = "agentflow.agent.message"
WORKER_SOURCE = "agentflow/worker"
"""The `source` of the events the worker sends (tasks, cancels, deadline replies)."""

AGENT_NAME_RULE = "at most 200 characters of A-Z a-z 0-9 . _ -, and not `replies` or `cancel`"
"""What the name of an agent that runs over Kafka must be: it is part of a topic name."""
RESERVED_AGENT_NAMES = ("replies", "cancel")
"""Names that would clash with the protocol's own topics."""
_AGENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_TOPIC = r"^[A-Za-z0-9._-]{1,249}$"


def agent_name_problem(name: str) -> str | None:
    """Return why `name` cannot name an agent that runs over Kafka, or None when it can."""
    if name in RESERVED_AGENT_NAMES:
        return f"'{name}' is reserved for the protocol's own topics"
    if not _AGENT_NAME.fullmatch(name):
        return f"must be {AGENT_NAME_RULE}"
    return None


AgentName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,200}$")]


class MessageToolCall(BaseModel):
    """A tool call an agent made: which tool, with which arguments."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    id: str | None = Field(default=None, description="Answered by the `tool` message with it.")


class ConversationMessage(BaseModel):
    """One message of a step's conversation, as a LangChain message dict."""

    type: Literal["human", "ai", "tool", "system"]
    content: str | list[str | dict[str, Any]] = ""
    name: str | None = Field(default=None, description="Who said it (an agent's name).")
    tool_calls: list[MessageToolCall] | None = Field(
        default=None, description="With `ai`: the tools it called."
    )
    tool_call_id: str | None = Field(
        default=None, description="With `tool`: the id of the call it answers."
    )

    @classmethod
    def of(cls, message: BaseMessage) -> ConversationMessage:
        """Describe a LangChain message.

        Raises:
            ProtocolError: a message of another type (`function`, `chat`, ...).
        """
        if isinstance(message, AIMessage):
            calls = [
                MessageToolCall(name=c["name"], args=c["args"], id=c.get("id"))
                for c in message.tool_calls
            ]
            return cls(type="ai", content=message.content, name=message.name, tool_calls=calls)
        if isinstance(message, ToolMessage):
            return cls(
                type="tool",
                content=message.content,
                name=message.name,
                tool_call_id=message.tool_call_id,
            )
        if isinstance(message, HumanMessage | SystemMessage):
            return cls(type=message.type, content=message.content, name=message.name)  # type: ignore[arg-type]
        raise ProtocolError(f"a {message.type} message has no place in an agent's conversation")

    def to_langchain(self) -> BaseMessage:
        """Return the LangChain message this describes."""
        if self.type == "ai":
            calls = [
                ToolCall(name=c.name, args=c.args, id=c.id, type="tool_call")
                for c in self.tool_calls or []
            ]
            return AIMessage(content=self.content, name=self.name, tool_calls=calls)
        if self.type == "tool":
            return ToolMessage(
                content=self.content, name=self.name, tool_call_id=self.tool_call_id or ""
            )
        kind = HumanMessage if self.type == "human" else SystemMessage
        return kind(content=self.content, name=self.name)


class TaskStep(BaseModel):
    """The step a task is about."""

    id: str
    title: str
    description: str = ""


class AgentTask(BaseModel):
    """`agentflow.agent.task`: a step for an agent to take its turn on."""

    task_id: str = Field(min_length=1, max_length=512, description="Also the event's `id`.")
    session_id: SessionId
    agent: AgentName = Field(description="The agent that is to work on the step.")
    step: TaskStep
    intent: str = Field(default="", description="What the workflow is for, in one sentence.")
    event: CloudEvent = Field(description="The CloudEvent the session is handling.")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="Outputs of the steps it depends on, by step id."
    )
    feedback: list[str] = Field(default_factory=list, description="Review and human feedback.")
    history: list[ConversationMessage] = Field(
        default_factory=list,
        description=(
            "The step's conversation so far, its task prompt first (agentflow's worker "
            "writes the step as a `human` message); empty: build the prompt from the fields."
        ),
    )
    attempt: int = Field(ge=1, description="1 for the first sending, n+1 after a timeout.")
    deadline: AwareDatetime = Field(
        description="RFC 3339; after it the worker no longer waits for this task."
    )
    reply_to: str = Field(pattern=_TOPIC, description="The topic of its messages and reply.")
    protocol_version: Literal[1] = Field(description="The protocol's major version.")

    def conversation(self) -> list[BaseMessage]:
        """Return `history` as LangChain messages."""
        return [m.to_langchain() for m in self.history]


class AgentUsage(BaseModel):
    """What an agent's turn spent on models."""

    llm_calls: int = Field(default=0, ge=0)
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)

    @classmethod
    def of(cls, usage: Usage) -> AgentUsage:
        """Report a session's kind of usage."""
        return cls(
            llm_calls=usage.llm_calls,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )


class AgentReply(BaseModel):
    """`agentflow.agent.reply`: how a task ended.

    `timeout` is never sent by a host: the worker sends it to itself when a task's
    deadline passes.
    """

    task_id: str = Field(min_length=1, max_length=512)
    agent: AgentName
    status: Literal["done", "failed", "timeout"]
    output: str = Field(default="", description="The agent's answer: the step's output.")
    messages: list[ConversationMessage] | None = Field(
        default=None, description="The agent's turn, appended to the step's conversation."
    )
    usage: AgentUsage | None = None
    error: str | None = Field(default=None, description="With `failed`: why.")

    def conversation(self) -> list[BaseMessage]:
        """Return `messages` as LangChain messages."""
        return [m.to_langchain() for m in self.messages or []]


class AgentCancel(BaseModel):
    """`agentflow.agent.cancel`: stop the task if it still runs, and do not reply."""

    task_id: str = Field(min_length=1, max_length=512)
    session_id: SessionId
    reason: str = Field(default="", description="Cancelled, superseded or rolled back.")


class AgentMessage(BaseModel):
    """`agentflow.agent.message`: what an agent says while it works on a task."""

    task_id: str = Field(min_length=1, max_length=512)
    agent: AgentName
    content: str = ""
    tool_calls: list[MessageToolCall] | None = None


class _AgentEventBase(CloudEventAttributes):
    sessionid: SessionId = Field(description="Extension: the session; also the Kafka key.")


class TaskEvent(_AgentEventBase):
    """The CloudEvent of a task; its `id` is the task id, its `subject` the event's."""

    type: Literal["agentflow.agent.task"]
    data: AgentTask


class ReplyEvent(_AgentEventBase):
    """The CloudEvent of a reply."""

    type: Literal["agentflow.agent.reply"]
    data: AgentReply


class CancelEvent(_AgentEventBase):
    """The CloudEvent of a cancellation."""

    type: Literal["agentflow.agent.cancel"]
    data: AgentCancel


class MessageEvent(_AgentEventBase):
    """The CloudEvent of an agent's message."""

    type: Literal["agentflow.agent.message"]
    data: AgentMessage


AgentEvent: TypeAlias = TaskEvent | ReplyEvent | CancelEvent | MessageEvent
_EVENTS: dict[str, type[AgentEvent]] = {
    TASK: TaskEvent,
    REPLY: ReplyEvent,
    CANCEL: CancelEvent,
    MESSAGE: MessageEvent,
}
_TYPE_OF: dict[type[BaseModel], str] = {
    AgentTask: TASK,
    AgentReply: REPLY,
    AgentCancel: CANCEL,
    AgentMessage: MESSAGE,
}


def envelope(
    data: AgentTask | AgentReply | AgentCancel | AgentMessage,
    *,
    session_id: str,
    source: str,
    subject: str | None = None,
) -> AgentEvent:
    """Wrap a message in its CloudEvent: a task's id is its task id, others get a fresh one."""
    kind = _TYPE_OF[type(data)]
    return _EVENTS[kind].model_validate(
        {
            "specversion": "1.0",
            "id": data.task_id if isinstance(data, AgentTask) else str(uuid.uuid4()),
            "source": source,
            "type": kind,
            "subject": subject,
            "time": utcnow(),
            "sessionid": session_id,
            "data": data,
        }
    )


def encode(event: AgentEvent) -> bytes:
    """Return the JSON a protocol event is sent as (absent optional fields left out)."""
    return event.model_dump_json(exclude_none=True).encode()


def parse_agent_event(
    raw: bytes | str | dict[str, Any], *, accept: Collection[str] = tuple(_EVENTS)
) -> AgentEvent:
    """Read a protocol event from JSON bytes, text or a dict.

    Args:
        raw: the record's value.
        accept: the event types the reader takes (a host: tasks and cancels).

    Raises:
        ProtocolError: the reason it cannot be read: not JSON, not a CloudEvent of an
            accepted type, or a field that is missing or wrong (named).
    """
    if isinstance(raw, dict):
        document: Any = raw
    else:
        try:
            document = pydantic_core.from_json(raw)
        except ValueError as exc:
            raise ProtocolError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolError("not a CloudEvent: must be a JSON object")
    kind = document.get("type")
    if not isinstance(kind, str) or kind not in accept:
        raise ProtocolError(
            f"unknown event type {kind!r}; expected {' or '.join(sorted(accept))}"
            if "type" in document
            else "not a CloudEvent: field 'type' is missing"
        )
    try:
        return _EVENTS[kind].model_validate(document)
    except ValidationError as exc:
        raise ProtocolError(format_validation_error(exc, f"{kind} event")) from None


# --- JSON Schema -----------------------------------------------------------------------


def json_schemas() -> dict[str, dict[str, Any]]:
    """Return the JSON Schema of each protocol event, by file name (`<type>.schema.json`)."""
    schemas = {}
    for kind, model in _EVENTS.items():
        schema = model.model_json_schema(mode="validation")
        schemas[f"{kind}.schema.json"] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": (
                f"agentflow agents protocol, version {PROTOCOL_VERSION}: generated by "
                "`python -m nodes.protocol docs/protocol`; do not edit. Readers ignore "
                "fields they do not know."
            ),
            **schema,
        }
    return schemas


def render_schema(schema: dict[str, Any]) -> str:
    """Return a schema as the text its file holds."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    """Write every protocol event's JSON Schema into `folder`; return the files."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = folder / name
        path.write_text(render_schema(schema))
        written.append(path)
    return written


def main(argv: Sequence[str]) -> int:
    """`python -m nodes.protocol DIR`: write the schema files into DIR."""
    if len(argv) != 1:
        sys.stderr.write("usage: python -m nodes.protocol DIR\n")
        return 2
    for path in write_schemas(Path(argv[0])):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
