"""Distributed engines run for real on the CPU: DeepSpeed ZeRO-3, two "nodes", torch FSDP2, the launch checks.

- ZeRO-3 on 2 processes (gloo) through `accelerate launch scripts/train.py` logs the same losses and metrics as one
  plain process with the same global batch, and saves the same model (OTPO with non-uniform weights, and DPO).
- `scripts/slurm_train.sh` runs as two "nodes" on this machine (`srun` and `scontrol` replaced by stand-ins): two
  `accelerate launch` with machine ranks 0 and 1 under ZeRO-3, and the same numbers again.
- A tiny model sharded by torch FSDP2 (`fully_shard`) on 2 gloo processes: the trainer's own hidden-state capture and
  OT weights equal the single-process ones (accelerate refuses FSDP without a GPU, so plain torch shards the model).
- `accelerate launch --cpu` with a DeepSpeed or several-process config stops with a message instead of silently
  running one plain process.

About 2 minutes on 2 CPU cores, plus ~40 s once per machine while DeepSpeed builds its shared-memory CPU op (cached
in ~/.cache/torch_extensions). The ZeRO-3 tests need the `deepspeed` extra: `pip install -e ".[deepspeed]"`.
"""

import importlib.util
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from otpo_trl.cli import upstream

from .testing_utils import ACCELERATE, REPO_ROOT, child_env, config, conversational_pairs, logged, tiny_recipe


pytestmark = pytest.mark.slow

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e '.[deepspeed]'; `make test` installs it)",
)

SINGLE = "configs/accelerate/single_gpu.yaml"
ZERO3 = "configs/accelerate/deepspeed_zero3.yaml"
BATCH_OF_4 = "Total train batch size (w. parallel, distributed & accumulation) = 4"
# Measured (2 CPU processes vs 1): logged losses, rewards and ot/* agree to ~1e-6 relative (the order of reductions);
# saved parameters to 7e-7, while the two steps moved them by 1.5e-3.
REL = 1e-4
PARAM_ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(tmp_path, name, recipe) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(command, env=None, timeout=300):
    """Run `command` from the repository root: (returncode, output). On timeout, kill it with every process it started
    (launchers leave their workers behind otherwise) and fail."""
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env or child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command[:4])} ... ran past {timeout} s:\n{output[-3000:]}")
    return process.returncode, output


def accelerate_launch(recipe_path, *launcher, timeout=300):
    """`accelerate launch <launcher> scripts/train.py --config <recipe>`: (returncode, output)."""
    return run([ACCELERATE, "launch", *launcher, "scripts/train.py", "--config", str(recipe_path)], timeout=timeout)


def distributed_recipe(model_dir, data_dir, output_dir, trainer):
    """Full fine-tuning, 2 steps of a global batch of 4 pairs taken in order; non-uniform OT weights (ot_reg 0.1).

    No `use_cpu` and no `ddp_backend`: on a machine without a GPU scripts/train.py sets `ddp_backend: gloo` under
    DeepSpeed itself, which is what these tests check."""
    recipe = tiny_recipe(model_dir, data_dir, output_dir, trainer=trainer, use_peft=False, max_steps=2)
    recipe |= {"do_eval": False, "save_strategy": "no", "learning_rate": 1.0e-3, "max_length": 128, "ot_reg": 0.1}
    recipe |= {"train_sampling_strategy": "sequential", "log_level": "info"}  # info: batch size and ZeRO-3 logged
    del recipe["use_cpu"]
    return recipe


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, sample_data_dir, tmp_path_factory):
    """The reference: one plain process (no DeepSpeed) with batch 4; runs each trainer once, when first asked."""
    runs = {}

    def reference(trainer):
        if trainer not in runs:
            tmp_path = tmp_path_factory.mktemp(f"one-{trainer}")
            recipe = distributed_recipe(tiny_model_dir, sample_data_dir, tmp_path / "out", trainer)
            recipe |= {"use_cpu": True, "per_device_train_batch_size": 4}
            code, output = accelerate_launch(write_recipe(tmp_path, "one", recipe), "--config_file", SINGLE, "--cpu")
            assert code == 0, output[-5000:]
            assert BATCH_OF_4 in output
            runs[trainer] = tmp_path / "out"
        return runs[trainer]

    return reference


def assert_same_run(two, one, initial, trainer):
    """Runs `two` and `one` logged the same metrics at steps 1 and 2 and saved the same model, which trained."""
    from transformers import AutoModelForCausalLM

    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"]
    if trainer == "otpo":
        keys += ["ot/plan_mass", "ot/weight_max", "ot/weight_entropy", "ot/fallbacks"]
    for key in keys:
        expected = logged(one, key)
        assert sorted(expected) == [1, 2], key
        assert logged(two, key) == pytest.approx(expected, rel=REL, abs=1e-6), key
    losses = logged(one)
    assert losses[2] != pytest.approx(losses[1], rel=1e-3)  # step 2 saw a trained model
    if trainer == "otpo":  # far from uniform: weights lost or mixed up on one rank would show
        assert logged(one, "ot/weight_entropy")[1] < 0.99 and logged(one, "ot/weight_max")[1] > 1.5

    saved_two = AutoModelForCausalLM.from_pretrained(two).state_dict()
    saved_one = AutoModelForCausalLM.from_pretrained(one).state_dict()
    start = AutoModelForCausalLM.from_pretrained(initial).state_dict()
    assert saved_two.keys() == saved_one.keys() == start.keys()
    for name, param in saved_one.items():
        assert (param - start[name]).abs().max() > 50 * PARAM_ATOL, f"{name} did not train"
        torch.testing.assert_close(saved_two[name], param, rtol=0, atol=PARAM_ATOL, msg=name)


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO-3


@needs_deepspeed
@pytest.mark.parametrize("trainer", ["otpo", "dpo"])
def test_zero3_on_two_processes_matches_one_process(tiny_model_dir, sample_data_dir, tmp_path, one_process, trainer):
    """The shipped ZeRO-3 config as the README launches it, with `--num_processes 2`: 2 x 2 pairs == 1 x 4 pairs."""
    recipe = distributed_recipe(tiny_model_dir, sample_data_dir, tmp_path / "out", trainer)
    launcher = ["--config_file", ZERO3, "--num_processes", "2", "--main_process_port", str(free_port())]
    code, output = accelerate_launch(write_recipe(tmp_path, "zero3", recipe), *launcher)
    assert code == 0, output[-5000:]
    assert BATCH_OF_4 in output
    assert "Detected DeepSpeed ZeRO-3" in output  # the weights were partitioned at load time
    assert_same_run(tmp_path / "out", one_process(trainer), tiny_model_dir, trainer)


STAND_INS = {
    # `scontrol show hostnames <list>`: this machine is every node.
    "scontrol": '#!/bin/bash\nfor _ in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done\n',
    # `srun --nodes=N ... bash -c CMD`: one task per "node", each with its SLURM_PROCID; one failing stops them all.
    # On one machine any "node" could host the rendezvous (on a cluster only node 0's address matches), and node 0's
    # launcher then finds its port taken: start the others once node 0 listens.
    "srun": (
        "#!/bin/bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        'SLURM_PROCID=0 "$@" & pids=($!)\n'
        "until (exec 3<>/dev/tcp/127.0.0.1/$MAIN_PROCESS_PORT) 2>/dev/null; do\n"
        '    kill -0 "${pids[0]}" 2>/dev/null || break; sleep 0.5\n'
        "done\n"
        'for rank in $(seq 1 $((SLURM_NNODES - 1))); do SLURM_PROCID=$rank "$@" & pids+=($!); done\n'
        'for _ in "${pids[@]}"; do wait -n || { kill "${pids[@]}" 2>/dev/null; wait; exit 1; }; done\n'
    ),
}


@needs_deepspeed
def test_slurm_script_runs_two_nodes_on_this_machine(tiny_model_dir, sample_data_dir, tmp_path, one_process):
    """scripts/slurm_train.sh as written, two "nodes" of one process each: two `accelerate launch` with
    `--num_machines 2 --machine_rank 0/1`, c10d rendezvous, ZeRO-3; the same run as one process with batch 4."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    recipe = distributed_recipe(tiny_model_dir, sample_data_dir, tmp_path / "unused", "otpo")
    recipe_path = write_recipe(tmp_path, "two-nodes", recipe)
    env = child_env() | {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]", "GPUS_PER_NODE": "1"}
    env |= {"MAIN_PROCESS_PORT": str(free_port()), "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}"}
    env["PATH"] += os.pathsep + os.environ["PATH"]
    command = ["bash", "scripts/slurm_train.sh", str(recipe_path), "deepspeed_zero3"]
    code, output = run([*command, "--output_dir", str(tmp_path / "out")], env=env)
    assert code == 0, output[-5000:]
    assert "on 2 nodes x 1 GPUs" in output
    assert BATCH_OF_4 in output and "Detected DeepSpeed ZeRO-3" in output
    assert_same_run(tmp_path / "out", one_process("otpo"), tiny_model_dir, "otpo")


# ---------------------------------------------------------------------------------------------- launch checks


@pytest.mark.parametrize(
    "launcher, asked",
    [
        (["--config_file", ZERO3, "--cpu", "--num_processes", "2"], "DEEPSPEED"),
        (["--config_file", "configs/accelerate/ddp.yaml", "--cpu", "--num_processes", "2"], "2 processes"),
    ],
)
def test_cpu_flag_that_would_drop_the_distributed_setup_is_refused(
    tiny_model_dir, sample_data_dir, tmp_path, launcher, asked
):
    """`accelerate launch --cpu` silently starts one plain process whatever the config says: scripts/train.py stops."""
    recipe = distributed_recipe(tiny_model_dir, sample_data_dir, tmp_path / "out", "otpo")
    code, output = accelerate_launch(write_recipe(tmp_path, "cpu-flag", recipe), *launcher)
    assert code != 0
    assert f"({asked}) would run one plain process" in output and "Remove `--cpu`" in output, output[-3000:]
    assert not (tmp_path / "out").exists()  # stopped before anything was loaded or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="the defaults apply only without a GPU")
@pytest.mark.parametrize(
    "env, defaults",
    [
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, {"ddp_backend": "gloo"}),
        ({"WORLD_SIZE": "2"}, {"use_cpu": True}),  # DDP: gloo alone would leave the model unwrapped
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, {}),  # accelerate refuses FSDP on the CPU itself
        ({"WORLD_SIZE": "1", "ACCELERATE_USE_DEEPSPEED": "true"}, {}),
        ({}, {}),
    ],
)
def test_launch_defaults_without_a_gpu(monkeypatch, env, defaults):
    for name in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert upstream.launch_defaults() == defaults


# ---------------------------------------------------------------------------------------------- torch FSDP2


def fsdp_trainer(model_dir, output_dir):
    """An OTPOTrainer with non-uniform OT weights (ot_reg 0.1) on 4 short pairs; bf16 autocast, as users train."""
    from transformers import AutoTokenizer

    from otpo_trl import OTPOConfig, OTPOTrainer

    args = config(OTPOConfig, Path(output_dir), ot_reg=0.1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = OTPOTrainer(
        model=model_dir, args=args, train_dataset=conversational_pairs(4), processing_class=tokenizer
    )
    with torch.no_grad():  # the same change in every process: policy != reference, so the loss is not ln 2
        for seed, param in enumerate(trainer.model.parameters()):
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
    return trainer


def capture(trainer, rows):
    """One `compute_loss` of pairs `rows` through the trainer's own path (its hooks capture the policy's hidden states
    and call `compute_token_weights`); returns the loss and what `compute_token_weights` received and returned."""
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in rows]))
    seen = {}
    compute = trainer.compute_token_weights

    def spy(chosen_hidden, rejected_hidden, chosen_mask, rejected_mask):
        seen["weights"] = compute(chosen_hidden, rejected_hidden, chosen_mask, rejected_mask)
        seen.update(chosen_hidden=chosen_hidden, rejected_hidden=rejected_hidden)
        seen["mask"] = torch.cat([chosen_mask, rejected_mask])
        return seen["weights"]

    trainer.compute_token_weights = spy
    try:
        with torch.no_grad(), trainer.accelerator.autocast():  # bf16, as the model accelerate prepares for training
            seen["loss"] = trainer.compute_loss(trainer.model, batch)
    finally:
        del trainer.compute_token_weights
    return {key: value.detach().cpu() for key, value in seen.items()}


def fsdp2_worker(rank, world_size, port, model_dir, out_dir):
    """One of the FSDP2 processes: shard the policy with `fully_shard` over gloo, capture pairs [2 rank, 2 rank + 1]."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ |= {"WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(1)
    trainer = fsdp_trainer(model_dir, Path(out_dir) / f"rank{rank}")  # use_cpu: accelerate joins the gloo group
    assert torch.distributed.get_world_size() == world_size
    mesh = init_device_mesh("cpu", (world_size,))
    model = trainer.model
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    embedding = model.model.embed_tokens.weight
    result = capture(trainer, [2 * rank, 2 * rank + 1])
    result["sharded_rows"] = torch.tensor([embedding.to_local().shape[0], embedding.shape[0]])
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_fsdp2_hidden_state_capture_and_ot_weights_match_one_process(tiny_model_dir, tmp_path):
    """Each of 2 FSDP2 ranks holds half of every parameter, yet the trainer's capture sees the full last hidden state:
    hidden states, OT weights and loss of its pairs equal those of one unsharded process."""
    import torch.multiprocessing as mp

    world_size = 2
    context = mp.start_processes(
        fsdp2_worker,
        args=(world_size, free_port(), tiny_model_dir, str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the FSDP2 processes did not finish in 300 s")

    single = fsdp_trainer(tiny_model_dir, tmp_path / "single")
    for rank in range(world_size):
        sharded = torch.load(tmp_path / f"rank{rank}.pt")
        local_rows, rows = sharded.pop("sharded_rows").tolist()
        assert local_rows == -(-rows // world_size)  # really sharded: this rank held half of the embedding
        expected = capture(single, [2 * rank, 2 * rank + 1])
        mask = expected["mask"]
        assert mask.sum() > 0 and torch.equal(sharded["mask"], mask)
        weights = expected["weights"][mask]
        assert weights.std() > 0.1  # non-uniform weights, so a wrong hidden state would change them
        for key in ("chosen_hidden", "rejected_hidden"):
            side = mask.chunk(2)[key == "rejected_hidden"]
            torch.testing.assert_close(sharded[key][side], expected[key][side], rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(sharded["weights"][mask], weights, rtol=1e-5, atol=1e-5)
        assert abs(expected["loss"].item() - math.log(2)) > 1e-3
        torch.testing.assert_close(sharded["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
