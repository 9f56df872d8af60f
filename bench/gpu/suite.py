"""OTPO vs DPO on one GPU, offline, in a few minutes: step time, peak memory, the OT part's own cost, and the batched
OT solver against the official per-pair POT loop. Run it through `bench/gpu/run.sh OUT_DIR` (which installs the
wheels of `bench/gpu/fetch_wheels.sh` first); `--device cpu --tiny` runs the same suite at tiny sizes in seconds.

Parts, most valuable first (`--parts` chooses and orders them); each runs in its own process, so that an error or
an out-of-memory in one leaves the others a clean GPU, and each has a share of the time budget (`--budget-s`): a part
that cannot start in the time left is skipped, one that runs out of time stops after its last whole round and keeps
what it measured ("partial"); the JSON and the summary are rewritten after every part.

- `step-8b-lora`: a Llama-3-8B-shaped model (random weights from a config; 32 layers, hidden 4096, vocab 128256)
  with LoRA r 16 on all seven projections (the recipe of `configs/llama-3-8b-instruct/otpo_lora.yaml`: alpha 16,
  dropout 0.05, bf16 weights, activation checkpointing, sdpa; the reference is the policy with its adapter disabled).
- `step-1b-full`: a Llama-3.2-1B-shaped model (16 layers, hidden 2048, tied embeddings), full fine-tuning with a
  frozen copy as the reference.
  In both: TRL's `DPOTrainer` and `OTPOTrainer`, each with its own model (identical weights), batch 2 pairs,
  max_length 2048, synthetic token ids with UltraFeedback-like lengths (the quantiles of the project's 1,000-pair
  sample, SmolLM2 tokens). Each round runs DPO, OTPO at `ot_reg` 1.0 and OTPO at `ot_reg` 0.1 on the same batch
  (a new batch each round), after warm-up rounds. Per step: seconds (synchronised), peak
  `torch.cuda.max_memory_allocated` (reset before each step; "alone" = minus the other trainer's resident model and
  optimizer state, i.e. what the trainer would peak at by itself), the OT part's time (`compute_token_weights`:
  cost matrix, solver, metrics) on the GPU timeline between two CUDA events, `ot/solver_iters`; after the timed
  rounds, one more OTPO step per `ot_reg` counts the host syncs inside the OT part (`torch.cuda.set_sync_debug_mode`).
- `long-1b` (not in the default parts: `--parts long-1b`, its own run): long completions on the Llama-3.2-1B shape
  with LoRA r 16, bf16, activation checkpointing, one pair a step with 8k- and then 16k-token completions (a 64-token
  prompt): DPO and OTPO (ε 1.0, the default memory budget) steps, seconds and peak memory and the OT part's time;
  then `ot_token_weights` alone on bf16 states of hidden 2048 at n = m = 8k and 16k, dense and online, ε 1.0 and 0.1:
  seconds, peak memory above the states, iterations (`bench/ot_memory.py` is the CPU counterpart).
- `ot-weights`: `otpo_trl.ot_token_weights` (batched) against the official code's loop (`bench/ot_weights.py`'s
  `official_torch`: POT's torch backend on the GPU tensors, padded L x L, `sinkhorn_stabilized`), B = 8 pairs,
  completions 300-1000 tokens, padded length 1536, hidden 4096, bf16 states, `ot_reg` 1.0 and 0.1, interleaved
  repeats; the speed-up of the medians, the iterations, the weights' difference, kernels per batched call.

    bench/gpu/run.sh /tmp/gpu-out                      # on the GPU machine (see bench/RESULTS.md)
    python bench/gpu/suite.py --out /tmp/x --device cpu --tiny
"""

import argparse
import copy
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
for path in (REPO / "bench", REPO):  # `import otpo_trl` from the checkout; bench/*.py as modules
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

PARTS = ("step-8b-lora", "step-1b-full", "ot-weights", "long-1b")
DEFAULT_PARTS = PARTS[:3]  # within the 8 minutes of one lent GPU; long-1b is a run of its own
# Seconds a part needs at least to start on the GPU (imports, model build, warm-up, 3 timed rounds), and at most.
PART_MIN_S = {"step-8b-lora": 120, "step-1b-full": 45, "ot-weights": 40, "long-1b": 90}
PART_MAX_S = {"step-8b-lora": 210, "step-1b-full": 120, "ot-weights": 120, "long-1b": 400}
LONG_TOKENS = (8192, 16384)  # completion lengths of `long-1b` (divided by TINY_LENGTH_DIVISOR with --tiny)
GRACE_S = 30  # a part stops itself this long before its share of the budget ends (then it is killed)
OT_REGS = (1.0, 0.1)
TARGETS = {"time_ratio": 1.03, "memory_ratio": 1.02, "ot_speedup": 100.0, "ot_share_8b": 0.01}

# Llama shapes (the Hub configs of meta-llama/Llama-3.2-1B and Meta-Llama-3-8B; weights are random).
SHAPES = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    ),
}
STEP_PARTS = {
    "step-8b-lora": {"label": "Llama-3-8B shape, LoRA r 16", "shape": "llama-3-8b", "lora": True},
    "step-1b-full": {"label": "Llama-3.2-1B shape, full fine-tuning", "shape": "llama-3.2-1b", "lora": False},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Token lengths of the project's UltraFeedback sample (../shared/data/ultrafeedback/train.jsonl, 1,000 pairs,
# SmolLM2-135M-Instruct's tokenizer and chat template; completions + EOS) at these quantiles. Sampled by inverse CDF.
LENGTH_QUANTILES = (0.0, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99, 1.0)
ULTRAFEEDBACK_LENGTHS = {
    "prompt": (34, 39, 42, 53, 112, 253, 509, 705, 1201, 2111),
    "chosen": (1, 9, 19, 60, 217, 457, 661, 790, 1025, 1242),
    "rejected": (1, 11, 22, 65, 195, 397, 559, 701, 946, 1014),
}
TINY_LENGTH_DIVISOR = 16  # --tiny: lengths / 16, max_length 2048 / 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for suite.json and summary.md")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models and problems: the whole suite in seconds on CPU")
    p.add_argument(
        "--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated, in order; of {', '.join(PARTS)}"
    )
    p.add_argument("--budget-s", type=float, default=None, help="time for all parts (default 420 s; 300 s --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per model part (default 2; 1 --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds per model part (default 8; 2 --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per solver and ot_reg (default 5; 2 --tiny)")
    p.add_argument("--batch", type=int, default=2, help="pairs per training step")
    p.add_argument("--max-length", type=int, default=None, help="default 2048 (128 --tiny)")
    p.add_argument("--no-checkpointing", action="store_true", help="train without activation checkpointing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--child-json", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # epoch seconds
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    args.budget_s = args.budget_s or (300.0 if tiny else 420.0)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    args.steps = args.steps if args.steps is not None else (2 if tiny else 8)
    args.repeats = args.repeats if args.repeats is not None else (2 if tiny else 5)
    args.max_length = args.max_length or (2048 // TINY_LENGTH_DIVISOR if tiny else 2048)
    if args.max_length < 32 or args.batch < 1:
        p.error("--max-length must be >= 32 and --batch >= 1")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {list(PARTS)}")
    return args


def is_cuda(device):
    return str(device).startswith("cuda")


def write_json(path, data):
    """Atomic: a reader (or a kill) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def median(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


# ---------------------------------------------------------------------------------------------- machine facts


def unmet_requirements(dists=("trl", "datasets", "POT", "dill", "multiprocess")):
    """Requires-Dist (no extras) of the carried packages that the installed versions do not meet."""
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for dist in dists:
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            unmet.append(f"{dist}: not installed")
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{dist} requires {line}: not installed")
                continue
            if not req.specifier.contains(version, prereleases=True):
                unmet.append(f"{dist} requires {line}: {version} installed")
    return unmet


def safe(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a fact that could not be read is written as such
        return f"{type(e).__name__}: {e}"


def machine_facts(device):
    from importlib import metadata

    import torch

    versions = {}
    for dist in (
        "torch",
        "transformers",
        "trl",
        "datasets",
        "accelerate",
        "peft",
        "POT",
        "numpy",
        "scipy",
        "triton",
        "pyarrow",
        "fsspec",
        "huggingface-hub",
        "tokenizers",
        "safetensors",
        "dill",
        "multiprocess",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    where = {}  # found, not imported (the parts import them, each in its own process)
    for module in ("trl", "datasets", "ot", "otpo_trl"):
        spec = importlib.util.find_spec(module)
        where[module] = str(Path(spec.origin).parent) if spec and spec.origin else "not found"
    facts = {
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": os.getloadavg(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "versions": versions,
        "imported_from": where,
        "unmet_requirements": safe(unmet_requirements),
    }
    try:
        facts["git_commit"] = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        facts["git_commit"] = None
    if is_cuda(device):
        try:
            facts["gpu"] = gpu_facts()
        except Exception as e:  # noqa: BLE001 - the parts will say what is wrong with the GPU; write the files
            facts["gpu"] = {"error": f"{type(e).__name__}: {e}"}
    else:
        try:
            with open("/proc/cpuinfo") as f:
                facts["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            facts["cpu"] = platform.processor() or None
    return facts


def gpu_facts():
    import torch

    props = torch.cuda.get_device_properties(0)
    facts = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": props.total_memory,
        "multiprocessors": props.multi_processor_count,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    try:
        facts["nvidia_smi"] = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except Exception as e:  # noqa: BLE001
        facts["nvidia_smi"] = f"{type(e).__name__}: {e}"
    return facts


# ---------------------------------------------------------------------------------------------- model parts


def sample_lengths(rng, max_length, tiny):
    """(prompt, chosen, rejected) token lengths drawn from the UltraFeedback quantiles; the prompt leaves room for a
    completion (TRL drops pairs whose prompt fills max_length)."""
    import numpy as np

    div = TINY_LENGTH_DIVISOR if tiny else 1
    while True:
        p, c, r = (
            max(1, round(float(np.interp(rng.random(), LENGTH_QUANTILES, ULTRAFEEDBACK_LENGTHS[k])) / div))
            for k in ("prompt", "chosen", "rejected")
        )
        if p <= max_length - max(8, max_length // 16):
            return p, c, r


def make_batches(n, pairs, vocab, max_length, tiny, seed, device):
    """n collated batches of `pairs` synthetic pairs each, as TRL's DataCollatorForPreference pads them."""
    import random

    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    collate = DataCollatorForPreference(pad_token_id=0, max_length=max_length)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731 - 0-2 are pad, eos, unk
    out = []
    for _ in range(n):
        examples = []
        for _ in range(pairs):
            p, c, r = sample_lengths(rng, max_length, tiny)
            examples.append({"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)})
        batch = collate.torch_call(examples)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def make_tokenizer():
    """A word-level tokenizer of six tokens: TRL needs a processing class (pad and EOS); the ids are synthetic."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3, "b": 4, "c": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def resident_bytes(trainer):
    """Bytes of the distinct storages of a trainer's policy, reference and optimizer state."""
    import torch

    seen, total = set(), 0
    tensors = []
    for model in (trainer.model, trainer.ref_model):
        if model is not None:
            tensors += list(model.parameters()) + list(model.buffers())
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class OTTimer:
    """Replaces an OTPOTrainer's `compute_token_weights` by a timed call: CUDA events around it on the GPU (the span
    of the OT work on the GPU timeline, idle gaps from launches and host syncs included), perf_counter on the CPU;
    optionally counts its host syncs (`torch.cuda.set_sync_debug_mode("warn")`)."""

    def __init__(self, trainer, cuda):
        self.inner, self.cuda, self.pending, self.count_syncs, self.syncs = (
            trainer.compute_token_weights,
            cuda,
            [],
            False,
            0,
        )
        trainer.compute_token_weights = self

    def __call__(self, *args, **kwargs):
        import torch

        events = None
        if self.cuda:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        start = time.perf_counter()
        if self.count_syncs:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = self.inner(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            self.syncs += sum("synchroniz" in str(w.message) for w in caught)
        else:
            out = self.inner(*args, **kwargs)
        host = time.perf_counter() - start
        if events:
            events[1].record()
        self.pending.append((events, host))
        return out

    def collect(self):
        """(seconds on the GPU timeline or None, host seconds) of the calls since the last collect; after a sync."""
        gpu = sum(e[0].elapsed_time(e[1]) / 1e3 for e, _ in self.pending) if self.cuda else None
        host = sum(h for _, h in self.pending)
        self.pending = []
        return gpu, host


def build_trainers(spec, args, shape, dtype):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import DPOConfig, DPOTrainer

    from otpo_trl import OTPOConfig, OTPOTrainer

    tokenizer = make_tokenizer()
    dataset = Dataset.from_dict({"prompt": ["a"] * 2, "chosen": ["b"] * 2, "rejected": ["c"] * 2})  # unused rows
    checkpointing = not args.no_checkpointing
    trainers = {}
    for kind in ("dpo", "otpo"):
        torch.manual_seed(args.seed)  # the same random weights for both trainers
        with torch.device(args.device):
            config = LlamaConfig(**shape, max_position_embeddings=max(4096, args.max_length))
            policy = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        ref = None
        if not spec["lora"]:
            ref = copy.deepcopy(policy).eval().requires_grad_(False)
        common = dict(
            output_dir=str(Path(tempfile.gettempdir()) / f"otpo-gpu-suite-{kind}"),
            per_device_train_batch_size=args.batch,
            max_length=args.max_length,
            bf16=True,
            use_cpu=not is_cuda(args.device),
            report_to="none",
            learning_rate=1e-7,  # the steps are timed, not trained; weights move little
            beta=0.01,
            seed=args.seed,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if kind == "otpo":
            cfg, trainer_cls = OTPOConfig(**common, ot_reg=OT_REGS[0], ot_reg_m=0.2), OTPOTrainer
        else:
            cfg, trainer_cls = DPOConfig(**common), DPOTrainer
        lora = None
        if spec["lora"]:
            lora = LoraConfig(
                r=16, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
            )
        trainer = trainer_cls(
            model=policy, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
        )
        if checkpointing:  # Trainer.train() would do this; the suite calls training_step itself
            base = trainer.model.get_base_model() if spec["lora"] else trainer.model
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer.model.train()
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is bypassed
        trainers[kind] = trainer
    return trainers


def step_part(name, args, deadline, state, save):
    import torch
    from step_overhead import step  # synchronised training_step + optimizer step, as bench/step_overhead.py times it

    spec = STEP_PARTS[name]
    cuda = is_cuda(args.device)
    shape = SHAPES["tiny" if args.tiny else spec["shape"]]
    state["config"] = {
        "label": spec["label"],
        "shape": "tiny" if args.tiny else spec["shape"],
        "model_config": shape,
        "lora": {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": LORA_TARGETS} if spec["lora"] else None,
        "dtype": "bfloat16 weights, bf16=True",
        "activation_checkpointing": not args.no_checkpointing,
        "batch_pairs": args.batch,
        "max_length": args.max_length,
        "warmup_rounds": args.warmup,
        "timed_rounds": args.steps,
        "ot_regs": OT_REGS,
        "ot_reg_m": 0.2,
        "beta": 0.01,
        "schedule": (
            "each round: DPO, OTPO ot_reg 1.0, OTPO ot_reg 0.1 on the same batch, the order rotated by one "
            "each round; a new batch each round"
        ),
    }
    t0 = time.perf_counter()
    trainers = build_trainers(spec, args, shape, torch.bfloat16)
    state["build_seconds"] = time.perf_counter() - t0
    timer = OTTimer(trainers["otpo"], cuda)
    n_batches = args.warmup + args.steps + 1
    batches = make_batches(
        n_batches, args.batch, shape["vocab_size"], args.max_length, args.tiny, args.seed, args.device
    )
    runs = {"dpo": ("dpo", None), **{f"otpo_reg{reg}": ("otpo", reg) for reg in OT_REGS}}
    m = state["measured"] = {
        key: {
            "seconds": [],
            "peak_bytes": [],
            "step_growth_bytes": [],
            "ot_gpu_seconds": [],
            "ot_host_seconds": [],
            "solver_iters": [],
        }
        for key in runs
    }
    state["rounds"] = []
    other = None
    for i, batch in enumerate(batches[:-1]):
        timed_round = i >= args.warmup
        if timed_round and state["rounds"] and time.time() + state["rounds"][-1]["seconds"] > deadline:
            state["stopped"] = f"out of time after {i - args.warmup} timed rounds"
            break
        if timed_round and other is None and cuda:  # the optimizer states exist after the first step
            other = {"dpo": resident_bytes(trainers["otpo"]), "otpo": resident_bytes(trainers["dpo"])}
            state["other_trainer_resident_bytes"] = other
        round_start = time.perf_counter()
        order = list(runs.items())
        order = order[i % len(order) :] + order[: i % len(order)]  # rotated each round: no run is always first
        for key, (kind, reg) in order:
            trainer = trainers[kind]
            if reg is not None:
                trainer.args.ot_reg = reg  # read by compute_token_weights at every call (ot_kwargs)
            before = None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            seconds = step(trainer, batch)
            gpu_ot, host_ot = timer.collect() if kind == "otpo" else (None, None)
            iters = trainer._metrics["train"].get("ot/solver_iters", [None])[-1]
            for t in trainers.values():
                t._metrics["train"].clear()
            if not timed_round:
                continue
            r = m[key]
            r["seconds"].append(seconds)
            if cuda:
                peak = torch.cuda.max_memory_allocated()
                r["peak_bytes"].append(peak)
                r["step_growth_bytes"].append(peak - before)
            if kind == "otpo":
                r["ot_gpu_seconds"].append(gpu_ot)
                r["ot_host_seconds"].append(host_ot)
                r["solver_iters"].append(iters)
        state["rounds"].append(
            {
                "round": i,
                "timed": timed_round,
                "seconds": time.perf_counter() - round_start,
                "tokens": int(batch["attention_mask"].sum()),
                "padded_shape": list(batch["input_ids"].shape),
            }
        )
        state["results"] = summarize_steps(m, other)
        save()
    if cuda and time.time() + 2 * (state["rounds"][-1]["seconds"] if state["rounds"] else 0) < deadline:
        timer.count_syncs, syncs = True, {}
        for reg in OT_REGS:  # one more, untimed step per ot_reg
            timer.syncs = 0
            trainers["otpo"].args.ot_reg = reg
            step(trainers["otpo"], batches[-1])
            timer.collect()
            syncs[f"otpo_reg{reg}"] = timer.syncs
        state["ot_host_syncs_per_step"] = syncs
    state["results"] = summarize_steps(m, other)
    if "stopped" in state or len(m["dpo"]["seconds"]) < args.steps:
        state["partial"] = True


def summarize_steps(m, other):
    out = {"median_seconds": {k: median(v["seconds"]) for k, v in m.items()}, "timed_rounds": len(m["dpo"]["seconds"])}
    dpo = m["dpo"]
    peak = {k: max(v["peak_bytes"]) if v["peak_bytes"] else None for k, v in m.items()}
    out["peak_bytes"] = peak
    if other:
        out["peak_alone_bytes"] = {
            k: (p - other["dpo" if k == "dpo" else "otpo"]) if p else None for k, p in peak.items()
        }
    for key, r in m.items():
        if key == "dpo":
            continue
        n = min(len(r["seconds"]), len(dpo["seconds"]))
        paired = [a / b for a, b in zip(r["seconds"][:n], dpo["seconds"][:n])]
        on_gpu = any(x is not None for x in r["ot_gpu_seconds"])
        ot = r["ot_gpu_seconds"] if on_gpu else r["ot_host_seconds"]
        out[key] = {
            "time_ratio": ratio(median(r["seconds"]), median(dpo["seconds"])),
            "paired_time_ratio_median": median(paired),
            "peak_ratio": ratio(peak[key], peak["dpo"]),
            "peak_alone_ratio": ratio(
                out.get("peak_alone_bytes", {}).get(key), out.get("peak_alone_bytes", {}).get("dpo")
            ),
            "step_growth_ratio": ratio(
                max(r["step_growth_bytes"], default=None), max(dpo["step_growth_bytes"], default=None)
            ),
            "ot_seconds_median": median(ot),
            "ot_timer": "cuda_events" if on_gpu else "host_perf_counter",
            "ot_host_seconds_median": median(r["ot_host_seconds"]),
            "ot_share_of_step": ratio(median(ot), median(r["seconds"])),
            "extra_seconds_median": (
                median(r["seconds"]) - median(dpo["seconds"]) if r["seconds"] and dpo["seconds"] else None
            ),
            "solver_iters": r["solver_iters"],
        }
    return out


# ---------------------------------------------------------------------------------------------- OT weights alone


def ot_part(name, args, deadline, state, save):
    import torch
    from ot_weights import make_inputs, max_rel_diff, official_torch, timed  # bench/ot_weights.py

    from otpo_trl.ot import ot_token_weights

    if args.tiny:
        cfg = dict(batch=4, padded_length=96, completion_length=40, spread=20, hidden=64)
    else:
        cfg = dict(batch=8, padded_length=1536, completion_length=650, spread=350, hidden=4096)
    state["config"] = {
        **cfg,
        "dtype": "bfloat16 states (as a bf16 policy gives them)",
        "reg_m": 0.2,
        "repeats": args.repeats,
        "ot_regs": OT_REGS,
        "official": (
            "bench/ot_weights.py official_torch: POT torch backend, padded L x L, sinkhorn_stabilized, per pair"
        ),
    }
    device = args.device
    inputs_start = time.time()
    hc, hr, mc, mr = make_inputs(
        cfg["batch"],
        cfg["padded_length"],
        cfg["completion_length"],
        cfg["hidden"],
        "cpu",
        seed=args.seed,
        spread=cfg["spread"],
    )
    hc, hr = hc.to(device, torch.bfloat16), hr.to(device, torch.bfloat16)
    mc, mr = mc.to(device), mr.to(device)
    state["completion_lengths"] = {"chosen": mc.sum(1).tolist(), "rejected": mr.sum(1).tolist()}
    results = state["results"] = {}
    reg_start = time.time()
    for reg in OT_REGS:
        if results and time.time() + (time.time() - reg_start) > deadline:  # another ot_reg as long as the last
            state["stopped"] = f"out of time before ot_reg {reg}"
            break
        reg_start = time.time()
        state["inputs_seconds"] = state.get("inputs_seconds", reg_start - inputs_start)
        batched = lambda reg=reg: ot_token_weights(hc, hr, mc, mr, reg=reg, reg_m=0.2)  # noqa: E731
        official = lambda reg=reg: official_torch(hc, hr, mc, mr, reg, 0.2)  # noqa: E731
        r = results[f"reg{reg}"] = {
            "first_call_s": {"batched": timed(batched, device), "official": timed(official, device)}
        }
        r["times_s"] = {"batched": [], "official": []}
        for _ in range(args.repeats):  # interleaved, so that both see the same machine state
            if (
                r["times_s"]["batched"]
                and time.time() + 1.5 * (r["times_s"]["official"][-1] + r["times_s"]["batched"][-1]) > deadline
            ):
                state["stopped"] = f"out of time at ot_reg {reg}"
                break
            r["times_s"]["batched"].append(timed(batched, device))
            r["times_s"]["official"].append(timed(official, device))
        tb, to = (median(r["times_s"][k]) for k in ("batched", "official"))
        r.update({"median_s": {"batched": tb, "official": to}, "speedup": ratio(to, tb)})
        wc, wr, info = ot_token_weights(hc, hr, mc, mr, reg=reg, reg_m=0.2, return_info=True, return_plan=False)
        oc, orr = official()
        r["batched_n_iter"] = info.n_iter
        r["max_rel_diff_batched_vs_official"] = max(
            max_rel_diff(wc.float().cpu(), oc.float().cpu()), max_rel_diff(wr.float().cpu(), orr.float().cpu())
        )
        try:
            r["batched_profile"] = profile_call(batched, is_cuda(device))
        except Exception as e:  # noqa: BLE001 - the profile is extra; keep the timings
            r["batched_profile"] = f"{type(e).__name__}: {e}"
        r["seconds"] = time.time() - reg_start
        save()
        if state.get("stopped"):
            break
    if state.get("stopped") or len(results) < len(OT_REGS):
        state["partial"] = True


def long_part(name, args, deadline, state, save):
    """Long completions: DPO and OTPO steps at 8k and 16k tokens a completion, then the OT step alone."""
    import torch
    from ot_memory import long_batch  # bench/ot_memory.py
    from step_overhead import step

    from otpo_trl.ot import ot_token_weights

    cuda = is_cuda(args.device)
    div = TINY_LENGTH_DIVISOR if args.tiny else 1
    tokens = [t // div for t in LONG_TOKENS]
    prompt = 64 // div
    shape = SHAPES["tiny" if args.tiny else "llama-3.2-1b"]
    spec = {"label": "Llama-3.2-1B shape, LoRA r 16, long completions", "lora": True}
    long_args = copy.copy(args)
    long_args.batch, long_args.max_length = 1, max(tokens) + prompt
    state["config"] = {
        "label": spec["label"],
        "shape": "tiny" if args.tiny else "llama-3.2-1b",
        "tokens": tokens,
        "prompt_tokens": prompt,
        "dtype": "bfloat16 weights, bf16=True",
        "ot_reg": OT_REGS[0],
        "activation_checkpointing": not args.no_checkpointing,
        "batch_pairs": 1,
    }
    t0 = time.perf_counter()
    trainers = build_trainers(spec, long_args, shape, torch.bfloat16)
    state["build_seconds"] = time.perf_counter() - t0
    timer = OTTimer(trainers["otpo"], cuda)
    steps = state["steps"] = {}
    step(trainers["dpo"], long_batch(prompt, shape["vocab_size"], prompt=prompt, device=args.device))  # warm-up
    step(trainers["otpo"], long_batch(prompt, shape["vocab_size"], prompt=prompt, device=args.device))
    timer.collect()
    for n in tokens:
        batch = long_batch(n, shape["vocab_size"], seed=args.seed, prompt=prompt, device=args.device)
        for kind in ("dpo", "otpo"):
            if steps and time.time() > deadline:
                state["stopped"] = f"out of time before the {kind} step at {n} tokens"
                break
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds = step(trainers[kind], batch)
            except torch.OutOfMemoryError as e:
                steps[f"{kind}_{n}"] = {"error": f"OutOfMemoryError: {str(e)[:300]}"}
                continue
            gpu_ot, host_ot = timer.collect() if kind == "otpo" else (None, None)
            peak = torch.cuda.max_memory_allocated() if cuda else None
            steps[f"{kind}_{n}"] = {"seconds": seconds, "peak_bytes": peak, "ot_seconds": gpu_ot if cuda else host_ot}
            save()
    del trainers, timer
    alone = state["ot_alone"] = {}
    hidden = shape["hidden_size"]
    for n in tokens:
        g = torch.Generator().manual_seed(args.seed)
        common = 3.0 * torch.randn(hidden, generator=g)
        hc, hr = ((torch.randn(1, n, hidden, generator=g) + common).to(args.device, torch.bfloat16) for _ in range(2))
        mask = torch.ones(1, n, dtype=torch.bool, device=args.device)
        for solver, reg in ((s, r) for s in ("batched", "online") for r in OT_REGS):
            if alone and time.time() > deadline:
                state["stopped"] = f"out of time before the OT step alone at {n} tokens, {solver}, ot_reg {reg}"
                break
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            start = time.perf_counter()
            _, _, info = ot_token_weights(
                hc, hr, mask, mask, reg=reg, solver=solver, return_info=True, return_plan=False
            )
            if cuda:
                torch.cuda.synchronize()
            alone[f"{solver}_{n}_reg{reg}"] = {
                "seconds": time.perf_counter() - start,
                "n_iter": info.n_iter,
                "extra_peak_bytes": torch.cuda.max_memory_allocated() - base if cuda else None,
                "one_fp32_matrix_bytes": n * n * 4,
            }
            save()
    state["results"] = {"steps": steps, "ot_alone": alone}
    if state.get("stopped"):
        state["partial"] = True


def profile_call(fn, cuda):
    """Kernels launched by one call and their summed GPU time (CUDA), or the CPU ops' count (CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
        syncs = sum(e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync") for e in events)
        return {
            "kernels": len(kernels),
            "kernel_seconds": busy,
            "wall_seconds_profiled": wall,
            "memcpy_or_sync_calls": syncs,
        }
    return {"cpu_ops": len(events), "wall_seconds_profiled": wall}


# ---------------------------------------------------------------------------------------------- orchestration


def child_main(args):
    state = {"part": args.child, "status": "running", "pid": os.getpid()}
    if args.tiny and not is_cuda(args.device):
        import torch

        # Tiny problems are a few hundred small ops a step: on shared CPU cores, a second thread mostly waits.
        torch.set_num_threads(1)
    state["torch_threads"] = __import__("torch").get_num_threads()
    save = lambda: write_json(args.child_json, state)  # noqa: E731
    start = time.perf_counter()
    try:
        ot_only = args.child == "ot-weights"
        for module in ("ot", "otpo_trl.ot") if ot_only else ("peft", "trl", "otpo_trl.otpo_trainer"):
            importlib.import_module(module)  # timed apart from the part's own work
        state["import_seconds"] = time.perf_counter() - start
        fn = {"ot-weights": ot_part, "long-1b": long_part}.get(args.child, step_part)
        fn(args.child, args, args.deadline, state, save)
        state["status"] = "partial" if state.pop("partial", False) else "ok"
    except BaseException as e:  # an OOM too: recorded, and the next part starts in a fresh process
        state["status"] = "error"
        state["error"] = f"{type(e).__name__}: {e}"[:2000]
        state["traceback"] = traceback.format_exc()[-6000:]
        print(state["traceback"], file=sys.stderr)
    finally:
        state["seconds"] = time.perf_counter() - start
        try:
            import torch

            if is_cuda(args.device):
                state["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        except Exception:  # noqa: BLE001
            pass
        save()
    return 0 if state["status"] != "error" else 1


def target_rows(parts, judge=True):
    """The targets as pass (True), fail (False) or n/a (None: not measured, or `judge` False: a tiny run)."""
    rows = []

    def add(name, value, op, limit):
        ok = None if value is None or not judge else (value <= limit if op == "<=" else value >= limit)
        rows.append({"target": name, "value": value, "op": op, "limit": limit, "pass": ok})

    for part, spec in STEP_PARTS.items():
        res = parts.get(part, {}).get("results", {})
        for reg in OT_REGS:
            r = res.get(f"otpo_reg{reg}", {})
            add(
                f"{spec['label']}, ot_reg {reg}: median step time OTPO / DPO",
                r.get("time_ratio"),
                "<=",
                TARGETS["time_ratio"],
            )
            add(
                f"{spec['label']}, ot_reg {reg}: peak max_memory_allocated OTPO / DPO (each trainer alone)",
                r.get("peak_alone_ratio"),
                "<=",
                TARGETS["memory_ratio"],
            )
            if part == "step-8b-lora":
                add(
                    f"{spec['label']}, ot_reg {reg}: OT part's share of the OTPO step (above it, fewer launches "
                    "and host syncs in the solver would lower it)",
                    r.get("ot_share_of_step"),
                    "<=",
                    TARGETS["ot_share_8b"],
                )
    res = parts.get("ot-weights", {}).get("results", {})
    for reg in OT_REGS:
        add(
            f"OT weights alone, ot_reg {reg}: official per-pair POT loop / batched (medians)",
            res.get(f"reg{reg}", {}).get("speedup"),
            ">=",
            TARGETS["ot_speedup"],
        )
    return rows


def fmt(x, spec=".3f", none="–"):
    return none if x is None else format(x, spec)


def mib(x):
    return fmt(None if x is None else x / 2**20, ",.0f")


def summary_markdown(result):
    m, parts = result["machine"], result["parts"]
    gpu = m.get("gpu", {}).get("name") or m.get("cpu") or m["device"]
    v = m["versions"]
    lines = [
        f"# OTPO vs DPO on {gpu}: `bench/gpu/suite.py`{' (--tiny)' if result['args']['tiny'] else ''}",
        "",
        f"{result['started_utc']} · device `{m['device']}` · torch {m['torch']} (CUDA {m['torch_cuda']}) · "
        f"transformers {v.get('transformers')} · trl {v.get('trl')} · peft {v.get('peft')} · POT {v.get('POT')} · "
        f"Python {m['python']} · commit {m.get('git_commit') or '?'} · budget {result['budget_s']:.0f} s, "
        f"used {result.get('seconds', 0):.0f} s",
        "",
    ]
    if m.get("unmet_requirements"):
        lines += ["Unmet requirements of the carried wheels: " + "; ".join(m["unmet_requirements"]), ""]
    if result["args"]["tiny"]:
        lines += [
            "Tiny sizes: a check that the suite runs end to end; the figures mean nothing and the targets are "
            "not judged (n/a).",
            "",
        ]
    lines += ["## Targets", ""]
    for t in result["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        lines.append(f"- **{mark}** {t['target']}: {fmt(t['value'])} (target {t['op']} {t['limit']})")
    lines.append("")
    for part in PARTS:
        p = parts.get(part)
        if p is None:
            continue
        head = f"## {part}: {p.get('status')}, {fmt(p.get('seconds'), '.0f')} s"
        lines += [head, ""]
        if p.get("error"):
            lines += [f"Error: `{p['error'].splitlines()[0][:300]}`", ""]
        if p.get("reason"):
            lines += [p["reason"], ""]
        if p.get("stopped"):
            lines += [f"Stopped: {p['stopped']}.", ""]
        res = p.get("results") or {}
        if part in STEP_PARTS and res:
            cfg = p.get("config", {})
            toks = [r["tokens"] for r in p.get("rounds", []) if r["timed"]]
            lines += [
                f"{cfg.get('label')}; {res.get('timed_rounds')} timed rounds (after {cfg.get('warmup_rounds')} warm-up), "
                f"batch {cfg.get('batch_pairs')} pairs, max_length {cfg.get('max_length')}, "
                f"{fmt(median(toks), '.0f')} tokens a step (median), activation checkpointing "
                f"{cfg.get('activation_checkpointing')}; built in {fmt(p.get('build_seconds'), '.0f')} s.",
                "",
                "| run | median s/step | / DPO | paired / DPO | peak MiB | alone MiB | alone / DPO | OT ms/step | "
                "OT share | solver iters | host syncs in OT |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            alone = res.get("peak_alone_bytes", {})
            syncs = p.get("ot_host_syncs_per_step", {})
            for key in res.get("median_seconds", {}):
                r = res.get(key, {}) if key != "dpo" else {}
                iters = r.get("solver_iters") or []
                lines.append(
                    f"| {key} | {fmt(res['median_seconds'][key])} | {fmt(r.get('time_ratio'))} | "
                    f"{fmt(r.get('paired_time_ratio_median'))} | {mib(res['peak_bytes'].get(key))} | "
                    f"{mib(alone.get(key))} | {fmt(r.get('peak_alone_ratio'), '.4f')} | "
                    f"{fmt(None if r.get('ot_seconds_median') is None else 1e3 * r['ot_seconds_median'], '.1f')} | "
                    f"{fmt(r.get('ot_share_of_step'), '.2%')} | "
                    f"{fmt(median([x for x in iters if x is not None]), '.0f')} | {syncs.get(key, '–')} |"
                )
            lines.append("")
        if part == "ot-weights" and res:
            cfg = p.get("config", {})
            lines += [
                f"B = {cfg.get('batch')} pairs, padded length {cfg.get('padded_length')}, completions "
                f"{cfg.get('completion_length', 0) - cfg.get('spread', 0)}-{cfg.get('completion_length', 0) + cfg.get('spread', 0)} "
                f"tokens, hidden {cfg.get('hidden')}, bf16 states, tau 0.2.",
                "",
                "| ot_reg | batched median s | official loop median s | speed-up | batched iters | max rel diff | "
                "kernels per batched call |",
                "|---|---|---|---|---|---|---|",
            ]
            for key, r in res.items():
                prof = r.get("batched_profile")
                kernels = prof.get("kernels", prof.get("cpu_ops")) if isinstance(prof, dict) else None
                lines.append(
                    f"| {key.removeprefix('reg')} | {fmt(r['median_s']['batched'], '.4f')} | "
                    f"{fmt(r['median_s']['official'], '.3f')} | {fmt(r.get('speedup'), '.1f')}x | "
                    f"{r.get('batched_n_iter')} | {fmt(r.get('max_rel_diff_batched_vs_official'), '.1e')} | "
                    f"{kernels if kernels is not None else '–'} |"
                )
            lines.append("")
        if part == "long-1b" and res:
            cfg = p.get("config", {})
            lines += [
                f"{cfg.get('label')}: one pair a step, {cfg.get('prompt_tokens')}-token prompt, ot_reg "
                f"{cfg.get('ot_reg')}.",
                "",
                "| step | seconds | peak MiB | OT seconds |",
                "|---|---|---|---|",
            ]
            for key, r in res.get("steps", {}).items():
                if "error" in r:
                    lines.append(f"| {key} | {r['error'][:80]} | | |")
                    continue
                ot = fmt(r.get("ot_seconds"))
                lines.append(f"| {key} | {fmt(r.get('seconds'))} | {mib(r.get('peak_bytes'))} | {ot} |")
            header = "| OT step alone (bf16 states) | seconds | iterations | extra peak MiB | / one fp32 n x m |"
            lines += ["", header, "|---|---|---|---|---|"]
            for key, r in res.get("ot_alone", {}).items():
                extra = r.get("extra_peak_bytes")
                share = fmt(ratio(extra, r.get("one_fp32_matrix_bytes")), ".2f")
                lines.append(f"| {key} | {fmt(r.get('seconds'))} | {r.get('n_iter')} | {mib(extra)} | {share} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="otpo-gpu-suite-"))
    start = time.monotonic()
    result = {
        "suite": "bench/gpu/suite.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "deadline"},
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": args.budget_s,
        "targets_set": TARGETS,
        "machine": machine_facts(args.device),
        "parts": {},
    }

    def flush():
        result["seconds"] = time.monotonic() - start
        result["targets"] = target_rows(result["parts"], judge=not args.tiny)
        write_json(out / "suite.json", result)
        (out / "summary.md").write_text(summary_markdown(result))

    flush()
    passthrough = list(sys.argv[1:] if argv is None else argv)
    for part in args.parts:
        left = args.budget_s - (time.monotonic() - start)
        need = 0 if args.tiny else PART_MIN_S[part]
        if left < need:
            result["parts"][part] = {
                "status": "skipped",
                "reason": f"{max(left, 0):.0f} s of the budget left, needs ~{need} s",
            }
            flush()
            continue
        share = left if args.tiny else min(left, PART_MAX_S[part])
        deadline = time.time() + share - min(GRACE_S, share / 4)  # the part stops itself here, is killed at share
        part_json = work / f"{part}.json"
        child = ("--child", part, "--child-json", str(part_json), "--deadline", str(deadline))
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, *child]
        print(f"[suite] {part}: up to {share:.0f} s ({left:.0f} s of the budget left)", flush=True)
        t = time.monotonic()
        killed = None
        try:
            subprocess.run(cmd, timeout=share, check=False)
        except subprocess.TimeoutExpired:
            killed = f"killed after {share:.0f} s, its share of the budget"
        part_result = json.loads(part_json.read_text()) if part_json.exists() else {"status": "error"}
        if killed:
            part_result["status"] = "partial" if part_result.get("results") else "error"
            part_result["killed"] = killed
        elif part_result.get("status") == "running":  # the process died without its final write
            part_result["status"] = "error"
            part_result.setdefault("error", "the part's process ended without finishing (crash or kill)")
        part_result["wall_seconds_with_startup"] = time.monotonic() - t
        result["parts"][part] = part_result
        flush()
        print(
            f"[suite] {part}: {part_result['status']} in {part_result['wall_seconds_with_startup']:.0f} s", flush=True
        )
    flush()
    print((out / "summary.md").read_text())
    print(f"[suite] wrote {out / 'suite.json'} and {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
