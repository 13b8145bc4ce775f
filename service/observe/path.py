"""The path a session took through the graph, read from its transition log."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from langgraph.constants import END, START

from service.storage.transitions import Transition

__all__ = ["NodeStats", "SessionPath", "format_duration", "session_path"]


@dataclass
class NodeStats:
    """How often a session ran one node and for how long in total."""

    visits: int = 0
    """Completed runs of the node (parallel `execute_step` tasks count one each)."""
    duration_ms: int = 0
    """Sum of the durations of those runs."""


@dataclass
class SessionPath:
    """The path a session took through the graph, built from its transition log."""

    session_id: str | None = None
    """The session the transitions belong to."""
    nodes: dict[str, NodeStats] = field(default_factory=dict)
    """Nodes the session reached (including `__start__` and `__end__`), by name."""
    edges: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Traversals of each edge `(source, target)`."""
    current: list[str] = field(default_factory=list)
    """Nodes started and not finished: running now, or waiting for a human."""
    failed: list[str] = field(default_factory=list)
    """Nodes that raised."""
    status: str | None = None
    """The last terminal transition's type, e.g. `session.completed`."""

    def visited(self, node: str) -> bool:
        """Whether the session reached a node."""
        return node in self.nodes

    def as_dict(self) -> dict[str, Any]:
        """Return the path as JSON-ready data."""
        return {
            "session_id": self.session_id,
            "status": self.status,
            "nodes": {
                name: {"visits": s.visits, "duration_ms": s.duration_ms}
                for name, s in self.nodes.items()
            },
            "edges": [
                {"source": src, "target": dst, "count": n} for (src, dst), n in self.edges.items()
            ],
            "current": list(self.current),
            "failed": list(self.failed),
        }

    def stats_label(self, node: str) -> str:
        """Say how often a node ran and for how long: `×2 · 1.2 s`, plus `running`/`waiting`."""
        stats = self.nodes[node]
        parts = [f"×{stats.visits} · {format_duration(stats.duration_ms)}"] if stats.visits else []
        if node in self.current:
            parts.append("waiting" if self.status == "session.interrupted" else "running")
        return " · ".join(parts)


def session_path(transitions: Iterable[Transition]) -> SessionPath:
    """Build the path a session took from its transitions, in `seq` order.

    An edge is counted when a node starts, from the nodes that finished in the
    superstep before it; a node re-started after an interrupt or a crash (started, never
    finished) is the same visit, so neither its edge nor its visit count twice.

    Args:
        transitions: one session's transitions, e.g. from `service.storage.publisher.read_log`.
    """
    path = SessionPath()
    previous: list[str] = [START]
    finished: list[str] = []  # finished since the last node started
    running: Counter[tuple[str, str | None]] = Counter()
    for t in sorted(transitions, key=lambda t: t.seq):
        path.session_id = path.session_id or t.session_id
        if t.type == "node.started" and t.node:
            if finished:
                previous, finished = list(dict.fromkeys(finished)), []
            key = (t.node, t.step_id)
            if running[key]:
                continue
            running[key] += 1
            path.nodes.setdefault(t.node, NodeStats())
            for src in previous:
                path.nodes.setdefault(src, NodeStats(visits=1) if src == START else NodeStats())
                path.edges[(src, t.node)] += 1
        elif t.type in ("node.completed", "node.failed") and t.node:
            key = (t.node, t.step_id)
            if running[key]:
                running[key] -= 1
            stats = path.nodes.setdefault(t.node, NodeStats())
            stats.visits += 1
            stats.duration_ms += t.duration_ms or 0
            finished.append(t.node)
            if t.type == "node.failed" and t.node not in path.failed:
                path.failed.append(t.node)
        elif t.type == "session.started" and t.data and t.data.get("replay_from"):
            # A replay forks from a checkpoint: it goes on from the nodes before the fork.
            previous, finished = list(t.data.get("after") or []), []
            running.clear()
        elif t.type == "session.started" and t.data and t.data.get("resumed") is False:
            previous, finished = [START], []  # a new event of the session starts over
        elif t.type == "session.completed":
            last = list(dict.fromkeys(finished)) if finished else previous
            for src in last:
                path.edges[(src, END)] += 1
            path.nodes.setdefault(END, NodeStats(visits=1))
            path.status = t.type
            running.clear()
        elif t.type in ("session.failed", "session.interrupted"):
            path.status = t.type
            if t.type == "session.failed":
                running.clear()
    path.current = list(dict.fromkeys(node for (node, _), n in running.items() if n > 0))
    return path


def format_duration(ms: int) -> str:
    """Format milliseconds for a label: `12 ms`, `1.2 s`, `2m 05s`."""
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(round(ms / 1000), 60)
    return f"{minutes}m {seconds:02d}s"
