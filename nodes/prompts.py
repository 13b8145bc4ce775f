"""Prompts, as module constants with named placeholders.

Structured context travels in `<tag>...</tag>` blocks: models read them well, and
the offline model reads them to give deterministic answers.
"""

from __future__ import annotations

__all__ = [
    "ASSIGN_PROMPT",
    "PLAN_ADAPT_PROMPT",
    "PLAN_PROMPT",
    "PLAN_REPAIR_PROMPT",
    "REVIEW_PROMPT",
    "STEP_AGENT_PROMPT",
    "STEP_TASK_PROMPT",
    "SUMMARY_PROMPT",
]

PLAN_PROMPT = """You are the intent agent of an event-driven workflow system.
Read the event and plan how to handle it: state its intent in one sentence, list the
goals, and break the work into 2 to 8 steps. Give each step a short id (s1, s2, ...),
an imperative title and a description of what it must produce. Use depends_on to say
which steps must finish first; steps without a dependency between them run in
parallel, and dependencies must never form a cycle.

Similar workflows handled before (adapt them when they fit, best first):
<examples>{examples}</examples>

The event:
<event>{event}</event>"""

PLAN_ADAPT_PROMPT = """You are the intent agent of an event-driven workflow system.
A workflow that handled a very similar event before is known to work. Adapt it to the
event below instead of planning from scratch: keep the steps that still fit, with their
ids and titles unchanged, and change, add or drop steps only where this event needs it.
State the intent in one sentence and list the goals. Use depends_on to say which steps
must finish first; dependencies must never form a cycle.

The known workflow:
<examples>{examples}</examples>

The event:
<event>{event}</event>"""

PLAN_REPAIR_PROMPT = """Your plan cannot be used: {problems}
Return a corrected plan for the same event."""

ASSIGN_PROMPT = """Assign agents to the steps of a workflow. For each step choose the
agent whose description and capabilities fit it best, by exact name from the catalogue.
When a step clearly needs two kinds of expertise, list several agents: they work on
the step in turn. Never invent an agent.

Agent catalogue:
<agents>{agents}</agents>

Workflow intent: {intent}
Steps:
<steps>{steps}</steps>"""

STEP_AGENT_PROMPT = """{system_prompt}

You are agent `{agent}` working on one step of a larger workflow. Use your tools when
they help, then answer with the step's result in a few sentences. If other agents
worked on this step before you, build on their messages."""

STEP_TASK_PROMPT = """Workflow intent: {intent}
<step>{step}</step>
Results of the steps this one depends on:
<inputs>{inputs}</inputs>
Reviewer feedback to take into account: {feedback}
The event:
<event>{event}</event>"""

REVIEW_PROMPT = """You review the result of a workflow. Decide:
- approve: the steps achieved the goals;
- revise: some steps must be redone; list their ids in steps_to_redo and say what to fix;
- escalate: a human must decide; ask one clear question.
Failed steps are never acceptable without revise or escalate.

Intent: {intent}
Goals: {goals}
Steps with their agents, status and output:
<steps>{steps}</steps>
Earlier feedback: {feedback}"""

SUMMARY_PROMPT = """Summarise for the requester, in at most five sentences, what this
workflow did and what came out of it.
<summary-request>yes</summary-request>
<intent>{intent}</intent>
<steps>{steps}</steps>
Review: {review}"""
