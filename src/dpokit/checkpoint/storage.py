"""Where checkpoint directories live and how they appear on disk: all at once or not at all.

Nothing here knows what a checkpoint holds. A save stages its files in a hidden directory
beside its destination (same filesystem, so the final rename is atomic), then `commit` renames
it into place; `LATEST` is a relative symlink to a hidden `.LATEST-*` directory, swapped with
`os.replace`, so once published it is never absent or partial. Names starting with "." are
ours: leftovers of a killed save are swept at start-up and ignored by every reader.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dpokit.errors import CheckpointError

LATEST = "LATEST"
BEST = "best"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
LATEST_DIR_PREFIX = ".LATEST-"
LINK_TMP_PREFIX = ".link-"
TMP_INFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike, fsync: bool = True) -> None:
    """`mkdir -p path`; with `fsync`, each directory made is durable in its parent (a directory's
    new entry survives power loss only once the directory holding it is fsynced)."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        if fsync:
            fsync_dir(new.parent)


def os_failure(action: str, path: str | os.PathLike, err: OSError) -> CheckpointError:
    return CheckpointError(f"cannot {action} {path}: {err.strerror or err}")


# ============================================================================================
# one file, atomically


@dataclass
class FileRecord:
    """What the manifest records of a file: its size and checksum (and step, for contract files)."""

    size: int
    xxh3_64: str
    step_idx: int | None = None


class _HashingWriter:
    """File wrapper that checksums bytes as they are written (no second read)."""

    def __init__(self, f: BinaryIO) -> None:
        import xxhash

        self.f, self.hash, self.size = f, xxhash.xxh3_64(), 0
        self.error: OSError | None = None  # torch.save re-raises write errors as RuntimeError

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(data)
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any], fsync: bool = True) -> FileRecord:
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
            raise os_failure("write", path, os_error) from None
        raise
    return FileRecord(writer.size, writer.hash.hexdigest())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> FileRecord:
    return atomic_write(path, lambda f: f.write(data), fsync)


# ============================================================================================
# directories


def link_target(path: Path) -> str | None:
    return os.readlink(path) if path.is_symlink() else None


class Storage:
    """Staging, publishing, links, removal and sweeping of the directories under one root."""

    def __init__(self, root: str | os.PathLike, fsync: bool = True) -> None:
        self.root, self.fsync = Path(root), fsync

    def stage(self, parent: Path | None = None, name: str | None = None) -> Path:
        """A fresh hidden staging directory in `parent` (default: the root); `name` lets several
        processes agree on one."""
        parent = Path(parent) if parent is not None else self.root
        staging = parent / (name or f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
        try:
            make_dirs(parent, self.fsync)
            staging.mkdir()
        except OSError as err:
            raise os_failure("create", staging, err) from None
        return staging

    @staticmethod
    def discard(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, name: str, parent: Path | None = None) -> Path:
        """Move a sealed staging directory into place as `name` (LATEST: through its link)."""
        parent = Path(parent) if parent is not None else self.root
        try:
            if self.fsync:
                fsync_dir(staging)
            if name == LATEST:
                self._swap_latest(staging, parent)
            else:
                self._replace_dir(staging, parent / name)
        except OSError as err:
            self.discard(staging)
            raise os_failure("publish checkpoint", parent / name, err) from None
        except BaseException:
            self.discard(staging)
            raise
        return parent / name

    def _swap_latest(self, staging: Path, parent: Path) -> None:
        link = parent / LATEST
        real = parent / f"{LATEST_DIR_PREFIX}{uuid.uuid4().hex[:12]}"
        os.rename(staging, real)
        if link.is_dir() and not link.is_symlink():
            # A plain LATEST directory (written by the reference or by hand): move it aside once.
            os.rename(link, parent / f"{TRASH_PREFIX}{LATEST}-{uuid.uuid4().hex[:8]}")
        old = link_target(link)
        self._replace_link(link, real.name)
        if old is not None and old.startswith(LATEST_DIR_PREFIX):
            shutil.rmtree(parent / old, ignore_errors=True)
        self._empty_trash(parent)

    def _replace_dir(self, staging: Path, target: Path) -> None:
        if target.exists() or target.is_symlink():
            # A directory of the same name (e.g. re-saving a step after resuming from an earlier
            # one): move it aside; until the new one is renamed in, the name is simply absent.
            os.rename(target, target.parent / f"{TRASH_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}")
        os.rename(staging, target)
        if self.fsync:
            fsync_dir(target.parent)
        self._empty_trash(target.parent)

    def _replace_link(self, link: Path, target_name: str) -> None:
        tmp_link = link.parent / f"{LINK_TMP_PREFIX}{uuid.uuid4().hex[:8]}"
        os.symlink(target_name, tmp_link)
        os.replace(tmp_link, link)
        if self.fsync:
            fsync_dir(link.parent)

    def point(self, link_name: str, target_name: str | None) -> None:
        """Make root/link_name a relative link to target_name (None: remove the link)."""
        link = self.root / link_name
        if target_name is None:
            if link.is_symlink():
                link.unlink()
            return
        if link_target(link) != target_name:
            self._replace_link(link, target_name)

    def remove(self, name: str) -> None:
        """Delete root/name; renamed first, so a half-deleted directory never looks like a checkpoint."""
        trash = self.root / f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self.root / name, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _empty_trash(parent: Path) -> None:
        for p in parent.glob(f"{TRASH_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)

    def leftovers(self) -> list[Path]:
        """What killed saves left behind: staging and trash directories, temporary files and
        links, and hidden LATEST directories that LATEST does not name."""
        if not self.root.is_dir():
            return []
        live = link_target(self.root / LATEST)
        found = []
        for p in self.root.iterdir():
            if (
                p.name.startswith((STAGING_PREFIX, TRASH_PREFIX, LINK_TMP_PREFIX))
                or (p.name.startswith(LATEST_DIR_PREFIX) and p.name != live)
                or p.name.startswith(".")
                and TMP_INFIX in p.name
            ):
                found.append(p)
        return found

    def sweep(self) -> list[str]:
        """Remove the leftovers of killed saves; returns their names."""
        removed = []
        for p in self.leftovers():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
        return removed
