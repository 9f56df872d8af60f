"""An untruncated data set for the length study (pairs that fit max_length whole)

```bash
python scripts/length_pool.py --max_length 512 --out out/length_pool_512   # -> train.jsonl, test.jsonl, pool.json
```

What it keeps and why is said in `studies/length_pool.py` (`--help` lists the options).
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where `studies/` is

from studies.length_pool import cli  # noqa: E402


if __name__ == "__main__":
    cli()
