"""`review` and `escalate`: judge the result, send steps back, or ask a human.

A human's answer is a decision (`HumanDecision`), honoured as given: approve finalizes,
reject ends the run `rejected`, revise sends steps back to `execute`. No model reads it.
"""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.messages import BaseMessage, HumanMessage
from langgraph.runtime import Runtime

from nodes._llm import chat_model, invoke_structured, model_name
from nodes._runtime import ask_human, context_of, dumps
from nodes.context import WorkflowContext
from nodes.models import DECISIONS, InterruptKind, ReviewDecision, Step
from nodes.prompts import REVIEW_PROMPT
from nodes.state import WorkflowState

__all__ = [
    "REVIEW_INTERRUPT",
    "escalate",
    "render_review_prompt",
    "review",
    "route_answer",
    "route_review",
]

REVIEW_INTERRUPT: InterruptKind = "review"
"""The `kind` of the interrupt that asks a human the reviewer's question."""


def render_review_prompt(state: WorkflowState) -> list[BaseMessage]:
    """Render the reviewer's messages for a state."""
    steps = [
        s.model_dump(include={"id", "title", "agents", "status", "output", "attempts", "error"})
        for s in state.get("steps", [])
    ]
    return [
        HumanMessage(
            REVIEW_PROMPT.format(
                intent=state.get("intent", ""),
                goals="; ".join(state.get("goals", [])),
                steps=dumps(steps),
                feedback="; ".join(state.get("feedback", [])) or "none",
            )
        )
    ]


def _redo(steps: list[Step], wanted: list[str]) -> list[Step]:
    """Reset the wanted steps, and the steps skipped because of them, to pending."""
    known = {s.id for s in steps}
    ids = (
        {i for i in wanted if i in known}
        or {s.id for s in steps if s.status in ("failed", "skipped")}
        or known
    )
    return [
        s.model_copy(update={"status": "pending", "output": "", "error": None})
        for s in steps
        if s.id in ids or s.status == "skipped"
    ]


async def review(state: WorkflowState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    """Ask the reviewer for a verdict; with `revise`, put the steps to redo back."""
    context = context_of(runtime)
    model = chat_model(context, "review")
    decision, raw, usage = await invoke_structured(
        model,
        ReviewDecision,
        render_review_prompt(state),
        node="review",
        timeout_s=context.model_timeout_s,
    )
    rounds = state.get("review_rounds", 0)
    update: dict[str, Any] = {
        "review": decision,
        "usage": usage,
        "models": [model_name(model, raw)],
    }
    if decision.verdict == "escalate" and not decision.question:
        decision.question = decision.feedback or "Do you approve this workflow's result?"
    if decision.verdict != "approve" and decision.feedback:
        update["feedback"] = [f"review: {decision.feedback}"]
    if decision.verdict == "revise" and rounds < context.max_revise_rounds:
        update["steps"] = _redo(state.get("steps", []), decision.steps_to_redo)
        update["review_rounds"] = rounds + 1
    return update


def route_review(
    state: WorkflowState, runtime: Runtime[WorkflowContext] | None = None
) -> Literal["execute", "escalate", "finalize"]:
    """Go back to execute, ask a human, or finish (also when the rounds are used up)."""
    decision = state["review"]
    if decision.verdict == "revise" and any(s.status == "pending" for s in state["steps"]):
        return "execute"
    rounds = state.get("review_rounds", 0)
    if decision.verdict == "escalate" and rounds < context_of(runtime).max_revise_rounds:
        return "escalate"
    return "finalize"


async def escalate(state: WorkflowState) -> dict[str, Any]:
    """Interrupt the run with the reviewer's question and apply the human's decision.

    The interrupt (kind `review`) carries the question, the reviewer's feedback, the
    step ids and the decisions it takes. The service checks an answer before it resumes
    the run; an answer it cannot take coming another way (LangGraph's server, a notebook)
    is asked again, with the reason, instead of failing the run.
    """
    decision = state["review"]
    steps = state.get("steps", [])
    question: dict[str, Any] = {
        "kind": REVIEW_INTERRUPT,
        "question": decision.question,
        "feedback": decision.feedback,
        "steps": [s.id for s in steps],
        "decisions": list(DECISIONS[REVIEW_INTERRUPT]),
    }
    answer = ask_human(question, lambda answer: answer.problem_with(REVIEW_INTERRUPT, question))
    update: dict[str, Any] = {
        "answers": [answer],
        "feedback": [f"human: {answer.line()}"],
        "review_rounds": state.get("review_rounds", 0) + 1,
    }
    if answer.decision == "approve":
        feedback = f"Approved by a human: {answer.feedback}" if answer.feedback else ""
        update["review"] = ReviewDecision(
            verdict="approve", feedback=feedback or "Approved by a human."
        )
    elif answer.decision == "revise":
        update["steps"] = _redo(steps, answer.steps or [s.id for s in steps])
    return update


def route_answer(state: WorkflowState) -> Literal["execute", "finalize"]:
    """After a human's answer: revise runs steps again; approve and reject finish."""
    answers = state.get("answers", [])
    return "execute" if answers and answers[-1].decision == "revise" else "finalize"
