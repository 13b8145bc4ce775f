"""One layered layout of the graph, shared by the SVG and PNG drawings.

Ranks come from a breadth-first walk; edges that go up the ranks are drawn as curves.
"""

from __future__ import annotations

from dataclasses import dataclass

from langchain_core.runnables.graph import Graph
from langgraph.constants import END, START

from service.observe.path import SessionPath

__all__ = ["HEIGHT", "Box", "Layout", "Line"]

_ROW = 96.0  # vertical distance between ranks
_GAP = 44.0  # horizontal gap between nodes of a rank
HEIGHT = 46.0  # of a node
_MARGIN = 70.0
_BEND = 46.0  # how far back-edges bulge out


@dataclass
class Box:
    """A node, placed: its centre, its label and stats line, and its CSS classes."""

    name: str
    x: float  # centre
    y: float  # centre
    label: str
    stats: str | None
    classes: list[str]


@dataclass
class Line:
    """An edge, placed: a straight segment or a cubic curve, with its count label."""

    source: str
    target: str
    points: list[tuple[float, float]]  # start, [control1, control2,] end
    label: str | None
    classes: list[str]
    label_at: tuple[float, float]
    anchor: str = "start"  # the label's side of `label_at`: start | end


@dataclass
class Layout:
    """The whole drawing: its size, the width every node gets, its nodes and edges."""

    width: float
    height: float
    node_width: float
    boxes: list[Box]
    lines: list[Line]
    session_id: str | None

    @classmethod
    def of(cls, drawable: Graph, path: SessionPath | None) -> Layout:
        """Lay out a graph, marking the nodes and edges of a session's path when given."""
        names = {key: node.name for key, node in drawable.nodes.items()}
        outgoing: dict[str, list[str]] = {key: [] for key in names}
        for e in drawable.edges:
            outgoing[e.source].append(e.target)
        first = drawable.first_node()
        root = first.id if first is not None else next(iter(names))
        # Ranks in breadth-first order; anything unreachable goes below.
        rank: dict[str, int] = {root: 0}
        order = [root]
        for key in order:
            for nxt in outgoing[key]:
                if nxt not in rank:
                    rank[nxt] = rank[key] + 1
                    order.append(nxt)
        for key in names:
            if key not in rank:
                rank[key] = max(rank.values()) + 1
                order.append(key)
        node_width = max(110.0, 8.0 * max(len(_display(n)) for n in names.values()) + 30.0)
        x: dict[str, float] = {}
        for r in range(max(rank.values()) + 1):
            row = [k for k in order if rank[k] == r]
            wanted = {}
            for k in row:
                parents = [e.source for e in drawable.edges if e.target == k and e.source in x]
                wanted[k] = sum(x[p] for p in parents) / len(parents) if parents else 0.0
            row.sort(key=lambda k: wanted[k])
            step = node_width + _GAP
            centre = sum(wanted.values()) / len(row)
            for i, k in enumerate(row):
                x[k] = centre + (i - (len(row) - 1) / 2) * step
        left = min(x.values()) - node_width / 2 - _MARGIN
        boxes = []
        for k in order:
            name = names[k]
            stats = path.nodes.get(name) if path else None
            classes = ["node"]
            if name in (START, END):
                classes.append("terminal")
            if stats is not None:
                classes.append("visited")
            if path and name in path.current:
                classes.append("current")
            if path and name in path.failed:
                classes.append("failed")
            boxes.append(
                Box(
                    name=name,
                    x=x[k] - left,
                    y=_MARGIN / 2 + HEIGHT / 2 + rank[k] * _ROW,
                    label=_display(name),
                    stats=path.stats_label(name)
                    if path and stats and name not in (START, END)
                    else None,
                    classes=classes,
                )
            )
        width = max(x.values()) - left + node_width / 2 + _MARGIN
        height = _MARGIN + HEIGHT + max(rank.values()) * _ROW
        by_name = {b.name: b for b in boxes}
        mid_x = width / 2
        lines = []
        for e in drawable.edges:
            src, dst = by_name[names[e.source]], by_name[names[e.target]]
            count = path.edges.get((src.name, dst.name), 0) if path else 0
            classes = ["edge"]
            if e.conditional:
                classes.append("conditional")
            if count:
                classes.append("visited")
            if rank[e.target] > rank[e.source]:
                start = (src.x, src.y + HEIGHT / 2)
                end = (dst.x, dst.y - HEIGHT / 2)
                points = [start, end]
                # Label on the outer side of a slanted edge, to the right of a straight one.
                leftwards = end[0] < start[0] - 1
                label_at = (
                    (start[0] + end[0]) / 2 + (-8 if leftwards else 8),
                    (start[1] + end[1]) / 2,
                )
                anchor = "end" if leftwards else "start"
            else:
                classes.append("back")
                points, label_at, anchor, alongside = _back_edge(src, dst, node_width, mid_x, boxes)
                if alongside:
                    classes.append("alongside")
            lines.append(
                Line(
                    source=src.name,
                    target=dst.name,
                    points=points,
                    label=f"×{count}" if count else None,
                    classes=classes,
                    label_at=label_at,
                    anchor=anchor,
                )
            )
        # A forward edge with a back-edge drawn alongside it keeps its label on the far side.
        paired = {(ln.target, ln.source) for ln in lines if "alongside" in ln.classes}
        for ln in lines:
            if (ln.source, ln.target) in paired and ln.anchor == "end":
                mx = (ln.points[0][0] + ln.points[-1][0]) / 2
                ln.label_at, ln.anchor = (mx + 8, ln.label_at[1]), "start"
        return cls(
            width=width,
            height=height,
            node_width=node_width,
            boxes=boxes,
            lines=lines,
            session_id=path.session_id if path else None,
        )


def _display(name: str) -> str:
    return {START: "start", END: "end"}.get(name, name)


def _back_edge(
    src: Box, dst: Box, node_width: float, mid_x: float, boxes: list[Box]
) -> tuple[list[tuple[float, float]], tuple[float, float], str, bool]:
    """Draw an edge that goes up the ranks as a cubic curve.

    Round the outside of the drawing when nothing stands beside the two nodes on that
    side; otherwise alongside the forward edge between them, shifted so both show.

    Returns:
        The curve's points, where its label goes and how it is anchored, and whether the
        curve runs alongside the forward edge.
    """
    top, bottom = min(src.y, dst.y), max(src.y, dst.y)
    between = [b for b in boxes if top <= b.y <= bottom and b is not src and b is not dst]

    def clear(side: float) -> bool:
        edge = max(src.x, dst.x) if side > 0 else min(src.x, dst.x)
        return not any((b.x - edge) * side > 0 for b in between)

    preferred = 1.0 if (src.x + dst.x) / 2 >= mid_x else -1.0
    if abs(src.x - dst.x) > node_width / 2:
        preferred = 1.0 if src.x > dst.x else -1.0
    sides = [s for s in (preferred, -preferred) if clear(s)]
    if sides:
        side = sides[0]
        start = (src.x + side * node_width / 2, src.y)
        end = (dst.x + side * node_width / 2, dst.y + HEIGHT / 4)
        out = max(start[0], end[0]) if side > 0 else min(start[0], end[0])
        c1 = (out + side * _BEND, start[1])
        c2 = (out + side * _BEND, end[1])
        shift, anchor = side * 4, "start" if side > 0 else "end"
    else:
        off = 0.22 * node_width
        start = (src.x - off, src.y - HEIGHT / 2)
        end = (dst.x - off, dst.y + HEIGHT / 2)
        dx, dy = end[0] - start[0], end[1] - start[1]
        c1 = (start[0] + dx / 3 - 8, start[1] + dy / 3)
        c2 = (start[0] + 2 * dx / 3 - 8, start[1] + 2 * dy / 3)
        shift, anchor = -6, "end"
    # The curve's midpoint (t = 0.5) carries the label.
    label_at = (
        0.125 * start[0] + 0.375 * c1[0] + 0.375 * c2[0] + 0.125 * end[0] + shift,
        0.125 * start[1] + 0.375 * c1[1] + 0.375 * c2[1] + 0.125 * end[1],
    )
    return [start, c1, c2, end], label_at, anchor, not sides
