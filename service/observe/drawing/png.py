"""The graph as PNG, from the layered layout, drawn with matplotlib's Agg canvas."""

from __future__ import annotations

import io

from service.observe.drawing.layout import HEIGHT, Layout

__all__ = ["png"]


def png(layout: Layout) -> bytes:
    """Draw a layout as a PNG image."""
    # The object-oriented API with the Agg canvas: no pyplot state, no GUI backend.
    # Imported here, not at the top: matplotlib takes about 0.3 s to import, and only a
    # PNG needs it (the CLI, the gateway and the notebooks import this package).
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
                (box.x - nw / 2 + pad, box.y - HEIGHT / 2 + pad),
                nw - 2 * pad,
                HEIGHT - 2 * pad,
                boxstyle=f"round,pad={pad},rounding_size={min(HEIGHT / 2, 8 + pad):.0f}",
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
