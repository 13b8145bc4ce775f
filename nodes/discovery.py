"""`discover`: find past workflows similar to the event."""

from __future__ import annotations

import logging
from typing import Any

from langgraph.runtime import Runtime
from langgraph.types import Overwrite

from nodes._runtime import context_of
from nodes.context import WorkflowContext
from nodes.library import default_library
from nodes.models import CloudEvent, SimilarWorkflow, Usage, utcnow
from nodes.planning import known_steps
from nodes.state import WorkflowState

__all__ = ["choose_basis", "discover"]

logger = logging.getLogger(__name__)


def choose_basis(
    event: CloudEvent, similar: list[SimilarWorkflow], context: WorkflowContext
) -> list[SimilarWorkflow]:
    """Mark the best match as the run's basis when the reuse policy allows it.

    The best match is reused when it handled the same event type, has steps and scores
    at least `reuse_score`; it is then marked with the policy's mode (`adapt` or `direct`).
    Taken `direct`, its steps must also pass the plan checks; if they do not, the run
    plans from scratch with it as an example.
    """
    similar = [w.model_copy(update={"reuse": None}) for w in similar]
    if context.reuse == "off" or not similar:
        return similar
    best = similar[0]
    if best.event_type != event.type or not best.steps or best.score < context.reuse_score:
        return similar
    if context.reuse == "direct" and (problems := known_steps(best)[1]):
        logger.warning("known workflow %s cannot be taken as it is: %s", best.id, problems)
        return similar
    similar[0] = best.model_copy(update={"reuse": context.reuse})
    return similar


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
        reason = str(exc) or type(exc).__name__  # a timeout has no message
        logger.warning("workflow library unavailable, planning without examples: %s", reason)
        similar, note = [], f"workflow library unavailable: {reason}"
    similar = choose_basis(
        event, [w for w in similar if w.score >= context.min_similarity], context
    )
    # A session may handle several events: each run starts from a clean slate. Only what
    # an earlier run left is reset (a first run writes less, and every write is stored).
    resets = {
        "steps": Overwrite([]),
        "conversations": Overwrite({}),
        "feedback": Overwrite([]),
        "usage": Overwrite(Usage()),
        "models": Overwrite([]),
        "review_rounds": 0,
        "answers": Overwrite([]),
    }
    update: dict[str, Any] = {"event": event, "started_at": utcnow()}
    update |= {key: value for key, value in resets.items() if key in state}
    if similar:
        update["similar_workflows"] = similar
    elif "similar_workflows" in state:
        update["similar_workflows"] = []
    if note or "discovery_note" in state:
        update["discovery_note"] = note
    return update
