"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodes.chat_models import make_chat_model
from nodes.models import CloudEvent

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run offline unless they point a model somewhere themselves."""
    for name in ("AGENTFLOW_MODEL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    make_chat_model.cache_clear()


@pytest.fixture
def make_event() -> Callable[..., CloudEvent]:
    """Build an event from an example file, with overrides."""

    def make(name: str = "claim_submitted", **overrides: Any) -> CloudEvent:
        raw = json.loads((EXAMPLES / "events" / f"{name}.json").read_text())
        raw.update(overrides)
        return CloudEvent.parse(raw)

    return make
