from __future__ import annotations

import pytest

from nodes.errors import EventValidationError
from nodes.models import CloudEvent, SimilarWorkflow, Usage, Workflow


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
