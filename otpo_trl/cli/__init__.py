"""The command lines: `otpo-trl <command>` and `scripts/*.py`, each a thin wrapper around `cli()` of a module here.

- `train`: `scripts/train.py`, in stages (data, the trainer, the run); `arguments`: its arguments and their checks;
  `upstream`: its workarounds for upstream libraries. Its run directory (the record, the lock, the rules) is the
  library `otpo_trl.runs`, which the tools read too: only `train` and `launch` import `arguments`.
- `evaluate`: `scripts/evaluate.py` and its reports; `plot_weights`: `scripts/plot_weights.py` (needs matplotlib; the
  drawing is `otpo_trl.plotting`); `ot_spread`: `scripts/ot_spread.py`.
- `options`: the options the analysis tools share.
- `main`: the `otpo-trl` command (also `python -m otpo_trl`), dispatching to these modules, imported lazily;
  `launch`: `otpo-trl train`, a recipe by file or shipped name (`otpo_trl/recipes`) through `accelerate launch`.

Each tool also runs as `python -m otpo_trl.cli.<module>`.
"""
