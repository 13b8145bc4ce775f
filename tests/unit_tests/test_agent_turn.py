"""`run_agent_turn`: the tool-calling loop the worker and agent hosts share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from nodes.agents import load_agents
from nodes.chat_models import make_chat_model
from nodes.execution import AgentTurn, run_agent_turn, step_task_message
from nodes.models import CloudEvent, Step
from nodes.protocol import TaskStep

EVENT = CloudEvent.wrap("claim.submitted", {"claim_id": "C-2001"}, subject="claim-C-2001")


def task_message() -> HumanMessage:
    return step_task_message(
        Step(id="s3", title="Assess eligibility", description="Assess claim C-2001"),
        EVENT,
        intent="Handle the claim",
        inputs={"s1": "recorded"},
        feedback=["a", "b", "c", "d"],
    )


def test_the_task_message_is_the_same_from_a_step_or_a_protocol_step() -> None:
    message = task_message()
    assert "Assess claim C-2001" in message.text and '"s1": "recorded"' in message.text
    assert "b; c; d" in message.text and "a; b" not in message.text  # the last three
    same = step_task_message(
        TaskStep(id="s3", title="Assess eligibility", description="Assess claim C-2001"),
        EVENT,
        intent="Handle the claim",
        inputs={"s1": "recorded"},
        feedback=["a", "b", "c", "d"],
    )
    assert same.text == message.text


async def analyst_turn(
    max_iterations: int, on_message: Callable[[BaseMessage], Awaitable[None]] | None = None
) -> AgentTurn:
    registry = load_agents("examples/agents.yaml")
    return await run_agent_turn(
        registry.get("eligibility_analyst"),
        [task_message()],
        model=make_chat_model("offline"),
        tools=registry.tools_of("eligibility_analyst"),
        max_iterations=max_iterations,
        timeout_s=5,
        on_message=on_message,
    )


async def test_a_turn_calls_tools_reports_each_message_as_it_comes_and_counts_usage() -> None:
    turn_so_far: list[BaseMessage] = []

    async def on_message(message: BaseMessage) -> None:
        turn_so_far.append(message)

    turn = await analyst_turn(4, on_message)
    assert [type(m) for m in turn.messages] == [AIMessage, ToolMessage, AIMessage]
    assert turn_so_far == turn.messages  # each one as it was produced, in order
    call = turn.messages[0].tool_calls[0]  # type: ignore[attr-defined]
    assert call["name"] == "check_eligibility" and call["args"] == {"claim_id": "C-2001"}
    assert turn.messages[1].content == "claim C-2001: eligible for disability benefits"
    assert all(m.name == "eligibility_analyst" for m in turn.messages if isinstance(m, AIMessage))
    assert turn.answer == turn.messages[2].text and "eligible" in turn.answer
    assert turn.usage.llm_calls == 2 and turn.usage.input_tokens > 0
    assert turn.model == "offline"


async def test_a_turn_stops_at_its_bound() -> None:
    turn = await analyst_turn(1)
    assert [type(m) for m in turn.messages] == [AIMessage, ToolMessage]
    assert turn.answer == "stopped after 1 model turns" and turn.usage.llm_calls == 1
