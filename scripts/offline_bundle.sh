#!/usr/bin/env bash
# What scripts/gpu_check.sh needs on a GPU machine without internet, gathered here, into folders
# git ignores: .whl/dpokit (wheels of dpokit's dependencies that such a machine's PyTorch image
# often lacks), .whl/reference (hydra-core and the omegaconf and antlr4 it needs, for the DPO
# reference; kept apart because dpokit pins a newer omegaconf) and .reference (a copy of the
# reference's checkout, if REFERENCE_DIR names one).
#
#   REFERENCE_DIR=../reference-dpo bash scripts/offline_bundle.sh [PYTHON_VERSION]
#
# PYTHON_VERSION is the target machine's (default 3.12); the wheels are for x86-64 Linux. The
# versions are constraints.txt's, so the target runs what the suite last ran with here.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
pin() { grep -i "^$1==" constraints.txt; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
download() {
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp "${platforms[@]}" -d "$@"
}
rm -rf .whl/dpokit .whl/reference
# torch, transformers, tokenizers, safetensors, numpy, pyarrow, pandas, xxhash, tqdm and
# matplotlib come with such images; datasets, its dill and multiprocess, and omegaconf often do not
download .whl/dpokit "$(pin omegaconf)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)"
# LoRA (peft, and the accelerate it imports) and QLoRA's bitsandbytes (about 43 MB; CUDA only,
# so the CPU suite's constraints.txt does not pin it)
download .whl/dpokit "$(pin peft)" "$(pin accelerate)" bitsandbytes==0.50.2
download .whl/reference hydra-core==1.3.2 omegaconf==2.3.0
# antlr4-python3-runtime 4.9.3 (hydra's) is published as a source distribution only
python3 -m pip wheel -q --disable-pip-version-check --no-deps -w .whl/reference antlr4-python3-runtime==4.9.3
if [[ -n "${REFERENCE_DIR:-}" ]]; then
  rm -rf .reference
  mkdir .reference
  cp -r "$REFERENCE_DIR"/{train.py,trainers.py,utils.py,preference_datasets.py,config} .reference/
fi
du -sh .whl/dpokit .whl/reference ${REFERENCE_DIR:+.reference}
