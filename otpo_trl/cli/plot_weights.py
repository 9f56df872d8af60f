"""Plot the OT token weights and the transport plan that a model gives one preference pair.

```bash
python scripts/plot_weights.py --model models/SmolLM2-135M-Instruct --out docs/paris_vs_italy.png \
    --prompt "What's the capital of France?" --chosen "The capital of France is Paris." \
    --rejected "The capital of France is Italy, which is definitely incorrect."
python scripts/plot_weights.py --model out/otpo-lora --data ../shared/data/ultrafeedback --split test --index 3 --svg
```

The top panels show the chosen and the rejected completion token by token, each token shaded by its OT weight (the
weight OTPO gives its log-prob; DPO gives every token 1); the bottom panel shows the transport plan between them. The
weights come from the policy's last hidden states, as in training (see `otpo_trl.inspection.pair_token_stats`). With a
reference (an adapter's base, or `--ref`), the title also gives the pair's implicit-reward margin under both weightings.

Text is drawn with DejaVu Sans, falling back, character by character, to Noto Sans CJK (Chinese, Japanese, Korean;
Debian/Ubuntu package `fonts-noto-cjk`) and Symbola (emoji and symbols; `fonts-symbola`) where they are installed; a
character that no installed font has is drawn as a box, with a warning naming the package to install. A character that
the tokenizer splits over several tokens (byte-level BPE does so with most emoji and many CJK characters) is drawn on
the token that completes it; the tokens before show `⋯`. The drawing is `otpo_trl.plotting`; this module reads the
arguments, loads the model and the pair, and writes the files.
"""

import argparse
import os
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import matplotlib


matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402

from ..data import load_preference_dataset  # noqa: E402
from ..inspection import REWARD_WEIGHTINGS, implicit_rewards, inline_example, pair_token_stats  # noqa: E402
from ..loading import load_model_and_tokenizer  # noqa: E402
from ..ot import ot_token_weights  # noqa: E402
from ..otpo_config import checked_value, ot_kwargs  # noqa: E402
from ..plotting.fonts import warn_missing_glyphs  # noqa: E402
from ..plotting.pair_figure import COLOR_SCALES, DPI, plot_pair, token_labels  # noqa: E402
from ..runs import writable_dir  # noqa: E402
from .options import add_max_length_argument, add_model_arguments, add_ot_arguments, check_ot_arguments  # noqa: E402


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
        for weighting in REWARD_WEIGHTINGS:
            chosen, rejected = implicit_rewards(stats, args.beta, weighting)
            margins[weighting] = float(chosen[0] - rejected[0])
        title.append(
            f"Implicit-reward margin (β={args.beta}): unweighted (DPO) {margins['unweighted']:+.4f}, "
            f"OT (OTPO) {margins['ot']:+.4f}"
        )
    warn_missing_glyphs([*title, *stats.chosen_tokens[0], *stats.rejected_tokens[0]])
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
