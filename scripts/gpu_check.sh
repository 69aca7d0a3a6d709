#!/usr/bin/env bash
# Everything that needs a CUDA device, in one pass: the test suite on CUDA and the GPU workloads of
# the benchmarks (dpokit against the DPO reference, the speed levers on and off, torch.compile).
# Made for a borrowed GPU machine without internet whose Python already has PyTorch and
# transformers: what it lacks comes from the folders scripts/offline_bundle.sh fills.
#
#   bash scripts/gpu_check.sh OUT_DIR [STAGE ...]     # stages: install tests reference throughput compile
#
# No STAGE: all of them, in that order. Each stage runs under its own time limit (seconds:
# TESTS_S, REFERENCE_S, THROUGHPUT_S, COMPILE_S); one that fails or runs out of time is reported
# and the next one runs. Written to OUT_DIR: gpu_check.log (everything printed), tests.xml (junit),
# reference.json, throughput.json, compile.json. The limits add up to 9 minutes (install
# included) so that one run fits a 10-minute slot on one H100 or H200; the variables below
# choose what runs. WORKLOAD=cpu runs the benchmark stages on their CPU workloads (how the
# script itself is checked without a GPU). Without a GPU, the tests stage runs the CPU suite.
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."
PYTHON="${PYTHON:-python3}"
WORKLOAD="${WORKLOAD:-gpu}"
TESTS="${TESTS:-tests}"                       # test paths (-k and other options: PYTEST_ADDOPTS)
TEST_WORKERS="${TEST_WORKERS:-8}"             # pytest-xdist processes (0: none)
REFERENCE_DIR="${REFERENCE_DIR:-.reference}"  # a checkout of the DPO reference
REFERENCE_VARIANTS="${REFERENCE_VARIANTS-dpokit, same work (final_eval=false);dpokit, bf16 + precompute + length_groups=4 + length_grouped}"
REFERENCE_EXAMPLES="${REFERENCE_EXAMPLES:-}"  # empty: the workload's (2048 pairs on GPU)
THROUGHPUT_EXAMPLES="${THROUGHPUT_EXAMPLES:-1024}"
THROUGHPUT_VARIANTS="${THROUGHPUT_VARIANTS-tf32=false (full float32 matmuls);bf16 autocast;precompute reference;bf16 + precompute + length_groups=4 + length_grouped sampler}"  # empty: all
COMPILE_STEPS="${COMPILE_STEPS:-12}"
reference_site=/tmp/dpokit-reference-site
reference_python=/tmp/dpokit-reference-python

install() {
  local pip=("$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile)
  if compgen -G ".whl/dpokit/*.whl" >/dev/null; then "${pip[@]}" .whl/dpokit/*.whl || return; fi
  "${pip[@]}" --no-build-isolation . || return
  if compgen -G ".whl/reference/*.whl" >/dev/null; then
    "${pip[@]}" --upgrade --target "$reference_site" .whl/reference/*.whl || return
  fi
  # the reference's python: this one, with hydra's omegaconf ahead of dpokit's
  printf '#!/bin/sh\nPYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' "$reference_site" \
    "$(command -v "$PYTHON")" >"$reference_python"
  chmod +x "$reference_python"
  "$PYTHON" -c '
import importlib.metadata as metadata

import torch

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"

names = ["dpokit", "torch", "transformers", "datasets", "omegaconf", "pyarrow", "accelerate", "peft", "bitsandbytes",
         "pytest-xdist"]
print("versions:", ", ".join(f"{n} {version(n)}" for n in names))
print("CUDA:", torch.cuda.is_available() and torch.cuda.get_device_name(), "| devices:", torch.cuda.device_count())
'
}

tests() {
  local workers=()
  # a module's tests in one worker: its module-scoped fixtures (whole training runs) are built once
  [[ "$TEST_WORKERS" != 0 ]] && workers=(-n "$TEST_WORKERS" --dist loadfile)
  local threads=$(( $(nproc) / (TEST_WORKERS > 0 ? TEST_WORKERS : 1) ))
  export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))  # the workers share the cores
  # shellcheck disable=SC2086  # TESTS is a list of pytest arguments
  # -v: a line per test as it ends, so a stage stopped at its limit still says what ran
  "$PYTHON" -m pytest -v -p no:cacheprovider "${workers[@]}" --durations=15 --junitxml="$out/tests.xml" $TESTS
}

reference() {
  local examples=() variants=()
  [[ -n "$REFERENCE_EXAMPLES" ]] && examples=(--n-examples "$REFERENCE_EXAMPLES")
  [[ -n "$REFERENCE_VARIANTS" ]] && variants=(--variants "$REFERENCE_VARIANTS")
  "$PYTHON" benchmarks/reference.py --workload "$WORKLOAD" --repeats 1 --reference-dir "$REFERENCE_DIR" \
    --python "$reference_python" "${examples[@]}" "${variants[@]}" --json "$out/reference.json"
}

throughput() {
  local variants=()
  [[ -n "$THROUGHPUT_VARIANTS" ]] && variants=(--variants "$THROUGHPUT_VARIANTS")
  "$PYTHON" benchmarks/train_throughput.py --workload "$WORKLOAD" --losses dpo --repeats 1 \
    --n-examples "$THROUGHPUT_EXAMPLES" "${variants[@]}" --json "$out/throughput.json"
}

compile() {
  "$PYTHON" benchmarks/compile.py --steps "$COMPILE_STEPS" --json "$out/compile.json"
}

# one stage as a process of its own, which `timeout` can stop: gpu_check.sh --stage NAME OUT_DIR
if [[ "${1:-}" == --stage ]]; then
  out=$3
  "$2"
  exit
fi

out="$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR [STAGE ...]}" && cd "$1" && pwd)"
shift
stages=("$@")
[[ ${#stages[@]} == 0 ]] && stages=(install tests reference throughput compile)
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "gpu_check $(date -u +%FT%TZ) on $(hostname): stages ${stages[*]}, workload $WORKLOAD"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
for name in "${stages[@]}"; do
  case $name in
    install) limit=40 ;;
    tests) limit=${TESTS_S:-200} ;;
    reference) limit=${REFERENCE_S:-140} ;;
    throughput) limit=${THROUGHPUT_S:-120} ;;
    compile) limit=${COMPILE_S:-40} ;;
    *) echo "unknown stage $name (stages: install tests reference throughput compile)" && exit 2 ;;
  esac
  echo "=== $name (limit ${limit}s)"
  start=$SECONDS
  timeout -k 10 "$limit" bash "$self" --stage "$name" "$out"
  status=$?
  case $status in
    0) echo "=== $name: passed in $((SECONDS - start))s" ;;
    124 | 137) echo "=== $name: STOPPED at its limit of ${limit}s" ;;
    *) echo "=== $name: FAILED (exit $status) after $((SECONDS - start))s" ;;
  esac
done
echo "gpu_check done after ${SECONDS}s"
