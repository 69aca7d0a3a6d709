"""Kill a training run with SIGKILL at many moments and check every checkpoint after each kill.

Each cycle starts `dpokit train` (resuming the run if it has a complete checkpoint), kills it
either at a random time or a random few milliseconds after a save has begun (a staging
directory appeared), then runs `dpokit ckpt verify` on the run directory. A directory that fails
verification, or a LATEST that vanished after it had been published, counts as a bad outcome.
Run directly for a longer soak:  .venv/bin/python tests/crash_harness.py --kills 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
ARGS = [
    "model=tiny",
    "sample_during_eval=false",
    "max_length=64",
    "max_prompt_length=32",
    "n_eval_examples=4",
    "eval_batch_size=4",
    "batch_size=4",
    "eval_every=4",
    "do_first_eval=false",
    "n_examples=48",
    "minimum_log_interval_secs=0",
    "lr=1e-3",
    "checkpoint.keep_last=3",
    "exp_name=crash",
]


@dataclass
class Report:
    kills: int = 0
    mid_save: int = 0  # kills that left a save's leftovers behind (staging dir, temp file, orphan)
    bad: list[str] = field(default_factory=list)
    latest_published: bool = False


def _leftovers(run_dir: Path) -> list[str]:
    live = os.readlink(run_dir / "LATEST") if (run_dir / "LATEST").is_symlink() else None
    names = []
    for p in run_dir.iterdir() if run_dir.exists() else []:
        if (
            p.name.startswith((".staging-", ".trash-", ".link-"))
            or ".tmp-" in p.name
            or (p.name.startswith(".LATEST-") and p.name != live)
        ):
            names.append(p.name)
    return names


def _saving(run_dir: Path) -> bool:
    return any(p.name.startswith((".staging-", ".link-")) for p in run_dir.iterdir()) if run_dir.exists() else False


def _has_checkpoint(run_dir: Path) -> bool:
    return run_dir.exists() and any(p.name == "LATEST" or p.name.startswith("step-") for p in run_dir.iterdir())


def kill_cycle(run_dir: Path, rng: random.Random, report: Report, env: dict) -> None:
    cmd = [str(BIN / "dpokit"), "train", *ARGS, f"local_run_dir={run_dir}"]
    if _has_checkpoint(run_dir):
        cmd.append(f"resume={run_dir}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    aim_at_save = rng.random() < 0.7
    deadline = time.time() + 120
    start = time.time()
    delay = rng.uniform(4.0, 12.0)
    while proc.poll() is None and time.time() < deadline:
        if aim_at_save:
            if _saving(run_dir):
                time.sleep(rng.uniform(0, 0.08))  # somewhere inside the save path
                break
        elif time.time() - start > delay:
            break
        time.sleep(0.002)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        report.kills += 1
        if _leftovers(run_dir):
            report.mid_save += 1
    else:
        err = proc.stderr.read().decode()
        if proc.returncode != 0:
            report.bad.append(f"run exited {proc.returncode} on its own: {err.strip().splitlines()[-1:]}")
    proc.stderr.close()

    if (run_dir / "LATEST").exists():
        report.latest_published = True
    elif report.latest_published:
        report.bad.append(f"kill {report.kills}: LATEST vanished after it had been published")
    if _has_checkpoint(run_dir):
        verify = subprocess.run(
            [str(BIN / "dpokit"), "ckpt", "verify", str(run_dir)], capture_output=True, text=True, env=env
        )
        if verify.returncode != 0:
            report.bad.append(
                f"kill {report.kills}: "
                + " | ".join(line for line in verify.stdout.splitlines() if line.startswith("FAIL"))
            )


def run(workdir: Path, kills: int, seed: int = 0) -> Report:
    rng = random.Random(seed)
    run_dir = workdir / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    report = Report()
    attempts = 0
    while report.kills < kills and attempts < kills * 3:
        attempts += 1
        kill_cycle(run_dir, rng, report, env)
    return report


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        result = run(Path(tmp), args.kills, args.seed)
        print(
            json.dumps(
                {
                    "kills": result.kills,
                    "kills_mid_save": result.mid_save,
                    "bad_outcomes": len(result.bad),
                    "latest_published": result.latest_published,
                    "details": result.bad,
                    "seconds": round(time.time() - t0),
                },
                indent=1,
            )
        )
