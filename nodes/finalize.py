"""`finalize`: summarise, build the `WorkflowResult`, keep approved workflows."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime

from nodes._llm import EMPTY_ANSWER, chat_model, invoke, model_name, node_attempt
from nodes._runtime import context_of, dumps
from nodes.chat_models import MODEL_MAX_ATTEMPTS, is_retryable
from nodes.context import WorkflowContext
from nodes.errors import ModelCallError
from nodes.library import default_library
from nodes.models import (
    HumanAnswer,
    ResultReview,
    ResultStatus,
    ResultWorkflow,
    SessionNote,
    SimilarWorkflow,
    Step,
    Usage,
    Workflow,
    WorkflowResult,
    based_on,
    subject_namespace,
    utcnow,
)
from nodes.prompts import SUMMARY_PROMPT
from nodes.state import WorkflowState, workflow_of

__all__ = ["build_result", "finalize", "quality", "rejected_by", "steps_summary"]

logger = logging.getLogger(__name__)


def build_result(
    state: WorkflowState | Mapping[str, Any],
    *,
    session_id: str,
    status: ResultStatus,
    summary: str = "",
    error: str | None = None,
    question: str | None = None,
    usage: Usage | None = None,
) -> WorkflowResult:
    """Build the result of a session from its state, whatever state it reached."""
    event = state.get("event")
    decision = state.get("review")
    event_id = event["id"] if isinstance(event, dict) else event.id if event else ""
    review = ResultReview(
        verdict=decision.verdict if decision else None,
        feedback=decision.feedback if decision else "",
    )
    if (rejection := rejected_by(state)) is not None:
        review = ResultReview(verdict="reject", feedback=rejection.line())
    return WorkflowResult(
        session_id=session_id,
        event_id=event_id,
        status=status,
        workflow=ResultWorkflow(
            intent=state.get("intent", ""),
            goals=state.get("goals", []),
            steps=state.get("steps", []),
        ),
        review=review,
        summary=summary,
        usage=(state.get("usage") or Usage()) + (usage or Usage()),
        model=", ".join(state.get("models", [])),
        started_at=state.get("started_at"),
        finished_at=utcnow(),
        error=error,
        question=question,
        based_on=based_on(state.get("similar_workflows")),
    )


def rejected_by(state: WorkflowState | Mapping[str, Any]) -> HumanAnswer | None:
    """The human answer that rejected the run, if its review's last answer is a rejection.

    A rejected tool call does not end the run: its agent reads why and goes on.
    """
    answers = [a for a in state.get("answers") or [] if a.kind == "review"]
    return answers[-1] if answers and answers[-1].decision == "reject" else None


def quality(state: WorkflowState) -> float:
    """Score how well a run went, in [0, 1].

    0 unless the review approved; else the share of steps done, times 0.8 for each
    review round that sent steps back or asked a human.
    """
    decision = state.get("review")
    steps = state.get("steps", [])
    if decision is None or decision.verdict != "approve" or not steps:
        return 0.0
    done = sum(1 for s in steps if s.status == "done") / len(steps)
    return round(done * 0.8 ** state.get("review_rounds", 0), 4)


def _same_steps(workflow: Workflow, basis: SimilarWorkflow) -> bool:
    def shape(steps: list[Step]) -> list[tuple[str, str, list[str], list[str]]]:
        return [(s.id, s.title.strip().lower(), s.depends_on, s.agents) for s in steps]

    return shape(workflow.steps) == shape(basis.steps)


async def _keep(library: Any, state: WorkflowState, summary: str, approved: bool) -> None:
    """Count the run on its basis; keep an approved workflow unless it repeats the basis."""
    workflow = workflow_of(state)
    score = quality(state)
    workflow.verdict = state["review"].verdict if state.get("review") else None
    workflow.quality = score
    basis = next((w for w in workflow.examples if w.reuse is not None), None)
    if approved and (basis is None or not _same_steps(workflow, basis)):
        await library.add(workflow, summary=summary)
    if basis is not None:
        await library.mark_used(basis.id, quality=score)


async def _remember(
    store: Any, state: WorkflowState, session_id: str, result: WorkflowResult
) -> None:
    """Keep a note of the run for its subject, for later sessions to recall."""
    event = state["event"]
    if store is None or not event.subject:
        return
    note = SessionNote(
        session_id=session_id,
        event_id=event.id,
        event_type=event.type,
        status=result.status,
        intent=result.workflow.intent,
        summary=result.summary,
        finished_at=result.finished_at or utcnow(),
    )
    await store.aput(
        subject_namespace(event.subject), f"{session_id}:{event.id}", note.model_dump(mode="json")
    )


def steps_summary(state: WorkflowState | Mapping[str, Any], why: str) -> str:
    """Summarise a run from its steps, saying that no model wrote it and why."""
    steps: list[Step] = state.get("steps", [])
    done = [s for s in steps if s.status == "done"]
    lines = [f"{s.id} {s.title}: {' '.join(s.output.split())[:160]}" for s in done]
    intent = state.get("intent", "") or "The workflow"
    return (
        f"Summary built from the steps (the model did not write one: {why}). "
        f"{intent} — {len(done)} of {len(steps)} steps done."
        + ("".join(f"\n- {line}" for line in lines))
    )


async def _summarise(
    state: WorkflowState, context: WorkflowContext, model: Any, max_attempts: int
) -> tuple[str, Usage, list[str]]:
    """Ask the model for the summary; on its last attempt, fall back to the steps.

    Returns:
        The summary, the model's usage and the name of the model that wrote it (none
        for the fallback).

    Raises:
        ModelCallError: the call failed and the node's retry policy has attempts left.
    """
    decision = state.get("review")
    steps = [s.model_dump(include={"id", "title", "status", "output"}) for s in state["steps"]]
    prompt = SUMMARY_PROMPT.format(
        intent=state.get("intent", ""),
        steps=dumps(steps),
        review=decision.model_dump_json() if decision else "none",
    )
    try:
        message, usage = await invoke(
            model, [HumanMessage(prompt)], node="finalize", timeout_s=context.model_timeout_s
        )
        if not message.text.strip():
            raise ModelCallError("finalize", EMPTY_ANSWER, node_attempt())
    except Exception as exc:
        if node_attempt() < max_attempts and is_retryable(exc):
            raise
        # The steps are done and reviewed: one bad summary call must not lose them.
        logger.warning("finalize: the summary falls back to the steps: %s", exc)
        return steps_summary(state, str(exc)), Usage(), []
    return message.text, usage, [model_name(model, message)]


async def finalize(
    state: WorkflowState,
    runtime: Runtime[WorkflowContext],
    config: RunnableConfig,
    *,
    max_attempts: int = MODEL_MAX_ATTEMPTS,
) -> dict[str, Any]:
    """Write the summary and the result; keep the workflow and the subject's note.

    The result is `completed` when the review (or a human) approved, `rejected` when a
    human rejected, else `failed`. An approved workflow goes to the library (unless it
    only repeats its basis), a rejected one never does; the
    basis, if any, counts one more use. With a long-term store, the run's note is kept
    under its subject for later sessions to recall. When the model gives no summary in
    `max_attempts` (the node's retry policy, bound by the graph), the summary is built
    from the steps and says so.
    """
    context = context_of(runtime)
    decision = state.get("review")
    approved = decision is not None and decision.verdict == "approve"
    model = chat_model(context, "finalize")
    summary, usage, summarised_by = await _summarise(state, context, model, max_attempts)
    error = None
    status: ResultStatus = "completed" if approved else "failed"
    if (rejection := rejected_by(state)) is not None:
        status, approved = "rejected", False
        error = f"rejected by a human: {rejection.line()}"
    elif not approved:
        rounds = state.get("review_rounds", 0)
        verdict = decision.verdict if decision else "none"
        error = (
            f"the review did not approve the workflow "
            f"(last verdict {verdict!r} after {rounds} round(s))"
        )
    library = default_library() if context.library is None else context.library
    try:
        await _keep(library, state, summary, approved)
    except Exception as exc:  # keeping the example must not fail the session
        logger.warning("could not update the workflow library: %s", exc)
    session_id = str(config.get("configurable", {}).get("thread_id", ""))
    models = sorted({*state.get("models", []), *summarised_by})
    result = build_result(
        {**state, "models": models},
        session_id=session_id,
        status=status,
        summary=summary,
        error=error,
        usage=usage,
    )
    try:
        await _remember(runtime.store, state, session_id, result)
    except Exception as exc:  # the note must not fail the session either
        logger.warning("could not keep the session note for %s: %s", state["event"].subject, exc)
    return {"result": result, "usage": usage, "models": summarised_by}
