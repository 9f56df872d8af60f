"""Length exploitation: DPO vs OTPO vs uniform weights, over seeds, scored on held-out pairs with bootstrap intervals.

```bash
make study                                # = python scripts/length_study.py (~2 h on 2 CPU cores)
python scripts/length_study.py --quick    # 2 steps, 1 seed, 16 pairs: checks the pipeline (~6 min)
```

Writes reports/length_study.md, its JSON and figures; the runs and scores go to out/length_study and are reused. The
arms, held-out pairs and statistics are in `otpo_trl.cli.length_study` (`--help` lists the options).
"""

from otpo_trl.cli.length_study import main


if __name__ == "__main__":
    main()
