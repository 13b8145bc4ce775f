"""Draw the workflow graph, and the path a session took through it, offline.

One function, `render_graph`, serves the CLI (`agentflow graph`), the notebooks and the
gateway. Mermaid and ASCII come from LangGraph's own drawing (`text`); SVG and PNG are
drawn from one layered layout (`layout`, `svg`, `png`) so nothing ever reaches
mermaid.ink or a CDN. The path itself is read from the transition log by
`service.observe.path.session_path`.
"""

from __future__ import annotations

from typing import Any, Literal, overload

from langchain_core.runnables.graph import Graph

from graphs.workflow import graph as workflow_graph
from service.observe.drawing.layout import Layout
from service.observe.drawing.png import png
from service.observe.drawing.svg import svg
from service.observe.drawing.text import ascii_drawing, mermaid
from service.observe.path import SessionPath, session_path

__all__ = ["FORMATS", "SessionPath", "render_graph", "session_path"]

FORMATS: tuple[str, ...] = ("mermaid", "ascii", "svg", "png")


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
    drawable: Graph = (workflow_graph if graph is None else graph).get_graph()
    if fmt == "mermaid":
        return mermaid(drawable, path)
    if fmt == "ascii":
        return ascii_drawing(drawable, path)
    layout = Layout.of(drawable, path)
    if fmt == "svg":
        return svg(layout)
    return png(layout)
