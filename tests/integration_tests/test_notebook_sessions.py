"""The session-debugging notebook: on servers it starts itself, and on a worker's session."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from service.config import Settings
from tests.integration_tests.conftest import example, read_topic, results_by_event, send
from tests.integration_tests.notebook_helpers import outputs, run_notebook, text


def visited_nodes(svg: str) -> set[str]:
    """The nodes a drawn session path marks as visited."""
    return {
        g.get("data-node") or ""
        for g in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}g")
        if "visited" in g.get("class", "").split()
    }


async def test_session_debugging_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a user opens it: no AGENTFLOW_REDIS_URL, so it starts Redis (and a broker) itself.
    monkeypatch.delenv("AGENTFLOW_REDIS_URL", raising=False)
    monkeypatch.delenv("AGENTFLOW_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("AGENTFLOW_SESSION_ID", raising=False)
    notebook = await run_notebook("03_session_debugging.ipynb")
    printed = text(notebook)
    assert "started here" in printed and "sample session" in printed
    assert "interrupted" in printed and "completed" in printed
    (svg,) = outputs(notebook, "image/svg+xml")
    assert {"plan", "execute_step", "review", "escalate", "finalize"} <= visited_nodes(svg)
    assert outputs(notebook, "image/png"), "the timeline is plotted"
    html = "\n".join(outputs(notebook, "text/html"))
    for title in ("nodes", "steps", "agent conversation", "checkpoints"):
        assert f"<h4>{title}</h4>" in html


async def test_session_debugging_notebook_on_a_session_of_the_worker(
    settings: Settings,
    start_worker: Any,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A session the worker ran and that waits for a human, looked at by its id.
    await start_worker(settings)
    session_id = f"nb-worker-{uuid.uuid4().hex[:8]}"
    event = example("claim_needs_review")
    await send(producer, settings, event, session_id)
    await read_topic(
        settings.kafka_bootstrap or "",
        settings.topic_results,
        until=lambda records: event["id"] in results_by_event(records),
    )

    monkeypatch.setenv("AGENTFLOW_REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("AGENTFLOW_SESSION_ID", session_id)
    notebook = await run_notebook("03_session_debugging.ipynb")
    printed = text(notebook)
    assert "from AGENTFLOW_REDIS_URL" in printed
    assert f"looking at session {session_id}" in printed and "sample session" not in printed
    assert f"{session_id}: interrupted, events ['{event['id']}']" in printed
    (svg,) = outputs(notebook, "image/svg+xml")
    visited = visited_nodes(svg)
    assert {"plan", "execute_step", "review", "escalate"} <= visited
    assert "finalize" not in visited  # it still waits for the human
    html = "\n".join(outputs(notebook, "text/html"))
    for title in ("nodes", "steps", "agent conversation", "checkpoints"):
        assert f"<h4>{title}</h4>" in html
