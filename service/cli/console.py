"""The CLI's output: results and their exit codes, the library's workflows, histories.

One line per transition and the result block are `service.observe.terminal`'s, shared
with the demo and `agentflow run`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

import typer
from langchain_core.messages import BaseMessage, messages_to_dict
from rich.console import Console
from rich.text import Text

from nodes.models import SimilarWorkflow, WorkflowResult
from service.observe.terminal import print_result
from service.storage.memory import RunConversation

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CODES",
    "EXIT_NO_RESULT",
    "console",
    "err_console",
    "finish",
    "print_history",
    "print_table",
    "print_workflow",
    "print_workflows",
]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

EXIT_CODES = {
    "completed": 0,
    "failed": 1,
    "interrupted": 3,
    "rejected": 4,
    "refused": 5,
    "superseded": 5,
    "rolled_back": 5,
    "waiting": 6,
}
"""A result's status as the exit code of `run`, `send --wait`, `sessions answer --wait`, ...

4: a human rejected the workflow when asked.
5: the event did not run to an end of its own (refused, or stopped by a newer event).
6: `agentflow run` stopped where a remote agent (`runs: kafka`) takes a turn: only the
service (a worker, and a host of the agent) sends its task and waits for the reply."""
EXIT_BAD_INPUT = 2
EXIT_NO_RESULT = 7
"""`--wait` saw no result within `--timeout` (the event was sent; it may still run)."""


def finish(result: WorkflowResult, *, as_json: bool, service: bool) -> NoReturn:
    """Print a result (or only its JSON) and exit with its status's code.

    Args:
        result: the run's result.
        as_json: print only the result's JSON.
        service: the session lives in the service (Redis), not in `agentflow run`'s
            checkpoints: an interrupted one is answered with `agentflow sessions answer`.
    """
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        print_result(console, result)
        if result.status == "interrupted":
            command = "sessions answer" if service else "run --resume"
            console.print(
                f"\nanswer with: agentflow {command} {result.session_id} "
                "--approve | --reject | --revise [--steps S1,S2] [--feedback TEXT]",
                soft_wrap=True,
                markup=False,
            )
        elif result.status == "waiting":
            agents = ", ".join(sorted({w.agent for w in result.waiting_on}))
            console.print(
                f"\nwaits for remote agent(s) {agents} (runs: kafka): run the event through "
                "the service (`agentflow send`, a worker and `agentflow agents serve`)",
                soft_wrap=True,
            )
    raise typer.Exit(EXIT_CODES[result.status])


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M}" if moment is not None else "–"


_WORKFLOW_COLUMNS = ("id", "event type", "source", "quality", "reused", "last used", "intent")


def print_workflows(items: Sequence[SimilarWorkflow], total: int) -> None:
    """Print the library's workflows, one line each, with their ids whole.

    See `print_table`: piped, `cut -f1` gives the ids that `show` and `delete` take.
    """
    rows = [
        (
            w.id,
            w.event_type,
            w.source,
            f"{w.quality:.2f}",
            str(w.reuse_count),
            _when(w.last_used),
            " ".join(w.intent.split()),
        )
        for w in items
    ]
    print_table(_WORKFLOW_COLUMNS, rows)
    if console.is_terminal:
        console.print(f"{len(items)} of {total} workflow(s)")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print rows under a header line, every cell whole.

    On a terminal, aligned columns (the last one free, wrapped by the terminal); piped,
    tab-separated lines, so that `cut -f` takes a column.
    """
    if not console.is_terminal:
        for row in (columns, *rows):
            typer.echo("\t".join(row))
        return
    aligned = len(columns) - 1
    widths = [max(len(row[i]) for row in (columns, *rows)) for i in range(aligned)]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(width) for cell, width in zip(row[:aligned], widths, strict=True)]
        return "  ".join([*cells, row[aligned]])

    console.print(Text(line(columns), style="bold"), soft_wrap=True)
    for row in rows:
        console.print(Text(line(row)), soft_wrap=True)


def print_workflow(item: SimilarWorkflow) -> None:
    """Print one workflow: what it handled, its steps and agents, and how it did."""
    lines = [
        f"workflow   {item.id}",
        f"event type {item.event_type}",
        f"source     {item.source}    verdict {item.verdict}",
        f"quality    {item.quality:.2f}    reused {item.reuse_count}×    "
        f"last used {_when(item.last_used)}",
        f"intent     {item.intent}",
        *(f"goal       {goal}" for goal in item.goals),
    ]
    if item.data_summary:
        lines.append(f"data       {item.data_summary}")
    lines.append("steps")
    for step in item.steps:
        after = f"  (after {', '.join(step.depends_on)})" if step.depends_on else ""
        lines.append(f"  {step.id:<4} {'+'.join(step.agents):<24} {step.title}{after}")
    if item.summary:
        lines.append(f"summary    {item.summary}")
    for line in lines:
        console.print(line, markup=False, soft_wrap=True)


def print_history(runs: Sequence[RunConversation], *, full: bool, as_json: bool) -> None:
    """Print a session's conversation: per event, per step, per agent; then who answered.

    Args:
        runs: the session's runs, oldest first.
        full: do not shorten messages.
        as_json: print the runs as JSON, messages in LangChain's dict form.
    """
    if as_json:
        typer.echo(json.dumps([_run_json(run) for run in runs], indent=2, default=str))
        return
    width = None if full else 160
    for run in runs:
        subject = f"  subject {run.event.subject}" if run.event.subject else ""
        console.print(f"event {run.event.id}  {run.event.type}{subject}", markup=False)
        for step in run.steps:
            agents = "+".join(step.agents)
            console.print(f"  {step.id} {step.title}  ({agents})  {step.status}", markup=False)
            for message in run.conversations.get(step.id, []):
                console.print("      " + _message_line(message, width), markup=False)
        for answer in run.answers:
            when = f"{answer.answered_at:%Y-%m-%d %H:%M:%S}" if answer.answered_at else "–"
            event = f"  event {answer.event_id}" if answer.event_id else ""
            console.print(
                f"  answered  {answer.line()}  ({answer.kind} {answer.interrupt_id}, {when}"
                f"{event})",
                markup=False,
                soft_wrap=True,
            )


def _run_json(run: RunConversation) -> dict[str, Any]:
    return {
        "event": run.event.model_dump(mode="json", exclude_none=True),
        "steps": {
            step.id: {
                "title": step.title,
                "agents": step.agents,
                "status": step.status,
                "messages": messages_to_dict(run.conversations.get(step.id, [])),
            }
            for step in run.steps
        },
        "answers": [a.model_dump(mode="json", exclude_none=True) for a in run.answers],
    }


def _message_line(message: BaseMessage, width: int | None) -> str:
    """Render one message as `who: what`, shortened to `width` characters."""
    if message.type == "ai":
        who = message.name or "agent"
        calls = [
            f"{c['name']}({', '.join(f'{k}={v}' for k, v in c['args'].items())})"
            for c in getattr(message, "tool_calls", [])
        ]
        what = "calls " + ", ".join(calls) if calls else message.text
    elif message.type == "tool":
        who, what = f"tool {message.name or ''}".strip(), message.text
    else:
        who, what = message.type, message.text
    line = f"{who:<22} {' '.join(what.split())}"
    return line if width is None or len(line) <= width else line[: width - 1] + "…"
