"""The agents protocol: its envelopes, the parser's reasons, message dicts, the schema files."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from nodes.errors import ProtocolError
from nodes.models import CloudEvent, Usage
from nodes.protocol import (
    CANCEL,
    MESSAGE,
    REPLY,
    TASK,
    AgentCancel,
    AgentMessage,
    AgentReply,
    AgentTask,
    AgentUsage,
    ConversationMessage,
    MessageToolCall,
    TaskStep,
    agent_name_problem,
    encode,
    envelope,
    json_schemas,
    parse_agent_event,
    render_schema,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "protocol"


def a_task(**overrides: Any) -> AgentTask:
    values: dict[str, Any] = {
        "task_id": "s-1:s2:1:0",
        "session_id": "s-1",
        "agent": "eligibility_analyst",
        "step": TaskStep(id="s2", title="Assess", description="Assess the claim"),
        "intent": "Handle the claim",
        "event": CloudEvent.wrap("claim.submitted", {"claim": "C-1"}, subject="claim-C-1"),
        "inputs": {"s1": "recorded"},
        "feedback": ["be brief"],
        "history": [ConversationMessage(type="human", content="Do step s2")],
        "attempt": 1,
        "deadline": datetime.now(UTC) + timedelta(minutes=5),
        "reply_to": "agentflow.agents.replies",
        "protocol_version": 1,
    }
    values.update(overrides)
    return AgentTask.model_validate(values)


def test_the_schema_files_are_the_models_schemas() -> None:
    # Regenerate with `python -m nodes.protocol docs/protocol` when a model changes.
    expected = json_schemas()
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(expected)
    for name, schema in expected.items():
        assert (SCHEMAS / name).read_text() == render_schema(schema), name


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (a_task(), TASK),
        (
            AgentReply(
                task_id="t-1",
                agent="a",
                status="done",
                output="eligible",
                messages=[ConversationMessage(type="ai", content="eligible", name="a")],
                usage=AgentUsage(llm_calls=1, input_tokens=10, output_tokens=2),
            ),
            REPLY,
        ),
        (AgentCancel(task_id="t-1", session_id="s-1", reason="cancelled"), CANCEL),
        (
            AgentMessage(
                task_id="t-1",
                agent="a",
                content="",
                tool_calls=[MessageToolCall(name="check", args={"claim_id": "C-1"}, id="c1")],
            ),
            MESSAGE,
        ),
    ],
)
def test_every_event_goes_out_and_reads_back_and_fits_its_schema_file(data: Any, kind: str) -> None:
    event = envelope(data, session_id="s-1", source="agentflow/test", subject="claim-C-1")
    raw = encode(event)
    document = json.loads(raw)
    assert document["specversion"] == "1.0" and document["type"] == kind
    assert document["sessionid"] == "s-1" and document["subject"] == "claim-C-1"
    if kind == TASK:
        assert document["id"] == data.task_id
    jsonschema.validate(document, json.loads((SCHEMAS / f"{kind}.schema.json").read_text()))
    back = parse_agent_event(raw)
    assert back == event


def test_readers_ignore_fields_they_do_not_know() -> None:
    document = json.loads(encode(envelope(a_task(), session_id="s-1", source="w")))
    document["traceparent"] = "00-abc"  # a CloudEvents extension
    document["data"]["priority"] = "high"  # a field of a later minor version
    document["data"]["step"]["owner"] = "team-b"
    task = parse_agent_event(json.dumps(document)).data
    assert isinstance(task, AgentTask) and task.step.id == "s2"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff{", "not valid JSON"),
        (b"[1, 2]", "not a CloudEvent: must be a JSON object"),
        (b'{"specversion": "1.0"}', "not a CloudEvent: field 'type' is missing"),
        (b'{"type": "claim.submitted"}', "unknown event type 'claim.submitted'"),
        ({"type": REPLY, "specversion": "1.0", "id": "1", "source": "h", "sessionid": "s-1",
          "data": {"agent": "a", "status": "done"}},
         "invalid agentflow.agent.reply event: field 'data.task_id': Field required"),
        ({"type": REPLY, "specversion": "1.0", "id": "1", "source": "h",
          "data": {"task_id": "t", "agent": "a", "status": "done"}},
         "field 'sessionid': Field required"),
        ({"type": REPLY, "specversion": "1.0", "id": "1", "source": "h", "sessionid": "a b",
          "data": {"task_id": "t", "agent": "a", "status": "done"}},
         "field 'sessionid': Value error, must be 1 to 200 characters"),
        ({"type": REPLY, "specversion": "0.3", "id": "1", "source": "h", "sessionid": "s",
          "data": {"task_id": "t", "agent": "a", "status": "maybe"}},
         "field 'specversion'"),
    ],
)  # fmt: skip
def test_malformed_events_raise_a_protocol_error_with_the_reason(
    raw: bytes | dict[str, Any], reason: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_agent_event(raw)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"protocol_version": 2}, "data.protocol_version"),
        ({"deadline": "2026-01-01T10:00:00"}, "data.deadline"),  # no time zone
        ({"attempt": 0}, "data.attempt"),
        ({"reply_to": "replies please"}, "data.reply_to"),
        ({"agent": "a/b"}, "data.agent"),
    ],
)
def test_a_task_that_breaks_the_contract_names_the_field(
    change: dict[str, Any], field: str
) -> None:
    document = json.loads(encode(envelope(a_task(), session_id="s-1", source="w")))
    document["data"].update(change)
    with pytest.raises(ProtocolError, match=f"field '{field}'"):
        parse_agent_event(document)


def test_a_reader_takes_only_the_types_it_accepts() -> None:
    reply = envelope(AgentReply(task_id="t", agent="a", status="done"), session_id="s", source="h")
    with pytest.raises(ProtocolError, match="expected agentflow.agent.cancel or agentflow.agent"):
        parse_agent_event(encode(reply), accept=(TASK, CANCEL))


def test_langchain_messages_become_message_dicts_and_back() -> None:
    messages = [
        SystemMessage("rules"),
        HumanMessage("Do step s2"),
        AIMessage(
            "",
            name="analyst",
            tool_calls=[{"name": "check", "args": {"claim_id": "C-1"}, "id": "c1"}],
        ),
        ToolMessage("eligible", tool_call_id="c1", name="check"),
        AIMessage("The claim is eligible.", name="analyst"),
    ]
    dicts = [ConversationMessage.of(m).model_dump(exclude_none=True) for m in messages]
    assert dicts == [
        {"type": "system", "content": "rules"},
        {"type": "human", "content": "Do step s2"},
        {
            "type": "ai",
            "content": "",
            "name": "analyst",
            "tool_calls": [{"name": "check", "args": {"claim_id": "C-1"}, "id": "c1"}],
        },
        {"type": "tool", "content": "eligible", "name": "check", "tool_call_id": "c1"},
        {"type": "ai", "content": "The claim is eligible.", "name": "analyst", "tool_calls": []},
    ]
    back = [ConversationMessage.model_validate(d).to_langchain() for d in dicts]
    assert [(type(m), m.content, m.name) for m in back] == [
        (type(m), m.content, m.name) for m in messages
    ]
    assert back[2].tool_calls == messages[2].tool_calls  # type: ignore[attr-defined]
    assert back[3].tool_call_id == "c1"  # type: ignore[attr-defined]


def test_usage_reports_calls_and_tokens() -> None:
    usage = Usage(llm_calls=2, input_tokens=30, output_tokens=5, by_node={"execute": 2})
    assert AgentUsage.of(usage).model_dump() == {
        "llm_calls": 2,
        "input_tokens": 30,
        "output_tokens": 5,
    }


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("eligibility_analyst", None),
        ("team-b.analyst_2", None),
        ("x" * 200, None),
        ("x" * 201, "at most 200 characters"),
        ("analyst one", "at most 200 characters of A-Z a-z 0-9 . _ -"),
        ("replies", "reserved"),
        ("cancel", "reserved"),
    ],
)
def test_agent_names_that_go_into_topic_names(name: str, problem: str | None) -> None:
    found = agent_name_problem(name)
    assert found is None if problem is None else problem in (found or "")
