"""Memory on a real Redis: subject notes across sessions, the LLM cache, session history."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from langchain_core.globals import get_llm_cache, set_llm_cache
from langgraph.checkpoint.memory import InMemorySaver
from redis.asyncio import Redis

from graphs.workflow import build_graph
from nodes.context import WorkflowContext
from nodes.library import InMemoryWorkflowLibrary
from nodes.models import WorkflowResult
from service.config import Settings
from service.runtime.runner import SessionRunner
from service.storage.checkpoints import checkpoint_serde
from service.storage.keys import LLM_CACHE_PREFIX
from service.storage.memory import install_llm_cache, open_subject_store, subject_notes
from tests.integration_tests.conftest import example, read_topic, results_by_event, send


@pytest.fixture
def llm_cache_reset() -> Iterator[None]:
    """The LLM cache is process-wide: put it back as it was."""
    before = get_llm_cache()
    yield
    set_llm_cache(before)


async def test_agents_recall_earlier_sessions_of_the_same_subject(
    redis: Redis, make_event: Any
) -> None:
    store = await open_subject_store(redis)
    subject = f"C-{uuid.uuid4().hex[:6]}"
    graph = build_graph(InMemorySaver(serde=checkpoint_serde()), store=store)
    runner = SessionRunner(graph, WorkflowContext(library=InMemoryWorkflowLibrary()))

    first = await runner.start(make_event(subject=subject), "mem-a")
    second = await runner.start(make_event("status_requested", subject=subject), "mem-b")
    other = await runner.start(make_event("status_requested", subject="C-other"), "mem-c")

    assert first.status == second.status == "completed"
    first_outputs = " ".join(s.output for s in first.workflow.steps)
    assert f"No earlier sessions about {subject}." in first_outputs
    second_outputs = " ".join(s.output for s in second.workflow.steps)
    assert f"Earlier sessions about {subject}:" in second_outputs
    assert "claim.submitted (session mem-a, completed)" in second_outputs
    assert "mem-a" not in " ".join(s.output for s in other.workflow.steps)

    notes = await subject_notes(store, subject)
    assert [(n.session_id, n.event_type) for n in notes] == [
        ("mem-b", "claim.status_requested"),
        ("mem-a", "claim.submitted"),
    ]
    assert notes[1].summary == first.summary and notes[1].status == "completed"


async def test_exact_llm_cache_replays_every_call(
    settings: Settings, redis: Redis, make_event: Any, llm_cache_reset: None
) -> None:
    assert install_llm_cache(settings) is None  # off by default
    cache = install_llm_cache(settings.model_copy(update={"llm_cache": "exact"}))
    assert cache is not None and get_llm_cache() is cache
    event = make_event(id=f"evt-cache-{uuid.uuid4().hex[:6]}")

    async def run(session_id: str) -> WorkflowResult:
        graph = build_graph(InMemorySaver(serde=checkpoint_serde()))
        context = WorkflowContext(library=InMemoryWorkflowLibrary())
        return await SessionRunner(graph, context).start(event, session_id)

    cold = await run("cache-1")
    warm = await run("cache-2")
    assert cold.status == warm.status == "completed"
    assert cold.usage.cached_calls == 0 and cold.usage.llm_calls > 0
    assert warm.usage.llm_calls == 0 and warm.usage.input_tokens == 0
    assert warm.usage.cached_calls == cold.usage.llm_calls

    def outcome(result: WorkflowResult) -> list[tuple[str, list[str], str, str]]:
        return [(s.id, s.agents, s.status, s.output) for s in result.workflow.steps]

    assert outcome(warm) == outcome(cold) and warm.summary == cold.summary
    assert await redis.keys(f"{LLM_CACHE_PREFIX}:*")


async def test_worker_uses_library_subject_memory_and_cache(
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    redis: Redis,
    llm_cache_reset: None,
) -> None:
    settings = settings.model_copy(update={"reuse": "direct", "llm_cache": "exact"})
    await redis.delete(*(await redis.keys(f"{LLM_CACHE_PREFIX}:*")) or ["-"])
    await start_worker(settings)
    assert get_llm_cache() is not None
    subject = f"C-{uuid.uuid4().hex[:6]}"
    first = example("claim_submitted", subject=subject)
    second = example("claim_submitted", subject=subject, data={"claim_id": "C-3001"})
    results: dict[str, list[dict[str, Any]]] = {}
    for session_id, event in (("w-mem-1", first), ("w-mem-2", second)):
        await send(producer, settings, event, session_id)
        records = await read_topic(
            settings.kafka_bootstrap or "",
            settings.topic_results,
            until=lambda rs, e=event: e["id"] in results_by_event(rs),
        )
        results = results_by_event(records)

    done = WorkflowResult.model_validate(results[second["id"]][0])
    assert done.status == "completed"
    assert done.based_on is not None and done.based_on["mode"] == "direct"
    assert "plan" not in done.usage.by_node and "assign" not in done.usage.by_node
    outputs = " ".join(s.output for s in done.workflow.steps)
    assert f"Earlier sessions about {subject}:" in outputs and "w-mem-1" in outputs
    assert await redis.keys(f"{LLM_CACHE_PREFIX}:*")  # the worker's calls went through it
    basis = await redis.json().get(f"agentflow:workflow:{done.based_on['id']}")  # type: ignore[misc]
    assert basis["workflow"]["reuse_count"] >= 1


async def test_sessions_history_prints_each_step_and_agent(
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await start_worker(settings)
    event = example("document_uploaded")
    await send(producer, settings, event, "w-history")
    await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda rs: event["id"] in results_by_event(rs),
    )
    from service.cli.app import main

    monkeypatch.setenv("AGENTFLOW_REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("COLUMNS", "200")

    def history(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as done:
            main(["sessions", "history", *args])
        out = capsys.readouterr()
        return int(done.value.code or 0), out.out, out.err

    # the CLI runs its own event loop: keep it off this test's loop
    code, out, err = await asyncio.to_thread(history, "w-history")
    assert code == 0, err
    assert f"event {event['id']}  document.uploaded" in out
    assert "document_reviewer" in out and "calls list_documents(claim_id=C-2001)" in out
    assert "tool list_documents" in out
    code, out, _ = await asyncio.to_thread(history, "w-history", "--json")
    (run,) = json.loads(out)
    assert run["event"]["id"] == event["id"]
    messages = [m for step in run["steps"].values() for m in step["messages"]]
    assert {m["type"] for m in messages} >= {"human", "ai", "tool"}
    code, _, err = await asyncio.to_thread(history, "no-such-session")
    assert code == 2 and "has no checkpoints" in err
