"""Turn the graph's stream into transitions: what a session did, as messages."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from langgraph.types import Overwrite

from nodes.models import Step
from service.storage.transitions import Transition

__all__ = ["TransitionMapper", "TransitionSink"]

TransitionSink = Callable[[Transition], Awaitable[None]]
"""Receives each transition, with its `seq` already set."""


def _node_data(name: str, result: dict[str, Any]) -> dict[str, Any] | None:
    """Pick the few facts of a node's writes worth showing live."""
    if name == "discover":
        similar = result.get("similar_workflows") or []
        data: dict[str, Any] = {"similar": [{"id": w.id, "score": w.score} for w in similar]}
        if note := result.get("discovery_note"):
            data["note"] = note
        return data
    if name == "plan":
        steps: list[Step] = result.get("steps") or []
        return {
            "intent": result.get("intent"),
            "steps": [{"id": s.id, "title": s.title, "depends_on": s.depends_on} for s in steps],
        }
    if name == "assign":
        return {"agents": {s.id: s.agents for s in result.get("steps") or []}}
    if name == "execute_step":
        steps = result.get("steps") or []
        return {"status": steps[0].status} if steps else None
    if name == "review" and (decision := result.get("review")) is not None:
        return {"verdict": decision.verdict, "feedback": decision.feedback}
    if name == "escalate" and (answers := result.get("answers")):
        return {"decision": answers[-1].decision, "feedback": answers[-1].feedback}
    if name == "finalize" and (res := result.get("result")) is not None:
        return {"status": res.status}
    return None


def _plain(result: Any) -> dict[str, Any]:
    """A node's writes as a dict, with `Overwrite` wrappers taken off."""
    if not isinstance(result, dict):
        return {}
    return {k: v.value if isinstance(v, Overwrite) else v for k, v in result.items()}


class TransitionMapper:
    """Turn LangGraph stream parts (`tasks`, `updates`, `custom`) into transitions."""

    def __init__(self, session_id: str, restored: dict[str, Any] | None = None) -> None:
        """Make a mapper for one run of a session.

        Args:
            session_id: the session.
            restored: results of tasks, by task id, that finished before a crash and whose
                saved writes LangGraph hands back instead of running them again. The
                stream still announces them; they become `node.completed` marked `restored`.
        """
        self.session_id = session_id
        self.restored = dict(restored or {})
        self._started: dict[str, tuple[float, str | None]] = {}

    def map(self, mode: str, chunk: Any) -> list[Transition]:
        """Map one `(mode, chunk)` stream part to zero or more transitions."""
        if mode == "tasks":
            return self._task(chunk)
        if mode == "custom" and isinstance(chunk, dict) and "type" in chunk:
            data = {k: v for k, v in chunk.items() if k not in {"type", "step_id", "agent"}}
            return [
                Transition(
                    session_id=self.session_id,
                    type=chunk["type"],
                    node="execute_step",
                    step_id=chunk.get("step_id"),
                    agent=chunk.get("agent"),
                    duration_ms=chunk.get("duration_ms"),
                    data=data or None,
                )
            ]
        return []

    def _task(self, chunk: dict[str, Any]) -> list[Transition]:
        name, task_id = chunk["name"], chunk["id"]
        if "input" in chunk:
            step_id = None
            if name == "execute_step" and isinstance(chunk["input"], dict):
                step = chunk["input"].get("step")
                step_id = getattr(step, "id", None)
            if task_id in self.restored:
                return [
                    self._completed(name, step_id, task_id, self.restored[task_id], restored=True)
                ]
            self._started[task_id] = (time.monotonic(), step_id)
            return [
                Transition(
                    session_id=self.session_id,
                    type="node.started",
                    node=name,
                    step_id=step_id,
                    task_id=task_id,
                )
            ]
        if task_id in self.restored:
            return []
        started, step_id = self._started.pop(task_id, (time.monotonic(), None))
        duration_ms = int((time.monotonic() - started) * 1000)
        if chunk.get("interrupts"):
            return []
        if chunk.get("error"):
            return [
                Transition(
                    session_id=self.session_id,
                    type="node.failed",
                    node=name,
                    step_id=step_id,
                    task_id=task_id,
                    duration_ms=duration_ms,
                    data={"error": str(chunk["error"])},
                )
            ]
        return [
            self._completed(name, step_id, task_id, chunk.get("result"), duration_ms=duration_ms)
        ]

    def _completed(
        self,
        name: str,
        step_id: str | None,
        task_id: str,
        result: Any,
        *,
        duration_ms: int | None = None,
        restored: bool = False,
    ) -> Transition:
        data = _node_data(name, _plain(result))
        if restored:
            data = {**(data or {}), "restored": True}
        return Transition(
            session_id=self.session_id,
            type="node.completed",
            node=name,
            step_id=step_id,
            task_id=task_id,
            duration_ms=duration_ms,
            data=data,
        )
