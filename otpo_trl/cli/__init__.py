"""The command lines behind `scripts/*.py`: each script is a thin wrapper around `cli()` of a module here.

- `train`: `scripts/train.py`, in stages (data, the trainer, the run); `arguments`: its arguments and their checks;
  `run_dir`: its run directory (`run_args.json`, the rules); `upstream`: its workarounds for upstream libraries.
- `evaluate`: `scripts/evaluate.py` and its reports; `plot_weights`: `scripts/plot_weights.py` (needs matplotlib).
- `options`: the options the analysis tools share.
"""
