"""What a checkpoint costs: the reference's three plain torch.save calls, dpokit's durable save
(staging, checksums, fsync, manifest, atomic publish), how long the loop is blocked with
checkpoint.async=true (save() plus the wait before the next optimizer step, with the next
forward and backward running beside the background copy, whose slowdown is reported too),
loading it back, and the raw durable write bandwidth of the same disk
(the same number of bytes, plain writes + fsync), all measured in the same run.

    .venv/bin/python benchmarks/checkpoint_io.py                    # tiny and a 124M GPT-2 config
    .venv/bin/python benchmarks/checkpoint_io.py --models tiny --repeats 9 --dir /path/on/the/disk --json out.json

Model weights and an RMSprop state (one step taken), one process. Medians of --repeats,
alternated between the variants. Before each durable write the disk and the memory are put in the
same state (`settle`) so that no variant pays for another's dirty pages or for memory the VM has
given back to its host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dpokit.checkpoint import CONTRACT_FILES, Checkpointer, CheckpointSettings, load_payload
from dpokit.distributed import SingleProcess
from dpokit.models import load_model

CONFIGS = {"tiny": None, "gpt2-124m": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}}


def build(name: str):
    if CONFIGS[name] is None:
        model = load_model("tiny")
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(**CONFIGS[name]))
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tokens = torch.randint(0, 4096, (2, 64))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()  # RMSprop state for every parameter
    return model, optimizer, scheduler


def next_step(model) -> None:
    """The forward and backward of a training step: what runs beside a background snapshot."""
    tokens = torch.randint(0, 4096, (2, 64))
    model(tokens, labels=tokens).loss.backward()
    model.zero_grad(set_to_none=True)


def checkpointer(run: Path, model, optimizer, scheduler, async_save: bool) -> Checkpointer:
    return Checkpointer(
        run,
        CheckpointSettings(async_save=async_save),
        policy=model,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state=lambda: {"example_counter": 0, "batch_counter": 0},
        dist=SingleProcess(),
        log=lambda _m: None,
    )


def raw_payload(n_bytes: int) -> memoryview:
    """n_bytes of distinct random data (a block written over and over is not what a checkpoint
    is, and some disks and VMs treat it differently), without a copy."""
    return memoryview(torch.randn((n_bytes + 3) // 4).numpy()).cast("B")[:n_bytes]


def raw_write(path: Path, data: memoryview) -> None:
    """Plain writes in 16 MiB pieces and one fsync: the disk's durable bandwidth."""
    with open(path, "wb") as f:
        for start in range(0, len(data), 1 << 24):
            f.write(data[start : start + (1 << 24)])
        f.flush()
        os.fsync(f.fileno())


def settle(scratch: Path, payload: memoryview) -> None:
    """The same start for every durable write: no dirty pages of the previous one, and as much
    page cache just released as the write will fill. On this sandboxed VM, filling page cache
    that was not just released costs the host's page faults, which dominate the write:
    measured (950 MiB, 124M config) 0.18 s to copy into just-released page cache, 1.4-2.5 s into
    other memory (even just-freed anonymous memory), the fsync after it 0.4 s either way; so a
    write that happened to follow an unlink looked 3-5x faster than one that did not. The
    scratch file is never written back: it is unlinked before anything asks for it."""
    with open(scratch, "wb") as f:
        for start in range(0, len(payload), 1 << 24):
            f.write(payload[start : start + (1 << 24)])
    scratch.unlink()
    os.sync()


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def measure(name: str, root: Path, repeats: int) -> dict:
    model, optimizer, scheduler = build(name)
    sync_ck = checkpointer(root / "sync", model, optimizer, scheduler, async_save=False)
    async_ck = checkpointer(root / "async", model, optimizer, scheduler, async_save=True)
    times: dict[str, list[float]] = {
        k: [] for k in ("reference", "sync", "async blocked", "async write", "step alone", "step beside", "load", "raw")
    }
    size = checkpoint_bytes(sync_ck.save(0))  # unmeasured: how many bytes a save writes
    payload = raw_payload(size)
    for i in range(repeats):
        out = root / f"plain-{i}"
        out.mkdir()
        t0 = time.perf_counter()
        for filename, state in zip(CONTRACT_FILES, (model.state_dict(), optimizer.state_dict(), scheduler.state_dict()),
                                   strict=True):  # fmt: skip
            torch.save({"step_idx": i, "state": state, "metrics": {}}, out / filename)
        times["reference"].append(time.perf_counter() - t0)
        shutil.rmtree(out)

        settle(root / "scratch", payload)
        t0 = time.perf_counter()
        target = sync_ck.save(i + 1)
        times["sync"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        next_step(model)
        times["step alone"].append(time.perf_counter() - t0)

        # the loop as it runs: save(), the next batch's forward and backward while parameters and
        # optimizer state are copied in the background, then before_update() before the step
        settle(root / "scratch", payload)
        t0 = time.perf_counter()
        async_ck.save(i + 1)
        blocked = time.perf_counter() - t0
        t1 = time.perf_counter()
        next_step(model)
        t2 = time.perf_counter()
        async_ck.before_update()
        times["step beside"].append(t2 - t1)
        times["async blocked"].append(blocked + time.perf_counter() - t2)
        async_ck.wait()
        times["async write"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        for filename in CONTRACT_FILES:
            load_payload(target / filename)
        times["load"].append(time.perf_counter() - t0)

        settle(root / "scratch", payload)
        t0 = time.perf_counter()
        raw_write(root / f"raw-{i}", payload)
        times["raw"].append(time.perf_counter() - t0)
        (root / f"raw-{i}").unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    snapshot_bytes = sum(b.numel() * b.element_size() for b in async_ck._buffers.values())
    return {"bytes": size, "parameters": sum(p.numel() for p in model.parameters()), "seconds": med,
            "async_extra_memory_bytes": snapshot_bytes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,gpt2-124m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory here)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = {}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(dir=args.dir or ".") as tmp:
            r = report[name] = measure(name, Path(tmp), args.repeats)
        s, mib = r["seconds"], r["bytes"] / 2**20
        print(f"\n{name}: {r['parameters'] / 1e6:.1f}M parameters, checkpoint {mib:.1f} MiB "
              f"(policy + RMSprop state + scheduler), {args.repeats} repeats, medians")  # fmt: skip
        rows = [
            ("reference: 3 x torch.save (no fsync)", s["reference"], ""),
            ("dpokit save, synchronous, durable", s["sync"], f"x{s['sync'] / s['reference']:.2f} of reference"),
            ("  loop blocked with checkpoint.async", s["async blocked"], f"{100 * s['async blocked'] / s['sync']:.1f}% of the synchronous save"),
            ("  background copy and write", s["async write"], ""),
            ("  next forward+backward, alone", s["step alone"], ""),
            ("  next forward+backward, beside the save", s["step beside"], f"+{(s['step beside'] - s['step alone']) * 1000:.0f} ms"),
            ("load (3 files, weights_only)", s["load"], ""),
            ("raw durable write of the same bytes", s["raw"], f"{mib / s['raw']:.0f} MiB/s"),
        ]  # fmt: skip
        for label, seconds, note in rows:
            print(f"  {label:42s}{seconds * 1000:10.1f} ms  {note}")
        print(f"  durable save throughput {mib / s['sync']:.0f} MiB/s = {s['raw'] / s['sync']:.2f} of the raw bandwidth; "
              f"async keeps one extra copy of the state: {r['async_extra_memory_bytes'] / 2**20:.1f} MiB")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
