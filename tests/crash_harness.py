"""Kill a training run with SIGKILL at many moments and check every checkpoint after each kill.

Each cycle starts `dpokit train` (resuming the run when it has a complete checkpoint) and kills
it at a chosen kind of moment, found by watching the run directory, never by guessing a time:

* `save`: a new staging directory has appeared (a save has begun); the process runs on for a
  random few milliseconds, is frozen with SIGSTOP, and is killed. It counts as a kill inside a
  save when the save's leftovers are still there at that moment.
* `final_save`: the same, for the save of LATEST after the last training step (the run is
  extended each time, so there always is a last step to reach).
* `training`: a new training step has been logged; the process runs on for a random moment.

After each kill every checkpoint directory of the run is verified (what `dpokit ckpt verify` does). A directory that fails
verification, or a LATEST that vanished after it had been published, is a bad outcome.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.checkpoint import checkpoint_dirs, verify_dir

BIN = Path(sys.executable).parent
ARGS = ["model=tiny", "sample_during_eval=false", "max_length=64", "max_prompt_length=32", "n_eval_examples=4",
        "eval_batch_size=4", "batch_size=4", "eval_every=4", "do_first_eval=false", "minimum_log_interval_secs=0",
        "lr=1e-3", "checkpoint.keep_last=3", "exp_name=crash"]  # fmt: skip
FIRST_RUN_EXAMPLES = 48
STATE_TIMEOUT = 300.0  # seconds to wait for a state; generous, so that a loaded machine only takes longer


@dataclass
class Report:
    kills: int = 0
    mid_save: int = 0  # kills that left a save's leftovers behind (staging dir, temp file, orphan)
    in_final_save: int = 0  # of those, kills inside the save of LATEST
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


def _staging(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.name.startswith(".staging-")} if run_dir.exists() else set()


def _train_steps(run_dir: Path) -> list[int]:
    log = run_dir / "metrics.jsonl"
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by an earlier kill
            continue
        if "loss/train" in record:
            steps.append(record["step"])
    return steps


def _has_checkpoint(run_dir: Path) -> bool:
    return run_dir.exists() and any(p.name == "LATEST" or p.name.startswith("step-") for p in run_dir.iterdir())


def _wait(proc: subprocess.Popen, condition: Callable[[], bool], what: str) -> bool:
    """True once condition() holds; False if the process ended first. Fails after STATE_TIMEOUT."""
    deadline = time.monotonic() + STATE_TIMEOUT
    while not condition():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {what} within {STATE_TIMEOUT:.0f} s")
        time.sleep(0.001)
    return True


def kill_cycle(
    run_dir: Path, mode: str, n_examples: int, rng: random.Random, report: Report, env: dict, extra: list[str]
) -> None:
    cmd = [str(BIN / "dpokit"), "train", *ARGS, *extra, f"n_examples={n_examples}", f"local_run_dir={run_dir}"]
    if _has_checkpoint(run_dir):
        cmd.append(f"resume={run_dir}")
    seen, steps = _staging(run_dir), len(_train_steps(run_dir))
    err_file = run_dir.parent / "stderr.txt"
    with open(err_file, "wb") as err_out:  # a file, not a pipe: nothing the process writes can block it
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_out, env=env, start_new_session=True)
    if mode == "training":
        reached = _wait(proc, lambda: len(_train_steps(run_dir)) > steps, "training step")
    elif mode == "final_save":
        reached = _wait(
            proc, lambda: n_examples in _train_steps(run_dir) and bool(_staging(run_dir) - seen), "save of LATEST"
        )
    else:
        reached = _wait(proc, lambda: bool(_staging(run_dir) - seen), "save")
    if reached:
        time.sleep(rng.uniform(0, 0.03 if mode != "training" else 0.3))
        os.killpg(proc.pid, signal.SIGSTOP)  # freeze it where it is, look, then kill
        inside = bool(_leftovers(run_dir))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        report.kills += 1
        if inside:
            report.mid_save += 1
            report.in_final_save += mode == "final_save"
    elif proc.returncode != 0:
        err = err_file.read_text(errors="replace").strip().splitlines()[-1:]
        report.bad.append(f"run exited {proc.returncode} on its own: {err}")

    if (run_dir / "LATEST").exists():
        report.latest_published = True
    elif report.latest_published:
        report.bad.append(f"kill {report.kills}: LATEST vanished after it had been published")
    if _has_checkpoint(run_dir):
        # what `dpokit ckpt verify RUN_DIR` checks (the command itself is tested in test_ckpt_tools),
        # in this process: a subprocess per kill would double the time of the soak
        failures = [f"{path}: {problem}" for _, path in checkpoint_dirs(run_dir) if (problem := verify_dir(path))]
        if failures:
            report.bad.append(f"kill {report.kills}: " + " | ".join(failures))


def run(
    workdir: Path,
    kills: int,
    seed: int = 0,
    min_mid_save: int = 3,
    min_final_save: int = 1,
    extra: list[str] | None = None,
) -> Report:
    """`kills` kills: mostly inside saves, some during training, and (once the run has finished
    and published LATEST) inside later saves of LATEST. Cycles go on, up to 4 * kills, until at
    least `min_mid_save` kills landed inside a save and `min_final_save` inside a save of LATEST."""
    rng = random.Random(seed)
    run_dir = workdir / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    report = Report()
    n_examples = FIRST_RUN_EXAMPLES
    for _ in range(4 * kills):
        enough = report.mid_save >= min_mid_save and report.in_final_save >= min_final_save
        if report.kills >= kills and enough:
            break
        if not report.latest_published and report.kills >= kills // 2:
            # let the run finish once, so that LATEST exists, then extend it for saves of LATEST
            subprocess.run(
                [str(BIN / "dpokit"), "train", *ARGS, *(extra or []), f"n_examples={n_examples}", f"local_run_dir={run_dir}",
                 *([f"resume={run_dir}"] if _has_checkpoint(run_dir) else [])],
                env=env, capture_output=True, check=True,
            )  # fmt: skip
            report.latest_published = (run_dir / "LATEST").exists()
            continue
        if report.latest_published:
            n_examples += 4  # one more step, and with it a new save of LATEST
            mode = "final_save" if report.in_final_save < min_final_save or rng.random() < 0.5 else "save"
        else:
            mode = "training" if rng.random() < 0.25 else "save"
        kill_cycle(run_dir, mode, n_examples, rng, report, env, extra or [])
    return report


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="more dpokit train arguments, e.g. checkpoint.async=true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        result = run(Path(tmp), args.kills, args.seed, extra=args.extra)
        summary = {
            "kills": result.kills,
            "kills_mid_save": result.mid_save,
            "kills_in_save_of_latest": result.in_final_save,
            "bad_outcomes": len(result.bad),
            "latest_published": result.latest_published,
            "details": result.bad,
            "seconds": round(time.time() - t0),
        }
        print(json.dumps(summary, indent=1))
