"""`finalize`: summarise, build the `WorkflowResult`, keep approved workflows."""

from __future__ import annotations

import logging
from typing import Any, Literal

from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime

from nodes._llm import chat_model, invoke, model_name
from nodes._runtime import context_of, dumps
from nodes.context import WorkflowContext
from nodes.library import default_library
from nodes.models import ResultReview, ResultWorkflow, Usage, WorkflowResult, utcnow
from nodes.prompts import SUMMARY_PROMPT
from nodes.state import WorkflowState, workflow_of

__all__ = ["build_result", "finalize"]

logger = logging.getLogger(__name__)


def build_result(
    state: WorkflowState,
    *,
    session_id: str,
    status: Literal["completed", "failed", "interrupted"],
    summary: str = "",
    error: str | None = None,
    question: str | None = None,
    usage: Usage | None = None,
) -> WorkflowResult:
    """Build the result of a session from its state, whatever state it reached."""
    event = state.get("event")
    decision = state.get("review")
    event_id = event["id"] if isinstance(event, dict) else event.id if event else ""
    return WorkflowResult(
        session_id=session_id,
        event_id=event_id,
        status=status,
        workflow=ResultWorkflow(
            intent=state.get("intent", ""),
            goals=state.get("goals", []),
            steps=state.get("steps", []),
        ),
        review=ResultReview(
            verdict=decision.verdict if decision else None,
            feedback=decision.feedback if decision else "",
        ),
        summary=summary,
        usage=(state.get("usage") or Usage()) + (usage or Usage()),
        model=", ".join(state.get("models", [])),
        started_at=state.get("started_at"),
        finished_at=utcnow(),
        error=error,
        question=question,
    )


async def finalize(
    state: WorkflowState, runtime: Runtime[WorkflowContext], config: RunnableConfig
) -> dict[str, Any]:
    """Write the summary and the result; hand an approved workflow to the library."""
    context = context_of(runtime)
    decision = state.get("review")
    approved = decision is not None and decision.verdict == "approve"
    model = chat_model(context, "finalize")
    steps = [s.model_dump(include={"id", "title", "status", "output"}) for s in state["steps"]]
    message, usage = await invoke(
        model,
        [
            HumanMessage(
                SUMMARY_PROMPT.format(
                    intent=state.get("intent", ""),
                    steps=dumps(steps),
                    review=decision.model_dump_json() if decision else "none",
                )
            )
        ],
        node="finalize",
        timeout_s=context.model_timeout_s,
    )
    summary = message.text
    error = None
    if not approved:
        rounds = state.get("review_rounds", 0)
        verdict = decision.verdict if decision else "none"
        error = (
            f"the review did not approve the workflow "
            f"(last verdict {verdict!r} after {rounds} round(s))"
        )
    else:
        library = default_library() if context.library is None else context.library
        try:
            await library.add(workflow_of(state), summary=summary)
        except Exception as exc:  # keeping the example must not fail the session
            logger.warning("could not add the workflow to the library: %s", exc)
    session_id = str(config.get("configurable", {}).get("thread_id", ""))
    models = sorted({*state.get("models", []), model_name(model, message)})
    result = build_result(
        {**state, "models": models},
        session_id=session_id,
        status="completed" if approved else "failed",
        summary=summary,
        error=error,
        usage=usage,
    )
    return {"result": result, "usage": usage, "models": [model_name(model, message)]}
