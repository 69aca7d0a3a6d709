"""A FUSE file system that can lose power: on command it drops everything not made durable.

Every operation passes through to a backing directory, so while the power is on the mount
behaves as a local disk does. Beside that, the file system keeps the disk a power cut would
leave, and nothing more:

* a file's data as of its last fsync (a file never fsynced holds nothing);
* a directory's entries (create, mkdir, symlink, link, rename, unlink, rmdir) as of its last
  fsync (a directory never fsynced has no entries).

That is what POSIX promises and no more: none of the extra ordering real file systems happen to
give (ext4's data=ordered journal, an fsync of a new file that also commits its name). A save
protocol that keeps its checkpoints here keeps them on any of them.

Run as a server: `python powerloss_fs.py BACKING MOUNTPOINT CONTROL [--freeze KIND:N[:REGEX]]`.
CONTROL is a Unix socket (multiprocessing.connection) taking these requests:

* `("wait_frozen", seconds)`: the freeze point's description once reached, or None.
  `--freeze KIND:N:REGEX` holds the N-th operation of KIND (any of OPS, or `any`) whose path
  matches REGEX, after it took effect and before it returns: the caller is stopped exactly there.
* `("cut",)`: the power cut. The backing directory becomes the durable tree, every operation
  from then on fails with EIO (a frozen one included), and the reply says what was dropped.
* `("release",)`: let a frozen operation return, power still on.
* `("log",)`: every operation so far, as (kind, path) pairs.
The process ends when the mount is unmounted (`fusermount3 -u MOUNTPOINT`).
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import shutil
import stat
import sys
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import mfusepy as fuse

ROOT = 1
# operations that change the tree or a file's data; `fsync` and `fsyncdir` make things durable
OPS = ("create", "mkdir", "symlink", "link", "rename", "unlink", "rmdir", "write", "truncate", "fsync", "fsyncdir")
AUTHKEY = b"powerloss"


@dataclass
class Node:
    kind: str  # "file", "dir" or "symlink"
    target: str = ""  # a symlink's contents (fixed when it is made)
    entries: dict[str, int] = field(default_factory=dict)  # a directory's names, as they are now


@dataclass
class Freeze:
    kind: str
    n: int
    pattern: re.Pattern
    seen: int = 0
    reached: dict | None = None


def parse_freeze(spec: str) -> Freeze:
    kind, n, *pattern = spec.split(":", 2)
    if kind not in (*OPS, "any"):
        raise SystemExit(f"--freeze: unknown operation {kind!r}; one of {', '.join(OPS)} or any")
    return Freeze(kind, int(n), re.compile(pattern[0] if pattern else ""))


class PowerLossFS(fuse.Operations):
    use_ns = True

    def __init__(self, backing: Path, shadow: Path, freeze: Freeze | None = None) -> None:
        self.backing, self.shadow, self.freeze = backing, shadow, freeze
        self.nodes: dict[int, Node] = {}
        self.durable_entries: dict[int, dict[str, int]] = {}  # directory -> its names at its last fsync
        self.durable_data: dict[int, Path] = {}  # file -> a copy of its data at its last fsync
        self.handles: dict[int, tuple[int, int]] = {}  # open file handle -> (backing fd, node)
        self.log: list[tuple[str, str]] = []
        self._mutex = threading.Lock()  # one operation or one cut at a time (not `lock`: a FUSE operation's name)
        self.released = threading.Event()
        self.frozen = threading.Condition(self._mutex)
        self.dead = False
        self._next = ROOT
        shadow.mkdir(parents=True, exist_ok=True)
        self._adopt(backing)

    # -- the model ----------------------------------------------------------------------------

    def _new(self, kind: str, target: str = "") -> int:
        node, self._next = self._next, self._next + 1
        self.nodes[node] = Node(kind, target)
        return node

    def _adopt(self, backing: Path) -> None:
        """What the backing directory holds at mount time is on the disk already: durable."""
        by_inode: dict[tuple[int, int], int] = {}

        def walk(path: Path, node: int) -> None:
            for child in sorted(path.iterdir()):
                st = child.lstat()
                if stat.S_ISDIR(st.st_mode):
                    new = self._new("dir")
                    walk(child, new)
                elif stat.S_ISLNK(st.st_mode):
                    new = self._new("symlink", os.readlink(child))
                elif (st.st_dev, st.st_ino) in by_inode:
                    new = by_inode[(st.st_dev, st.st_ino)]
                else:
                    new = by_inode[(st.st_dev, st.st_ino)] = self._new("file")
                    shutil.copyfile(child, self.shadow / str(new))
                    self.durable_data[new] = self.shadow / str(new)
                self.nodes[node].entries[child.name] = new
            self.durable_entries[node] = dict(self.nodes[node].entries)

        walk(backing, self._new("dir"))

    def _lookup(self, path: str) -> int:
        node = ROOT
        for part in path.strip("/").split("/") if path.strip("/") else []:
            node = self.nodes[node].entries[part]
        return node

    def _parent(self, path: str) -> tuple[int, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        return self._lookup(head or "/"), name

    def _real(self, path: str) -> str:
        return str(self.backing) + path

    def _sync_file(self, node: int, fd: int) -> None:
        copy = self.shadow / f"{node}.new"
        # the handle may be write-only; /proc reopens the same file (even one already unlinked)
        with open(f"/proc/self/fd/{fd}", "rb") as src, open(copy, "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(copy, self.shadow / str(node))
        self.durable_data[node] = self.shadow / str(node)

    # -- the cut ------------------------------------------------------------------------------

    def cut(self) -> dict:
        """Make the backing directory the durable tree; from now on every operation fails."""
        with self._mutex:
            self.dead = True
            before = sum(1 for _ in self.backing.rglob("*"))
            tree = self.backing.with_name(self.backing.name + ".cut")
            shutil.rmtree(tree, ignore_errors=True)
            tree.mkdir()
            made: dict[int, Path] = {}  # files made so far (hard links stay links)
            placed: set[int] = {ROOT}

            def build(node: int, path: Path) -> None:
                for name, child in sorted(self.durable_entries.get(node, {}).items()):
                    kind, where = self.nodes[child].kind, path / name
                    if kind == "dir":
                        if child in placed:  # durable under two names (a rename not yet synced): keep one
                            continue
                        placed.add(child)
                        where.mkdir()
                        build(child, where)
                    elif kind == "symlink":
                        os.symlink(self.nodes[child].target, where)
                    elif child in made:
                        os.link(made[child], where)
                    else:
                        if child in self.durable_data:
                            shutil.copyfile(self.durable_data[child], where)
                        else:
                            where.touch()  # its name was made durable, its data never was
                        made[child] = where

            build(ROOT, tree)
            lost = self.backing.with_name(self.backing.name + ".lost")
            os.rename(self.backing, lost)
            os.rename(tree, self.backing)
            shutil.rmtree(lost, ignore_errors=True)
            after = sum(1 for _ in self.backing.rglob("*"))
            self.frozen.notify_all()
        self.released.set()
        return {"entries_before": before, "entries_after": after}

    # -- freezing -----------------------------------------------------------------------------

    def _record(self, kind: str, path: str) -> bool:
        """Log an operation that took effect; True if it is the freeze point."""
        self.log.append((kind, path))
        f = self.freeze
        if f is None or f.reached is not None or (f.kind != "any" and f.kind != kind) or not f.pattern.search(path):
            return False
        f.seen += 1
        if f.seen < f.n:
            return False
        f.reached = {"kind": kind, "path": path, "index": len(self.log) - 1}
        self.frozen.notify_all()
        return True

    def wait_frozen(self, seconds: float) -> dict | None:
        with self._mutex:
            self.frozen.wait_for(lambda: self.freeze is not None and self.freeze.reached is not None or self.dead,
                                 timeout=seconds)  # fmt: skip
            return self.freeze.reached if self.freeze is not None else None

    # -- operations ---------------------------------------------------------------------------
    # Each takes the lock, fails once the power is cut, passes through to the backing directory,
    # then updates the model; a mutating one is logged and may be the freeze point.

    def _op(self, kind: str | None, path: str, apply: Any) -> Any:
        with self._mutex:
            if self.dead:
                raise fuse.FuseOSError(errno.EIO)
            try:
                result = apply()
            except OSError as err:
                raise fuse.FuseOSError(err.errno or errno.EIO) from None
            hold = kind is not None and self._record(kind, path)
        if hold:
            self.released.wait()
            if self.dead:
                raise fuse.FuseOSError(errno.EIO)
        return result

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            st = os.lstat(self._real(path))
            keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
            attrs = {k.removesuffix("_ns"): getattr(st, k) for k in keys}
            attrs["st_blocks"], attrs["st_blksize"] = st.st_blocks, st.st_blksize
            return attrs

        return self._op(None, path, apply)

    def readdir(self, path: str, fh: int) -> list[str]:
        return self._op(None, path, lambda: [".", "..", *os.listdir(self._real(path))])

    def readlink(self, path: str) -> str:
        return self._op(None, path, lambda: os.readlink(self._real(path)))

    def statfs(self, path: str) -> dict[str, int]:
        def apply() -> dict[str, int]:
            sv = os.statvfs(self._real(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                    "f_frsize", "f_namemax")  # fmt: skip
            return {k: getattr(sv, k) for k in keys}

        return self._op(None, path, apply)

    def access(self, path: str, amode: int) -> int:
        return self._op(None, path, lambda: 0 if os.access(self._real(path), amode) else -errno.EACCES)

    def chmod(self, path: str, mode: int) -> int:
        return self._op(None, path, lambda: os.chmod(self._real(path), mode))

    def chown(self, path: str, uid: int, gid: int) -> int:
        return self._op(None, path, lambda: os.chown(self._real(path), uid, gid, follow_symlinks=False))

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            return self._op(None, path, lambda: os.utime(self._real(path), follow_symlinks=False))
        return self._op(None, path, lambda: os.utime(self._real(path), ns=times, follow_symlinks=False))

    def mkdir(self, path: str, mode: int) -> int:
        def apply() -> None:
            os.mkdir(self._real(path), mode)
            parent, name = self._parent(path)
            self.nodes[parent].entries[name] = self._new("dir")

        return self._op("mkdir", path, apply)

    def _remove(self, kind: str, path: str, remove: Any) -> int:
        def apply() -> None:
            remove(self._real(path))
            parent, name = self._parent(path)
            del self.nodes[parent].entries[name]

        return self._op(kind, path, apply)

    def rmdir(self, path: str) -> int:
        return self._remove("rmdir", path, os.rmdir)

    def unlink(self, path: str) -> int:
        return self._remove("unlink", path, os.unlink)

    def symlink(self, target: str, source: str) -> int:
        def apply() -> None:  # `target` is the new link's path, `source` what it points to
            os.symlink(source, self._real(target))
            parent, name = self._parent(target)
            self.nodes[parent].entries[name] = self._new("symlink", source)

        return self._op("symlink", target, apply)

    def link(self, target: str, source: str) -> int:
        def apply() -> None:
            os.link(self._real(source), self._real(target))
            parent, name = self._parent(target)
            self.nodes[parent].entries[name] = self._lookup(source)

        return self._op("link", target, apply)

    def rename(self, old: str, new: str) -> int:
        def apply() -> None:
            os.rename(self._real(old), self._real(new))
            (src, src_name), (dst, dst_name) = self._parent(old), self._parent(new)
            node = self.nodes[src].entries[src_name]
            if self.nodes[dst].entries.get(dst_name) != node:  # two names of one file: rename does nothing
                del self.nodes[src].entries[src_name]
                self.nodes[dst].entries[dst_name] = node

        return self._op("rename", f"{old} -> {new}", apply)

    def _handle(self, fd: int, node: int) -> int:
        self.handles[fd] = (fd, node)
        return fd

    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        def apply() -> int:
            parent, name = self._parent(path)
            fd = os.open(self._real(path), flags | os.O_CREAT, mode)
            node = self.nodes[parent].entries.get(name)
            if node is None:
                node = self.nodes[parent].entries[name] = self._new("file")
            return self._handle(fd, node)

        return self._op("create", path, apply)

    def open(self, path: str, flags: int) -> int:
        return self._op(None, path, lambda: self._handle(os.open(self._real(path), flags), self._lookup(path)))

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self._op(None, path, lambda: os.pread(self.handles[fh][0], size, offset))

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self._op("write", path, lambda: os.pwrite(self.handles[fh][0], data, offset))

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is not None:
            return self._op("truncate", path, lambda: os.ftruncate(self.handles[fh][0], length))
        return self._op("truncate", path, lambda: os.truncate(self._real(path), length))

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        fd, _ = self.handles.pop(fh)
        os.close(fd)  # even after the cut: a closed handle holds nothing
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        fd, node = self.handles[fh]
        return self._op("fsync", path, lambda: self._sync_file(node, fd))

    def opendir(self, path: str) -> int:
        return self._op(None, path, lambda: 0)

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        def apply() -> None:
            node = self._lookup(path)
            self.durable_entries[node] = dict(self.nodes[node].entries)

        return self._op("fsyncdir", path, apply)


def _refuse_rename_flags(method: Any) -> Any:
    """mfusepy drops rename(2)'s flags (RENAME_NOREPLACE, RENAME_EXCHANGE); rather than do the
    wrong thing, refuse them, as a file system that lacks them does."""

    @functools.wraps(method)
    def rename(self: Any, old: bytes, new: bytes, flags: int) -> int:
        return -errno.EINVAL if flags else method(self, old, new, flags)

    return rename


fuse.FUSE.rename_fuse_3 = _refuse_rename_flags(fuse.FUSE.rename_fuse_3)  # type: ignore[method-assign]


def _serve_control(fs: PowerLossFS, listener: Listener) -> None:
    with listener:
        while True:
            with listener.accept() as conn:
                while True:
                    try:
                        request = conn.recv()
                    except (EOFError, OSError):
                        break
                    if request[0] == "wait_frozen":
                        conn.send(fs.wait_frozen(request[1]))
                    elif request[0] == "cut":
                        conn.send(fs.cut())
                    elif request[0] == "release":
                        fs.released.set()
                        conn.send(None)
                    elif request[0] == "log":
                        with fs._mutex:
                            conn.send(list(fs.log))
                    else:
                        conn.send(ValueError(f"unknown request {request!r}"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("control", help="Unix socket path for the control requests")
    parser.add_argument("--shadow", type=Path, help="where durable copies are kept (default: BACKING.shadow)")
    parser.add_argument("--freeze", type=parse_freeze, help="KIND:N[:REGEX], e.g. rename:1:/LATEST$")
    args = parser.parse_args(argv)
    backing = args.backing.resolve()
    fs = PowerLossFS(backing, args.shadow or backing.with_name(backing.name + ".shadow"), args.freeze)
    listener = Listener(str(Path(args.control).resolve()), family="AF_UNIX", authkey=AUTHKEY)
    threading.Thread(target=_serve_control, args=(fs, listener), daemon=True).start()
    # one thread: operations are applied, logged and frozen in one order; hard_remove: an
    # unlinked open file is really unlinked (no .fuse_hidden files in the tree)
    fuse.FUSE(fs, str(args.mountpoint), foreground=True, nothreads=True, hard_remove=True, fsname="powerloss")
    sys.exit(0)


if __name__ == "__main__":
    main()
