"""Quiet tools: the Python API and `otpo-trl evaluate / plot-weights / prepare-model` print no upstream warning a user
cannot act on (otpo_trl.upstream_warnings), and the filters drop those messages only."""

import logging
import os
import re
import subprocess
import sys
import warnings

from otpo_trl.upstream_warnings import filter_upstream_warnings

from .testing_utils import REPO_ROOT


def test_the_filters_drop_those_messages_and_nothing_else():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    deepspeed_logger = logging.getLogger("DeepSpeed")
    deepspeed_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            filter_upstream_warnings()
            message = "'pin_memory' argument is set as true but no accelerator is found, then device pinned memory"
            warnings.warn(message + " won't be used.", UserWarning, stacklevel=1)
            for name in ("gradient_checkpointing", "is_gradient_checkpointing", "gradient_checkpointing_disable"):
                warnings.warn(
                    f"`{name}` is deprecated and will be removed in v6. Use ...", FutureWarning, stacklevel=1
                )
            warnings.warn("another warning", UserWarning, stacklevel=1)
            warnings.warn("`something_else` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        deepspeed_logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
        deepspeed_logger.warning("another DeepSpeed message")
    finally:
        deepspeed_logger.removeHandler(handler)
        deepspeed_logger.filters.clear()
    assert [str(w.message) for w in caught] == [
        "another warning",
        "`something_else` is deprecated and will be removed in v6.",
    ]
    assert [r.getMessage() for r in records] == ["another DeepSpeed message"]


# Run as a user would, with Python's default warning filters, except that every warning that no filter drops is shown
# each time (not once per place), so that each tool's own output shows its warnings.
TOOLS = r"""
import contextlib, shutil, sys, warnings
warnings.simplefilter("always", append=True)
tiny, work = sys.argv[1], sys.argv[2]

print("=== python-api", flush=True)
from datasets import Dataset
from peft import LoraConfig
from otpo_trl import OTPOConfig, OTPOTrainer
pairs = Dataset.from_list(
    [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant", "content": "Paris."}],
      "rejected": [{"role": "assistant", "content": "Rome, I think."}]} for i in range(4)]
)
args = OTPOConfig(output_dir=f"{work}/api", max_steps=1, per_device_train_batch_size=2, bf16=False, report_to="none")
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
trainer = OTPOTrainer(model=tiny, args=args, train_dataset=pairs, peft_config=lora)
trainer.train()
trainer.save_model()

from otpo_trl.cli.main import main
print("=== evaluate", flush=True)
main(["evaluate", "--model", f"{work}/api", "--data", f"{work}/pairs.jsonl", "--max_samples", "2",
      "--num_generations", "2", "--max_new_tokens", "4", "--output_dir", f"{work}/eval", "--disable_tqdm", "true"])

print("=== plot-weights", flush=True)
main(["plot-weights", "--model", tiny, "--prompt", "Capital of France?", "--chosen", "Paris.\r\nYes.\r",
      "--rejected", "Rome.", "--out", f"{work}/pair.png"])

print("=== prepare-model", flush=True)
from otpo_trl.cli import prepare_model
from transformers import AutoModelForCausalLM, AutoTokenizer
def convert(target):  # the tiny model in place of the GGUF file: the same loading and saving
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(target)
    (target / "README.md").write_text(prepare_model.README)
prepare_model.convert, prepare_model.packages_on_path = convert, contextlib.nullcontext
with contextlib.suppress(SystemExit):
    main(["prepare-model", "--output_dir", f"{work}/models/SmolLM2-135M-Instruct"])
print("=== end", flush=True)
"""
NOISE = re.compile(r"\w+Warning: |Setting accelerator to CPU|warnings\.warn\(")


def test_python_api_and_tools_print_no_upstream_warning(tiny_model_dir, tmp_path):
    rows = [
        '{"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome."}',
        '{"prompt": "Two plus two?", "chosen": " Four.", "rejected": " Five."}',
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-c", TOOLS, tiny_model_dir, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # in order: each warning in the section of the tool that printed it
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "=== end" in result.stdout, result.stdout[-5000:]
    sections = dict(section.split("\n", 1) for section in re.split(r"^=== ", result.stdout, flags=re.M)[1:-1])
    assert list(sections) == ["python-api", "evaluate", "plot-weights", "prepare-model"]
    for tool, output in sections.items():
        noise = [line for line in output.splitlines() if NOISE.search(line)]
        assert not noise, f"{tool}:\n" + "\n".join(noise)
    assert "Wrote" in sections["plot-weights"] and "Saved SmolLM2-135M-Instruct" in sections["prepare-model"]
