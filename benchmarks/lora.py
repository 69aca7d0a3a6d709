"""Full fine-tuning against LoRA for DPO: peak memory, speed, checkpoint size and save time.

    .venv/bin/python benchmarks/lora.py                      # GPT-2 124M config, CPU
    .venv/bin/python benchmarks/lora.py --repeats 3 --json out.json

The model is GPT-2's own 124M configuration (12 layers, 768 wide, vocabulary 50257) built from
its config with the bundled tokenizer, so nothing is downloaded. DPO on the bundled HH pairs,
batch 4, max_length 256, max_prompt_length 128, --n-examples pairs, float32 policy; full
fine-tuning with its reference model (a copy, float32) against `lora.enabled=true lora.r=16`
(PEFT's default targets for GPT-2, the reference = the policy with its adapters off), each
also with activation_checkpointing=true (activations recomputed in backward), and LoRA with
lora.save_merged=false (checkpoints hold the adapter, not the merged policy.pt). One
checkpoint is saved at the end (`LATEST`: the reference's three files, plus the adapter for
LoRA); no evaluation. Runs alternate; printed per variant: median examples/s per step (first
step excluded), the whole process's wall time and peak RSS, the checkpoint's size on disk and
its save time, the wall time of `dpokit ckpt export` of it (a whole process: for an adapter-only
checkpoint it rebuilds the base and merges), and the trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_throughput import BIN, timed_process  # noqa: E402

LORA = ["lora.enabled=true", "lora.r=16", "lora.alpha=32"]
VARIANTS = {
    "full fine-tuning": [],
    "LoRA r=16": LORA,
    "full + act. ckpt": ["activation_checkpointing=true"],
    "LoRA + act. ckpt": [*LORA, "activation_checkpointing=true"],
    "LoRA, adapter only": [*LORA, "lora.save_merged=false"],  # checkpoints without the merged policy.pt
}


def gpt2_124m(root: Path) -> str:
    from transformers import GPT2Config

    out = root / "gpt2-124m"
    out.mkdir(parents=True, exist_ok=True)
    GPT2Config(bos_token_id=0, eos_token_id=0).save_pretrained(out)  # GPT-2's sizes: 124M parameters
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(str(resources.files("dpokit") / "assets/tiny" / f)), out / f)
    return str(out)


def run_once(model: str, n_examples: int, extra: list[str], root: Path) -> dict:
    run_dir = root / f"run-{time.monotonic_ns()}"
    args = [f"model.name_or_path={model}", "model.block_name=GPT2Block", "model.reference_dtype=float32",
            "loss=dpo", "loss.beta=0.1", "batch_size=4", "max_length=256", "max_prompt_length=128",
            f"n_examples={n_examples}", "eval_every=100000000", "do_first_eval=false", "final_eval=false",
            "sample_during_eval=false", "n_eval_examples=8", "eval_batch_size=8", "minimum_log_interval_secs=0",
            "device=cpu", "exp_name=bench", "warmup_steps=2", "lr=1e-5", f"local_run_dir={run_dir}",
            f"local_dirs=[{root / 'cache'}]", *extra]  # fmt: skip
    log = root / "stdout.txt"
    wall, rss = timed_process([str(BIN / "dpokit"), "train", *args], {**os.environ, "HF_HUB_OFFLINE": "1"}, log)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "examples_per_second" in r][1:]
    saves = [r for r in records if "checkpoint/write_seconds" in r]
    trainable = next((line for line in log.read_text().splitlines() if line.startswith("LoRA: ")), None)
    size = sum(p.stat().st_size for p in (run_dir / "LATEST").rglob("*") if p.is_file())
    # what reading the weights costs (an adapter-only checkpoint rebuilds its base and merges)
    export_seconds, _ = timed_process([str(BIN / "dpokit"), "ckpt", "export", str(run_dir / "LATEST"),
                                       str(run_dir / "hf")], {**os.environ, "HF_HUB_OFFLINE": "1"}, log)  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "examples_per_second": statistics.median(r["examples_per_second"] for r in steps),
        "process_seconds": wall,
        "peak_rss_mib": rss,
        "checkpoint_mib": size / 2**20,
        "save_seconds": saves[-1]["checkpoint/write_seconds"],
        "export_seconds": export_seconds,
        "trainable": trainable.split(" trainable")[0].removeprefix("LoRA: ") if trainable else "all",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-examples", type=int, default=32)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                        help=f"variants to run (default: all): {', '.join(repr(v) for v in VARIANTS)}")  # fmt: skip
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {v: [] for v in args.only}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        model = gpt2_124m(root)
        from dpokit.models import load_model

        n_params = sum(p.numel() for p in load_model(model).parameters())
        for _ in range(args.repeats):  # alternated: drift in the machine hits both alike
            for name in args.only:
                extra = VARIANTS[name]
                runs[name].append(run_once(model, args.n_examples, extra, root))
                r = runs[name][-1]
                print(
                    f"  done: {name}: {r['examples_per_second']:.2f} examples/s, {r['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    print(f"\nDPO, GPT-2 124M config ({n_params / 1e6:.1f}M parameters), CPU, batch 4, max_length 256, "
          f"{args.n_examples} pairs, {args.repeats} repeats (medians)")  # fmt: skip
    print(f"  {'variant':20s}{'trainable':>14s}{'ex/s':>8s}{'process s':>11s}{'peak RSS':>11s}{'checkpoint':>12s}"
          f"{'save s':>8s}{'export s':>10s}")  # fmt: skip
    report = {}
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "trainable"}
        med["trainable"] = rs[0]["trainable"]
        report[name] = med
        print(f"  {name:20s}{med['trainable']:>14s}{med['examples_per_second']:8.2f}{med['process_seconds']:11.1f}"
              f"{med['peak_rss_mib']:9.0f}Mi{med['checkpoint_mib']:10.0f}Mi{med['save_seconds']:8.2f}"
              f"{med['export_seconds']:10.1f}")  # fmt: skip
    pairs = (("full fine-tuning", "LoRA r=16"), ("full + act. ckpt", "LoRA + act. ckpt"),
             ("LoRA r=16", "LoRA, adapter only"))  # fmt: skip
    for full_name, lora_name in (pair for pair in pairs if set(pair) <= set(report)):
        full, lo = report[full_name], report[lora_name]
        print(f"  {lora_name} / {full_name}: peak RSS x{lo['peak_rss_mib'] / full['peak_rss_mib']:.2f}, "
              f"examples/s x{lo['examples_per_second'] / full['examples_per_second']:.2f}, "
              f"checkpoint x{lo['checkpoint_mib'] / full['checkpoint_mib']:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": n_params, "variants": report}, indent=1))


if __name__ == "__main__":
    main()
