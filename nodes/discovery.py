"""`discover`: find past workflows similar to the event."""

from __future__ import annotations

import logging
from typing import Any

from langgraph.runtime import Runtime
from langgraph.types import Overwrite

from nodes._runtime import context_of
from nodes.context import WorkflowContext
from nodes.library import default_library
from nodes.models import CloudEvent, Usage, utcnow
from nodes.state import WorkflowState

__all__ = ["discover"]

logger = logging.getLogger(__name__)


async def discover(state: WorkflowState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    """Validate the event and look up similar workflows in the library.

    A library that cannot be searched does not stop the run: it goes on without
    examples and says why in `discovery_note`.
    """
    context = context_of(runtime)
    event = CloudEvent.model_validate(state["event"])
    library = default_library() if context.library is None else context.library
    note = ""
    try:
        similar = await library.search(event, limit=context.max_similar)
    except Exception as exc:  # any library outage must not stop the run
        logger.warning("workflow library unavailable, planning without examples: %s", exc)
        similar, note = [], f"workflow library unavailable: {exc}"
    similar = [w for w in similar if w.score >= context.min_similarity]
    # A session may handle several events: each run starts from a clean slate.
    return {
        "event": event,
        "started_at": utcnow(),
        "similar_workflows": similar,
        "discovery_note": note,
        "steps": Overwrite([]),
        "conversations": Overwrite({}),
        "feedback": Overwrite([]),
        "usage": Overwrite(Usage()),
        "models": Overwrite([]),
        "review_rounds": 0,
        "human_answer": {},
    }
