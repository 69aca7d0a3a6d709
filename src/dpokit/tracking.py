"""What a run records about itself, in its run directory (by the first process only).

- `metrics.jsonl`: one JSON record per logged train step and evaluation (the reference's metric
  names), plus per-save checkpoint timings. Each record is written whole and flushed, so a crash
  loses at most the last line; on resume, records past the resumed step are dropped (atomically),
  so steps never go backwards.
- `samples/step-N.jsonl`: the sampled completions of each evaluation.
- `train.log`: everything the run printed (progress bars excepted on a terminal).
- `run.json`: status (running, finished, interrupted, failed), process, host and times, for
  `dpokit runs`.
- Optional sinks through their own libraries: Weights & Biases (`wandb.enabled`) and TensorBoard
  (`tensorboard.enabled`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

METRICS = "metrics.jsonl"
SAMPLES = "samples"
TRAIN_LOG = "train.log"
RUN_STATUS = "run.json"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut by a crash (the last) is left out."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def drop_metrics_after(run_dir: str | Path, step: int) -> int:
    """Keep the records up to `step` (a resumed run continues from there); returns how many
    were dropped. The file is replaced atomically: it is never seen half rewritten."""
    from dpokit.checkpoint import atomic_write_bytes

    path = Path(run_dir) / METRICS
    if not path.exists():
        return 0
    records = read_metrics(run_dir)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records) or not path.read_text().endswith("\n"):
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode(), fsync=False)
    return len(records) - len(kept)


def write_status(run_dir: str | Path, status: str, **extra: Any) -> None:
    from dpokit.checkpoint import atomic_write_bytes

    path = Path(run_dir) / RUN_STATUS
    record = {}
    if path.exists():
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record.update(status=status, pid=os.getpid(), host=socket.gethostname(), updated=now, **extra)
    record.setdefault("started", now)
    with contextlib.suppress(Exception):  # the status is information; it never stops a run
        atomic_write_bytes(path, json.dumps(record, indent=1).encode(), fsync=False)


def read_status(run_dir: str | Path) -> dict:
    """run.json, with a 'running' run whose process is gone (on this host) reported as 'interrupted'."""
    try:
        record = json.loads((Path(run_dir) / RUN_STATUS).read_text())
    except (OSError, ValueError):
        return {}
    if record.get("status") == "running" and record.get("host") == socket.gethostname():
        try:
            os.kill(int(record.get("pid", 0)), 0)
        except (OSError, ValueError):
            record["status"] = "interrupted"
            record["note"] = "the process is gone"
    return record


class Tracker:
    """The run's records; a no-op on every process but the first."""

    def __init__(self, run_dir: str | Path, cfg: Any, enabled: bool = True) -> None:
        self.run_dir, self.cfg, self.enabled = Path(run_dir), cfg, enabled
        self._wandb: Any = None
        self._tensorboard: Any = None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.cfg.wandb.enabled and not self.cfg.debug:
            self.wandb().log(metrics, step=step)
        if self.cfg.tensorboard.enabled:
            writer = self.tensorboard()
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(key, value, global_step=step)
            writer.flush()

    def samples(self, step: int, prompts: list[str], policy: list[str], reference: list[str]) -> Path | None:
        if not self.enabled:
            return None
        out = self.run_dir / SAMPLES / f"step-{step}.jsonl"
        out.parent.mkdir(exist_ok=True)
        with open(out, "w") as f:
            for i, text in enumerate(policy):
                record = {"prompt": prompts[i] if i < len(prompts) else None, "policy": text}
                if reference:
                    record["reference"] = reference[i]
                f.write(json.dumps(record) + "\n")
        return out

    def wandb(self) -> Any:
        if self._wandb is None:
            import wandb
            from omegaconf import OmegaConf

            wandb.init(
                entity=self.cfg.wandb.entity,
                project=self.cfg.wandb.project,
                name=self.cfg.exp_name,
                config=OmegaConf.to_container(self.cfg, resolve=True),
                dir=str(self.run_dir),
            )
            self._wandb = wandb
        return self._wandb

    def tensorboard(self) -> Any:
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        return self._tensorboard

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


class _Tee:
    """A console stream that also appends what it writes to a file."""

    def __init__(self, stream: TextIO, copy: TextIO) -> None:
        self.stream, self.copy = stream, copy

    def write(self, s: str) -> int:
        self.copy.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()
        self.copy.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def console_copied_to(path: Path, enabled: bool = True) -> Iterator[None]:
    """stdout and stderr also go to `path` (appended, line-buffered) while the block runs."""
    if not enabled:
        yield
        return
    with open(path, "a", buffering=1) as copy:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, copy), _Tee(err, copy)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
