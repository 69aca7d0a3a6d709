"""Shared test helpers: short, deterministic training runs on the bundled tiny model."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# Small enough to run in seconds on 2 CPU cores, large enough to exercise every code path.
FAST = [
    "model=tiny",
    "sample_during_eval=false",
    "max_length=64",
    "max_prompt_length=32",
    "n_eval_examples=8",
    "eval_batch_size=8",
    "minimum_log_interval_secs=0",
    "lr=1e-3",
    "warmup_steps=2",
]


def bundled_pairs(n: int) -> list[dict]:
    path = resources.files("dpokit") / "assets/hh_sample/harmless-base-test.jsonl.gz"
    with gzip.open(str(path), "rt") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


@pytest.fixture
def train(tmp_path):
    """Run `dpokit train` in-process; returns the summary dict (run_dir, checkpoints, metrics)."""
    from dpokit.train import main

    def run(*args: str, exp_name: str = "t") -> dict:
        return main([*FAST, f"exp_name={exp_name}", f"local_dirs=[{tmp_path / 'runs'}]", *args])

    return run


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real `dpokit` command in a subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([str(BIN / "dpokit"), *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def metrics_log(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
