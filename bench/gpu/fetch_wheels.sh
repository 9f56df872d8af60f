#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that the GPU machine lacks to run bench/gpu/suite.py, and print
# their total size. Run it on a machine that reaches PyPI, from anywhere in the checkout:
#
#     bench/gpu/fetch_wheels.sh            # PYTHON=/path/to/python to choose the pip that downloads
#
# The GPU machine (the workplace's `nvidia-h200` kind; /work/.library/device/KINDS.md, read 2026-11):
#   - Python 3.12.3 (/opt/torch/.venv/bin/python3), x86-64 Linux (manylinux wheels), no network at all: no package
#     index, no Hugging Face Hub. Wheels travel with the working tree (at most 64 MiB with everything else).
#   - Has: torch 2.11.0 (CUDA 13.0), transformers 5.17.0, accelerate 1.15.0, peft, huggingface_hub 1.33.0,
#     numpy 2.5.2, scipy, pandas, pyarrow, fsspec, xxhash, tqdm, filelock, packaging, pyyaml, jinja2, psutil,
#     safetensors, tokenizers, triton 3.6.0, pytest (the whole list: DEVICE_HAS below, from KINDS.md).
#   - Lacks: trl, datasets, POT, and of their requirements only dill and multiprocess (checked below against each
#     wheel's Requires-Dist; a requirement neither fetched nor in DEVICE_HAS stops this script).
# The versions are the ones this project is tested with (trl 1.16.0, datasets 5.2.0, dill 0.4.1, multiprocess
# 0.70.19), except POT: 0.9.6.post1 (1.5 MB) instead of the tested 0.9.7.post1, whose cp312 wheel is 32 MB (a 175 MB
# `ot/bsp` extension, new in 0.9.7). The unbalanced Sinkhorn the benchmark times, `ot/unbalanced/_sinkhorn.py`, is
# byte-identical in the two, and 0.9.6.post1 is within pyproject's `POT>=0.9.5`; otpo_trl itself imports POT only for
# `solver="pot"`. One version of each, since two versions of one package stop `pip install --no-deps` there.
# Version ranges cannot be checked here (the device's versions of pyarrow, fsspec, peft are not all recorded):
# bench/gpu/suite.py checks every Requires-Dist of these wheels against what is installed there, at run time, and
# records any unmet one in its JSON (`machine.unmet_requirements`).
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
PYTHON=${PYTHON:-python3}
DEST=${WHEEL_DIR:-.whl}

WHEELS=(
  trl==1.16.0          # OTPOTrainer's base (DPOTrainer); needs datasets, and what the device has
  datasets==5.2.0      # imported by trl and by otpo_trl (datasets.fingerprint.Hasher); pyarrow is on the device
  POT==0.9.6.post1     # the official code's solver (the per-pair loop the batched solver is timed against)
  dill==0.4.1          # datasets: dill<0.4.2,>=0.3.0
  multiprocess==0.70.19  # datasets: multiprocess<0.70.20 (a py312 wheel)
)
# Python packages on the GPU machine's image (KINDS.md, "Python packages already there", read 2026-11-17).
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"

mkdir -p "$DEST"
specs=()
for w in "${WHEELS[@]}"; do specs+=("${w%%#*}"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"

# Exactly the wanted wheels, one version each, and every requirement either fetched or on the device.
"$PYTHON" - "$DEST" "$DEVICE_HAS" "${specs[@]}" <<'PY'
import re, sys, zipfile
from pathlib import Path

dest, device_has, specs = Path(sys.argv[1]), set(sys.argv[2].split()), sys.argv[3:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wanted = {norm(s.split("==")[0]): s.split("==")[1] for s in specs}
found, problems = {}, []
for whl in sorted(dest.glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    found.setdefault(norm(name), []).append((version, whl))
for name, versions in found.items():
    if name not in wanted:
        problems.append(f"{versions[0][1].name}: not in this script's list (remove it: {dest} must hold only these)")
    elif len(versions) > 1 or versions[0][0] != wanted[name]:
        problems.append(f"{name}: {[v for v, _ in versions]} in {dest}, want only {wanted[name]}")
for name in wanted.keys() - found.keys():
    problems.append(f"{name}: not downloaded")
print(f"{'wheel':<52} {'KiB':>7}  requires (not extras)")
for name, versions in sorted(found.items()):
    whl = versions[0][1]
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    reqs = [r for r in reqs if "extra ==" not in r]
    for r in reqs:
        req = norm(re.match(r"[A-Za-z0-9_.-]+", r).group())
        if req not in wanted and req not in device_has:
            problems.append(f"{whl.name} requires {r!r}: neither fetched nor on the device")
    print(f"{whl.name:<52} {whl.stat().st_size / 1024:7.0f}  {'; '.join(reqs)}")
total = sum(w.stat().st_size for w in dest.glob("*.whl"))
print(f"total: {len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.2f} MiB in {dest}/ (the working tree may carry 64 MiB)")
if problems:
    sys.exit("fetch_wheels.sh: " + "\n  ".join(["problems:", *problems]))
PY
