"""End to end: `accelerate launch scripts/train.py` in a subprocess, a tiny Llama, the UltraFeedback sample, CPU.

About a minute and a half on 2 CPU cores, most of it process start-up. Run only these with `pytest -m slow`.
"""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from .testing_utils import ACCELERATE, REPO_ROOT, child_env, logged, tiny_recipe


pytestmark = pytest.mark.slow


def launch(tmp_path, recipe, *args, num_processes=1, timeout=240):
    """Run scripts/train.py through `accelerate launch` from the repository root; return its combined output."""
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if num_processes == 1:
        launcher = ["--config_file", "configs/accelerate/single_gpu.yaml", "--cpu"]
    else:
        # The DDP config through torchrun; `use_cpu: true` in the recipe puts each process on the CPU (gloo).
        # (`accelerate launch --cpu --num_processes N` would start a single process: it needs mpirun for more.)
        launcher = ["--config_file", "configs/accelerate/ddp.yaml", "--num_processes", str(num_processes)]
    result = subprocess.run(
        [ACCELERATE, "launch", *launcher, "scripts/train.py", "--config", str(path), *args],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def test_lora_run_saves_everything_and_resumes_at_the_saved_step(tiny_model_dir, sample_data_dir, tmp_path):
    out = tmp_path / "out"
    recipe = tiny_recipe(tiny_model_dir, sample_data_dir, out, report_to="tensorboard")
    output = launch(tmp_path, recipe)
    assert list((out / "runs").glob("events.out.tfevents.*")), "TensorBoard logs belong under output_dir/runs"
    # a readable console: no deprecation warning at every step, no dump of every argument
    assert "is_gradient_checkpointing" not in output and "Training arguments:" not in output
    assert "pin_memory" not in output and "Setting accelerator to CPU" not in output

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).exists(), name
    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert "OTPO" in card and "2505.18720" in card
    # the local data set is named by its folder's name, never by an absolute path
    assert f"`{sample_data_dir.name}` (a local data set)" in card and str(sample_data_dir.resolve()) not in card
    results = json.loads((out / "all_results.json").read_text())
    # Pairs whose prompt alone fills max_length are dropped by TRL (the tiny tokenizer's tokens are short).
    assert 0 < results["train_samples"] <= 16 and 0 < results["eval_samples"] <= 4 and "eval_loss" in results
    first = logged(out)
    assert sorted(first) == [1, 2, 3]
    assert len(set(first.values())) > 1  # the model trained

    # The same command again: the run is finished, nothing is stepped.
    assert "holds this run, finished at step 3: nothing to train" in launch(tmp_path, recipe)
    # A kill during step 3 (checkpoint-3 lost, the run not finished): the same command resumes from checkpoint-2 and
    # redoes step 3 identically.
    shutil.rmtree(out / "checkpoint-3")
    record = json.loads((out / "run_args.json").read_text())
    (out / "run_args.json").write_text(json.dumps({**record, "status": "started"}))
    output = launch(tmp_path, recipe)
    assert f"resuming training from {out / 'checkpoint-2'}" in output
    resumed = logged(out)
    assert sorted(resumed) == [1, 2, 3]
    assert resumed[3] == pytest.approx(first[3], rel=1e-5)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


def test_two_process_data_parallel_matches_one_process(tiny_model_dir, sample_data_dir, tmp_path):
    """2 processes x 2 pairs and 1 process x 4 pairs see the same global batches (sequential sampling), so the
    logged losses agree; and near-uniform OT weights reproduce DPO under the same 2-process launch."""
    common = {"use_peft": False, "do_eval": False, "save_strategy": "no", "learning_rate": 1.0e-3}
    common |= {"train_sampling_strategy": "sequential", "log_level": "info"}  # info: the total batch size is logged

    def run(name, num_processes, batch_size, **changes):
        recipe = tiny_recipe(tiny_model_dir, sample_data_dir, tmp_path / name, **common, **changes)
        recipe["per_device_train_batch_size"] = batch_size
        output = launch(tmp_path, recipe, num_processes=num_processes)
        assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in output
        return logged(tmp_path / name)

    two = run("otpo-2x2", 2, 2)
    one = run("otpo-1x4", 1, 4)
    assert sorted(two) == [1, 2, 3]
    assert len(set(two.values())) > 1
    assert two == pytest.approx(one, rel=1e-4)

    uniform = run("otpo-uniform-2x2", 2, 2, ot_reg=1.0e6, ot_normalization="length")
    dpo = run("dpo-2x2", 2, 2, trainer="dpo")
    assert uniform == pytest.approx(dpo, rel=1e-4)


def test_compare_script_trains_both_evaluates_and_writes_the_report(tiny_model_dir, sample_data_dir, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, sample_data_dir, tmp_path / "unused", save_strategy="no", do_eval=False)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    report = tmp_path / "reports" / "dpo_vs_otpo.md"
    env = child_env()
    cmd = [sys.executable, "scripts/compare_dpo_otpo.py", "--recipe", str(recipe_path), "--max_steps", "2"]
    cmd += ["--out", str(tmp_path / "runs"), "--report", str(report), "--max_samples", "4"]
    cmd += ["--num_generations", "3", "--max_new_tokens", "8"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]

    summary = json.loads(report.with_suffix(".json").read_text())
    for kind in ("dpo", "otpo"):
        assert logged(tmp_path / "runs" / kind).keys() == {1, 2}
        preference = summary["held_out"][kind]["preference"]
        for weighting in ("unweighted", "ot"):
            assert 0 <= preference[weighting]["accuracy"] <= 1
        generation = summary["held_out"][kind]["generation"]
        assert generation["n"] == 3 and 0 < generation["length_mean"] <= 8
        assert summary["seconds_per_step"][kind] > 0
    text = report.read_text()
    assert "Against the paper" in text and "1791 vs 2168" in text
    for name in ("loss.png", "reward_accuracy.png", "reward_margin.png", "lengths.png"):
        assert (report.parent / "figures" / name).stat().st_size > 0
        assert f"figures/{name}" in text

    # --render_only rewrites the same report from its JSON (which holds the curves and lengths: every figure redrawn).
    made = text
    for name in ("loss.png", "lengths.png"):
        (report.parent / "figures" / name).unlink()
    render = subprocess.run(
        [*cmd, "--render_only"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert render.returncode == 0 and "redrew 4 figures" in render.stdout, (
        render.stdout[-3000:] + render.stderr[-3000:]
    )
    assert report.read_text() == made and (report.parent / "figures" / "loss.png").stat().st_size > 0

    # A second call reuses the finished runs and evaluations instead of training again.
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing") == 5

    # Other settings into the same --out: a run of other steps is refused, naming the change (not reported as new) ...
    longer = [*cmd[: cmd.index("--max_steps") + 1], "3", *cmd[cmd.index("--max_steps") + 2 :]]
    refused = subprocess.run(longer, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "max_steps: 2 -> 3" in refused.stderr, refused.stderr[-3000:]
    # ... and an evaluation of other budgets is made again, the finished runs being reused.
    fewer = [*cmd[: cmd.index("--num_generations") + 1], "2", *cmd[cmd.index("--num_generations") + 2 :]]
    redo = subprocess.run(fewer, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert redo.returncode == 0 and redo.stdout.count("made with other settings") == 3, redo.stdout[-3000:]
    assert json.loads(report.with_suffix(".json").read_text())["held_out"]["dpo"]["generation"]["n"] == 2
