"""What the studies share: the recipe as the training CLI resolves it, the arms they can train ([`KNOWN_ARMS`]: a name
and its training flags), one way to train an arm (in this process, with the settings-checked reuse), the runs' logs,
figures, Markdown with `--render_only`, and the compute they ran on. Scoring is `studies/scoring.py`.

A study's paths, the recipe's included, are relative to the repository root ([`REPO_ROOT`]): the studies run from
there ([`at_repo_root`]), as `make study` and `make report` do.
"""

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from otpo_trl.cli import train as train_cli
from otpo_trl.runs import describe_changes, finished_run_changes, run_settings


REPO_ROOT = Path(__file__).resolve().parents[1]
FIGURE_DPI = 120
FIGURE_SIZE = (6.4, 3.6)


@contextlib.contextmanager
def at_repo_root():
    """Run the block from the repository root (training runs in this process: the recipe's relative paths must
    resolve as under `make`), then go back."""
    cwd = Path.cwd()
    os.chdir(REPO_ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------------ the arms


@dataclass(frozen=True)
class Arm:
    """One arm of a study: what its runs are called (`<name>-seed<seed>`), how a report labels it, the training flags
    that set it apart from the recipe (`--flag value` pairs, space-separated; given before the user's own flags),
    and its colour in figures (matplotlib's default cycle: C0 blue, C1 orange, C2 green, ...)."""

    name: str
    label: str
    flags: str
    color: str = "C7"

    def __post_init__(self):
        if "-" in self.name:  # `-` joins the arms of a difference (`otpo-dpo`) and a run's seed (`otpo-seed42`)
            raise ValueError(f"an arm's name has no '-': {self.name!r}")

    def settings(self) -> dict[str, str]:
        """The arm's flags as {flag: value}, say {"--trainer": "otpo", "--ot_weighting": "ot"}."""
        flags = self.flags.split()
        return dict(zip(flags[::2], flags[1::2]))

    @property
    def solves_ot(self) -> bool:
        """Whether its token weights come from an OT plan (OTPO's `ot_weighting: ot`), whose ot_* options it uses."""
        return self.settings().get("--trainer") == "otpo" and self.settings().get("--ot_weighting") == "ot"


# Every arm a study can train, one entry each. `otpo` solves OT at the recipe's ot_reg (1.0 in quickstart.yaml);
# `uniform` is the paper's "w/o OT" ablation (1 per token, then the same normalisation). The peer methods: LD-DPO
# (`ld_alpha`: the tokens past the shorter completion count ld_alpha times), TRL's length-normalised sigmoid loss, and
# SamPO's down-sampling. The order is the reports' order.
KNOWN_ARMS = {
    arm.name: arm
    for arm in (
        Arm("dpo", "DPO", "--trainer dpo", "C0"),
        Arm("otpo", "OTPO", "--trainer otpo --ot_weighting ot", "C1"),
        Arm("uniform", "OTPO w/o OT", "--trainer otpo --ot_weighting uniform", "C2"),
        Arm("otpo_reg_0.02", "OTPO (ε 0.02)", "--trainer otpo --ot_weighting ot --ot_reg 0.02", "C3"),
        Arm("ld_dpo", "LD-DPO (α 0)", "--trainer dpo --ld_alpha 0", "C4"),
        Arm("ld_dpo_0.5", "LD-DPO (α 0.5)", "--trainer dpo --ld_alpha 0.5", "C5"),
        Arm("sigmoid_norm", "sigmoid_norm", "--trainer dpo --loss_type sigmoid_norm", "C6"),
        Arm("sampo", "SamPO", "--trainer otpo --ot_weighting sampo", "C8"),
    )
}


def arm_label(name: str) -> str:
    """The report's name of an arm (`uniform`: OTPO w/o OT) or of an arm difference (`otpo-uniform`); an unknown
    name is shown in capitals."""
    return " - ".join(KNOWN_ARMS[part].label if part in KNOWN_ARMS else part.upper() for part in name.split("-"))


def arm_flags(name: str) -> list[str]:
    """The training flags of the known arm `name`; another name: ValueError listing the known ones."""
    if name not in KNOWN_ARMS:
        raise ValueError(f"unknown arm {name!r}: the known arms are {', '.join(KNOWN_ARMS)}.")
    return KNOWN_ARMS[name].flags.split()


# ------------------------------------------------------------------ the recipe, training an arm


def resolve_recipe(flags: list[str]) -> dict:
    """The recipe as a run trained with `flags` resolves it (`scripts/train.py`'s parser: its defaults and checks), as
    one flat dict: script, model, then training arguments."""
    script_args, training_args, model_args = train_cli.parse_args(flags)
    return {**vars(script_args), **vars(model_args), **training_args.to_dict()}


def planned_settings(flags: list[str]) -> dict:
    """The settings that `run_args.json` would record for a run trained with `flags` (`run_settings`)."""
    return run_settings(*train_cli.parse_args(flags))


def run_arm(flags: list[str], run_dir: str | Path, *, on_mismatch: str = "give the study a new --out") -> bool:
    """Train the run that `flags` describe into `run_dir` in this process, through the training CLI's parser and
    main, unless it has finished. A finished run (`all_results.json`) is reused only if `run_args.json` records the
    settings these flags would train: one of other settings raises ValueError naming the difference (`on_mismatch`
    says how to go on), so that it is never reported under the new ones. An interrupted run resumes from its last
    checkpoint (the training CLI's rules, `otpo_trl.runs`). `flags` must set `--output_dir run_dir`.

    Returns True if it trained, False if it reused the finished run.
    """
    run_dir = Path(run_dir)
    parsed = train_cli.parse_args(flags)
    if Path(parsed[1].output_dir).resolve() != run_dir.resolve():
        raise ValueError(f"the flags train into {parsed[1].output_dir}, not {run_dir}")
    if (run_dir / "all_results.json").exists():
        changes = finished_run_changes(run_dir, run_settings(*parsed))
        if changes:
            raise ValueError(
                f"{run_dir} holds a finished run of other settings ({describe_changes(changes)}): {on_mismatch}."
            )
        print(f"{run_dir.name}: reusing the finished run in {run_dir}")
        return False
    print(f"{run_dir.name}: training", flush=True)
    train_cli.main(*parsed)
    return True


def cpu_flags() -> list[str]:
    """`--use_cpu true` where no GPU is seen (TRL would otherwise look for an accelerator)."""
    return [] if torch.cuda.is_available() else ["--use_cpu", "true"]


# ------------------------------------------------------------------ the runs' logs


def log_history(run_dir: str | Path) -> list[dict]:
    """The `log_history` of a run's `trainer_state.json` ([] when the run has none)."""
    state = Path(run_dir) / "trainer_state.json"
    return json.loads(state.read_text())["log_history"] if state.exists() else []


def training_steps(history: list[dict]) -> list[dict]:
    """The per-step training entries of a log history (those with a `loss` and a `step`; not the final summary)."""
    return [h for h in history if "loss" in h and "step" in h]


def mean_logged(history: list[dict], keys) -> dict[str, float]:
    """The mean over steps of each of `keys` that the history logged (say the `ot/*` scalars); absent keys left out."""
    return {k: float(np.mean([h[k] for h in history if k in h])) for k in keys if any(k in h for h in history)}


# ------------------------------------------------------------------ figures


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, save at the studies' resolution and close `fig`; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    pyplot().close(fig)
    return path


# ------------------------------------------------------------------ Markdown


def relative(path: str | Path, report_dir: str | Path) -> str:
    """`path` relative to the report's folder, as a link in the report."""
    return os.path.relpath(path, report_dir)


def image(alt: str, path: str | Path, report_dir: str | Path) -> str:
    return f"![{alt}]({relative(path, report_dir)})"


def table(header: list[str], rows: list[list[str]], align: str = "---") -> list[str]:
    """A Markdown table's lines: `header`, the separator, one line per row of cells."""

    def line(cells):
        return "|" + "".join(f" {c} |" if str(c) else " |" for c in cells)

    return [line(header), "|" + f"{align}|" * len(header), *(line(row) for row in rows)]


def report_paths(report: str | Path) -> tuple[Path, Path, Path]:
    """(the Markdown report, its JSON beside it, its figures folder)."""
    report = Path(report)
    return report, report.with_suffix(".json"), report.parent / "figures"


def write_report(summary: dict, report: str | Path, figures, render, *, indent: int) -> list[Path]:
    """Write a study's JSON (`summary`), its figures (`figures(summary, fig_dir)`) and its Markdown
    (`render(summary, report_dir)`) at `report`; returns the figures drawn."""
    report, json_path, fig_dir = report_paths(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=indent))
    drawn = figures(summary, fig_dir)
    report.write_text(render(summary, report.parent))
    return drawn


def render_from_json(report: str | Path, figures, render) -> tuple[dict, list[Path]]:
    """`--render_only`: redraw the figures the JSON beside `report` has data for and rewrite the Markdown from it,
    training nothing; returns (the JSON's dict, the figures drawn). No JSON there: ValueError."""
    report, json_path, fig_dir = report_paths(report)
    if not json_path.is_file():
        raise ValueError(f"--render_only: no report JSON at {json_path} (beside --report).")
    summary = json.loads(json_path.read_text())
    drawn = figures(summary, fig_dir)
    report.write_text(render(summary, report.parent))
    return summary, drawn


# ------------------------------------------------------------------ compute


def compute_description() -> dict:
    """What this process runs on: CPU cores, torch threads and the GPU's name (None without one)."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def device_name() -> str:
    """The GPU's name, else `CPU (<n> cores)`."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
