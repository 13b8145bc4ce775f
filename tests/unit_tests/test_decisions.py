"""Human decisions: read as data, checked against the pending interrupt, honoured by the graph."""

from __future__ import annotations

from typing import Any

import pytest

from nodes.context import WorkflowContext
from nodes.errors import AnswerError
from nodes.library import InMemoryWorkflowLibrary
from nodes.models import HumanAnswer, HumanDecision
from tests.unit_tests.helpers import runner_for


@pytest.mark.parametrize(
    ("text", "decision", "feedback"),
    [
        ("approve: discharge confirmed", "approve", "discharge confirmed"),
        ("Reject: manager did not approve", "reject", "manager did not approve"),
        ("revise - check the dates", "revise", "check the dates"),
        ("  approve", "approve", ""),
        ("REJECT\nnot eligible", "reject", "not eligible"),
    ],
)
def test_free_text_that_starts_with_a_decision_is_that_decision(
    text: str, decision: str, feedback: str
) -> None:
    read = HumanDecision.read(text)
    assert (read.decision, read.feedback) == (decision, feedback)
    assert HumanDecision.read({"answer": text}).decision == decision


@pytest.mark.parametrize("text", ["yes", "approved", "I reject this", "", "ok, approve"])
def test_free_text_without_a_decision_word_is_refused_naming_the_three(text: str) -> None:
    with pytest.raises(AnswerError) as refused:
        HumanDecision.read(text)
    message = str(refused.value)
    assert "names no decision" in message
    assert all(word in message for word in ("approve", "reject", "revise"))


def test_structured_answers_are_validated_field_by_field() -> None:
    read = HumanDecision.read({"decision": "revise", "steps": ["s2"], "feedback": "dates"})
    assert read.steps == ["s2"] and read.interrupt_id is None
    with pytest.raises(AnswerError, match="field 'decision'"):
        HumanDecision.read({"decision": "maybe"})
    with pytest.raises(AnswerError, match="field 'color'"):
        HumanDecision.read({"decision": "approve", "color": "red"})
    with pytest.raises(AnswerError, match="takes no other fields"):
        HumanDecision.read({"answer": "approve", "feedback": "twice"})
    with pytest.raises(AnswerError, match="not int"):
        HumanDecision.read(7)


def test_a_decision_must_fit_its_interrupt() -> None:
    payload = {"steps": ["s1", "s2"]}

    def problem(**fields: Any) -> str | None:
        return HumanDecision(**fields).problem_with("review", payload)

    assert problem(decision="approve") is None
    assert problem(decision="revise", steps=["s2"]) is None
    assert problem(decision="edit", args={"a": 1}) == (
        "a review interrupt takes approve, reject, revise, not edit"
    )
    assert problem(decision="reject", steps=["s1"]) == "steps go with revise only"
    assert problem(decision="revise", steps=["s9"]) == (
        "no step s9 to revise; the steps are s1, s2"
    )
    approval = HumanDecision(decision="edit")
    assert approval.problem_with("tool_approval", {}) == (
        "edit needs args: the tool call's new arguments"
    )


async def test_approve_finalizes_without_asking_the_reviewer_again(make_event: Any) -> None:
    library = InMemoryWorkflowLibrary()
    runner, seen = runner_for(WorkflowContext(library=library))
    asked = await runner.start(make_event("claim_needs_review"), "ok")
    assert asked.status == "interrupted"
    reviews = sum(1 for t in seen if t.node == "review" and t.type == "node.started")

    answer = await runner.check_answer(
        "ok", {"decision": "approve", "feedback": "discharge confirmed"}, source="cli", who="me"
    )
    result = await runner.resume("ok", answer)
    assert result.status == "completed" and result.review.verdict == "approve"
    assert "discharge confirmed" in result.review.feedback
    assert sum(1 for t in seen if t.node == "review" and t.type == "node.started") == reviews
    answered = next(t for t in seen if t.type == "session.answered")
    assert answered.data is not None
    assert (answered.data["decision"], answered.data["who"]) == ("approve", "me")
    assert answered.data["interrupt_id"] == answer.interrupt_id
    assert len(library) == 1  # an approved workflow is kept


async def test_reject_ends_rejected_and_is_not_kept_even_in_free_text(make_event: Any) -> None:
    library = InMemoryWorkflowLibrary()
    runner, seen = runner_for(WorkflowContext(library=library))
    await runner.start(make_event("claim_needs_review"), "no")

    result = await runner.resume("no", "reject: manager did not approve")
    assert result.status == "rejected"
    assert result.review.verdict == "reject"
    assert "manager did not approve" in result.review.feedback
    assert result.error is not None and result.error.startswith("rejected by a human")
    assert seen[-1].type == "session.rejected"
    assert len(library) == 0  # never offered as an example
    assert await library.search(make_event("claim_needs_review")) == []
    state = (await runner.graph.aget_state(runner.config("no"))).values
    assert [a.decision for a in state["answers"]] == ["reject"]


async def test_revise_runs_the_named_steps_again_with_the_feedback(make_event: Any) -> None:
    runner, seen = runner_for(WorkflowContext())
    asked = await runner.start(make_event("claim_needs_review"), "again")
    before = {s.id: s.attempts for s in asked.workflow.steps}

    again = await runner.resume(
        "again", {"decision": "revise", "steps": ["s3"], "feedback": "use the 2019 DD-214"}
    )
    # s3 ran again (the offline reviewer asks once more: its output still asks for review).
    assert again.status == "interrupted"
    after = {s.id: s.attempts for s in again.workflow.steps}
    assert after["s3"] == before["s3"] + 1
    assert all(after[s] == before[s] for s in before if s not in ("s3", "s4"))
    step_tasks = [t for t in seen if t.type == "step.started" and t.step_id == "s3"]
    assert len(step_tasks) == 2
    state = (await runner.graph.aget_state(runner.config("again"))).values
    assert any("use the 2019 DD-214" in f for f in state["feedback"])
    assert state["review_rounds"] == 1  # the human's revise counts against the bound

    done = await runner.resume("again", "approve")
    assert done.status == "completed"


async def test_revise_is_bounded_by_max_revise_rounds(make_event: Any) -> None:
    runner, _ = runner_for(WorkflowContext(max_revise_rounds=1))
    await runner.start(make_event("claim_needs_review"), "bound")
    result = await runner.resume("bound", "revise")
    # The one round is spent: the review may not ask again, and did not approve.
    assert result.status == "failed"
    assert result.error is not None and "did not approve" in result.error


async def test_answers_that_do_not_fit_are_refused_and_the_question_stays(
    make_event: Any,
) -> None:
    runner, _ = runner_for(WorkflowContext())
    await runner.start(make_event("claim_needs_review"), "ask")
    with pytest.raises(AnswerError, match="names no decision"):
        await runner.check_answer("ask", "sure")
    with pytest.raises(AnswerError, match="not edit"):
        await runner.check_answer("ask", {"decision": "edit", "args": {}})
    with pytest.raises(AnswerError, match="no pending interrupt nope; pending: "):
        await runner.check_answer("ask", {"decision": "approve", "interrupt_id": "nope"})
    assert len(await runner.questions("ask")) == 1
    (pending,) = await runner.questions("ask")
    assert pending.value["kind"] == "review"
    assert pending.value["decisions"] == ["approve", "reject", "revise"]
    named = await runner.check_answer("ask", {"decision": "approve", "interrupt_id": pending.id})
    assert isinstance(named, HumanAnswer) and named.interrupt_id == pending.id


async def test_an_answer_the_node_cannot_take_is_asked_again(make_event: Any) -> None:
    """Resumed directly (LangGraph's server, a notebook), a bad answer asks again."""
    from langgraph.types import Command

    runner, _ = runner_for(WorkflowContext())
    await runner.start(make_event("claim_needs_review"), "direct")
    config = runner.config("direct")
    await runner.graph.ainvoke(Command(resume="sure"), config, context=runner.context)
    (again,) = (await runner.graph.aget_state(config)).interrupts
    assert "names no decision" in again.value["problem"]
    result = await runner.resume("direct", "approve: fine")
    assert result.status == "completed"
