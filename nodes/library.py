"""The workflow library protocol, its similarity score and the in-memory implementation.

Every library scores a workflow against an event the same way, so that thresholds
(`min_similarity`, `reuse_score`) mean the same whatever library is behind them:

    score = 0.5 * same_type + 0.5 * text                        (no embeddings)
    score = 0.5 * same_type + 0.25 * text + 0.25 * vector       (hybrid)

`same_type` is 1 when the workflow handled the event's type; `text` is the share of the
event's distinct terms (type and data, see `terms`) found in the workflow's text (type,
data summary, intent, goals, steps and agents); `vector` is the cosine similarity of
their embeddings, floored at 0.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from nodes.models import CloudEvent, SimilarWorkflow, Step, Workflow, utcnow

__all__ = [
    "OFFERED_VERDICTS",
    "InMemoryWorkflowLibrary",
    "WorkflowLibrary",
    "blend_quality",
    "default_library",
    "event_text",
    "record_of",
    "similarity",
    "terms",
    "workflow_text",
]

_TOKEN = re.compile(r"[a-z0-9]+")

OFFERED_VERDICTS = frozenset({"approve", "template"})
"""Workflows with another verdict may be kept but are never offered as examples."""


@runtime_checkable
class WorkflowLibrary(Protocol):
    """Where finished workflows are kept and similar ones are found."""

    async def search(self, event: CloudEvent, *, limit: int = 3) -> list[SimilarWorkflow]:
        """Return workflows similar to the event, best first, with scores in [0, 1]."""
        ...

    async def add(self, workflow: Workflow, *, summary: str = "") -> str:
        """Keep a finished workflow and return its id."""
        ...

    async def mark_used(self, workflow_id: str, *, quality: float | None = None) -> None:
        """Count one more run based on a workflow, blending that run's quality in."""
        ...


def terms(text: str) -> list[str]:
    """Split text into lower-case words, leaving out bare numbers and single letters."""
    return [t for t in _TOKEN.findall(text.lower()) if len(t) > 1 and not t.isdigit()]


def event_text(event: CloudEvent) -> str:
    """Return the text of an event that similarity looks at: its type and data."""
    return f"{event.type} {event.data_summary()}"


def workflow_text(workflow: SimilarWorkflow) -> str:
    """Return the text of a kept workflow that search looks at."""
    parts = [workflow.event_type, workflow.data_summary, workflow.intent, *workflow.goals]
    parts += [f"{s.title} {s.description} {' '.join(s.agents)}" for s in workflow.steps]
    return " ".join(parts)


def similarity(
    query: Iterable[str],
    event_type: str | None,
    workflow_type: str,
    workflow_terms: Iterable[str],
    vector: float | None = None,
) -> float:
    """Score a workflow for a query in [0, 1] (the formula is in the module docstring).

    Args:
        query: the query's terms (see `terms`).
        event_type: the event's type, if the query is for an event.
        workflow_type: the event type the workflow handled.
        workflow_terms: the workflow's terms.
        vector: the cosine similarity of their embeddings, in hybrid search.
    """
    wanted = set(query)
    text = len(wanted & set(workflow_terms)) / len(wanted) if wanted else 0.0
    same_type = 1.0 if event_type is not None and workflow_type == event_type else 0.0
    if vector is None:
        return round(0.5 * same_type + 0.5 * text, 4)
    return round(0.5 * same_type + 0.25 * text + 0.25 * max(0.0, vector), 4)


def record_of(workflow: Workflow, *, summary: str = "", workflow_id: str = "") -> SimilarWorkflow:
    """Turn a finished workflow into what a library keeps: no outputs, fresh counters."""
    now = utcnow()
    return SimilarWorkflow(
        id=workflow_id or uuid.uuid4().hex[:12],
        event_type=workflow.event.type,
        intent=workflow.intent,
        goals=workflow.goals,
        steps=[
            Step(
                id=s.id,
                title=s.title,
                description=s.description,
                depends_on=s.depends_on,
                agents=s.agents,
            )
            for s in workflow.steps
        ],
        summary=summary,
        data_summary=workflow.event.data_summary(limit=200),
        subject=workflow.event.subject,
        verdict=workflow.verdict or "approve",
        quality=1.0 if workflow.quality is None else workflow.quality,
        created_at=now,
        last_used=now,
    )


def blend_quality(current: float, reuse_count: int, quality: float) -> float:
    """Average a run's quality into a workflow's, counting its own first run."""
    return round((current * (reuse_count + 1) + quality) / (reuse_count + 2), 4)


class InMemoryWorkflowLibrary:
    """A process-local library, scored like every library (see the module docstring)."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[SimilarWorkflow, frozenset[str]]] = {}

    def __repr__(self) -> str:
        return f"InMemoryWorkflowLibrary(workflows={len(self._items)})"

    def __len__(self) -> int:
        return len(self._items)

    async def add(self, workflow: Workflow, *, summary: str = "") -> str:
        """Keep a finished workflow and return its id."""
        return await self.put(record_of(workflow, summary=summary))

    async def put(self, item: SimilarWorkflow) -> str:
        """Keep a workflow record as it is (a template, say), replacing one with its id."""
        self._items[item.id] = (item, frozenset(terms(workflow_text(item))))
        return item.id

    async def get(self, workflow_id: str) -> SimilarWorkflow | None:
        """Return a kept workflow, or None."""
        found = self._items.get(workflow_id)
        return found[0] if found else None

    async def mark_used(self, workflow_id: str, *, quality: float | None = None) -> None:
        """Count one more run based on a workflow, blending that run's quality in."""
        if (found := self._items.get(workflow_id)) is None:
            return
        item, words = found
        update: dict[str, object] = {"reuse_count": item.reuse_count + 1, "last_used": utcnow()}
        if quality is not None:
            update["quality"] = blend_quality(item.quality, item.reuse_count, quality)
        self._items[workflow_id] = (item.model_copy(update=update), words)

    async def search(self, event: CloudEvent, *, limit: int = 3) -> list[SimilarWorkflow]:
        """Return workflows similar to the event, best first."""
        query = terms(event_text(event))
        scored = []
        for item, words in self._items.values():
            if item.verdict not in OFFERED_VERDICTS:
                continue
            score = similarity(query, event.type, item.event_type, words)
            if score > 0:
                scored.append(item.model_copy(update={"score": score}))
        scored.sort(key=lambda w: (-w.score, -w.quality, -w.reuse_count))
        return scored[:limit]


_DEFAULT = InMemoryWorkflowLibrary()


def default_library() -> InMemoryWorkflowLibrary:
    """Return the process-wide in-memory library used when a run names none."""
    return _DEFAULT
