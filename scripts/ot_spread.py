"""How far from uniform OTPO's token weights are for a model, a data set and a list of ε, before any training.

```bash
python scripts/ot_spread.py --model models/SmolLM2-135M-Instruct --data ../shared/data/ultrafeedback --split test \
    --ot_reg 1.0 0.5 0.1 0.05 --ot_cost_scale official minmax --max_length 256 --out reports/ot_spread
```

Prints a table per setting and writes ot_spread.md, .json and .png to `--out`; see `otpo_trl.cli.ot_spread`
(`--help` lists the options and defines the measures).
"""

from otpo_trl.cli.ot_spread import cli


if __name__ == "__main__":
    cli()
