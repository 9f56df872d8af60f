"""Evaluate a model (or a LoRA adapter) on preference pairs and by greedy generation.

```bash
python scripts/evaluate.py --model out/otpo-lora --data ../shared/data/ultrafeedback --split test \
    --max_samples 200 --num_generations 64 --output_dir out/eval/otpo-lora
python scripts/evaluate.py --model out/otpo-full --ref models/SmolLM2-135M-Instruct --data trl-lib/ultrafeedback_binarized
```

Writes `eval.json`, `eval.md` and `generations.jsonl` to `--output_dir`; see `otpo_trl.cli.evaluate` (`--help`).
"""

from otpo_trl.cli.evaluate import cli


if __name__ == "__main__":
    cli()
