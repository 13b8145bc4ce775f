from __future__ import annotations

import hashlib
import json

import pytest

from nodes.errors import EventValidationError
from nodes.models import (
    CloudEvent,
    EventLimits,
    SimilarWorkflow,
    Usage,
    Workflow,
    check_session_id,
    derived_session_id,
    exceeds_json_depth,
    session_id_problem,
)


def test_event_parses_cloudevent_json() -> None:
    event = CloudEvent.parse(
        b'{"specversion":"1.0","id":"e1","source":"s","type":"claim.submitted",'
        b'"sessionid":"abc","data":{"claim_id":"C-1"}}'
    )
    assert event.type == "claim.submitted"
    assert event.sessionid == "abc"
    assert event.data == {"claim_id": "C-1"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"specversion":"0.3","id":"e","source":"s","type":"t"}', "field 'specversion'"),
        (b'{"specversion":"1.0","source":"s","type":"t"}', "field 'id': Field required"),
        (b'{"specversion":"1.0","id":"e","source":"s","type":""}', "field 'type'"),
        (b'{"specversion":"1.0","id":"e","source":"s","type":"t","sessionid":"a b"}', "sessionid"),
    ],
)
def test_invalid_events_name_the_field(raw: bytes, message: str) -> None:
    with pytest.raises(EventValidationError, match=message):
        CloudEvent.parse(raw)


def test_workflow_create_from_context_keeps_examples() -> None:
    event = CloudEvent.wrap("claim.submitted", {"claim_id": "C-1"})
    similar = [SimilarWorkflow(id="w1", score=0.9, event_type="claim.submitted", intent="x")]
    workflow = Workflow.create_from_context(event, similar)
    assert workflow.event is event
    assert [w.id for w in workflow.examples] == ["w1"]
    assert workflow.steps == []


def test_usage_adds_by_node() -> None:
    total = Usage(llm_calls=1, input_tokens=3, by_node={"plan": 1}) + Usage(
        llm_calls=2, output_tokens=5, by_node={"plan": 1, "review": 1}
    )
    assert (total.llm_calls, total.input_tokens, total.output_tokens) == (3, 3, 5)
    assert total.by_node == {"plan": 2, "review": 1}


# --- the rules for what an event may hold -----------------------------------------------


def _event(**fields: object) -> dict[str, object]:
    return {"specversion": "1.0", "id": "e1", "source": "s", "type": "t"} | fields


def _nested(levels: int) -> object:
    value: object = "leaf"
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "session_id",
    ["a", "x" * 200, "Case-T.2026_01:alice@example.org", "session-0b6f1c2e", "0"],
)
def test_session_ids_that_keep_the_rule(session_id: str) -> None:
    assert session_id_problem(session_id) is None
    assert CloudEvent.parse(_event(sessionid=session_id)).sessionid == session_id


@pytest.mark.parametrize(
    ("session_id", "problem"),
    [
        ("", "not 0 characters"),
        ("x" * 201, "not 201 characters"),
        ("has space", "' ' (at 3)"),
        ("a/b", "'/' (at 1)"),
        ("a,b", "','"),
        ("a\x00b", "'\\x00'"),
        ("caf\u00e9", "'\u00e9'"),
        ("line\n", "'\\n'"),  # `$` would let a trailing newline through; the rule does not
        ("a\ufffdb", "'\ufffd'"),
    ],
)
def test_session_ids_that_break_the_rule(session_id: str, problem: str) -> None:
    found = session_id_problem(session_id)
    assert found is not None and problem in found and "A-Z a-z 0-9 . _ : @ -" in found
    with pytest.raises(EventValidationError, match="field 'sessionid'") as raised:
        CloudEvent.parse(_event(sessionid=session_id))
    assert [field for field, _ in raised.value.problems] == ["sessionid"]
    with pytest.raises(ValueError, match="1 to 200 characters"):
        check_session_id(session_id)


def test_a_session_is_derived_from_the_event_id_and_hashed_when_it_would_break_the_rule() -> None:
    assert derived_session_id("evt-claim-2001") == "session-evt-claim-2001"
    assert derived_session_id("x" * 192) == "session-" + "x" * 192  # 200 characters: kept
    for event_id in ("x" * 193, "a/b", "claim 7", "caf\u00e9", "urn:uuid:1?q=2"):
        digest = hashlib.sha256(event_id.encode()).hexdigest()[:32]
        assert derived_session_id(event_id) == f"session-{digest}", event_id
        assert session_id_problem(derived_session_id(event_id)) is None
    assert derived_session_id("a/b") != derived_session_id("a/c")
    assert (
        derived_session_id("claim 7/2026") == "session-8ee7a537540a48e47b3f067b724d3ba9"
    )  # README


def test_event_ids_are_bounded_in_utf8_bytes_and_free_of_control_characters() -> None:
    assert CloudEvent.parse(_event(id="x" * 256)).id == "x" * 256
    assert CloudEvent.parse(_event(id="\u00e9" * 128)).id == "\u00e9" * 128  # 256 bytes
    assert CloudEvent.parse(_event(id="a/b c?\u00e9")).id == "a/b c?\u00e9"  # any other text
    with pytest.raises(EventValidationError, match="257 bytes of UTF-8") as raised:
        CloudEvent.parse(_event(id="x" * 257))
    assert raised.value.problems[0][0] == "id"
    assert "AGENTFLOW_MAX_ID_BYTES (256)" in str(raised.value)
    with pytest.raises(EventValidationError, match="258 bytes"):
        CloudEvent.parse(_event(id="\u00e9" * 129))
    limits = EventLimits(max_id_bytes=1000)
    assert CloudEvent.parse(_event(id="x" * 1000), limits).id == "x" * 1000
    for bad in ("a\x00b", "bell\x07", "esc\x1b[0m", "del\x7f", "c1\x85", "new\nline"):
        with pytest.raises(EventValidationError, match="field 'id': .*control characters"):
            CloudEvent.parse(_event(id=bad))


@pytest.mark.parametrize("form", ["bytes", "text", "dict"])
def test_json_nesting_is_bounded(form: str) -> None:
    def raw(levels: int) -> bytes | str | dict[str, object]:
        event = _event(data=_nested(levels))
        text = json.dumps(event)
        return {"bytes": text.encode(), "text": text, "dict": event}[form]  # type: ignore[return-value]

    # the event is level 1: data may nest 63 levels under the default limit of 64
    assert CloudEvent.parse(raw(63)).data == _nested(63)
    for levels in (64, 150, 199):
        with pytest.raises(EventValidationError, match=r"AGENTFLOW_MAX_JSON_DEPTH \(64 levels\)"):
            CloudEvent.parse(raw(levels))
    assert CloudEvent.parse(raw(99), EventLimits(max_json_depth=100)).data == _nested(99)


@pytest.mark.parametrize("levels", [1_000, 100_000])
def test_json_nested_past_any_parser_limit_is_too_deep_not_a_crash(levels: int) -> None:
    text = '{"specversion":"1.0","id":"e","source":"s","type":"t","data":' + (
        "[" * levels + "]" * levels + "}"
    )
    with pytest.raises(EventValidationError, match="AGENTFLOW_MAX_JSON_DEPTH") as raised:
        CloudEvent.parse(text.encode())
    assert raised.value.problems == [("(body)", raised.value.problems[0][1])]
    assert exceeds_json_depth(text, 64)


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    assert not exceeds_json_depth(b'{"a": "[[[[[[[[[[[[[[[[[["}', 2)
    assert not exceeds_json_depth(b'{"a": "\\"[[[[[[[[[[[[[[[[[[\\\\"}', 2)  # escaped quotes
    assert exceeds_json_depth(b'{"a": "\\\\", "b": [[1]]}', 2)  # an escaped backslash ends
    assert not exceeds_json_depth(b'[[1], [2], [3], {"a": [4]}]', 3)  # siblings: depth 3
    assert exceeds_json_depth(b'[[1], [2], [3], {"a": [4]}]', 2)
    assert not exceeds_json_depth([[1], [2], {"a": (3,)}], 3)
    assert exceeds_json_depth([[1], [2], {"a": [[]]}], 3)
    assert not exceeds_json_depth("plain", 1) and not exceeds_json_depth(7, 1)
