"""Does each pairwise loss learn? From one SFT archive on the bundled HH data, every pairwise loss
of the registry trains on the same pairs; the table gives each one's eval reward accuracy and
margin before and after.

    .venv/bin/python benchmarks/learning_losses.py                       # every pairwise loss
    .venv/bin/python benchmarks/learning_losses.py --losses dpo,simpo --json out.json

The SFT stage: the bundled tiny model, --sft-examples chosen responses. Each loss then starts
from that archive (`model.archive`, the reference too where the loss has one) and trains on
--examples pairs, evaluated before the first step and at the end on the same --eval-examples
held-out pairs. The rewards are each loss's own (beta times the policy/reference log-ratio;
beta times the policy's log-prob, length-averaged where the loss averages, for the
reference-free ones), so at the start the reference-based losses have rewards of exactly 0 on
both sides: accuracy 0 (a tie is not a win), margin 0; the reference-free ones start from what
the SFT model already prefers. A loss "learned" when its final eval accuracy is above the start
and its eval loss below. beta is each loss's usual scale (0.1; SimPO 2.0, its paper's). A
measurement, not a test: it prints the verdicts and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMON = ["model=tiny", "max_length=256", "max_prompt_length=128", "batch_size=8", "eval_batch_size=16",
          "sample_during_eval=false", "minimum_log_interval_secs=0", "warmup_steps=10", "device=cpu",
          "checkpoint.save_optimizer=false", "checkpoint.fsync=false"]  # fmt: skip
BETAS = {"simpo": 2.0}
EXTRA = {"exo_pair": ["loss.label_smoothing=1e-3"]}  # EXO's epsilon has no default; the paper's


def run(args: list[str], run_dir: Path) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(BIN / "dpokit"), "train", *COMMON, *args, f"local_run_dir={run_dir}", "exp_name=learn"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    from dpokit.loss_registry import LOSSES

    pairwise = [n for n, spec in LOSSES.items() if spec.data == "paired"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default=",".join(pairwise))
    parser.add_argument("--sft-examples", type=int, default=512)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--eval-examples", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    losses = args.losses.split(",")
    unknown = [n for n in losses if n not in pairwise]
    if unknown:
        raise SystemExit(f"--losses: {unknown} are not pairwise losses; there are {pairwise}")
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        run(["loss=sft", f"n_examples={args.sft_examples}", "eval_every=100000000", "do_first_eval=false",
             f"n_eval_examples={args.eval_examples}", "lr=1e-4"], root / "sft")  # fmt: skip
        archive = root / "sft" / "LATEST" / "policy.pt"
        print(f"SFT archive: {args.sft_examples} examples, {time.perf_counter() - t0:.0f} s", flush=True)
        for name in losses:
            t0 = time.perf_counter()
            beta = [f"loss.beta={BETAS.get(name, 0.1)}"] if "beta" in LOSSES[name].keys else []
            log = run([f"loss={name}", *beta, *EXTRA.get(name, []), f"model.archive={archive}", f"n_examples={args.examples}",
                       f"eval_every={args.examples}", f"n_eval_examples={args.eval_examples}", f"lr={args.lr}",
                       "final_eval=true"], root / name)  # fmt: skip
            evals = [m for m in log if "rewards_eval/accuracies" in m]
            start, end = evals[0], evals[-1]
            row = {
                "loss": name,
                "start_accuracy": start["rewards_eval/accuracies"],
                "end_accuracy": end["rewards_eval/accuracies"],
                "start_margin": start["rewards_eval/margins"],
                "end_margin": end["rewards_eval/margins"],
                "start_loss": start["loss/eval"],
                "end_loss": end["loss/eval"],
                "seconds": time.perf_counter() - t0,
            }
            row["learned"] = row["end_accuracy"] > row["start_accuracy"] and row["end_loss"] < row["start_loss"]
            rows.append(row)
            print(f"  done: {name}: accuracy {row['start_accuracy']:.3f} -> {row['end_accuracy']:.3f}, "
                  f"{row['seconds']:.0f} s", flush=True)  # fmt: skip
    print(f"\nlearning check: tiny model, bundled HH pairs; SFT {args.sft_examples} examples, then {args.examples} "
          f"pairs per loss (lr {args.lr}), eval on {args.eval_examples} held-out pairs")  # fmt: skip
    print(f"  {'loss':20s}{'accuracy start':>16s}{'end':>8s}{'margin start':>14s}{'end':>10s}"
          f"{'eval loss start':>17s}{'end':>9s}  learned")  # fmt: skip
    for r in rows:
        print(f"  {r['loss']:20s}{r['start_accuracy']:16.3f}{r['end_accuracy']:8.3f}{r['start_margin']:14.4f}"
              f"{r['end_margin']:10.4f}{r['start_loss']:17.4f}{r['end_loss']:9.4f}  {'yes' if r['learned'] else 'NO'}")  # fmt: skip
    not_learned = [r["loss"] for r in rows if not r["learned"]]
    print(f"  {len(rows) - len(not_learned)} of {len(rows)} learned"
          + (f"; not: {', '.join(not_learned)}" if not_learned else ""))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
