"""How long `dpokit train resume=RUN` takes to start on a large checkpoint: the work done before
the first training step (deciding where to resume, verifying the checkpoint, reading the data,
restoring the state).

    .venv/bin/python benchmarks/resume_startup.py                       # this checkout
    .venv/bin/python benchmarks/resume_startup.py --src OTHER/src       # another checkout's dpokit, same data

The checkpoint: SFT on GPT-2's own 124M configuration (vocabulary 50257, the bundled tokenizer)
for 4 examples with AdamW, so policy.pt is ~500 MB and optimizer.pt ~1 GB (made once, in the
benchmark's directory). Timed, alternated, --repeats times each:
- `finished`: `dpokit train resume=RUN` with the same n_examples: the run is over, so the time is
  the decision alone (config, checkpoint located and verified, data prepared) and exiting;
- `to first step`: `resume=RUN n_examples=8`: wall seconds from the start to the first
  `train stats` line (the decision, the model built, the state restored, one step).
The page cache is warm in both (the checkpoint was just written or read), as on a restart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora import gpt2_124m  # noqa: E402

COMMON = ["model.block_name=GPT2Block", "loss=sft", "optimizer=AdamW", "batch_size=2", "max_length=64",
          "max_prompt_length=32", "eval_every=100000000", "do_first_eval=false", "final_eval=false",
          "sample_during_eval=false", "n_eval_examples=2", "eval_batch_size=2", "minimum_log_interval_secs=0",
          "device=cpu", "warmup_steps=1", "exp_name=resume"]  # fmt: skip


def dpokit(args: list[str], src: str | None, until: str | None = None) -> float:
    """Seconds `python -m dpokit.train args` takes to exit (or to print a line starting `until`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PYTHONPATH": src} if src else {})}
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a full pipe would stall the process
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "dpokit.train", *args], env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if until is not None and line.startswith(until):
                elapsed = time.perf_counter() - t0
                proc.kill()
                proc.wait()
                return elapsed
        if proc.wait() != 0:
            err.seek(0)
            raise SystemExit(f"dpokit train {' '.join(args[-3:])} failed: {err.read()[-3000:]}")
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--src", action="append", default=None,
                        help="a checkout's src directory to time (repeatable; default: the installed dpokit)")  # fmt: skip
    parser.add_argument("--dir", default=".", help="where the checkpoint goes (~1.5 GB)")
    args = parser.parse_args()
    sources = args.src or [None]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        model = gpt2_124m(root)
        run = root / "run"
        base = [f"model.name_or_path={model}", *COMMON, f"local_dirs=[{root / 'cache'}]"]
        made = dpokit([*base, "n_examples=4", f"local_run_dir={run}"], sources[0])
        size = sum(f.stat().st_size for f in (run / "LATEST").iterdir() if f.is_file()) / 2**20
        print(f"checkpoint {run / 'LATEST'}: {size:.0f} MiB, made in {made:.1f} s", flush=True)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for src in sources:
                name = src or "installed"
                times.setdefault((name, "finished"), []).append(dpokit([*base, "n_examples=4", f"resume={run}"], src))
                # a copy per run: a resumed run writes into the directory it resumes
                copy = root / "copy"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(run, copy)
                times.setdefault((name, "to first step"), []).append(
                    dpokit([*base, "n_examples=8", f"resume={copy}"], src, until="train stats after"))  # fmt: skip
                print(f"  {name}: finished {times[(name, 'finished')][-1]:.2f} s, to first step "
                      f"{times[(name, 'to first step')][-1]:.2f} s", flush=True)  # fmt: skip
        print(f"\nresume= start-up, GPT-2 124M config, {size:.0f} MiB checkpoint, medians of {args.repeats}:")
        for (name, what), ts in times.items():
            print(f"  {name:40s} {what:15s} {statistics.median(ts):7.2f} s")


if __name__ == "__main__":
    main()
