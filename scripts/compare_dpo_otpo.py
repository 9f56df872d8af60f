"""DPO vs OTPO on the same data: train both from one recipe, evaluate both, write a Markdown report with figures.

```bash
make report                                      # = python scripts/compare_dpo_otpo.py (~35 min on 2 CPU cores)
python scripts/compare_dpo_otpo.py --render_only   # rewrite reports/dpo_vs_otpo/ from its JSON, training nothing
```

Writes reports/dpo_vs_otpo/dpo_vs_otpo.md, its JSON and figures; the runs go to out/report and are reused. The study
is `studies/dpo_vs_otpo.py` (`--help` lists the options).
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where `studies/` is

from studies.dpo_vs_otpo import cli  # noqa: E402


if __name__ == "__main__":
    cli()
