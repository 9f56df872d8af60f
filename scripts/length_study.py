"""Length exploitation: DPO vs OTPO vs OTPO w/o OT, over seeds, scored on held-out pairs with bootstrap intervals.

```bash
make study                                  # = python scripts/length_study.py (~2 h on 2 CPU cores)
python scripts/length_study.py --quick      # 2 steps, 1 seed, 16 pairs: checks the pipeline (~6 min)
python scripts/length_study.py --render_only   # rewrite reports/length_study/ from its JSON, training nothing
```

Writes reports/length_study/length_study.md, its JSON and figures; the runs and scores go to out/length_study and are
reused. The study is `studies/length_study.py` and the modules it names (`--help` lists the options, `--arms` the
arms).
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where `studies/` is

from studies.length_study import cli  # noqa: E402


if __name__ == "__main__":
    cli()
