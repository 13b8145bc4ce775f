"""A step's turn by a remote agent (`runs: kafka`) is a durable wait: an interrupt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from graphs.workflow import build_graph
from nodes.context import WorkflowContext
from nodes.models import WorkflowResult
from service.errors import UnknownSessionError
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import checkpoint_serde
from service.storage.transitions import Transition
from tests.unit_tests.helpers import scripted, write_agents

TEAM = """
agents:
  - name: first
    description: Takes in, records and reviews claims, documents and eligibility.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    system_prompt: First.
  - name: second
    description: Takes in, records and reviews claims, documents and eligibility.
    capabilities: [take, record, review, document, assess, eligibility, report, outcome, claim]
    system_prompt: Second.
    runs: kafka
    timeout_s: 30
"""


def _runner(tmp_path: Path, seen: list[Transition] | None = None) -> tuple[SessionRunner, Any]:
    agents = write_agents(tmp_path, "", TEAM, module="wait_tools")
    model = scripted(lambda text, kw: None)
    graph = build_graph(InMemorySaver(serde=checkpoint_serde()))
    context = WorkflowContext(agents_file=str(agents), chat_model=model)

    async def sink(transition: Transition) -> None:
        (seen if seen is not None else []).append(transition)

    return SessionRunner(graph, context, sink=sink), model


def _reply(task_id: str, status: str = "done", output: str = "") -> dict[str, Any]:
    return {
        "task_id": task_id,
        "agent": "second",
        "status": status,
        "output": output or f"second's answer to {task_id[:6]}",
        "messages": [],
        "usage": {"llm_calls": 1, "input_tokens": 10, "output_tokens": 5},
    }


async def _answer_all(runner: SessionRunner, result: WorkflowResult, sid: str) -> WorkflowResult:
    """Reply to every task the session waits for, one by one, until the run ends."""
    while result.status == "waiting":
        result = await runner.reply(
            sid, result.waiting_on[0].task_id, _reply(result.waiting_on[0].task_id)
        )
    return result


async def test_a_remote_turn_waits_and_its_reply_resumes_the_step(
    tmp_path: Path, make_event: Any
) -> None:
    runner, model = _runner(tmp_path)
    result = await runner.start(make_event(), "wait")
    assert result.status == "waiting"
    assert result.waiting_on and all(w.agent == "second" for w in result.waiting_on)
    waits = {w.step_id: w for w in result.waiting_on}
    calls_before = len(model.calls)
    # The first reply resumes one step; the others' tasks wait on, under the same ids.
    first = result.waiting_on[0]
    result = await runner.reply("wait", first.task_id, _reply(first.task_id))
    # The local turns that led to the waits are not called again.
    again = [
        c
        for c in model.calls[calls_before:]
        for step_id in waits
        if "First." in c and f'"id": "{step_id}"' in c
    ]
    assert again == []
    for w in result.waiting_on:
        if w.step_id in waits:
            assert w.task_id == waits[w.step_id].task_id
    result = await _answer_all(runner, result, "wait")
    assert result.status == "completed"
    step = result.workflow.steps[0]
    assert step.status == "done"
    assert "first:" in step.output and "second: second's answer" in step.output
    state = await runner.graph.aget_state(runner.config("wait"))
    names = [getattr(m, "name", None) for m in state.values["conversations"][step.id]]
    assert names.index("first") < names.index("second")
    assert result.usage.llm_calls >= 1


async def test_a_task_that_times_out_is_sent_again_then_the_step_fails(
    tmp_path: Path, make_event: Any
) -> None:
    seen: list[Transition] = []
    runner, _ = _runner(tmp_path, seen)
    result = await runner.start(make_event(), "late")
    wait = result.waiting_on[0]
    assert wait.attempt == 1
    result = await runner.reply("late", wait.task_id, _reply(wait.task_id, "timeout"))
    again = next(w for w in result.waiting_on if w.step_id == wait.step_id)
    assert again.attempt == 2 and again.task_id != wait.task_id
    await runner.reply("late", again.task_id, _reply(again.task_id, "timeout"))
    failed = [
        t.data for t in seen if t.type == "step.completed" and t.step_id == wait.step_id and t.data
    ]
    assert failed == [
        {
            "status": "failed",
            "duration_ms": failed[0]["duration_ms"],
            "error": "agent second did not answer within 30 s",
        }
    ]


async def test_a_reply_for_a_task_not_waited_for_is_refused(
    tmp_path: Path, make_event: Any
) -> None:
    runner, _ = _runner(tmp_path)
    result = await runner.start(make_event(), "dup")
    wait = result.waiting_on[0]
    await runner.reply("dup", wait.task_id, _reply(wait.task_id))
    with pytest.raises(UnknownSessionError):
        await runner.reply("dup", wait.task_id, _reply(wait.task_id))
    with pytest.raises(UnknownSessionError):
        await runner.reply("dup", "no-such-task", _reply("no-such-task"))
