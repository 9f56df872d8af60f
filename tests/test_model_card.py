"""The saved model card (README.md) of a tiny run: publishable as it is (no path of this machine, the license, a filled
training procedure, how to load it, the citations)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from peft import LoraConfig
from transformers import AutoTokenizer

from otpo_trl import OTPOConfig, OTPOTrainer
from otpo_trl import model_card as model_card_module
from otpo_trl.cli import upstream

from .testing_utils import config, conversational_pairs, tiny_argv


def trained(model_dir, tmp_path, settings=None, **kwargs):
    """An OTPOTrainer after one step (or as `settings` say) on `model_dir`, writing to tmp_path/out."""
    settings = {"max_steps": 1, "beta": 0.25, "ot_reg": 0.5, "ot_normalization": "mean", **(settings or {})}
    args = config(OTPOConfig, tmp_path, **settings)
    trainer = OTPOTrainer(
        model=model_dir,
        args=args,
        train_dataset=conversational_pairs(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        **kwargs,
    )
    trainer.train()
    return trainer


def saved_card(trainer, **kwargs):
    trainer.create_model_card(**kwargs)
    path = f"{trainer.args.output_dir}/README.md"
    with open(path) as f:
        return f.read(), ModelCard.load(path).data


def test_lora_card_names_no_path_takes_the_base_license_and_fills_the_procedure(tiny_model_dir, tmp_path):
    base = tmp_path / "models" / "Tiny-Llama-Instruct"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# The base model\n")
    data = tmp_path / "data" / "my-preferences"
    data.mkdir(parents=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trained(str(base), tmp_path, peft_config=lora)

    text, meta = saved_card(trainer, model_name="tiny-otpo", dataset_name=str(data))
    assert str(tmp_path) not in text and "/tmp" not in text  # no path of this machine, anywhere
    assert meta.license == "apache-2.0" and "licence" not in text
    assert meta.base_model is None and meta.datasets is None  # a local folder is no Hub id: not in the metadata
    assert meta.library_name == "peft" and {"otpo", "dpo", "trl", "lora"} <= set(meta.tags)
    assert "`Tiny-Llama-Instruct` (a local model folder)" in text
    procedure = text.split("## Training procedure", 1)[1]
    for row in (
        "| Loss | `loss_type` sigmoid, `beta` 0.25 |",
        "`ot_reg` 0.5, `ot_reg_m` 0.2, `ot_cost` euclidean",
        "`ot_normalization` mean",
        "| Data | `my-preferences` (a local data set), 8 training pairs |",
        "| Steps | 1 of 1 (epoch ",
        "2 pairs a step (2 per device x 1 accumulation x 1 process(es))",
        "| Precision | weights float32, bf16 autocast |",
        "| Fine-tuning | LoRA adapter: r 4, alpha 8, dropout 0, modules q_proj, v_proj |",
        "| Reference model | the base model with the adapter disabled |",
        "learning rate 0.01, `linear` schedule",  # enums by their recipe value, not `SchedulerType.LINEAR`
    ):
        assert row in procedure, row
    assert "PeftModel.from_pretrained(base" in text and 'from_pretrained("Tiny-Llama-Instruct")' in text
    assert "2505.18720" in text and "@inproceedings{li2025otpo" in text and "vonwerra2020trl" in text

    # A license given to create_model_card (or push_to_hub) replaces the base model's.
    _, meta = saved_card(trainer, license="mit")
    assert meta.license == "mit"


def test_full_card_links_hub_names_and_says_when_the_license_is_unknown(tiny_model_dir, tmp_path, monkeypatch):
    trainer = trained(tiny_model_dir, tmp_path)
    text, meta = saved_card(trainer, dataset_name="trl-lib/ultrafeedback_binarized")
    assert "license" not in meta.to_dict() and "licence" not in text
    assert "License: not recorded" in text
    assert meta.datasets == ["trl-lib/ultrafeedback_binarized"] and meta.library_name == "transformers"
    assert "[trl-lib/ultrafeedback_binarized](https://huggingface.co/datasets/trl-lib/ultrafeedback_binarized)" in text
    assert "| Fine-tuning | full fine-tuning |" in text and 'pipeline("text-generation", model="out")' in text
    assert str(tmp_path) not in text

    # A base model given as a Hub id is named and linked as such, with its card's license.
    monkeypatch.setattr(trainer.model.config, "_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setattr(model_card_module, "base_model_license", lambda name: (("license", "apache-2.0"),))
    text, meta = saved_card(trainer)
    assert meta.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta.license == "apache-2.0"
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in text


@pytest.mark.parametrize(
    ("given", "shown"),
    [("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"), (None, None)],
)
def test_public_name_keeps_hub_ids(given, shown):
    assert model_card_module.public_name(given) == shown


def test_public_name_shows_a_folder_by_its_name(tmp_path):
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    assert model_card_module.public_name(f"{folder}/") == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("base_card", ["---\nlicense: apache-2.0\n---\n# base\n", None])
def test_the_dpo_baseline_card_names_no_path_of_this_machine(tmp_path, base_card):
    """`trainer: dpo` saves TRL's card; the training CLI names its local base by the folder's name and replaces TRL's
    `licence: license` with the base's license, or drops it when the base has none."""
    base = tmp_path / "models" / "MyBase"
    base.mkdir(parents=True)
    if base_card:
        (base / "README.md").write_text(base_card)
    card = tmp_path / "out" / "README.md"
    card.parent.mkdir()
    card.write_text(  # the parts of TRL 1.16's card that name the base model and the license
        "---\nlibrary_name: transformers\nmodel_name: out\nlicence: license\n---\n\n"
        f"This model is a fine-tuned version of `{base.resolve()}`.\n"
        'generator = pipeline("text-generation", model="None", device_map="auto")\n'
        "[None](https://huggingface.co/None)\n"
    )
    upstream.fix_local_model_card(card, str(base.resolve()), "out/run")
    text = card.read_text()
    assert str(tmp_path) not in text and "None" not in text and "licence" not in text
    assert "fine-tuned version of `MyBase`." in text and 'model="out/run"' in text
    assert ModelCard(text).data.get("license") == ("apache-2.0" if base_card else None)


def _hub_cache(root, repo_id, model_dir):
    """A Hub cache (`HF_HUB_CACHE`) in which `repo_id` resolves offline to a copy of `model_dir`."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


def _snippet(card_text: str) -> str:
    return card_text.split("```python\n", 1)[1].split("```", 1)[0]


def test_cards_of_the_prepared_model_name_its_hub_id_and_their_code_runs_as_written(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A run on the folder `otpo-trl prepare-model` writes (a Hub model in another format, by its card): the card's
    `base_model` is the Hub id, the name says what the model is, no path of this machine is in any card, checkpoints
    carry no card, and the loading code of the adapter and of a full fine-tune runs as written from the directory the
    run was started in (the base model from an offline Hub cache)."""
    from otpo_trl.cli.prepare_model import HUB_ID
    from otpo_trl.cli.prepare_model import README as PREPARED_README

    base = tmp_path / "models" / "SmolLM2-135M-Instruct"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text(PREPARED_README)
    monkeypatch.chdir(tmp_path)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    checkpoints = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1}
    adapter = trained(str(base.resolve()), tmp_path / "a", checkpoints, peft_config=lora)
    adapter.save_model()  # PEFT rewrites the folder's card with the base model's path; the card is saved over it
    adapter_dir = tmp_path / "a" / "out"
    text, meta = (adapter_dir / "README.md").read_text(), ModelCard.load(adapter_dir / "README.md").data
    assert meta.base_model == HUB_ID and meta.license == "apache-2.0"
    assert meta.model_name == "SmolLM2-135M-Instruct-OTPO"  # not TRL's default, the folder's name "out"
    assert f"[{HUB_ID}](https://huggingface.co/{HUB_ID}) (its local copy `SmolLM2-135M-Instruct`)" in text
    assert "Give the folder" not in text  # every name in the code loads as written
    assert sorted(p.name for p in adapter_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(adapter_dir.glob("checkpoint-*/README.md"))
    files = [p for p in adapter_dir.rglob("*") if p.suffix in (".md", ".json")]
    with_path = {p.relative_to(adapter_dir).as_posix() for p in files if str(tmp_path) in p.read_text()}
    # PEFT's own record of the base's folder, documented in the card, and nothing else
    assert with_path == {"adapter_config.json", "checkpoint-1/adapter_config.json", "checkpoint-2/adapter_config.json"}
    assert "`adapter_config.json` records the base model as the folder" in text

    full = trained(str(base.resolve()), tmp_path / "f")
    full.save_model()
    full_text, full_meta = saved_card(full, dataset_name="trl-lib/ultrafeedback_binarized")
    assert full_meta.base_model == HUB_ID and full_meta.datasets == ["trl-lib/ultrafeedback_binarized"]
    assert str(tmp_path) not in full_text

    code = _snippet(text) + _snippet(full_text)
    assert 'from_pretrained(base, "a/out")' in code and 'model="f/out"' in code
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(_hub_cache(tmp_path / "hub", HUB_ID, tiny_model_dir))}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("trainer", ["otpo", "dpo"])
def test_a_lora_run_of_the_training_script_leaves_no_path_in_its_cards(
    train, tiny_model_dir, sample_data_dir, tmp_path, trainer
):
    """Both trainers through scripts/train.py: PEFT's template (the base by its absolute path) is removed from each
    checkpoint, and the run's card names no path; `adapter_config.json` alone keeps the base's folder."""
    out = tmp_path / "out"
    extra = ["--trainer", trainer, "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
    train.main(*train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, out, *extra)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(out.glob("checkpoint-*/README.md"))
    files = [p for p in out.rglob("*") if p.suffix == ".md" or p.name == "adapter_config.json"]
    with_path = {p.relative_to(out).as_posix() for p in files if str(tiny_model_dir) in p.read_text()}
    assert with_path == {"adapter_config.json", "checkpoint-1/adapter_config.json", "checkpoint-2/adapter_config.json"}
    if trainer == "otpo":  # the script passes the folder's name, TRL's default: the card names the model instead
        name = Path(tiny_model_dir).name
        assert ModelCard.load(out / "README.md").data.model_name == f"{name}-OTPO"
