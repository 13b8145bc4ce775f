"""Mermaid and ASCII: LangGraph's own drawing, with labels and classes added for a path."""

from __future__ import annotations

from langchain_core.runnables.graph import Edge, Graph, Node
from langgraph.constants import END, START

from service.observe.path import SessionPath

__all__ = ["ascii_drawing", "mermaid"]

_VISITED_STYLE = "fill:#ffe2a8,stroke:#c77700,stroke-width:2px"
_CURRENT_STYLE = "fill:#ffe2a8,stroke:#d62828,stroke-width:3px"
_FAILED_STYLE = "fill:#f8c4c4,stroke:#b00020,stroke-width:2px"
_EDGE_STYLE = "stroke:#c77700,stroke-width:2px"


def _labelled(drawable: Graph, path: SessionPath) -> Graph:
    nodes = {}
    for key, node in drawable.nodes.items():
        stats = path.nodes.get(node.name)
        name = node.name
        if stats is not None and node.name not in (START, END):
            name = f"{node.name} {path.stats_label(node.name)}"
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


def mermaid(drawable: Graph, path: SessionPath | None) -> str:
    """Draw as Mermaid; a path adds counts to labels and styles visited nodes and edges."""
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


def ascii_drawing(drawable: Graph, path: SessionPath | None) -> str:
    """Draw as ASCII art; a path stars visited nodes and adds a legend of its edges."""
    if path is None:
        return drawable.draw_ascii()
    labelled = _labelled(drawable, path)
    labels = {
        key: f"*{node.name}*" if drawable.nodes[key].name in path.nodes else node.name
        for key, node in labelled.nodes.items()
    }
    # Imported here, not at the top: it loads grandalf and numpy (about 40 ms), which
    # only ASCII drawings need.
    from langchain_core.runnables.graph_ascii import draw_ascii

    text = draw_ascii(labels, labelled.edges)
    walked = [f"  {src} -> {dst}  ×{n}" for (src, dst), n in path.edges.items() if n and dst != src]
    legend = ["", f"path of session {path.session_id}  (*node* = visited)", *walked]
    if path.current:
        legend.append(f"  now at: {', '.join(path.current)}")
    if path.failed:
        legend.append(f"  failed: {', '.join(path.failed)}")
    return text + "\n".join(legend) + "\n"
