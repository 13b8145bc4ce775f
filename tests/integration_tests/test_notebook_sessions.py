"""The session-debugging notebook, with the local servers it starts itself."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.unit_tests.test_notebooks import outputs, run_notebook, text

pytestmark = pytest.mark.integration


def test_session_debugging_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a user opens it: no AGENTFLOW_REDIS_URL, so it starts Redis (and a broker) itself.
    monkeypatch.delenv("AGENTFLOW_REDIS_URL", raising=False)
    monkeypatch.delenv("AGENTFLOW_KAFKA_BOOTSTRAP", raising=False)
    notebook = run_notebook("03_session_debugging.ipynb")
    printed = text(notebook)
    assert "started here" in printed and "interrupted" in printed and "completed" in printed
    (svg,) = outputs(notebook, "image/svg+xml")
    root = ET.fromstring(svg)
    visited = {
        g.get("data-node")
        for g in root.iter("{http://www.w3.org/2000/svg}g")
        if "visited" in g.get("class", "").split()
    }
    assert {"plan", "execute_step", "review", "escalate", "finalize"} <= visited
    assert outputs(notebook, "image/png"), "the timeline is plotted"
    html = "\n".join(outputs(notebook, "text/html"))
    for title in ("nodes", "steps", "agent conversation", "checkpoints"):
        assert f"<h4>{title}</h4>" in html
