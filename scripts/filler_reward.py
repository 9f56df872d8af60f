"""Does a trained reward pay for appended filler? (a length measure with the content held fixed)

```bash
python scripts/filler_reward.py --runs out/length_study_peers --arms dpo ld_dpo   # -> reports/filler_reward/
python scripts/filler_reward.py --render_only   # rewrite the report from its JSON, scoring nothing
```

The runs are a length study's (`scripts/length_study.py --out`); the measure is in `studies/filler_reward.py`
(`--help` lists the options).
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where `studies/` is

from studies.filler_reward import cli  # noqa: E402


if __name__ == "__main__":
    cli()
