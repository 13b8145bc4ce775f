"""`plan`: the intent agent turns the event into intent, goals and steps."""

from __future__ import annotations

import logging
from graphlib import CycleError, TopologicalSorter
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage
from langgraph.runtime import Runtime
from langgraph.types import Overwrite

from nodes._llm import chat_model, invoke_structured, model_name
from nodes._runtime import context_of, dumps
from nodes.context import WorkflowContext
from nodes.errors import PlanError
from nodes.models import CloudEvent, PlanDraft, SimilarWorkflow, Step, Usage
from nodes.prompts import PLAN_ADAPT_PROMPT, PLAN_PROMPT, PLAN_REPAIR_PROMPT
from nodes.state import WorkflowState

__all__ = ["check_plan", "known_steps", "plan", "render_plan_prompt"]

logger = logging.getLogger(__name__)

MAX_STEPS = 12


def render_plan_prompt(state: WorkflowState) -> list[BaseMessage]:
    """Render the planner's messages for a state: adapt the basis, or plan with examples."""
    similar = state.get("similar_workflows", [])
    event = dumps(state["event"].model_dump(mode="json", exclude_none=True))
    basis = next((w for w in similar if w.reuse == "adapt"), None)
    if basis is not None:
        return [
            HumanMessage(PLAN_ADAPT_PROMPT.format(examples=dumps([_example(basis)]), event=event))
        ]
    examples = dumps([_example(w) for w in similar])
    return [HumanMessage(PLAN_PROMPT.format(examples=examples, event=event))]


def _example(workflow: SimilarWorkflow) -> dict[str, Any]:
    return {
        "score": workflow.score,
        "event_type": workflow.event_type,
        "intent": workflow.intent,
        "goals": workflow.goals,
        "steps": [
            s.model_dump(include={"id", "title", "description", "depends_on", "agents"})
            for s in workflow.steps
        ],
    }


def check_plan(draft: PlanDraft) -> tuple[list[Step], list[str]]:
    """Repair what can be repaired in a plan and report what cannot.

    Duplicate ids are renamed, and dependencies on unknown or own ids are dropped.
    An empty plan, too many steps or a dependency cycle are problems for the model.

    Returns:
        The repaired steps and the problems left, as sentences.
    """
    problems: list[str] = []
    if not draft.steps:
        problems.append("the plan has no steps")
    if len(draft.steps) > MAX_STEPS:
        problems.append(f"the plan has {len(draft.steps)} steps; use at most {MAX_STEPS}")
    steps: list[Step] = []
    seen: set[str] = set()
    for index, item in enumerate(draft.steps):
        step_id = (item.id or f"s{index + 1}").strip()
        if step_id in seen:
            logger.info("plan repair: duplicate step id %r renamed", step_id)
            step_id = f"{step_id}_{index + 1}"
        seen.add(step_id)
        steps.append(Step(id=step_id, title=item.title, description=item.description))
    known = {s.id for s in steps}
    for step, item in zip(steps, draft.steps, strict=True):
        deps = [d for d in dict.fromkeys(item.depends_on) if d in known and d != step.id]
        if len(deps) != len(item.depends_on):
            logger.info("plan repair: step %s loses unknown dependencies", step.id)
        step.depends_on = deps
    try:
        TopologicalSorter({s.id: s.depends_on for s in steps}).prepare()
    except CycleError as exc:
        cycle = " -> ".join(str(n) for n in exc.args[1])
        problems.append(f"the step dependencies form a cycle ({cycle})")
    return steps, problems


async def plan(state: WorkflowState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    """Ask the intent agent for a plan, repairing or rejecting an invalid one.

    With a `direct` basis the known steps and agents are taken without a model call;
    with an `adapt` basis the model adapts the known workflow instead of planning anew.

    Raises:
        PlanError: the plan is still invalid after one repair request.
    """
    basis = next((w for w in state.get("similar_workflows", []) if w.reuse == "direct"), None)
    if basis is not None:
        steps, problems = known_steps(basis)
        if problems:  # discovery only picks a basis whose steps pass
            raise PlanError(f"known workflow {basis.id} is invalid: " + "; ".join(problems))
        return {
            "intent": _retarget(basis.intent, basis.subject, state["event"]),
            "goals": basis.goals,
            "steps": Overwrite(steps),
            "usage": Usage(),
        }
    context = context_of(runtime)
    model = chat_model(context, "plan")
    messages = render_plan_prompt(state)
    draft, raw, usage = await invoke_structured(
        model, PlanDraft, messages, node="plan", timeout_s=context.model_timeout_s
    )
    steps, problems = check_plan(draft)
    if problems:
        logger.warning("plan rejected, asking for a repair: %s", "; ".join(problems))
        repair = HumanMessage(
            PLAN_REPAIR_PROMPT.format(problems="; ".join(problems))
            + f"\nThe rejected plan: {draft.model_dump_json()}"
        )
        draft, raw, more = await invoke_structured(
            model, PlanDraft, [*messages, repair], node="plan", timeout_s=context.model_timeout_s
        )
        usage = usage + more
        steps, problems = check_plan(draft)
        if problems:
            raise PlanError("the planner's plan is invalid: " + "; ".join(problems))
    return {
        "intent": draft.intent,
        "goals": draft.goals,
        "steps": Overwrite(steps),
        "usage": usage,
        "models": [model_name(model, raw)],
    }


def known_steps(basis: SimilarWorkflow) -> tuple[list[Step], list[str]]:
    """Take a known workflow's steps and agents as they are, checked like a plan."""
    draft = PlanDraft.of(basis.intent, basis.goals, basis.steps)
    steps, problems = check_plan(draft)
    agents = [s.agents for s in basis.steps]
    return [
        s.model_copy(update={"agents": a}) for s, a in zip(steps, agents, strict=True)
    ], problems


def _retarget(intent: str, old_subject: str | None, event: CloudEvent) -> str:
    """Point a known intent at the new event's subject."""
    if old_subject and event.subject and old_subject != event.subject:
        return intent.replace(old_subject, event.subject)
    return intent
