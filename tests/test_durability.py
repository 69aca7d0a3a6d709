"""Durability with real processes: SIGKILL during saves, and a disk that refuses writes."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, FAST
from crash_harness import run as crash_run
from dpokit.checkpoint import checksum_file, verify_dir
from dpokit.train import main

MODES = {
    "sync": [],
    "async": ["checkpoint.async=true"],
    "sharded": ["checkpoint.format=sharded"],
    "async-sharded": ["checkpoint.async=true", "checkpoint.format=sharded"],
    "lora": ["lora.enabled=true", "lora.r=4"],  # policy.pt merged, and PEFT's adapter directory
}


@pytest.mark.parametrize("mode", ["sync", "async", "async-sharded", "lora"])
def test_kill_during_save_leaves_every_checkpoint_complete(tmp_path, mode):
    """SIGKILL at moments found by watching the run directory (inside saves, inside saves of
    LATEST, between steps): every checkpoint directory verifies after every kill, and LATEST,
    once published, never goes missing. The same with saves written by a background thread, in
    either layout."""
    extra = MODES[mode]
    report = crash_run(tmp_path, kills=8 if mode == "sync" else 6, seed=1, extra=extra)
    assert report.bad == []
    assert report.kills >= (8 if mode == "sync" else 6)
    assert report.latest_published
    assert report.mid_save >= 3  # the kills really landed inside saves, not only between steps
    assert report.in_final_save >= 1  # and inside a save that replaces LATEST


def _limit_file_size():
    # Writes past 1 MiB fail with EFBIG, as on a full disk; ignore SIGXFSZ so the write returns
    # the error instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def _snapshot(run_dir: Path) -> dict:
    return {
        str(p.relative_to(run_dir)): checksum_file(p) for d in ("step-4", "LATEST") for p in (run_dir / d).iterdir()
    }


@pytest.mark.parametrize("mode", [m for m in MODES if m != "lora"])
def test_failed_save_names_the_path_and_keeps_previous_checkpoints(tmp_path, mode):
    """A disk that refuses writes: the failed save is named with the OS's reason and nothing
    published before is touched. Written in the background (async), the failure surfaces at the
    next save or at the end, never silently."""
    async_arg = MODES[mode]
    common = [*FAST, "exp_name=full", f"local_dirs=[{tmp_path / 'runs'}]", "batch_size=4", "eval_every=4"]
    run_dir = Path(main([*common, "n_examples=8"])["run_dir"])
    before = _snapshot(run_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    stopped = subprocess.run(
        [str(BIN / "dpokit"), "train", f"resume={run_dir}", "n_examples=16", *async_arg],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_file_size,
    )
    assert stopped.returncode != 0 and "Traceback" not in stopped.stderr
    error = [line for line in stopped.stderr.splitlines() if line.startswith("dpokit: error:")]
    # torch.save inside Distributed Checkpoint loses the OS's reason; it reports a short file
    reason = "the disk refused a write" if "sharded" in mode else "File too large"
    assert len(error) == 1 and str(run_dir / "step-12") in error[0] and reason in error[0], error
    assert (
        _snapshot(run_dir) == before
        and verify_dir(run_dir / "step-4") is None
        and verify_dir(run_dir / "LATEST") is None
    )
    assert not any(p.name.startswith(".staging-") for p in run_dir.iterdir())

    warned = subprocess.run(
        [str(BIN / "dpokit"), "train", f"resume={run_dir}", "n_examples=16", "checkpoint.on_error=warn", *async_arg],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_file_size,
    )
    assert warned.returncode == 0, warned.stderr[-2000:]
    assert warned.stdout.count("WARNING: checkpoint not saved") == 2  # step-12 and LATEST
    assert "train stats after 16 examples" in warned.stdout  # training went on to the end
    assert _snapshot(run_dir) == before
