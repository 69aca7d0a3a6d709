#!/usr/bin/env bash
# SFT on the bundled HH sample with the bundled tiny model, then DPO seeded from the SFT
# result through model.archive, exactly as the DPO paper's pipeline does.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
mkdir -p "$out"
dpokit=.venv/bin/dpokit
start=$(date +%s)

$dpokit train model=tiny datasets=[hh_sample] loss=sft lr=5e-4 exp_name=demo_sft "local_dirs=[$out]" "$@" | tee "$out/sft.log"
sft_run=$(ls -td "$out"/*/demo_sft_* | head -n 1)

$dpokit train model=tiny datasets=[hh_sample] loss=dpo loss.beta=0.1 lr=5e-5 exp_name=demo_dpo \
    "model.archive=$sft_run/LATEST/policy.pt" "local_dirs=[$out]" "$@" | tee "$out/dpo.log"
dpo_run=$(ls -td "$out"/*/demo_dpo_* | head -n 1)

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "SFT run:  $sft_run   (checkpoints: $(cd "$sft_run" && ls -d LATEST step-* | tr '\n' ' '))"
echo "DPO run:  $dpo_run   (checkpoints: $(cd "$dpo_run" && ls -d LATEST step-* | tr '\n' ' '))"
echo "final DPO policy: $dpo_run/LATEST/policy.pt"
