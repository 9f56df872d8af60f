"""What OTPO's transport plan weights, before any training: held-out pairs with a planted span.

```bash
python scripts/planted_tokens.py                 # -> reports/planted_tokens/ (SmolLM2-135M-Instruct, test pairs)
python scripts/planted_tokens.py --render_only   # rewrite the report and its figure from its JSON, scoring nothing
```

Writes reports/planted_tokens/planted_tokens.md, its JSON and figure. The variants are made in
`studies/planted_variants.py`, scored and reported in `studies/planted_tokens.py` (`--help` lists the options).
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where `studies/` is

from studies.planted_tokens import cli  # noqa: E402


if __name__ == "__main__":
    cli()
