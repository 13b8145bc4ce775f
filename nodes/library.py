"""The workflow library protocol and its in-memory implementation."""

from __future__ import annotations

import math
import re
import uuid
from collections import Counter
from typing import Protocol, runtime_checkable

from nodes.models import CloudEvent, SimilarWorkflow, Workflow

__all__ = ["InMemoryWorkflowLibrary", "WorkflowLibrary", "default_library"]

_TOKEN = re.compile(r"[a-z0-9]+")


@runtime_checkable
class WorkflowLibrary(Protocol):
    """Where finished workflows are kept and similar ones are found."""

    async def search(self, event: CloudEvent, *, limit: int = 3) -> list[SimilarWorkflow]:
        """Return workflows similar to the event, best first, with scores in [0, 1]."""
        ...

    async def add(self, workflow: Workflow, *, summary: str = "") -> str:
        """Keep a finished workflow and return its id."""
        ...


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _event_text(event: CloudEvent) -> str:
    return f"{event.type} {event.type.replace('.', ' ')} {event.data_summary()}"


class InMemoryWorkflowLibrary:
    """A process-local library scored by cosine similarity of word counts."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[SimilarWorkflow, Counter[str]]] = {}

    def __repr__(self) -> str:
        return f"InMemoryWorkflowLibrary(workflows={len(self._items)})"

    def __len__(self) -> int:
        return len(self._items)

    async def add(self, workflow: Workflow, *, summary: str = "") -> str:
        """Keep a finished workflow and return its id."""
        workflow_id = uuid.uuid4().hex[:12]
        item = SimilarWorkflow(
            id=workflow_id,
            score=0.0,
            event_type=workflow.event.type,
            intent=workflow.intent,
            goals=workflow.goals,
            steps=workflow.steps,
            summary=summary,
        )
        text = " ".join(
            [_event_text(workflow.event), workflow.intent, *workflow.goals]
            + [f"{s.title} {s.description}" for s in workflow.steps]
        )
        self._items[workflow_id] = (item, Counter(_tokens(text)))
        return workflow_id

    async def search(self, event: CloudEvent, *, limit: int = 3) -> list[SimilarWorkflow]:
        """Return workflows similar to the event, best first."""
        query = Counter(_tokens(_event_text(event)))
        scored = []
        for item, counts in self._items.values():
            score = _cosine(query, counts)
            if item.event_type == event.type:
                score = min(1.0, score + 0.5)
            if score > 0:
                scored.append(item.model_copy(update={"score": round(score, 4)}))
        scored.sort(key=lambda w: -w.score)
        return scored[:limit]


def _cosine(a: Counter[str], b: Counter[str]) -> float:
    dot = sum(count * b[word] for word, count in a.items())
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


_DEFAULT = InMemoryWorkflowLibrary()


def default_library() -> InMemoryWorkflowLibrary:
    """Return the process-wide in-memory library used when a run names none."""
    return _DEFAULT
