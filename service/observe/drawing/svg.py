"""The graph as SVG, from the layered layout: styled by classes, no script, no CDN."""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from service.observe.drawing.layout import HEIGHT, Layout

__all__ = ["svg"]

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


def svg(layout: Layout) -> str:
    """Draw a layout as a standalone SVG document (nodes and edges carry ids and classes)."""
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
        radius = HEIGHT / 2 if "terminal" in box.classes else 8
        tooltip = box.name if box.stats is None else f"{box.name}: {box.stats}"
        out.append(
            f'<g class="{" ".join(box.classes)}" id="node-{box.name}" '
            f"data-node={quoteattr(box.name)}>"
            f"<title>{escape(tooltip)}</title>"
            f'<rect x="{box.x - nw / 2:.1f}" y="{box.y - HEIGHT / 2:.1f}" width="{nw:.1f}" '
            f'height="{HEIGHT:.1f}" rx="{radius:.1f}" ry="{radius:.1f}"/>'
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
