"""Train a model with OTPO (or the plain DPO baseline) from a YAML recipe.

```bash
accelerate launch --config_file configs/accelerate/single_gpu.yaml scripts/train.py --config configs/quickstart.yaml
accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml scripts/train.py \
    --config configs/llama-3-8b-instruct/otpo_full.yaml --output_dir out/my-run --learning_rate 1.0e-6
```

The recipe gives the defaults and command-line flags override them; a key that no argument knows is an error. The
arguments, the run directory's rules and the stages of a run are in `otpo_trl.cli.train` (`--help` lists them).
"""

from otpo_trl.cli.train import cli


if __name__ == "__main__":
    cli()
