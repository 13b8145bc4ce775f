"""Draw the workflow graph, and the path a session took through it, offline.

One function, `render_graph`, serves the CLI (`agentflow graph`), the notebooks and the
gateway. Mermaid and ASCII come from LangGraph's own drawing; SVG and PNG are laid out
here (ranks from a breadth-first walk, back-edges drawn as curves) so nothing ever
reaches mermaid.ink or a CDN.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, overload
from xml.sax.saxutils import escape, quoteattr

from langchain_core.runnables.graph import Edge, Graph, Node
from langgraph.constants import END, START

from service.storage.transitions import Transition

__all__ = [
    "DrawFormat",
    "FORMATS",
    "NodeStats",
    "SessionPath",
    "format_duration",
    "render_graph",
    "session_path",
]

DrawFormat = Literal["mermaid", "ascii", "svg", "png"]
FORMATS: tuple[str, ...] = ("mermaid", "ascii", "svg", "png")

_VISITED_STYLE = "fill:#ffe2a8,stroke:#c77700,stroke-width:2px"
_CURRENT_STYLE = "fill:#ffe2a8,stroke:#d62828,stroke-width:3px"
_FAILED_STYLE = "fill:#f8c4c4,stroke:#b00020,stroke-width:2px"
_EDGE_STYLE = "stroke:#c77700,stroke-width:2px"


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


def session_path(transitions: Iterable[Transition]) -> SessionPath:
    """Build the path a session took from its transitions, in `seq` order.

    An edge is counted when a node starts, from the nodes that finished in the
    superstep before it; a node re-started after an interrupt or a crash (started, never
    finished) is the same visit, so neither its edge nor its visit count twice.

    Args:
        transitions: one session's transitions, e.g. from `service.publisher.read_log`.
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


def _stats_label(name: str, path: SessionPath) -> str:
    """`×2 · 1.2 s`; a node running now or waiting for a human says so."""
    stats = path.nodes[name]
    parts = [f"×{stats.visits} · {format_duration(stats.duration_ms)}"] if stats.visits else []
    if name in path.current:
        parts.append("waiting" if path.status == "session.interrupted" else "running")
    return " · ".join(parts)


@overload
def render_graph(
    fmt: Literal["mermaid", "ascii", "svg"], path: SessionPath | None = None, *, graph: Any = None
) -> str: ...


@overload
def render_graph(
    fmt: Literal["png"], path: SessionPath | None = None, *, graph: Any = None
) -> bytes: ...


@overload
def render_graph(
    fmt: str, path: SessionPath | None = None, *, graph: Any = None
) -> str | bytes: ...


def render_graph(fmt: str, path: SessionPath | None = None, *, graph: Any = None) -> str | bytes:
    """Draw the workflow graph, highlighting a session's path when given.

    Args:
        fmt: `mermaid`, `ascii` or `svg` (text) or `png` (bytes).
        path: the path a session took (see `session_path`); visited nodes and edges
            are highlighted and labelled with counts and durations.
        graph: a compiled graph to draw instead of the workflow graph.

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if graph is None:
        from graphs.workflow import graph as workflow_graph

        graph = workflow_graph
    drawable: Graph = graph.get_graph()
    if fmt == "mermaid":
        return _mermaid(drawable, path)
    if fmt == "ascii":
        return _ascii(drawable, path)
    layout = _Layout.of(drawable, path)
    if fmt == "svg":
        return _svg(layout)
    return _png(layout)


# --- mermaid and ascii: LangGraph's drawing, with labels and classes added ----------------


def _labelled(drawable: Graph, path: SessionPath) -> Graph:
    nodes = {}
    for key, node in drawable.nodes.items():
        stats = path.nodes.get(node.name)
        name = node.name
        if stats is not None and node.name not in (START, END):
            name = f"{node.name} {_stats_label(node.name, path)}"
        nodes[key] = Node(id=node.id, name=name, data=node.data, metadata=node.metadata)
    edges = [
        Edge(
            source=e.source,
            target=e.target,
            data=f"×{n}" if (n := path.edges.get((e.source, e.target), 0)) else e.data,
            conditional=e.conditional,
        )
        for e in drawable.edges
    ]
    return Graph(nodes=nodes, edges=edges)


def _mermaid(drawable: Graph, path: SessionPath | None) -> str:
    if path is None:
        return drawable.draw_mermaid()
    lines = [_labelled(drawable, path).draw_mermaid().rstrip("\n")]
    lines.append(f"\tclassDef visited {_VISITED_STYLE}")
    lines.append(f"\tclassDef current {_CURRENT_STYLE}")
    lines.append(f"\tclassDef failed {_FAILED_STYLE}")
    for cls, names in (
        ("visited", [n for n in path.nodes if n not in path.current and n not in path.failed]),
        ("current", path.current),
        ("failed", path.failed),
    ):
        if names := [n for n in names if n in drawable.nodes]:
            lines.append(f"\tclass {','.join(names)} {cls};")
    walked = [str(i) for i, e in enumerate(drawable.edges) if (e.source, e.target) in path.edges]
    if walked:
        lines.append(f"\tlinkStyle {','.join(walked)} {_EDGE_STYLE};")
    return "\n".join(lines) + "\n"


def _ascii(drawable: Graph, path: SessionPath | None) -> str:
    if path is None:
        return drawable.draw_ascii()
    labelled = _labelled(drawable, path)
    labels = {
        key: f"*{node.name}*" if drawable.nodes[key].name in path.nodes else node.name
        for key, node in labelled.nodes.items()
    }
    from langchain_core.runnables.graph_ascii import draw_ascii

    text = draw_ascii(labels, labelled.edges)
    walked = [f"  {src} -> {dst}  ×{n}" for (src, dst), n in path.edges.items() if n and dst != src]
    legend = ["", f"path of session {path.session_id}  (*node* = visited)", *walked]
    if path.current:
        legend.append(f"  now at: {', '.join(path.current)}")
    if path.failed:
        legend.append(f"  failed: {', '.join(path.failed)}")
    return text + "\n".join(legend) + "\n"


# --- svg and png: one layered layout -------------------------------------------------------

_ROW = 96.0  # vertical distance between ranks
_GAP = 44.0  # horizontal gap between nodes of a rank
_HEIGHT = 46.0
_MARGIN = 70.0
_BEND = 46.0  # how far back-edges bulge out


@dataclass
class _Box:
    name: str
    x: float  # centre
    y: float  # centre
    label: str
    stats: str | None
    classes: list[str]


@dataclass
class _Line:
    source: str
    target: str
    points: list[tuple[float, float]]  # start, [control1, control2,] end
    label: str | None
    classes: list[str]
    label_at: tuple[float, float]
    anchor: str = "start"  # the label's side of `label_at`: start | end


@dataclass
class _Layout:
    width: float
    height: float
    node_width: float
    boxes: list[_Box]
    lines: list[_Line]
    session_id: str | None

    @classmethod
    def of(cls, drawable: Graph, path: SessionPath | None) -> _Layout:
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
                _Box(
                    name=name,
                    x=x[k] - left,
                    y=_MARGIN / 2 + _HEIGHT / 2 + rank[k] * _ROW,
                    label=_display(name),
                    stats=_stats_label(name, path)
                    if path and stats and name not in (START, END)
                    else None,
                    classes=classes,
                )
            )
        width = max(x.values()) - left + node_width / 2 + _MARGIN
        height = _MARGIN + _HEIGHT + max(rank.values()) * _ROW
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
                start = (src.x, src.y + _HEIGHT / 2)
                end = (dst.x, dst.y - _HEIGHT / 2)
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
                _Line(
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
    src: _Box, dst: _Box, node_width: float, mid_x: float, boxes: list[_Box]
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
        end = (dst.x + side * node_width / 2, dst.y + _HEIGHT / 4)
        out = max(start[0], end[0]) if side > 0 else min(start[0], end[0])
        c1 = (out + side * _BEND, start[1])
        c2 = (out + side * _BEND, end[1])
        shift, anchor = side * 4, "start" if side > 0 else "end"
    else:
        off = 0.22 * node_width
        start = (src.x - off, src.y - _HEIGHT / 2)
        end = (dst.x - off, dst.y + _HEIGHT / 2)
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


_SVG_STYLE = """
svg.agentflow-graph { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; }
svg.agentflow-graph .node rect { fill: #f2f0ff; stroke: #6b5fd3; stroke-width: 1.2; }
svg.agentflow-graph .node.terminal rect { fill: #ffffff; }
svg.agentflow-graph .node text { fill: #222; font-size: 13px; text-anchor: middle; }
svg.agentflow-graph .node text.stats { fill: #7a4a00; font-size: 11px; }
svg.agentflow-graph .node.visited rect { fill: #ffe2a8; stroke: #c77700; stroke-width: 2; }
svg.agentflow-graph .node.current rect { stroke: #d62828; stroke-width: 3; }
svg.agentflow-graph .node.failed rect { fill: #f8c4c4; stroke: #b00020; stroke-width: 2; }
svg.agentflow-graph .edge { fill: none; stroke: #8a8a9a; stroke-width: 1.3; }
svg.agentflow-graph .edge.conditional { stroke-dasharray: 5 4; }
svg.agentflow-graph .edge.visited { stroke: #c77700; stroke-width: 2.4; }
svg.agentflow-graph .edge-label { fill: #7a4a00; font-size: 11px; font-weight: 600; }
"""


def _svg_path(points: list[tuple[float, float]]) -> str:
    (x0, y0), *rest = points
    if len(rest) == 1:
        return f"M {x0:.1f} {y0:.1f} L {rest[0][0]:.1f} {rest[0][1]:.1f}"
    (x1, y1), (x2, y2), (x3, y3) = rest
    return f"M {x0:.1f} {y0:.1f} C {x1:.1f} {y1:.1f}, {x2:.1f} {y2:.1f}, {x3:.1f} {y3:.1f}"


def _svg(layout: _Layout) -> str:
    w, h, nw = layout.width, layout.height, layout.node_width
    title = "agentflow workflow graph"
    if layout.session_id:
        title += f", path of session {layout.session_id}"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="agentflow-graph" '
        f'width="{w:.0f}" height="{h:.0f}" viewBox="0 0 {w:.0f} {h:.0f}" role="img">',
        f"<title>{escape(title)}</title>",
        f"<style>{_SVG_STYLE}</style>",
        "<defs>",
        '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#8a8a9a"/></marker>',
        '<marker id="arrow-visited" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#c77700"/></marker>',
        "</defs>",
        '<g class="edges">',
    ]
    for line in layout.lines:
        marker = "arrow-visited" if "visited" in line.classes else "arrow"
        out.append(
            f'<path class="{" ".join(line.classes)}" id="edge-{line.source}-{line.target}" '
            f"data-source={quoteattr(line.source)} data-target={quoteattr(line.target)} "
            f'd="{_svg_path(line.points)}" marker-end="url(#{marker})"/>'
        )
        if line.label:
            lx, ly = line.label_at
            out.append(
                f'<text class="edge-label" data-edge="{line.source}-{line.target}" '
                f'x="{lx:.1f}" y="{ly:.1f}" text-anchor="{line.anchor}">'
                f"{escape(line.label)}</text>"
            )
    out.append("</g>")
    out.append('<g class="nodes">')
    for box in layout.boxes:
        radius = _HEIGHT / 2 if "terminal" in box.classes else 8
        tooltip = box.name if box.stats is None else f"{box.name}: {box.stats}"
        out.append(
            f'<g class="{" ".join(box.classes)}" id="node-{box.name}" '
            f"data-node={quoteattr(box.name)}>"
            f"<title>{escape(tooltip)}</title>"
            f'<rect x="{box.x - nw / 2:.1f}" y="{box.y - _HEIGHT / 2:.1f}" width="{nw:.1f}" '
            f'height="{_HEIGHT:.1f}" rx="{radius:.1f}" ry="{radius:.1f}"/>'
        )
        if box.stats:
            out.append(f'<text x="{box.x:.1f}" y="{box.y - 3:.1f}">{escape(box.label)}</text>')
            out.append(
                f'<text class="stats" x="{box.x:.1f}" y="{box.y + 13:.1f}">'
                f"{escape(box.stats)}</text>"
            )
        else:
            out.append(f'<text x="{box.x:.1f}" y="{box.y + 4.5:.1f}">{escape(box.label)}</text>')
        out.append("</g>")
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _png(layout: _Layout) -> bytes:
    # The object-oriented API with the Agg canvas: no pyplot state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path

    dpi = 100
    fig = Figure(figsize=(layout.width / dpi, layout.height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, layout.width)
    ax.set_ylim(layout.height, 0)
    ax.axis("off")
    nw = layout.node_width
    for line in layout.lines:
        visited = "visited" in line.classes
        colour = "#c77700" if visited else "#8a8a9a"
        codes = [Path.MOVETO, Path.LINETO]
        if len(line.points) == 4:
            codes = [Path.MOVETO, Path.CURVE4, Path.CURVE4, Path.CURVE4]
        ax.add_patch(
            FancyArrowPatch(
                path=Path(line.points, codes),
                arrowstyle="-|>",
                mutation_scale=12,
                color=colour,
                linewidth=2.2 if visited else 1.2,
                linestyle=(0, (5, 4)) if "conditional" in line.classes else "solid",
                shrinkA=0,
                shrinkB=0,
            )
        )
        if line.label:
            ax.text(
                *line.label_at,
                line.label,
                fontsize=8,
                color="#7a4a00",
                weight="bold",
                va="center",
                ha="right" if line.anchor == "end" else "left",
            )
    for box in layout.boxes:
        face, edge, lw = "#f2f0ff", "#6b5fd3", 1.2
        if "terminal" in box.classes:
            face = "#ffffff"
        if "visited" in box.classes:
            face, edge, lw = "#ffe2a8", "#c77700", 2.0
        if "failed" in box.classes:
            face, edge, lw = "#f8c4c4", "#b00020", 2.0
        if "current" in box.classes:
            edge, lw = "#d62828", 3.0
        pad = 6.0
        ax.add_patch(
            FancyBboxPatch(
                (box.x - nw / 2 + pad, box.y - _HEIGHT / 2 + pad),
                nw - 2 * pad,
                _HEIGHT - 2 * pad,
                boxstyle=f"round,pad={pad},rounding_size={min(_HEIGHT / 2, 8 + pad):.0f}",
                facecolor=face,
                edgecolor=edge,
                linewidth=lw,
            )
        )
        if box.stats:
            ax.text(box.x, box.y - 6, box.label, ha="center", va="center", fontsize=10)
            ax.text(box.x, box.y + 10, box.stats, ha="center", va="center", fontsize=8)
        else:
            ax.text(box.x, box.y, box.label, ha="center", va="center", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()
