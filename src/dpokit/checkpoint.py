"""The checkpoint store: all checkpoint I/O in dpokit goes through this module.

Format (the DPO reference's contract): a checkpoint directory holds `policy.pt`, `optimizer.pt`
and `scheduler.pt`, each `torch.save({'step_idx': int, 'state': state_dict, 'metrics': dict})`.
Around it we add, without changing it:

* `manifest.json`, written last: files with sizes and xxh3-64 checksums, step, metrics, the run's
  config, library versions, time. A directory is a valid checkpoint only when its manifest is
  there and matches (directories written by the reference have none and are checked by loading).
* `trainer_state.pt`: counters, RNG states and data position, for exact resume.
* Crash safety: files go to a hidden staging directory in the run directory (temporary name,
  flush, fsync, rename), the manifest last, the staging directory is fsynced and renamed into
  place, then the run directory is fsynced. `LATEST` is a relative symlink to a hidden
  directory, swapped with os.replace, so it is never absent or half-written once published.
  Leftovers of a killed save (`.staging-*`, `.trash-*`, orphaned `.LATEST-*`) are swept at
  start-up and ignored by every reader.
* Retention: keep the newest N and/or best K `step-*` directories; deletion happens only after
  the new checkpoint is published, and never touches what LATEST or `best` names.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from dpokit.errors import CheckpointError

CONTRACT_FILES = ("policy.pt", "optimizer.pt", "scheduler.pt")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "LATEST"
BEST = "best"
STEP_PREFIX = "step-"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
LATEST_DIR_PREFIX = ".LATEST-"
LINK_TMP_PREFIX = ".link-"
TMP_INFIX = ".tmp-"
MANIFEST_FORMAT = "dpokit-checkpoint"
MANIFEST_VERSION = 1
_CHUNK = 1 << 22


# ============================================================================================
# storage layer: atomic writes, fsync, checksums, safe reads


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """File wrapper that checksums bytes as torch.save writes them (no second read)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.hash, self.size = f, xxhash.xxh3_64(), 0
        self.error: OSError | None = None  # torch.save re-raises write errors as RuntimeError

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


@dataclass
class FileRecord:
    size: int
    xxh3_64: str
    step_idx: int | None = None


def _fail(action: str, path: str | os.PathLike, err: OSError) -> CheckpointError:
    reason = err.strerror or str(err)
    return CheckpointError(f"cannot {action} {path}: {reason}")


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], fsync: bool = True) -> FileRecord:
    """Write `path` so that it is either absent/old or complete/new, whatever happens."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{uuid.uuid4().hex[:8]}")
    writer: _HashingWriter | None = None
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        os_error = err if isinstance(err, OSError) else (writer.error if writer is not None else None)
        if os_error is not None:
            raise _fail("write", path, os_error) from None
        raise
    return FileRecord(writer.size, writer.hash.hexdigest())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> FileRecord:
    return atomic_write(path, lambda f: f.write(data), fsync)


def checksum_file(path: str | os.PathLike) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_payload(
    path: str | os.PathLike, step: int, state: Any, metrics: dict | None, fsync: bool = True
) -> FileRecord:
    """One contract file: torch.save({'step_idx', 'state', 'metrics'}), atomically."""
    payload = {"step_idx": step, "state": state, "metrics": metrics if metrics is not None else {}}
    record = atomic_write(path, lambda f: torch.save(payload, f), fsync)
    record.step_idx = step
    return record


def load_payload(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a contract file with weights_only=True, turning every failure into one sentence."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint file {path} is a directory")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise _fail("read", path, err) from None
    # torch.save writes a zip archive (PK..); files of torch < 1.6 start with a pickle opcode
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        what = "it is empty" if not magic else f"it starts with {magic!r}"
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({what})")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} needs arbitrary pickle to load (it stores Python objects, not only tensors), which dpokit "
                f'refuses for safety; if you trust the file, convert it with: python -c "import torch; '
                f"p=torch.load('{path}', weights_only=False); torch.save(p, '{path}.converted')\""
            ) from None
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({_first_line(err)})") from None
    except Exception as err:  # torch reports damaged archives with many exception types
        raise CheckpointError(
            f"{path} is truncated or not a torch checkpoint ({type(err).__name__}: {_first_line(err)})"
        ) from None
    if not isinstance(payload, dict) or "state" not in payload or "step_idx" not in payload:
        kind = f"dict with keys {sorted(payload)[:5]}" if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a dpokit/DPO-reference checkpoint: expected a dict with 'step_idx', "
            f"'state' and 'metrics', found a {kind}"
        )
    return payload


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


# ============================================================================================
# checkpoint directories: manifest, verification, discovery


def library_versions() -> dict[str, str]:
    import transformers

    from dpokit import __version__

    return {
        "dpokit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def read_manifest(ckpt_dir: str | os.PathLike) -> dict | None:
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({_first_line(err)})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointError(f"{path} is not a dpokit manifest")
    return manifest


def verify_dir(ckpt_dir: str | os.PathLike, checksums: bool = True) -> str | None:
    """None if the directory is a complete checkpoint, else a one-line reason.

    With a manifest: every listed file exists with its size (and checksum). Without one (written by
    the reference): policy.pt and any optimizer.pt/scheduler.pt load and agree on step_idx.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return f"{ckpt_dir} is not a directory"
    try:
        manifest = read_manifest(ckpt_dir)
    except CheckpointError as err:
        return str(err)
    if manifest is not None:
        if "policy.pt" not in manifest["files"]:
            return f"{ckpt_dir / MANIFEST} lists no policy.pt"
        steps = {name: rec.get("step_idx") for name, rec in manifest["files"].items() if name in CONTRACT_FILES}
        if len(set(steps.values())) > 1:
            return f"{ckpt_dir} mixes steps: " + ", ".join(f"{k} has step {v}" for k, v in sorted(steps.items()))
        for name, rec in manifest["files"].items():
            path = ckpt_dir / name
            if not path.is_file():
                return f"{path} is missing"
            size = path.stat().st_size
            if size != rec["size"]:
                return f"{path} has {size} bytes, the manifest says {rec['size']}"
            if checksums and checksum_file(path) != rec["xxh3_64"]:
                return f"{path} does not match its checksum in the manifest"
        return None
    if not (ckpt_dir / "policy.pt").is_file():
        return f"{ckpt_dir} has no policy.pt and no manifest"
    steps = {}
    for name in CONTRACT_FILES:
        if (ckpt_dir / name).is_file():
            try:
                steps[name] = load_payload(ckpt_dir / name)["step_idx"]
            except CheckpointError as err:
                return str(err)
    if len(set(steps.values())) > 1:
        return f"{ckpt_dir} mixes steps: " + ", ".join(f"{k} has step {v}" for k, v in steps.items())
    return None


def step_of(name: str) -> int | None:
    if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX) :].isdigit():
        return int(name[len(STEP_PREFIX) :])
    return None


def dir_step(ckpt_dir: Path) -> int | None:
    """The step a checkpoint directory holds (from its manifest, else its policy.pt)."""
    try:
        manifest = read_manifest(ckpt_dir)
        if manifest is not None:
            return int(manifest["step"])
        return int(load_payload(ckpt_dir / "policy.pt")["step_idx"])
    except CheckpointError:
        return None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / LATEST).exists() or any(step_of(p.name) is not None for p in path.iterdir()))


def resolve_archive(path: str | os.PathLike) -> Path:
    """`model.archive` may name a policy.pt, a checkpoint directory, or a run directory (its LATEST)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"model.archive {p} does not exist")
    if (p / "policy.pt").is_file():
        return p / "policy.pt"
    if (p / LATEST / "policy.pt").is_file():
        return p / LATEST / "policy.pt"
    newest = newest_complete(p, checksums=False)
    if newest is not None:
        return newest / "policy.pt"
    raise CheckpointError(f"model.archive {p} is a directory with no policy.pt, LATEST or step-* checkpoint")


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every visible checkpoint directory in a run directory, newest first."""
    found = []
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        if p.name.startswith("."):
            continue
        if (p.name == LATEST or step_of(p.name) is not None) and p.is_dir():
            step = dir_step(p) if p.name == LATEST else step_of(p.name)
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


# ============================================================================================
# retention: plain logic, tested without a disk


def select_retained(
    entries: list[tuple[str, int, float | None]],
    keep_last: int | None,
    keep_best: int | None,
    mode: str = "min",
    protected: frozenset[str] = frozenset(),
) -> set[str]:
    """Names of step directories to keep. entries: (name, step, metric or None).

    No limit set keeps everything. Otherwise the union of the newest keep_last and the best
    keep_best (by metric, `mode` min or max) is kept, plus whatever is protected.
    """
    names = {name for name, _, _ in entries}
    if keep_last is None and keep_best is None:
        return names
    keep = set(protected) & names
    if keep_last is not None:
        keep |= {name for name, _, _ in sorted(entries, key=lambda e: e[1], reverse=True)[:keep_last]}
    if keep_best is not None:
        keep |= {name for name, _ in _ranked(entries, mode)[:keep_best]}
    return keep


def _ranked(entries: list[tuple[str, int, float | None]], mode: str) -> list[tuple[str, int]]:
    """(name, step) of the entries that have a metric, best first; ties go to the newer step."""
    scored = [
        (name, step, metric if mode == "min" else -metric) for name, step, metric in entries if metric is not None
    ]
    return [(name, step) for name, step, _ in sorted(scored, key=lambda e: (e[2], -e[1]))]


def best_of(entries: list[tuple[str, int, float | None]], mode: str) -> str | None:
    ranked = _ranked(entries, mode)
    return ranked[0][0] if ranked else None


# ============================================================================================
# the store


@dataclass
class CheckpointStore:
    """Publishes checkpoint directories in a run directory; the trainer's only way to disk."""

    run_dir: Path
    fsync: bool = True
    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str = "loss/eval"
    best_mode: str = "min"
    config: dict | None = None
    log: Callable[[str], None] = print
    _records: dict[Path, dict[str, FileRecord]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    # -- staging -------------------------------------------------------------------------------

    def begin(self, parent: Path | None = None) -> Path:
        """A fresh hidden staging directory beside its future place (same filesystem, so the
        final rename is atomic); files written into it are recorded for the manifest."""
        parent = Path(parent) if parent is not None else self.run_dir
        staging = parent / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
        except OSError as err:
            raise _fail("create", staging, err) from None
        self._records[staging] = {}
        return staging

    def abort(self, staging: Path) -> None:
        self._records.pop(staging, None)
        shutil.rmtree(staging, ignore_errors=True)

    def write(self, directory: Path, filename: str, step: int, state: Any, metrics: dict | None) -> None:
        """Write one contract file. Into a staging directory it is recorded for the manifest;
        anywhere else the whole directory is republished (copy-on-write), so a published
        checkpoint and its manifest never disagree."""
        directory = Path(directory)
        if directory in self._records:
            self._records[directory][filename] = write_payload(directory / filename, step, state, metrics, self.fsync)
            return
        staging = self.begin(parent=directory.parent)
        try:
            if directory.is_dir():
                # Carried-over files keep their recorded checksums (a file damaged since then
                # stays detectable); files the manifest does not know are hashed now.
                try:
                    known = (read_manifest(directory) or {}).get("files", {})
                except CheckpointError:
                    known = {}
                for old in directory.iterdir():
                    if old.name in (MANIFEST, filename) or old.name.startswith(".") or not old.is_file():
                        continue
                    os.link(old, staging / old.name)
                    rec = known.get(old.name)
                    self._records[staging][old.name] = (
                        FileRecord(**rec)
                        if rec
                        else FileRecord(old.stat().st_size, checksum_file(old), _step_if_contract(old))
                    )
            self._records[staging][filename] = write_payload(staging / filename, step, state, metrics, self.fsync)
            self.publish(staging, directory.name, step, metrics, parent=directory.parent)
        except BaseException:
            self.abort(staging)
            raise

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, staging: Path, name: str, step: int, metrics: dict | None, parent: Path | None = None) -> Path:
        """Seal a staging directory (manifest last, fsync) and move it into place as `name`."""
        parent = Path(parent) if parent is not None else self.run_dir
        records = self._records.pop(staging, {})
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "step": step,
            "files": {k: vars(v) for k, v in sorted(records.items())},
            "metrics": metrics or {},
            "config": self.config,
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            atomic_write_bytes(staging / MANIFEST, json.dumps(manifest, indent=1, default=str).encode(), self.fsync)
            if self.fsync:
                fsync_dir(staging)
            target = parent / name
            if name == LATEST:
                self._swap_latest(staging, parent)
            else:
                self._replace_dir(staging, target)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise _fail("publish checkpoint", parent / name, err) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _swap_latest(self, staging: Path, parent: Path) -> None:
        link = parent / LATEST
        real = parent / f"{LATEST_DIR_PREFIX}{uuid.uuid4().hex[:12]}"
        os.rename(staging, real)
        if link.is_dir() and not link.is_symlink():
            # A plain LATEST directory (written by the reference or by hand): move it aside once.
            os.rename(link, parent / f"{TRASH_PREFIX}{LATEST}-{uuid.uuid4().hex[:8]}")
        old = Path(os.readlink(link)) if link.is_symlink() else None
        tmp_link = parent / f"{LINK_TMP_PREFIX}{uuid.uuid4().hex[:8]}"
        os.symlink(real.name, tmp_link)
        os.replace(tmp_link, link)
        if self.fsync:
            fsync_dir(parent)
        if old is not None and old.name.startswith(LATEST_DIR_PREFIX):
            shutil.rmtree(parent / old.name, ignore_errors=True)
        self._sweep_trash(parent)

    def _replace_dir(self, staging: Path, target: Path) -> None:
        if target.exists() or target.is_symlink():
            # A directory of the same name (e.g. re-saving a step after resuming from an earlier
            # one): move it aside; until the new one is renamed in, the name is simply absent.
            os.rename(target, target.parent / f"{TRASH_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}")
        os.rename(staging, target)
        if self.fsync:
            fsync_dir(target.parent)
        self._sweep_trash(target.parent)

    @staticmethod
    def _sweep_trash(parent: Path) -> None:
        for p in parent.glob(f"{TRASH_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)

    def sweep(self) -> list[str]:
        """Remove leftovers of killed saves; called once at start-up (by rank 0 only)."""
        if not self.run_dir.is_dir():
            return []
        latest = self.run_dir / LATEST
        live = os.readlink(latest) if latest.is_symlink() else None
        removed = []
        for p in self.run_dir.iterdir():
            stale = (
                p.name.startswith((STAGING_PREFIX, TRASH_PREFIX, LINK_TMP_PREFIX))
                or (p.name.startswith(LATEST_DIR_PREFIX) and p.name != live)
                or (TMP_INFIX in p.name and p.name.startswith("."))
            )
            if stale:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    # -- retention -----------------------------------------------------------------------------

    def _entries(self) -> list[tuple[str, int, float | None]]:
        entries = []
        for p in self.run_dir.iterdir():
            step = step_of(p.name)
            if step is None or not p.is_dir():
                continue
            try:
                manifest = read_manifest(p)
            except CheckpointError:
                manifest = None
            metric = (manifest or {}).get("metrics", {}).get(self.best_metric)
            entries.append((p.name, step, float(metric) if isinstance(metric, (int, float)) else None))
        return entries

    def after_publish(self) -> None:
        """Move the `best` pointer and apply retention; runs only after a publish succeeded."""
        entries = self._entries()
        best = best_of(entries, self.best_mode)
        if best is not None:
            link = self.run_dir / BEST
            if not (link.is_symlink() and os.readlink(link) == best):
                tmp_link = self.run_dir / f"{LINK_TMP_PREFIX}{uuid.uuid4().hex[:8]}"
                os.symlink(best, tmp_link)
                os.replace(tmp_link, link)
                if self.fsync:
                    fsync_dir(self.run_dir)
        protected = frozenset(n for n in (best, _link_name(self.run_dir / LATEST)) if n)
        keep = select_retained(entries, self.keep_last, self.keep_best, self.best_mode, protected)
        for name, _, _ in entries:
            if name not in keep:
                # rename first: a half-deleted directory must never look like a checkpoint
                trash = self.run_dir / f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
                os.rename(self.run_dir / name, trash)
                shutil.rmtree(trash, ignore_errors=True)
                self.log(f"retention: removed {self.run_dir / name}")


def _link_name(path: Path) -> str | None:
    return os.readlink(path) if path.is_symlink() else None


def _step_if_contract(path: Path) -> int | None:
    if path.name not in CONTRACT_FILES:
        return None
    try:
        return int(load_payload(path)["step_idx"])
    except CheckpointError:
        return None
