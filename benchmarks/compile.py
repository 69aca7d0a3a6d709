"""Does torch.compile speed up the policy's DPO forward and backward? Eager against compiled.

    .venv/bin/python benchmarks/compile.py                 # the CPU workload of train_throughput.py
    .venv/bin/python benchmarks/compile.py --steps 24 --json out.json

The step timed is the policy's part of a DPO step as the trainer runs it (chosen and rejected
concatenated, logits only where a label is predicted, log-probs summed, backward), on the first
--steps batches of the bundled HH data through the bundled tiny model (batch 8, max_length 256,
max_prompt_length 128); on CUDA, train_throughput.py's GPU workload (GPT-2-small shape built
from a config, batch 32, max_length 512, max_prompt_length 256). Batch
shapes vary with the data, so the compiled model is built with dynamic=True. Printed: the first
step (which compiles), the median of the others, the whole time, and compiled / eager.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dpokit import losses
from dpokit.data import prepare_data, train_iterator
from dpokit.models import fuse_gelu, load_model, load_tokenizer
from dpokit.startup import build_config
from train_throughput import model_dir


def batches(steps: int, cuda: bool, cache: str) -> list[dict]:
    sizes = ["batch_size=32", "max_length=512", "max_prompt_length=256"] if cuda else [
        "batch_size=8", "max_length=256", "max_prompt_length=128"]  # fmt: skip
    cfg, _ = build_config(["model=tiny", "loss=dpo", "loss.beta=0.1", *sizes, f"n_examples={(steps + 1) * 32}",
                           "exp_name=compile", f"local_dirs=[{cache}]"])  # fmt: skip
    tokenizer = load_tokenizer("tiny")
    data = prepare_data(cfg, tokenizer, log=lambda _: None)
    return [b for _, b in zip(range(steps), train_iterator(cfg, data, tokenizer, 0), strict=False)]


def time_steps(model: torch.nn.Module, run: Any, data: list[dict], device: torch.device) -> list[float]:
    times = []
    for batch in data:
        start = time.perf_counter()
        cat = losses.concatenated_inputs(batch)
        labels = cat["concatenated_labels"]
        positions = losses.predicted_indices(labels).to(device)
        labels = labels.to(device)
        with losses.logits_where_predicted(model, labels, positions):
            out = run(cat["concatenated_input_ids"].to(device),
                      attention_mask=cat["concatenated_attention_mask"].to(device), use_cache=False)  # fmt: skip
        losses.batch_logps(out.logits, labels, positions=positions).sum().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        data = batches(args.steps, cuda, cache)
        name = model_dir("gpt2-small-4k" if cuda else "tiny", Path(cache))
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            model = load_model(name).to(device)
            fuse_gelu(model)
            run = torch.compile(model, dynamic=True) if mode == "compiled" else model
            times = time_steps(model, run, data, device)
            results[mode] = {
                "first_step_s": times[0], "median_step_s": statistics.median(times[1:]), "total_s": sum(times)}  # fmt: skip
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, {args.steps} steps")
    print(f"{'mode':<10} {'first step':>11} {'median step':>12} {'total':>9}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['first_step_s']:>10.2f}s {r['median_step_s'] * 1000:>10.1f}ms {r['total_s']:>8.1f}s")
    ratio = results["eager"]["median_step_s"] / results["compiled"]["median_step_s"]
    print(f"compiled speed / eager speed, per step after the first: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "steps": args.steps, "results": results, "speedup": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
