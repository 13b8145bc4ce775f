"""`assign`: choose agents for each step from the registry."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage
from langgraph.runtime import Runtime

from nodes._llm import chat_model, invoke_structured, model_name, node_attempt
from nodes._runtime import context_of, dumps
from nodes.agents import AgentRegistry, load_agents
from nodes.context import WorkflowContext
from nodes.errors import StructuredOutputError
from nodes.models import AssignmentDraft, Step, Usage
from nodes.state import WorkflowState

__all__ = ["assign", "check_assignment", "keep_known_agents", "render_assign_prompt"]

from nodes.prompts import ASSIGN_PROMPT


def render_assign_prompt(state: WorkflowState, registry: AgentRegistry) -> list[BaseMessage]:
    """Render the assigner's messages for a state."""
    steps = [s.model_dump(include={"id", "title", "description"}) for s in state["steps"]]
    prompt = ASSIGN_PROMPT.format(
        agents=dumps(registry.catalogue()), intent=state.get("intent", ""), steps=dumps(steps)
    )
    return [HumanMessage(prompt)]


def check_assignment(
    draft: AssignmentDraft, steps: list[Step], registry: AgentRegistry
) -> tuple[list[Step], list[str]]:
    """Apply an assignment to the steps, refusing unknown agents and missing steps.

    Returns:
        The steps with agents, and the problems found, as sentences.
    """
    chosen = {a.step_id: list(dict.fromkeys(a.agents)) for a in draft.assignments}
    problems: list[str] = []
    assigned: list[Step] = []
    for step in steps:
        agents = chosen.get(step.id, [])
        unknown = [a for a in agents if a not in registry]
        if unknown:
            problems.append(f"step {step.id}: unknown agent(s) {', '.join(unknown)}")
        elif not agents:
            problems.append(f"step {step.id} has no agent")
        assigned.append(step.model_copy(update={"agents": agents}))
    return assigned, problems


async def assign(state: WorkflowState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    """Ask the assigner which agents take each step, and validate the answer.

    Steps carried over from the run's basis keep their known agents; only the others
    go to the model, and when there are none, no model is called.

    Raises:
        StructuredOutputError: the answer still names unknown agents after one repair
            request (the node's retry policy asks again).
    """
    context = context_of(runtime)
    registry = await asyncio.to_thread(load_agents, context.agents_file)
    kept, todo = keep_known_agents(state, registry)
    if not todo:
        return {"steps": kept, "usage": Usage()}
    state = {**state, "steps": todo}
    model = chat_model(context, "assign")
    messages = render_assign_prompt(state, registry)
    draft, raw, usage = await invoke_structured(
        model, AssignmentDraft, messages, node="assign", timeout_s=context.model_timeout_s
    )
    steps, problems = check_assignment(draft, state["steps"], registry)
    if problems:
        repair = HumanMessage(
            "Your assignment cannot be used: "
            + "; ".join(problems)
            + f". Use only these agent names: {', '.join(registry.names)}."
        )
        draft, raw, more = await invoke_structured(
            model,
            AssignmentDraft,
            [*messages, repair],
            node="assign",
            timeout_s=context.model_timeout_s,
        )
        usage = usage + more
        steps, problems = check_assignment(draft, state["steps"], registry)
        if problems:
            raise StructuredOutputError(
                "assign", "invalid agent assignment: " + "; ".join(problems), node_attempt()
            )
    return {"steps": [*kept, *steps], "usage": usage, "models": [model_name(model, raw)]}


def keep_known_agents(
    state: WorkflowState, registry: AgentRegistry
) -> tuple[list[Step], list[Step]]:
    """Give steps carried over from the run's basis the basis's agents.

    A step keeps the known agents when the basis has a step with its id and title whose
    agents all exist in the registry.

    Returns:
        The steps with known agents, and the steps still to assign.
    """
    basis = next((w for w in state.get("similar_workflows", []) if w.reuse is not None), None)
    known = {s.id: s for s in basis.steps} if basis is not None else {}
    kept: list[Step] = []
    todo: list[Step] = []
    for step in state["steps"]:
        base = known.get(step.id)
        if (
            base is not None
            and base.title.strip().lower() == step.title.strip().lower()
            and base.agents
            and all(a in registry for a in base.agents)
        ):
            kept.append(step.model_copy(update={"agents": base.agents}))
        else:
            todo.append(step)
    return kept, todo
