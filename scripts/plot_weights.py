"""Plot the OT token weights and the transport plan that a model gives one preference pair.

```bash
python scripts/plot_weights.py --model models/SmolLM2-135M-Instruct --out docs/paris_vs_italy.png \
    --prompt "What's the capital of France?" --chosen "The capital of France is Paris." \
    --rejected "The capital of France is Italy, which is definitely incorrect."
python scripts/plot_weights.py --model out/otpo-lora --data ../shared/data/ultrafeedback --split test --index 3 --svg
```

What the figure shows and how it draws CJK and emoji: see `otpo_trl.cli.plot_weights` (`--help` lists the options).
"""

from otpo_trl.cli.plot_weights import cli


if __name__ == "__main__":
    cli()
