"""Model faults in-process: empty and malformed answers are retried, then fail with a reason."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from nodes.chat_models import is_retryable, model_retry
from nodes.context import WorkflowContext
from nodes.errors import ModelCallError, StructuredOutputError
from tests.unit_tests.helpers import runner_for, scripted

EMPTY = ChatResult(generations=[])
"""What a client makes of an answer with no `choices`."""


def _summary(text: str, kw: dict[str, Any]) -> bool:
    return "<summary-request>" in text


def _plan(text: str, kw: dict[str, Any]) -> bool:
    return "intent agent" in text and bool(kw.get("tool_choice"))


async def test_an_empty_answer_is_retried_and_the_run_completes(make_event: Any) -> None:
    answers = iter([EMPTY, EMPTY])

    def hook(text: str, kw: dict[str, Any]) -> Any:
        return next(answers, None) if _plan(text, kw) else None

    model = scripted(hook)
    runner, _ = runner_for(WorkflowContext(chat_model=model))
    result = await runner.start(make_event(), "empty-once")

    assert result.status == "completed", result.error
    assert sum(1 for c in model.calls if "intent agent" in c) == 3  # two empty, one good


async def test_an_empty_answer_that_persists_fails_with_a_reason(make_event: Any) -> None:
    model = scripted(lambda text, kw: EMPTY if _plan(text, kw) else None)
    runner, _ = runner_for(WorkflowContext(chat_model=model))
    result = await runner.start(make_event(), "empty-always")

    assert result.status == "failed"
    assert result.error == (
        "ModelCallError: plan: the provider returned an empty answer (5 attempts)"
    )
    assert sum(1 for c in model.calls if "intent agent" in c) == 5


async def test_the_graph_retries_as_often_as_its_policy_says(make_event: Any) -> None:
    def hook(text: str, kw: dict[str, Any]) -> Any:
        if _plan(text, kw):
            raise json.JSONDecodeError("Expecting value", '{"id": "chatcmpl-1", "object": ', 38)
        return None

    model = scripted(hook)
    runner, _ = runner_for(
        WorkflowContext(chat_model=model), retry=model_retry(2, initial_interval=0, jitter=False)
    )
    result = await runner.start(make_event(), "two-attempts")

    assert result.status == "failed"
    assert result.error is not None
    assert result.error.startswith(
        "ModelCallError: plan: the provider returned a malformed answer (JSONDecodeError"
    )
    assert result.error.endswith("(2 attempts)")
    assert sum(1 for c in model.calls if "intent agent" in c) == 2


async def test_finalize_falls_back_to_the_steps_when_the_summary_keeps_failing(
    make_event: Any,
) -> None:
    model = scripted(lambda text, kw: EMPTY if _summary(text, kw) else None)
    runner, _ = runner_for(WorkflowContext(chat_model=model))
    result = await runner.start(make_event(), "no-summary")

    assert result.status == "completed", result.error
    assert result.review.verdict == "approve"
    assert all(s.status == "done" for s in result.workflow.steps)
    assert result.summary.startswith("Summary built from the steps")
    assert "finalize: the provider returned an empty answer (5 attempts)" in result.summary
    assert all(s.id in result.summary for s in result.workflow.steps)
    assert sum(1 for c in model.calls if "<summary-request>" in c) == 5


async def test_an_empty_summary_is_retried(make_event: Any) -> None:
    answers = iter([ChatResult(generations=[ChatGeneration(message=AIMessage(content=""))])])

    def hook(text: str, kw: dict[str, Any]) -> Any:
        return next(answers, None) if _summary(text, kw) else None

    runner, _ = runner_for(WorkflowContext(chat_model=scripted(hook)))
    result = await runner.start(make_event(), "empty-summary")

    assert result.status == "completed", result.error
    assert result.summary and not result.summary.startswith("Summary built from the steps")


def test_model_call_errors_say_node_reason_and_attempts_and_survive_pickling() -> None:
    error = StructuredOutputError("review", "the model did not answer with a ReviewDecision", 3)
    assert str(error) == "review: the model did not answer with a ReviewDecision (3 attempts)"
    assert is_retryable(error)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is StructuredOutputError and str(copy) == str(error)
    rejected = ModelCallError("plan", "the provider failed: 401", 1, retryable=False)
    assert str(rejected) == "plan: the provider failed: 401 (1 attempt)"
    assert not is_retryable(rejected)


@pytest.mark.parametrize(
    "exc",
    [IndexError("list index out of range"), json.JSONDecodeError("Expecting value", "{", 1)],
)
def test_bare_parse_errors_are_not_retried_unless_named_a_provider_fault(exc: Exception) -> None:
    # LangGraph's default refuses these; only the model call wraps them as transient
    assert not is_retryable(exc)


async def test_a_step_is_marked_failed_after_the_graphs_own_attempts(make_event: Any) -> None:
    def hook(text: str, kw: dict[str, Any]) -> Any:
        if '"id": "s3"' in text and "<step>" in text:
            return EMPTY
        return None

    runner, seen = runner_for(
        WorkflowContext(chat_model=scripted(hook), max_revise_rounds=0),
        retry=model_retry(2, initial_interval=0, jitter=False),
    )
    result = await runner.start(make_event(), "step-two-attempts")

    assert [t.step_id for t in seen if t.type == "step.started"].count("s3") == 2
    s3 = next(s for s in result.workflow.steps if s.id == "s3")
    assert s3.status == "failed"
    assert s3.error == "ModelCallError: execute: the provider returned an empty answer (2 attempts)"
