"""The command lines behind `scripts/*.py`: each script is a thin wrapper around `cli()` of a module here.

- `train`: `scripts/train.py` (recipes, arguments, data, the trainer); `run_dir`: its run directory (`run_args.json`).
- `evaluate`: `scripts/evaluate.py` and its reports; `plot_weights`: `scripts/plot_weights.py` (needs matplotlib).
- `options`: the options the analysis tools share.
"""
