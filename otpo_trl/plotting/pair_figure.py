"""The picture of one pair's OT token weights and transport plan (`otpo-trl plot-weights` draws it).

Each completion is drawn token by token, each token shaded by its weight (one panel per set of weights, all on one
colour scale), and under them the transport plan between the two completions. The figure is made at the width its
content needs (at most `FIG_WIDTH` inches). Text uses [`otpo_trl.plotting.fonts`] (looked for on the first picture).
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle

from ..ot.stats import token_weight_stats
from .fonts import use_fonts


SPLIT_CHARACTER = "⋯"  # the label of a token that holds only the first bytes of a character
FIG_WIDTH = 12.0  # inches
MARGIN = 0.4  # inches, left and right
DPI = 150
LINE_HEIGHT = 0.34  # inches per line of tokens
WEIGHT_CMAP = "YlOrRd"
RELATIVE_CMAP = "RdBu_r"  # color_scale "relative": blue below the side's mean weight, red above
COLOR_SCALES = ("weight", "relative")
PLAN_CMAP = "Blues"
AXIS_LABELS = {"y": "chosen tokens", "x": "rejected tokens", "bar": "transport mass"}  # of the plan


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token in `ids`, decoded in sequence: a character split over several byte-level tokens (which
    decode one by one to "\ufffd") is given to the token that completes it; the tokens before get `SPLIT_CHARACTER`."""
    labels, pending = [], []
    for token in ids:
        pending.append(token)
        text = tokenizer.decode(pending)
        if text.endswith("\ufffd"):
            labels.append(SPLIT_CHARACTER)
            continue
        labels.append(text)
        pending = []
    if pending:  # bytes that never form a character: show them as decoded
        labels[-len(pending) :] = [tokenizer.decode([token]) for token in pending]
    return labels


def _shown(token: str) -> tuple[str, bool, bool]:
    """(label, starts with a space, ends the line): leading spaces become a gap, whitespace-only tokens a symbol."""
    breaks = "\n" in token
    label = token.replace("\r\n", "\n").replace("\r", "↵").replace("\n", "↵").replace("\t", "⇥").lstrip(" ")
    return label or "␣", token.startswith(" ") and bool(label), breaks


def _layout(tokens: list[str], width: float, measure) -> list[tuple[int, float, float, str]]:
    """Wrap `tokens` into lines `width` inches wide: (line, x, box width, label) per token, x from the left."""
    gap, pad = measure(" "), 0.03
    boxes, line, x = [], 0, 0.0
    for token in tokens:
        label, space, breaks = _shown(token)
        w = measure(label) + 2 * pad
        x += gap if space and x > 0 else 0
        if x + w > width and x > 0:
            line, x = line + 1, 0.0
        boxes.append((line, x, w, label))
        x += w
        if breaks:
            line, x = line + 1, 0.0
    return boxes


def _text_color(rgba) -> str:
    luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return "black" if luminance > 0.5 else "white"


def _draw_tokens(canvas, boxes, weights, top: float, cmap, norm, font: FontProperties) -> None:
    """Token boxes shaded by weight on `canvas` (data units: inches), the first line's top at height `top`."""
    for (line, x, w, label), weight in zip(boxes, weights):
        y = top - (line + 1) * LINE_HEIGHT
        color = cmap(norm(weight))
        canvas.add_patch(
            Rectangle((MARGIN + x, y + 0.04), w, LINE_HEIGHT - 0.06, facecolor=color, edgecolor="white", linewidth=0.8)
        )
        canvas.text(
            MARGIN + x + w / 2,
            y + LINE_HEIGHT / 2 + 0.01,
            label,
            ha="center",
            va="center",
            fontproperties=font,
            color=_text_color(color),
            parse_math=False,
        )


def _spread(weights: np.ndarray) -> tuple[np.ndarray | None, float | None]:
    """One completion's (n,) weights over their mean, and the largest over the mean ([`token_weight_stats`], as the
    trainer's metrics and `otpo-trl spread` measure them); (None, None) without a token or when they sum to 0."""
    stats = token_weight_stats(torch.as_tensor(weights)[None], torch.ones(1, weights.size, dtype=torch.bool))
    if not stats.max_mean.isfinite().item():
        return None, None
    return stats.ratio[0].numpy(), stats.max_mean.item()


def plot_pair(
    stats,
    i: int,
    title_lines: list[str],
    max_tokens: int,
    panels: list[tuple[str, np.ndarray, np.ndarray]] | None = None,
    color_scale: str = "weight",
):
    """The figure for pair `i` of `stats` (an `otpo_trl.inspection.PairStats`), as wide as its content needs.

    `panels`: (heading, chosen weights (n,), rejected weights (m,)) per panel of token weights, all drawn on one
    colour scale (default: one panel, `stats`' weights, no heading). `color_scale`: "weight" (the weight, from 0) or
    "relative" (each weight over its side's mean, the weight without OT; diverging around 1)."""
    chosen_tokens, rejected_tokens = stats.chosen_tokens[i], stats.rejected_tokens[i]
    n, m = len(chosen_tokens), len(rejected_tokens)
    if panels is None:
        panels = [(None, stats.chosen_weights[i, :n].cpu().numpy(), stats.rejected_weights[i, :m].cpu().numpy())]
    if color_scale not in COLOR_SCALES:
        raise ValueError(f"color_scale must be one of {list(COLOR_SCALES)}, got {color_scale!r}.")
    plan = stats.plan[i, :n, :m].cpu().numpy()
    use_fonts()  # before any FontProperties is made: each takes the font families when it is made
    token_font = FontProperties(size=12)

    # Sizes in inches, measured before the figure exists so that the figure is made at its final size.
    renderer = FigureCanvasAgg(plt.Figure(dpi=DPI)).get_renderer()

    def measure(text, prop=token_font):
        return renderer.get_text_width_height_descent(text, prop, ismath=False)[0] / DPI

    text_width = FIG_WIDTH - 2 * MARGIN
    layouts = [_layout(tokens, text_width, measure) for tokens in (chosen_tokens, rejected_tokens)]
    text_heights = [(max((b[0] for b in boxes), default=0) + 1) * LINE_HEIGHT for boxes in layouts]

    # The plan: cells up to 0.3 in, the matrix no wider than the text, the token labels beside and below it.
    rows, cols = min(n, max_tokens), min(m, max_tokens)
    cell = min(0.3, (text_width - 2.5) / cols)
    label_font = FontProperties(size=max(5.0, min(10.0, cell * 72 * 0.8)))  # one label per cell
    y_labels, x_labels = ([_shown(t)[0] for t in tokens] for tokens in (chosen_tokens[:rows], rejected_tokens[:cols]))
    y_room, x_room = (max(measure(t, label_font) for t in labels) + 0.45 for labels in (y_labels, x_labels))
    cell = min(cell, (text_width - y_room - 1.1) / cols)
    plan_w, plan_h = cols * cell, rows * cell
    # The axis and colour-bar labels are centred on the plan's height: over a short plan they would reach into the
    # heading above, so room is kept above (and, if the tick labels leave too little, below) the plan.
    axis_font = FontProperties(size=11)
    label_h = max(measure(AXIS_LABELS["y"], axis_font), measure(AXIS_LABELS["bar"], axis_font)) + 0.1
    pad_above = max(0.0, label_h - plan_h) / 2
    pad_below = max(0.0, pad_above - x_room)

    title_fonts = [FontProperties(size=14, weight="bold")] + [FontProperties(size=11)] * (len(title_lines) - 1)
    panel_font = FontProperties(size=12, weight="bold")
    cbar_len = 4.0
    right = max(
        *(MARGIN + x + w for boxes in layouts for _, x, w, _ in boxes),
        *(MARGIN + measure(line, font) for line, font in zip(title_lines, title_fonts)),
        *(MARGIN + measure(heading, panel_font) for heading, _, _ in panels if heading),
        MARGIN + 1.5 + cbar_len + 0.3,
        MARGIN + y_room + plan_w + 1.2,  # the plan's colour bar and its label
    )
    fig_w = min(FIG_WIDTH, right + MARGIN)

    title_h, head_h, cbar_h, gap = 0.28 * len(title_lines) + 0.15, 0.32, 0.95, 0.25
    sides_h = head_h + text_heights[0] + gap + head_h + text_heights[1]
    panel_h = sum((head_h if heading else 0) + sides_h for heading, _, _ in panels) + gap * (len(panels) - 1)
    fig_h = title_h + panel_h + cbar_h + head_h + pad_above + plan_h + x_room + pad_below
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI)
    # Everything but the plan and the colour bars is drawn on one axes spanning the figure, in inches: its transform
    # stays consistent with the other axes' when `bbox_inches="tight"` crops the figure (`dpi_scale_trans` would not).
    canvas = fig.add_axes([0, 0, 1, 1], xlim=(0, fig_w), ylim=(0, fig_h))
    canvas.axis("off")

    def add_axes(left, bottom, width, height):
        return fig.add_axes([left / fig_w, bottom / fig_h, width / fig_w, height / fig_h])

    top = fig_h
    for k, (line, font) in enumerate(zip(title_lines, title_fonts)):
        canvas.text(MARGIN, top - 0.1 - 0.28 * k, line, va="top", parse_math=False, fontproperties=font)
    top -= title_h

    spreads = [[_spread(w) for w in sides] for _, *sides in panels]
    if color_scale == "relative":
        # Each side over its mean weight: the normalisation (both sides sum to min(n, m)) divides out, and 1 is the
        # weight without OT. White at 1; blue down to the lowest ratio of any panel, red up to the highest.
        shown = [
            tuple(w if r is None else r for w, (r, _) in zip(sides, s)) for (_, *sides), s in zip(panels, spreads)
        ]
        ratios = [w for ws in shown for w in ws if w.size]
        low = min([0.95, *(float(w.min()) for w in ratios)])
        high = max([1.05, *(float(w.max()) for w in ratios)])
        norm, cmap = TwoSlopeNorm(1.0, low, high), plt.get_cmap(RELATIVE_CMAP)
        bar_label, mark = "Weight / mean", "w/o OT: 1"
    else:
        shown = [tuple(sides) for _, *sides in panels]
        vmax = max([1e-12, *(float(w.max(initial=0)) for sides in shown for w in sides)])
        norm, cmap, bar_label, mark = Normalize(0, vmax), plt.get_cmap(WEIGHT_CMAP), "OT token weight", "DPO: 1"
    for p, ((heading, *raw), weights_pair) in enumerate(zip(panels, shown)):
        if p:
            top -= gap
        if heading:
            canvas.text(MARGIN, top - head_h / 2, heading, va="center", parse_math=False, fontproperties=panel_font)
            top -= head_h
        for k, (side, boxes, weights, tokens) in enumerate(
            zip(("Chosen", "Rejected"), layouts, weights_pair, (chosen_tokens, rejected_tokens))
        ):
            if k:
                top -= gap
            w = raw[k]
            summary = f"{len(tokens)} tokens, weights sum to {w.sum():.2f}"
            max_mean = spreads[p][k][1]
            if max_mean is not None:
                summary += f", max / mean {max_mean:.2f}"
            color = "#1a7f37" if k == 0 else "#b42318"
            canvas.text(MARGIN, top - head_h / 2, side, va="center", fontsize=13, weight="bold", color=color)
            canvas.text(MARGIN + 1.05, top - head_h / 2, summary, va="center", fontsize=11, color="0.35")
            top -= head_h
            _draw_tokens(canvas, boxes, weights, top, cmap, norm, token_font)
            top -= text_heights[k]

    # Colour scale of the token weights; the weight without reweighting (DPO's 1, or the side's mean) marked.
    cax = add_axes(MARGIN + 1.5, top - 0.5, cbar_len, 0.16)
    cax.set_label("token weight scale")
    cbar = fig.colorbar(plt.cm.ScalarMappable(norm, cmap), cax=cax, orientation="horizontal")
    cbar.ax.tick_params(labelsize=10)
    canvas.text(MARGIN, top - 0.42, bar_label, va="center", fontsize=11)
    if color_scale == "relative":
        cbar.set_ticks([low, (low + 1) / 2, 1, (1 + high) / 2, high])
        cbar.ax.set_xticklabels([f"{t:.2f}" for t in cbar.get_ticks()])
    if norm.vmin <= 1 <= norm.vmax:
        cbar.ax.axvline(1, color="black", linewidth=1.5)
        cbar.ax.text(1, 1.25, mark, transform=cbar.ax.get_xaxis_transform(), ha="center", fontsize=9)
    top -= cbar_h

    truncated = rows < n or cols < m
    note = f" (first {rows} of {n} chosen × {cols} of {m} rejected tokens)" if truncated else ""
    canvas.text(MARGIN, top - head_h / 2, f"Transport plan{note}", va="center", fontsize=13, weight="bold")
    top -= head_h + pad_above
    left = MARGIN + y_room
    ax = add_axes(left, top - plan_h, plan_w, plan_h)
    image = ax.imshow(plan[:rows, :cols], cmap=PLAN_CMAP, aspect="auto", interpolation="nearest", vmin=0)
    ax.set_yticks(range(rows), y_labels, fontproperties=label_font)
    ax.set_xticks(range(cols), x_labels, fontproperties=label_font, rotation=90)
    ax.set_ylabel(AXIS_LABELS["y"], fontproperties=axis_font)
    ax.set_xlabel(AXIS_LABELS["x"], fontproperties=axis_font)
    ax.tick_params(length=0)
    for label in (*ax.get_xticklabels(), *ax.get_yticklabels()):
        label.set_parse_math(False)
    plan_bar = fig.colorbar(image, cax=add_axes(left + plan_w + 0.15, top - plan_h, 0.15, plan_h))
    plan_bar.set_label(AXIS_LABELS["bar"], fontproperties=axis_font)
    plan_bar.ax.tick_params(labelsize=9)
    return fig


__all__ = ["COLOR_SCALES", "DPI", "SPLIT_CHARACTER", "plot_pair", "token_labels"]
