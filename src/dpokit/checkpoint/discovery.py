"""What a path given by a user is, and which checkpoint it means.

One place decides it for every caller (training, resume, `model.archive`, the `ckpt` tools):
a contract file (`policy.pt`), a checkpoint directory, or a run directory (its checkpoints are
`step-*` and `LATEST`; the newest complete one is chosen, damaged newer ones are reported).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dpokit.checkpoint.format import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    OPTIMIZER,
    POLICY,
    SCHEDULER,
    TRAINER_STATE,
    is_adapter_only,
    is_sharded,
    load_payload,
    manifest_step,
    read_manifest,
    verify_dir,
)
from dpokit.checkpoint.storage import LATEST
from dpokit.errors import CheckpointError

STEP_PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def step_of(name: str) -> int | None:
    if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX) :].isdigit():
        return int(name[len(STEP_PREFIX) :])
    return None


class PathKind(enum.Enum):
    MISSING = "missing"
    FILE = "file"
    CHECKPOINT = "checkpoint directory"
    RUN = "run directory"
    OTHER_DIR = "directory"


def kind_of(path: Path) -> PathKind:
    if not path.exists():
        return PathKind.MISSING
    if path.is_file():
        return PathKind.FILE
    if (path / POLICY).is_file() or (path / "manifest.json").is_file():
        return PathKind.CHECKPOINT
    if (path / LATEST).exists() or any(step_of(p.name) is not None for p in path.iterdir()):
        return PathKind.RUN
    return PathKind.OTHER_DIR


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every visible checkpoint directory in a run directory, newest first."""
    found = []
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        if p.name.startswith("."):
            continue
        if (p.name == LATEST or step_of(p.name) is not None) and p.is_dir():
            step = manifest_step(p) if p.name == LATEST else step_of(p.name)
            # an unreadable LATEST still counts (last), so that verification reports it
            found.append((step if step is not None else -1, p))
    # at equal steps prefer LATEST: it is the end-of-training state
    return sorted(found, key=lambda sp: (sp[0], sp[1].name == LATEST), reverse=True)


def newest_complete(run_dir: Path, checksums: bool = True, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint directory that verifies; damaged newer ones are reported loudly."""
    for _, path in checkpoint_dirs(run_dir):
        problem = verify_dir(path, checksums=checksums)
        if problem is None:
            return path
        log(f"WARNING: skipping damaged checkpoint {path}: {problem}")
    return None


Purpose = Literal["archive", "resume", "weights"]


def locate(path: str | Path, purpose: Purpose, log: Callable[[str], None] = print, checksums: bool = True) -> Path:
    """The checkpoint a user means by `path`.

    archive / weights: the file holding the policy's weights (a file, a checkpoint directory, or
    a run directory's LATEST, else its newest complete checkpoint): its `policy.pt`, or for a
    LoRA checkpoint without merged weights its adapter file (`dpokit.weights` merges it).
    resume: the checkpoint directory, verified (a run directory: its newest complete checkpoint; checksums=False: verified
    without reading the files through).
    """
    p = Path(path).expanduser()
    kind = kind_of(p)
    what = {"archive": "model.archive", "resume": "resume path", "weights": "checkpoint"}[purpose]
    if kind is PathKind.MISSING:
        raise CheckpointError(f"{what} {p} does not exist")
    if purpose == "resume":
        ckpt = p.parent if kind is PathKind.FILE else p
        if kind_of(ckpt) is PathKind.CHECKPOINT:
            problem = verify_dir(ckpt, checksums=checksums)
            if problem is not None:
                raise CheckpointError(f"cannot resume from {ckpt}: {problem}")
            return ckpt
        found = newest_complete(ckpt, checksums=checksums, log=log)
        if found is None:
            raise CheckpointError(f"resume path {p} holds no complete checkpoint")
        return found
    if kind is PathKind.FILE:
        return p
    if kind is PathKind.CHECKPOINT:
        return _policy_file(p, what)
    if (p / LATEST / POLICY).is_file() or _layout_without_policy(p / LATEST):
        return _policy_file(p / LATEST, what)
    newest = newest_complete(p, checksums=False, log=log) if kind is PathKind.RUN else None
    if newest is not None:
        return _policy_file(newest, what)
    raise CheckpointError(f"{what} {p} is a directory with no policy.pt, LATEST or step-* checkpoint")


def _manifest_or_none(ckpt_dir: Path) -> dict | None:
    try:
        return read_manifest(ckpt_dir) if ckpt_dir.is_dir() else None
    except CheckpointError:
        return None


def _layout_without_policy(ckpt_dir: Path) -> bool:
    manifest = _manifest_or_none(ckpt_dir)
    return is_sharded(manifest) or is_adapter_only(manifest)


def checkpoint_dir_of(weights: Path) -> Path:
    """The checkpoint directory of a file `locate` returned for archive / weights."""
    in_adapter_dir = weights.name == Path(ADAPTER_WEIGHTS).name and weights.parent.name == ADAPTER_DIR
    return weights.parent.parent if in_adapter_dir else weights.parent


def _policy_file(ckpt_dir: Path, what: str) -> Path:
    if (ckpt_dir / POLICY).is_file():
        return ckpt_dir / POLICY
    if is_adapter_only(_manifest_or_none(ckpt_dir)):
        return ckpt_dir / ADAPTER_WEIGHTS
    if is_sharded(_manifest_or_none(ckpt_dir)):
        raise CheckpointError(
            f"{what} {ckpt_dir} is a sharded checkpoint (checkpoint.format=sharded), which has no policy.pt; "
            f"turn it into one with: dpokit ckpt consolidate {ckpt_dir} OUT_DIR"
        )
    raise CheckpointError(f"{what} {ckpt_dir} has no policy.pt")


def run_config_of(ckpt_dir: Path) -> dict | None:
    """The config of the run that wrote a checkpoint: its manifest's, else the run's config.yaml."""
    from omegaconf import OmegaConf

    config = (_manifest_or_none(ckpt_dir) or {}).get("config")
    if config:
        return config
    config_yaml = ckpt_dir.parent / "config.yaml"
    if config_yaml.is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(config_yaml))
        return loaded if isinstance(loaded, dict) else None
    return None


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: a verified checkpoint directory and how far its run had come.
    Decided once, by the first process, and sent to every other."""

    checkpoint: Path
    examples: int  # training examples consumed
    batches: int  # global batches (optimizer steps) consumed

    @property
    def is_end(self) -> bool:
        """LATEST: the state the run ended in (a step-* directory is one of its evaluations)."""
        return self.checkpoint.name == LATEST


def resume_point(ckpt_dir: Path) -> ResumePoint:
    """The resume point at a (located, verified) checkpoint directory; refused in one sentence
    when it lacks what resuming needs beyond the weights (optimizer, scheduler, trainer state),
    before any model is built."""
    from dpokit.checkpoint import sharded

    manifest = _manifest_or_none(ckpt_dir)
    needed = (SCHEDULER, TRAINER_STATE) if is_sharded(manifest) else (OPTIMIZER, SCHEDULER, TRAINER_STATE)
    files = (manifest or {}).get("files", {})
    missing = [name for name in needed if name not in files and not (ckpt_dir / name).is_file()]
    if is_sharded(manifest) and not sharded.has_optimizer(ckpt_dir):
        missing.insert(0, OPTIMIZER)
    if missing:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: it has no {missing[0]} (saved with checkpoint.save_optimizer=false or by "
            f"another tool); start a new run from its weights with model.archive={ckpt_dir} instead"
        )
    state = load_payload(ckpt_dir / TRAINER_STATE)["state"]
    try:
        return ResumePoint(ckpt_dir, int(state["example_counter"]), int(state["batch_counter"]))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: its {TRAINER_STATE} holds no training counters"
        ) from None
