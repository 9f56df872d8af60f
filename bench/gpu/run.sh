#!/usr/bin/env bash
# Run bench/gpu/suite.py on the GPU machine, offline: install the carried wheels, then the suite.
#
#     bench/gpu/run.sh OUT_DIR [suite args]      # e.g. bench/gpu/run.sh "$OUT"; bench/gpu/run.sh /tmp/x --device cpu --tiny
#
# 1. If .whl/ (made by bench/gpu/fetch_wheels.sh; WHEEL_DIR to use another folder) holds wheels: `pip install --no-index --no-deps --target` them into
#    a temporary folder and put it first on PYTHONPATH (trl, datasets, POT, dill, multiprocess: what the GPU machine
#    lacks). If .whl/ is absent or empty, this step is SKIPPED and the suite uses the Python environment as it is:
#    the CPU tiny-mode test (tests/test_bench_gpu.py) runs that way, in the project's venv, where these are installed.
# 2. Runs `python bench/gpu/suite.py --out OUT_DIR [suite args]` with the checkout on PYTHONPATH; it writes
#    OUT_DIR/suite.json and OUT_DIR/summary.md, rewritten after every part. The parts share a budget of 420 s
#    (--budget-s), most valuable first, each killed at the end of its share: with the install (~10 s) and the start,
#    the whole run ends within 8 minutes on one H200 (see bench/RESULTS.md for the expected time of each part).
# PYTHON chooses the interpreter (default python3, the GPU machine's torch venv).
set -uo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: $0 OUT_DIR [suite args]" >&2
  exit 2
fi
out=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$out"
start=$(date +%s)

shopt -s nullglob
wheel_dir=${WHEEL_DIR:-$repo/.whl}  # the test points WHEEL_DIR at an empty folder: cp312 wheels need Python 3.12
wheels=("$wheel_dir"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/otpo-site.XXXXXX")
  echo "[run.sh] installing ${#wheels[@]} wheels from $wheel_dir into $site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
    || { echo "[run.sh] pip install of $wheel_dir failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "[run.sh] no wheels in $wheel_dir: install step skipped, using $("$PY" -c 'import sys; print(sys.prefix)') as it is"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Nothing is fetched: no Hub, no telemetry (the GPU machine has no network anyway).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" "$repo/bench/gpu/suite.py" --out "$out" "$@"
rc=$?
echo "[run.sh] exit $rc after $(( $(date +%s) - start )) s; results in $out/suite.json and $out/summary.md"
exit $rc
