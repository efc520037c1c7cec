"""Draw a composite's tree as a PNG, each sub-model box coloured by its gradient-flow status."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg  # headless: no pyplot, no display
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import FancyBboxPatch, Patch

from .flow_table import format_norm
from .flow_tree import FlowNode

# status -> (fill, edge, edge width, edge style)
STYLES: dict[str, tuple[str, str, float, str]] = {
    "ok": ("#a6dba0", "#1b7837", 1.2, "solid"),
    "frozen": ("#92c5de", "#2166ac", 1.2, "solid"),
    "inactive": ("#e0e0e0", "#6f6f6f", 1.2, "dashed"),
    "problem": ("#f4a582", "#b2182b", 2.6, "solid"),
    "no params": ("#ffffff", "#9a9a9a", 1.0, "solid"),
    "": ("#fdf6e3", "#5a5a5a", 1.0, "solid"),  # a container without parameters of its own
}
LEGEND = {
    "ok": "ok",
    "frozen": "frozen",
    "inactive": "inactive (routed out, may_skip)",
    "problem": "problem (guard's cause)",
    "no params": "no parameters",
    "": "composite / container",
}
NAME_FONT = FontProperties(family="DejaVu Sans", size=10, weight="bold")
TEXT_FONT = FontProperties(family="DejaVu Sans", size=8.5)
PAD, LINE, ROW_GAP, COL_GAP, MARGIN, HEADER, MIN_W = 0.09, 0.19, 0.16, 0.5, 0.3, 0.95, 1.3  # inches


def _lines(node: FlowNode) -> list[str]:
    shown_role = node.role if node.role not in ("model", node.name) else ""  # "router" is named router
    kind = f"{shown_role} · {node.kind}" if shown_role else node.kind
    if node.children and not node.parameters:
        return [node.name, kind, node.detail]
    if node.status == "no params":
        return [node.name, kind, "no parameters"]
    norm = "no gradient" if node.grad_norm is None else f"grad norm {format_norm(node.grad_norm)}"
    return [node.name, kind, norm if node.status == "ok" else f"{node.status} · {norm}"]


def _summary(tree: FlowNode) -> str:
    bad = [n for n in tree.walk() if n.causes]
    if bad:
        listed = "; ".join(f"{n.label} ({n.status})" for n in bad[:4]) + ("; ..." if len(bad) > 4 else "")
        return f"problem in {len(bad)} sub-model{'s' if len(bad) > 1 else ''}: {listed}"
    counts = {s: sum(n.status == s for n in tree.walk()) for s in ("ok", "frozen", "inactive")}
    said = [f"{c} {s}" for s, c in counts.items() if c]
    if said:
        said[0] = (
            said[0].replace(" ", " sub-model ", 1)
            if said[0].startswith("1 ")
            else said[0].replace(" ", " sub-models ", 1)
        )
    return "no problem: " + (", ".join(said) or "no trainable parameters")


def draw_flow_tree(tree: FlowNode, path: str | Path, title: str | None = None, dpi: int = 150) -> Path:
    """Write a PNG of the tree: composites open left to right, one box per sub-model.

    Each box shows the name, the role in its parent (``stage 2``, ``branch``, ``router``,
    ``combiner``) and type, and the gradient norm with the status when it is not ``ok``;
    its colour is the status (legend at the top).

    Args:
        tree: from :func:`~composites.views.flow.gradient_flow` or
            :func:`~composites.views.flow.check_gradient_flow`.
        path: the PNG to write (its folder is created).
        title: the heading; by default ``Gradient flow: <model type>``.
        dpi: resolution (lowered for very large trees so the image stays under 20,000 pixels).

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from composites import Parallel
        >>> from composites.views.flow import check_gradient_flow
        >>> model = Parallel({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}, combine="sum")
        >>> tree, _ = check_gradient_flow(model, nn.MSELoss(), (torch.randn(4, 3), torch.zeros(4, 2)))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     draw_flow_tree(tree, f"{tmp}/flow.png").stat().st_size > 0
        True
    """
    fig = Figure()
    renderer = FigureCanvasAgg(fig).get_renderer()

    def width(text: str, font: FontProperties) -> float:
        return renderer.get_text_width_height_descent(text, font, ismath=False)[0] / fig.dpi

    nodes = list(tree.walk())
    depth, row = {id(tree): 0}, {}
    for node in nodes:
        for child in node.children:
            depth[id(child)] = depth[id(node)] + 1
    leaves = [n for n in nodes if not n.children]
    for i, leaf in enumerate(leaves):
        row[id(leaf)] = float(i)
    for node in reversed(nodes):  # children before parents: centre each container on its children
        if node.children:
            row[id(node)] = (row[id(node.children[0])] + row[id(node.children[-1])]) / 2
    columns = max(depth.values()) + 1
    box_w, col_w = {}, [0.0] * columns
    for node in nodes:
        name, *rest = _lines(node)
        box_w[id(node)] = max([MIN_W, width(name, NAME_FONT)] + [width(t, TEXT_FONT) for t in rest]) + 2 * PAD
        col_w[depth[id(node)]] = max(col_w[depth[id(node)]], box_w[id(node)])
    box_h = 3 * LINE + 2 * PAD
    content_w = sum(col_w) + COL_GAP * (columns - 1)
    fig_w = max(content_w + 2 * MARGIN, 8.5)
    fig_h = HEADER + len(leaves) * (box_h + ROW_GAP) - ROW_GAP + 2 * MARGIN
    col_x = [(fig_w - content_w) / 2 + sum(col_w[:d]) + COL_GAP * d for d in range(columns)]

    fig.set_size_inches(fig_w, fig_h)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(fig_h, 0)  # y grows downwards, in inches
    ax.axis("off")

    def centre(node: FlowNode) -> float:
        return HEADER + MARGIN + row[id(node)] * (box_h + ROW_GAP) + box_h / 2

    for node in nodes:
        d, y = depth[id(node)], centre(node)
        x = col_x[d]
        fill, edge, lw, style = STYLES[node.category]
        ax.add_patch(
            FancyBboxPatch(
                (x, y - box_h / 2),
                box_w[id(node)],
                box_h,
                boxstyle="round,pad=0,rounding_size=0.06",
                facecolor=fill,
                edgecolor=edge,
                linewidth=lw,
                linestyle=style,
                zorder=2,
            )
        )
        for k, text in enumerate(_lines(node)):
            ty = y - box_h / 2 + PAD + (k + 0.5) * LINE
            font = NAME_FONT if k == 0 else TEXT_FONT
            colour = "#8b0000" if k == 2 and node.causes else "#1a1a1a"
            ax.text(x + PAD, ty, text, fontproperties=font, color=colour, va="center", ha="left", zorder=3)
        if node.children:  # elbow connectors to the children
            x0, x1 = x + box_w[id(node)], col_x[d + 1]
            mid = x1 - COL_GAP / 2
            ys = [centre(c) for c in node.children]
            line = dict(color="#7a7a7a", linewidth=1.1, zorder=1)
            ax.plot([x0, mid], [y, y], **line)
            ax.plot([mid, mid], [min(ys), max(ys)], **line)
            for cy in ys:
                ax.plot([mid, x1], [cy, cy], **line)

    fig.text(
        0.5,
        1 - 0.28 / fig_h,
        title or f"Gradient flow: {tree.kind}",
        ha="center",
        va="center",
        fontsize=13,
        weight="bold",
    )
    fig.text(
        0.5,
        1 - 0.55 / fig_h,
        _summary(tree),
        ha="center",
        va="center",
        fontsize=9.5,
        color="#8b0000" if any(n.causes for n in nodes) else "#1b5e20",
    )
    handles = [
        Patch(facecolor=f, edgecolor=e, linewidth=min(lw, 2.0), linestyle=ls, label=LEGEND[s])
        for s, (f, e, lw, ls) in STYLES.items()
    ]
    fig.legend(
        handles=handles,
        loc="center",
        bbox_to_anchor=(0.5, 1 - 0.86 / fig_h),
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        handlelength=1.6,
        columnspacing=1.2,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=min(dpi, 20000 / max(fig_w, fig_h)), facecolor="white")
    return out
