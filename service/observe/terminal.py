"""How transitions and results read in a terminal: one line per transition, then the result."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape

from nodes.models import HumanAnswer, WorkflowResult
from service.storage.transitions import Transition, TransitionType

__all__ = ["print_result", "print_transition"]

_STYLE: dict[TransitionType, str] = {
    "session.started": "bold cyan",
    "node.started": "dim",
    "node.completed": "green",
    "node.failed": "bold red",
    "step.started": "dim",
    "step.completed": "green",
    "agent.message": "blue",
    "session.interrupted": "bold yellow",
    "session.answered": "bold yellow",
    "session.waiting": "yellow",
    "session.completed": "bold green",
    "session.failed": "bold red",
    "session.rejected": "bold red",
    "session.superseded": "bold magenta",
    "session.rolled_back": "bold magenta",
    "event.refused": "magenta",
    "event.parked": "magenta",
}


_DOUBLE_TEXTS = ("session.superseded", "session.rolled_back", "event.refused", "event.parked")
"""What a newer event did to a busy session: each carries its reason (`error`, `reason`)."""


def _detail(t: Transition) -> str:
    data = t.data or {}
    if t.type == "agent.message":
        # A local agent's calls are names; a remote agent's, the protocol's dicts.
        calls = [
            c if isinstance(c, str) else str(c.get("name")) for c in data.get("tool_calls") or []
        ]
        text = f"calls {', '.join(calls)}" if calls else str(data.get("content", ""))
        if "task_id" in data:  # a remote agent's task: its message came over Kafka
            text = f"over Kafka: {text}"
        return text[:110]
    if t.type == "node.completed" and t.node == "plan":
        return f"{len(data.get('steps', []))} steps: {data.get('intent', '')}"[:110]
    if t.type == "node.completed" and t.node == "assign":
        return ", ".join(f"{k}→{'+'.join(v)}" for k, v in data.get("agents", {}).items())
    if t.type == "node.completed" and t.node == "review":
        return f"{data.get('verdict')}: {data.get('feedback', '')}"[:110]
    if t.type == "node.completed" and t.node == "discover":
        similar = data.get("similar", [])
        return data.get("note") or f"{len(similar)} similar workflow(s)"
    if t.type in ("node.failed", "session.failed", *_DOUBLE_TEXTS):
        return str(data.get("error") or data.get("reason") or "")[:200]
    if t.type == "session.interrupted":
        return f"asks: {data.get('question', '')}"
    if t.type == "session.answered" and "decision" in data:
        return HumanAnswer.model_validate(data).line()[:200]
    if t.type == "session.rejected":
        return str(data.get("error") or "")[:200]
    if t.type == "session.waiting":
        return "; ".join(_waits(data.get("result") or {}))
    if t.type == "step.completed":
        return str(data.get("status", ""))
    if t.type == "session.started":
        return f"event {data.get('event_id')}" + (" (resumed)" if data.get("resumed") else "")
    return ""


def _waits(result: dict[str, Any]) -> list[str]:
    """Say what a waiting session waits for: each remote agent's task, until when."""
    said = []
    for wait in result.get("waiting_on") or []:
        text = f"waits for {wait.get('agent')} over Kafka (step {wait.get('step_id')}"
        if (attempt := wait.get("attempt", 1)) > 1:
            text += f", attempt {attempt}"
        if deadline := wait.get("deadline"):
            text += f", until {datetime.fromisoformat(deadline):%H:%M:%S}"
        elif timeout_s := wait.get("timeout_s"):
            text += f", answer within {timeout_s:g} s"
        said.append(text + ")")
    return said


def print_transition(console: Console, t: Transition) -> None:
    """Print one transition as a single line."""
    where = t.node or ""
    if t.step_id:
        where += f"[{t.step_id}]"
    if t.agent:
        where += f" {t.agent}"
    took = f"{t.duration_ms:>6} ms" if t.duration_ms is not None else " " * 9
    style = _STYLE.get(t.type, "none")
    console.print(
        f"{t.seq:>4} {t.ts:%H:%M:%S.%f}"[:-3]
        + f"  [{style}]{t.type:<20}[/] {escape(where):<40} {took}  {escape(_detail(t))}",
        highlight=False,
        soft_wrap=True,
    )


def print_result(console: Console, result: WorkflowResult) -> None:
    """Print a result for a person: status, steps and summary."""
    colour = {
        "completed": "green",
        "failed": "red",
        "rejected": "red",
        "interrupted": "yellow",
    }.get(result.status, "magenta")
    console.print(
        f"\n[bold {colour}]{result.status.upper()}[/]  session {result.session_id}  "
        f"event {result.event_id}  model {result.model or '-'}"
    )
    if result.workflow.intent:
        console.print(f"[bold]intent[/]  {escape(result.workflow.intent)}")
    for step in result.workflow.steps:
        console.print(
            f"  {step.id:<4} {step.status:<8} {'+'.join(step.agents):<30} {escape(step.title)}",
            soft_wrap=True,
        )
    if result.review.verdict:
        console.print(f"[bold]review[/]  {result.review.verdict}: {escape(result.review.feedback)}")
    if result.summary:
        console.print(f"[bold]summary[/] {escape(result.summary)}")
    if result.question:
        console.print(f"[bold yellow]question[/] {escape(result.question)}")
    if result.error:
        console.print(f"[bold red]error[/]   {escape(result.error)}")
    u = result.usage
    console.print(
        f"[dim]usage   {u.llm_calls} model calls, {u.input_tokens} input + "
        f"{u.output_tokens} output tokens[/]"
    )
