"""The command lines: the `otpo-trl` command and the modules behind `scripts/*.py`, one `cli(argv)` each.

- `main`: `otpo-trl <command>` (also `python -m otpo_trl`), dispatching to the modules below, imported lazily.
- `launch`: `otpo-trl train`: a recipe by file or shipped name (`otpo_trl/recipes`), through `accelerate launch`.
- `train`: `scripts/train.py` (recipes, arguments, data, the trainer); `run_dir`: its run directory (`run_args.json`).
- `evaluate`: `scripts/evaluate.py` and its reports; `plot_weights`: `scripts/plot_weights.py` (needs matplotlib).
- `options`: the options the analysis tools share.

Each tool also runs as `python -m otpo_trl.cli.<module>`.
"""
