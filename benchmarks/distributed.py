"""Multi-process training on CPU: examples/s with 1 and 2 processes, and what each checkpoint
layout costs with 2 processes, written synchronously and in the background (how long save()
holds the loop, how long until the checkpoint is published, and rank 0's peak resident memory
during the save above what it held before: a full save gathers the whole state on rank 0, a
sharded one must not; a background save adds its copy). No training runs beside the saves here,
so a background save's copy, which in training overlaps the next forward and backward, is in
"written", not in "loop waits".

    .venv/bin/python benchmarks/distributed.py                       # tiny and a GPT-2-small (124M) config
    .venv/bin/python benchmarks/distributed.py --models tiny --repeats 3 --json out.json

Prints a table; --json writes the numbers. Each model directory is built from a config (random
weights) with the bundled tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

MODELS = {
    "tiny": None,  # the bundled one
    "gpt2-124m": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
}
BIN = Path(sys.executable).parent
LAYOUTS = ("full", "sharded", "full async", "sharded async")  # checkpoint.format, + checkpoint.async=true


def model_dir(name: str, root: Path) -> str:
    if MODELS[name] is None:
        return name
    from transformers import GPT2Config

    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    GPT2Config(**MODELS[name], bos_token_id=0, eos_token_id=0).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(str(resources.files("dpokit") / "assets/tiny" / f)), out / f)
    return str(out)


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ============================================================================================
# throughput: the real `dpokit train`, 1 process (BasicTrainer) and 2 (FSDPTrainer)


def throughput(model: str, nproc: int, root: Path, steps: int, batch: int) -> dict:
    run = root / f"tp-{Path(model).name}-{nproc}-{time.monotonic_ns()}"
    args = [
        f"model.name_or_path={model}",
        "model.block_name=GPT2Block",
        "model.reference_dtype=float32",
        "loss=sft",
        f"batch_size={batch}",
        "max_length=128",
        "max_prompt_length=64",
        f"n_examples={batch * steps}",
        "eval_every=1000000",
        "do_first_eval=false",
        "n_eval_examples=8",
        "eval_batch_size=8",
        "sample_during_eval=false",
        "minimum_log_interval_secs=0",
        "debug=true",
        "exp_name=bench",
        f"local_run_dir={run}",
    ]
    if nproc > 1:
        args += ["trainer=FSDPTrainer", f"nproc={nproc}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "dpokit"), "train", *args], check=True, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["examples_per_second"] for r in records if "examples_per_second" in r][1:]  # first step warms up
    shutil.rmtree(run, ignore_errors=True)
    return {"examples_per_second": statistics.median(per_step), "process_seconds": wall}


# ============================================================================================
# checkpoint cost: a worker under torchrun saves the same state in one layout, sync or async


def worker(model: str, out: str, repeats: int, layout: str) -> None:
    import torch

    from dpokit import distributed
    from dpokit.checkpoint import Checkpointer, CheckpointSettings
    from dpokit.models import load_model
    from dpokit.train import exit_worker

    rank, _ = distributed.init_process_group()
    dist = distributed.FSDP2("GPT2Block")
    policy = dist.wrap_policy(load_model(model))
    optimizer = torch.optim.RMSprop(policy.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tokens = torch.randint(0, 4096, (2, 64))
    policy(tokens, labels=tokens).loss.backward()  # fill the optimizer state
    optimizer.step()
    # one layout per process: memory another layout freed would hide this one's growth
    results = {}
    run = Path(out) / layout.replace(" ", "-")
    checkpointer = Checkpointer(
        run,
        CheckpointSettings(format=layout.split()[0], async_save=layout.endswith("async")),
        policy=policy,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state=lambda: {"example_counter": 0, "batch_counter": 0, "rng": {}},
        dist=dist,
        log=lambda _m: None,
    )
    times, done, growth = [], [], []
    for i in range(repeats):
        base = rss_kib()
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
        dist.barrier()
        t0 = time.perf_counter()
        checkpointer.save(i + 1)
        times.append(time.perf_counter() - t0)  # what the loop waits for (async: the snapshot)
        checkpointer.wait()  # an async save's copy and write, in the background until here
        done.append(time.perf_counter() - t0)
        growth.append((rss_kib("VmHWM") - base) / 1024)
    size = sum(p.stat().st_size for p in (run / "step-1").rglob("*") if p.is_file())
    results[layout] = {"save_seconds": statistics.median(times), "complete_seconds": statistics.median(done),
                       "rank0_peak_extra_mib": max(growth), "bytes": size}  # fmt: skip
    if rank == 0:
        n = sum(p.numel() for p in policy.parameters())  # DTensor.numel() is the whole parameter's
        print("RESULT " + json.dumps({"parameters": n, **results}), flush=True)
    distributed.shutdown(finished=True)
    exit_worker(0)  # not the interpreter's teardown: gloo's threads outlive it after FSDP2 (see its docstring)


def save_cost(model: str, root: Path, repeats: int) -> dict:
    out = root / f"ckpt-{Path(model).name}"
    cost: dict = {}
    for layout in LAYOUTS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", model, str(out), str(repeats), layout]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        shutil.rmtree(out, ignore_errors=True)
        line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
        cost.update(json.loads(line[len("RESULT ") :]))
    return cost


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,gpt2-124m")
    parser.add_argument("--repeats", type=int, default=3, help="saves per layout (medians)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per throughput run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        for name in args.models.split(","):
            model = model_dir(name, root)
            batch = 8
            one = throughput(model, 1, root, args.steps, batch)
            two = throughput(model, 2, root, args.steps, batch)
            cost = save_cost(model, root, args.repeats)
            report[name] = {"one_process": one, "two_processes": two, "checkpoint": cost}
            print(f"\n{name}: {cost['parameters'] / 1e6:.1f}M parameters, SFT, batch {batch}, max_length 128")
            print(f"  {'':28s}{'examples/s (median)':>22s}{'whole process':>16s}")
            for label, r in (("1 process (BasicTrainer)", one), ("2 processes (FSDPTrainer)", two)):
                print(f"  {label:28s}{r['examples_per_second']:22.2f}{r['process_seconds']:15.1f}s")
            print(f"  2 / 1 processes: x{two['examples_per_second'] / one['examples_per_second']:.2f}")
            print(f"  {'save, 2 processes':28s}{'loop waits':>12s}{'written':>10s}{'rank 0 extra RSS':>20s}"
                  f"{'on disk':>12s}")  # fmt: skip
            for layout in LAYOUTS:
                c = cost[layout]
                print(f"  {layout:28s}{c['save_seconds']:11.3f}s{c['complete_seconds']:9.3f}s"
                      f"{c['rank0_peak_extra_mib']:16.1f} MiB{c['bytes'] / 2**20:9.1f} MiB")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
