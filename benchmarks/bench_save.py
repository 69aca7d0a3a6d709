"""Cost of durability: wall time of one checkpoint save of the bundled tiny model.

Compares the reference's way (three plain torch.save calls into a directory) with dpokit's
store (staging directory, checksums, manifest, rename, LATEST symlink swap) with and without
fsync. Prints the median of --repeats runs of each and the ratios to the plain save.
    .venv/bin/python benchmarks/bench_save.py --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dpokit.checkpoint import CONTRACT_FILES, CheckpointWriter, Storage
from dpokit.models import load_model


def tiny_training_state() -> tuple[dict, dict, dict]:
    """Policy, optimizer (with its moments filled) and scheduler state of the tiny model."""
    model = load_model("tiny")
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 151))
    model(torch.randint(0, 4096, (2, 32)), labels=torch.randint(0, 4096, (2, 32))).loss.backward()
    optimizer.step()
    scheduler.step()
    return model.state_dict(), optimizer.state_dict(), scheduler.state_dict()


def plain_save(run_dir: Path, states: tuple) -> None:
    out = run_dir / "LATEST"
    out.mkdir(parents=True, exist_ok=True)
    for name, state in zip(CONTRACT_FILES, states, strict=True):
        torch.save({"step_idx": 1, "state": state, "metrics": {}}, out / name)


def store_save(run_dir: Path, states: tuple, fsync: bool) -> None:
    """What the Checkpointer does for one save: stage, write each file, manifest last, publish."""
    storage = Storage(run_dir, fsync=fsync)
    staging = storage.stage()
    writer = CheckpointWriter(staging, fsync)
    for name, state in zip(CONTRACT_FILES, states, strict=True):
        writer.write(name, 1, state, {})
    writer.seal(1, {}, None)
    storage.commit(staging, "LATEST")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    states = tiny_training_state()
    variants = {
        "reference torch.save x3": lambda d: plain_save(d, states),
        "dpokit store, fsync=false": lambda d: store_save(d, states, fsync=False),
        "dpokit store, fsync=true": lambda d: store_save(d, states, fsync=True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for i in range(args.repeats):  # interleaved, so drift in the machine hits all variants alike
            for name, fn in variants.items():
                run_dir = Path(tmp) / f"{i}-{len(times[name])}-{name.split()[0]}"
                t0 = time.perf_counter()
                fn(run_dir)
                times[name].append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in (Path(tmp) / "0-0-reference" / "LATEST").iterdir())
    base = statistics.median(times["reference torch.save x3"])
    print(
        f"checkpoint size {size / 2**20:.1f} MiB (policy + optimizer + scheduler), {args.repeats} repeats, "
        f"filesystem of {args.dir or tempfile.gettempdir()}"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:28s} median {med * 1000:8.1f} ms  (min {min(ts) * 1000:7.1f}, max {max(ts) * 1000:7.1f})  "
            f"x{med / base:.2f} of reference"
        )
    print(json.dumps({k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}))


if __name__ == "__main__":
    main()
