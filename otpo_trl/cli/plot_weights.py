"""Plot the OT token weights and the transport plan that a model gives one preference pair.

```bash
python scripts/plot_weights.py --model models/SmolLM2-135M-Instruct --out docs/paris_vs_italy.png \
    --prompt "What's the capital of France?" --chosen "The capital of France is Paris." \
    --rejected "The capital of France is Italy, which is definitely incorrect."
python scripts/plot_weights.py --model out/otpo-lora --data ../shared/data/ultrafeedback --split test --index 3 --svg
```

The top panels show the chosen and the rejected completion token by token, each token shaded by its OT weight (the
weight OTPO gives its log-prob; DPO gives every token 1); the bottom panel shows the transport plan between them. The
weights come from the policy's last hidden states, as in training (see `otpo_trl.analysis.pair_token_stats`). With a
reference (an adapter's base, or `--ref`), the title also gives the pair's implicit-reward margin under both weightings.

Text is drawn with DejaVu Sans, falling back, character by character, to Noto Sans CJK (Chinese, Japanese, Korean;
Debian/Ubuntu package `fonts-noto-cjk`) and Symbola (emoji and symbols; `fonts-symbola`) where they are installed; a
character that no installed font has is drawn as a box, with a warning naming the package to install. A character that
the tokenizer splits over several tokens (byte-level BPE does so with most emoji and many CJK characters) is drawn on
the token that completes it; the tokens before show `⋯`.
"""

import argparse
import logging
import os
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np


matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import Normalize, TwoSlopeNorm  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ..analysis import implicit_rewards, inline_example, pair_token_stats  # noqa: E402
from ..data import load_preference_dataset  # noqa: E402
from ..loading import load_model_and_tokenizer  # noqa: E402
from ..ot_weights import ot_token_weights  # noqa: E402
from ..otpo_config import checked_value, ot_kwargs  # noqa: E402
from .options import add_max_length_argument, add_model_arguments, add_ot_arguments, check_ot_arguments  # noqa: E402
from .run_dir import writable_dir  # noqa: E402


# Fonts tried in turn for each character after DejaVu Sans (matplotlib's own: Latin, Greek, Cyrillic, arrows, a few
# emoji), with the Debian/Ubuntu package of each. Colour emoji fonts (Noto Color Emoji) are bitmaps Agg cannot draw.
FALLBACK_FONTS = {"Noto Sans CJK JP": "fonts-noto-cjk", "Symbola": "fonts-symbola"}
_FONT_FILES = {"Noto Sans CJK JP": "NotoSansCJK", "Symbola": "Symbola"}  # how their files' names start
SPLIT_CHARACTER = "⋯"  # the label of a token that holds only the first bytes of a character


def font_families() -> list[str]:
    """DejaVu Sans, then those of `FALLBACK_FONTS` that are installed. A font installed after matplotlib cached its
    font list is missing from that list: it is looked for among the system's font files and added."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    if not set(FALLBACK_FONTS) <= installed:
        for path in font_manager.findSystemFonts():
            if any(Path(path).name.startswith(_FONT_FILES[name]) for name in set(FALLBACK_FONTS) - installed):
                font_manager.fontManager.addfont(path)
        installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed)]


def missing_glyphs(texts: list[str], families: list[str]) -> str:
    """The characters of `texts` (whitespace aside) that none of the font `families` can draw, sorted."""
    fonts = [FT2Font(font_manager.findfont(FontProperties(family=f), fallback_to_default=False)) for f in families]
    characters = {c for text in texts for c in text if not c.isspace()}
    return "".join(sorted(c for c in characters if not any(font.get_char_index(ord(c)) for font in fonts)))


def warn_missing_glyphs(texts: list[str], families: list[str]) -> str:
    """Warn (naming the font packages to install) when some character of `texts` has no glyph; return those."""
    missing = missing_glyphs(texts, families)
    if missing:
        absent = [
            f"{name} (Debian/Ubuntu: {package})" for name, package in FALLBACK_FONTS.items() if name not in families
        ]
        fix = f"install {' and '.join(absent)}" if absent else "no font configured here covers them"
        warnings.warn(
            f"No installed font draws {missing[:40]!r}: they appear as boxes. To draw them, {fix}.", stacklevel=2
        )
    return missing


FONT_FAMILIES = font_families()
matplotlib.rcParams["font.family"] = FONT_FAMILIES  # before any FontProperties: each takes the family list
# Symbola has no bold face: matplotlib would say so for every bold title. Missing glyphs are warned about above.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
FIG_WIDTH = 12.0  # inches
MARGIN = 0.4  # inches, left and right
DPI = 150
TOKEN_FONT = FontProperties(size=12)
LINE_HEIGHT = 0.34  # inches per line of tokens
WEIGHT_CMAP = "YlOrRd"
RELATIVE_CMAP = "RdBu_r"  # --color_scale relative: blue below the side's mean weight, red above
COLOR_SCALES = ("weight", "relative")
PLAN_CMAP = "Blues"
AXIS_LABELS = {"y": "chosen tokens", "x": "rejected tokens", "bar": "transport mass"}  # of the plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_arguments(parser)
    source = parser.add_argument_group(
        "the pair: from a data set (--data, --index) or inline (--prompt, --chosen, --rejected)"
    )
    source.add_argument("--data", help="Hub data set id, or a local .jsonl / .json / .parquet file or folder.")
    source.add_argument("--split", default="test", help="Split of --data. Default: test.")
    source.add_argument("--index", type=int, default=0, help="Index of the pair in the split. Default: 0.")
    source.add_argument("--prompt", help="User prompt of an inline pair.")
    source.add_argument("--chosen", help="Chosen assistant answer of an inline pair.")
    source.add_argument("--rejected", help="Rejected assistant answer of an inline pair.")
    parser.add_argument("--out", default="ot_weights.png", help="PNG file to write. Default: ot_weights.png.")
    parser.add_argument("--svg", action="store_true", help="Also write an SVG next to the PNG.")
    parser.add_argument(
        "--max_tokens", type=int, default=64, help="Show at most this many tokens per side in the plan. Default: 64."
    )
    add_max_length_argument(parser)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta for the margins in the title.")
    add_ot_arguments(parser)
    parser.add_argument(
        "--compare_ot_reg",
        type=float,
        nargs="+",
        default=[],
        metavar="EPS",
        help="Also draw the token weights at these ot_reg values, one panel each under the --ot_reg one, on the same "
        "colour scale (the plan shown is --ot_reg's). E.g. --ot_reg 0.05 --compare_ot_reg 1.0.",
    )
    parser.add_argument(
        "--color_scale",
        choices=COLOR_SCALES,
        default="weight",
        help="weight: the OT weight itself, from 0 (DPO's weight 1 marked). relative: each token's weight over its "
        "side's mean weight, which is the weight without OT (ot_weighting uniform): 1 is white, the colours show which "
        "tokens the plan raises or lowers. Default: weight.",
    )
    args = parser.parse_args(argv)
    inline = [args.prompt, args.chosen, args.rejected]
    if any(x is not None for x in inline) and not all(x is not None for x in inline):
        parser.error("an inline pair needs all of --prompt, --chosen and --rejected.")
    if (args.data is None) == (args.prompt is None):
        parser.error("give either --data (with --index) or an inline pair (--prompt, --chosen, --rejected).")
    if args.max_tokens < 1:
        parser.error("--max_tokens must be >= 1.")
    check_ot_arguments(parser, args)  # --ot_* and --beta as OTPOConfig checks them
    try:
        args.compare_ot_reg = [checked_value("ot_reg", eps, "--compare_ot_reg") for eps in args.compare_ot_reg]
    except ValueError as err:
        parser.error(str(err))
    return args


def load_example(args: argparse.Namespace) -> dict:
    if args.prompt is not None:
        return inline_example(args.prompt, args.chosen, args.rejected)
    if args.index < 0:
        raise ValueError(f"--index must be >= 0, got {args.index}.")
    dataset = load_preference_dataset(args.data, args.split, max_samples=args.index + 1)
    if args.index >= len(dataset):
        raise IndexError(f"--index {args.index} is out of range: {args.data} [{args.split}] has {len(dataset)} pairs.")
    return dataset[args.index]


# ------------------------------------------------------------------ drawing


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


def _draw_tokens(canvas, boxes, weights, top: float, cmap, norm) -> None:
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
            fontproperties=TOKEN_FONT,
            color=_text_color(color),
            parse_math=False,
        )


def plot_pair(
    stats,
    i: int,
    title_lines: list[str],
    max_tokens: int,
    panels: list[tuple[str, np.ndarray, np.ndarray]] | None = None,
    color_scale: str = "weight",
):
    """The figure for pair `i` of `stats` (an `otpo_trl.analysis.PairStats`), as wide as its content needs.

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

    # Sizes in inches, measured before the figure exists so that the figure is made at its final size.
    renderer = FigureCanvasAgg(plt.Figure(dpi=DPI)).get_renderer()

    def measure(text, prop=TOKEN_FONT):
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

    if color_scale == "relative":
        # Each side over its mean weight: the normalisation (both sides sum to min(n, m)) divides out, and 1 is the
        # weight without OT. White at 1; blue down to the lowest ratio of any panel, red up to the highest.
        shown = [tuple(w / w.mean() if w.size and w.mean() > 0 else w for w in sides) for _, *sides in panels]
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
            if w.size and w.mean() > 0:
                summary += f", max / mean {w.max() / w.mean():.2f}"
            color = "#1a7f37" if k == 0 else "#b42318"
            canvas.text(MARGIN, top - head_h / 2, side, va="center", fontsize=13, weight="bold", color=color)
            canvas.text(MARGIN + 1.05, top - head_h / 2, summary, va="center", fontsize=11, color="0.35")
            top -= head_h
            _draw_tokens(canvas, boxes, weights, top, cmap, norm)
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


def _one_line(text: str, width: int = 110) -> str:
    return textwrap.shorten(" ".join(text.split()), width, placeholder=" …")


def _prompt_text(example: dict) -> str:
    prompt = example.get("prompt")
    if prompt is None:  # implicit prompt: the turns the two completions share
        from trl.data_utils import extract_prompt

        prompt = extract_prompt(example)["prompt"]
    if isinstance(prompt, list):
        return " / ".join(m["content"] for m in prompt if m["role"] == "user") or prompt[-1]["content"]
    return prompt


def output_paths(out: str, svg: bool) -> list[Path]:
    """The files `--out` (and `--svg`) name, the PNG first, checked (their folder made) before anything loads: a
    `ValueError` if one is a folder or a read-only file, or if their folder is a file or cannot be written to."""
    out = Path(out).expanduser()
    png = out if out.suffix.lower() == ".png" else out.with_suffix(".png")
    paths = [png, *([png.with_suffix(".svg")] if svg else [])]
    for path in (out, *paths):
        if path.is_dir():
            raise ValueError(f"--out {path} is a folder; give a file name, such as {path / 'ot_weights.png'}.")
    writable_dir(png.parent, f"--out {out}: its folder")
    for path in paths:
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(
                f"--out {path} exists and cannot be written to; give another file name, or make it writable."
            )
    return paths


def _completion_text(example: dict, side: str) -> str:
    """The text of the `side` ("chosen" or "rejected") completion of `example`, without the prompt."""
    if "prompt" not in example:  # implicit prompt: the turns the two completions share
        from trl.data_utils import extract_prompt

        example = extract_prompt(example)
    completion = example[side]
    if isinstance(completion, list):
        return "".join(str(message.get("content") or "") for message in completion)
    return completion


def warn_empty_completions(example: dict) -> list[str]:
    """Warn for each completion of `example` that is empty or only whitespace; return their sides."""
    empty = [side for side in ("chosen", "rejected") if not _completion_text(example, side).strip()]
    for side in empty:
        warnings.warn(
            f"The {side} completion is empty: the figure shows only the tokens the chat template adds to it (such as "
            f"the end of the turn), so its weights say nothing about an answer. Is this the pair you meant?",
            stacklevel=2,
        )
    return empty


def comparison_panels(stats, options: dict, compare_regs: list[float]) -> list[tuple] | None:
    """The weight panels of pair 0 of `stats`: its own weights (made with `options`), then those at each ε of
    `compare_regs`, from the same hidden states (`stats` made with `return_hidden`); None without `compare_regs`."""
    if not compare_regs:
        return None
    n, m = int(stats.chosen_mask[0].sum()), int(stats.rejected_mask[0].sum())
    panels = [(f"ot_reg = {options['reg']}", stats.chosen_weights[0], stats.rejected_weights[0])]
    for reg in compare_regs:
        wc, wr = ot_token_weights(
            stats.chosen_hidden,
            stats.rejected_hidden,
            stats.chosen_mask,
            stats.rejected_mask,
            **{**options, "reg": reg},
        )
        panels.append((f"ot_reg = {reg}", wc[0], wr[0]))
    return [(heading, wc[:n].cpu().numpy(), wr[:m].cpu().numpy()) for heading, wc, wr in panels]


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    paths = output_paths(args.out, args.svg)  # before the model loads, not after the OT solve
    example = load_example(args)
    warn_empty_completions(example)
    policy, reference, tokenizer = load_model_and_tokenizer(
        args.model, ref=args.ref, dtype=args.dtype, device=args.device
    )
    options = ot_kwargs(args)
    stats = pair_token_stats(
        policy,
        reference,
        tokenizer,
        [example],
        max_length=args.max_length,
        return_hidden=bool(args.compare_ot_reg),
        **options,
    )
    if not stats.chosen_mask.any() or not stats.rejected_mask.any():
        raise ValueError(f"The pair has no completion tokens within --max_length {args.max_length}.")
    panels = comparison_panels(stats, options, args.compare_ot_reg)
    labels = {
        side: [token_labels(tokenizer, ids[mask].tolist()) for ids, mask in zip(ids_, masks)]
        for side, ids_, masks in (
            ("chosen", stats.chosen_ids, stats.chosen_mask),
            ("rejected", stats.rejected_ids, stats.rejected_mask),
        )
    }
    stats = replace(stats, chosen_tokens=labels["chosen"], rejected_tokens=labels["rejected"])

    model_name = Path(args.model.rstrip("/")).name
    title = [
        f"OT token weights · {model_name}",
        f"Prompt: “{_one_line(_prompt_text(example))}”",
        "OT: " + ", ".join(f"{k}={v}" for k, v in options.items() if k not in ("solver", "max_iter", "tol")),
    ]
    if stats.has_reference:
        margins = {}
        for weighting in ("unweighted", "ot"):
            chosen, rejected = implicit_rewards(stats, args.beta, weighting)
            margins[weighting] = float(chosen[0] - rejected[0])
        title.append(
            f"Implicit-reward margin (β={args.beta}): unweighted (DPO) {margins['unweighted']:+.4f}, "
            f"OT (OTPO) {margins['ot']:+.4f}"
        )
    warn_missing_glyphs([*title, *stats.chosen_tokens[0], *stats.rejected_tokens[0]], FONT_FAMILIES)
    fig = plot_pair(stats, 0, title, args.max_tokens, panels=panels, color_scale=args.color_scale)

    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white")
        print(f"Wrote {path}")
    plt.close(fig)
    return paths


def cli(argv: list[str] | None = None) -> None:
    """`scripts/plot_weights.py`: bad input exits with its message."""
    try:
        main(argv)
    except (FileNotFoundError, NotADirectoryError, IndexError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
