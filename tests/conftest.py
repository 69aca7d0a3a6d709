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


def assert_no_further_from_exact(candidate: dict, float32: dict, exact: dict, factor: float = 4.0) -> None:
    """For a computation that is exact in real arithmetic but sums floats in another order:
    `candidate` is no further from the float64 result `exact` than the plain float32 result is
    (within `factor`, on per-tensor norms), up to the rounding of the weights themselves
    (2 float32 eps of the tensor's norm)."""
    import torch

    eps = torch.finfo(torch.float32).eps
    assert candidate.keys() == float32.keys() == exact.keys()
    for key, ref in exact.items():
        ref = ref.double()
        err = (candidate[key].double() - ref).norm().item()
        baseline = (float32[key].double() - ref).norm().item()
        assert err <= factor * baseline + 2 * eps * ref.norm().item(), (key, err, baseline)


def write_dataset(path: Path, rows: list[dict], fmt: str) -> str:
    """`rows` as a dataset file in one of the formats dpokit reads; its `datasets=` entry."""
    import datasets

    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return f"{fmt}:{path}"


def metrics_log(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


class Store:
    """The checkpoint components (storage, writer, retention) driven the way the Checkpointer
    drives them, without a model or optimizer: for tests that build checkpoint directories."""

    def __init__(
        self,
        run_dir,
        fsync=True,
        config=None,
        keep_last=None,
        keep_best=None,
        best_metric="loss/eval",
        best_mode="min",
        log=print,
    ):
        from dpokit.checkpoint import RetentionPolicy, Storage

        self.storage = Storage(run_dir, fsync)
        self.config, self.log = config, log
        self.retention = RetentionPolicy(keep_last, keep_best, best_metric, best_mode)

    def publish(self, name, step, metrics, states, parent=None) -> Path:
        """A complete checkpoint directory (contract files, manifest last), published as `name`."""
        from dpokit.checkpoint import CheckpointWriter

        staging = self.storage.stage(parent)
        writer = CheckpointWriter(staging, self.storage.fsync)
        for filename, state in states.items():
            writer.write(filename, step, state, metrics)
        writer.seal(step, metrics, self.config)
        return self.storage.commit(staging, name, parent)

    def write(self, directory, filename, step, state, metrics) -> Path:
        from dpokit.checkpoint import rewrite_file

        return rewrite_file(self.storage, Path(directory), filename, step, state, metrics, self.config)

    def sweep(self) -> list[str]:
        return self.storage.sweep()

    def after_publish(self) -> None:
        from dpokit.checkpoint import apply_retention

        apply_retention(self.storage, self.retention, self.log)
