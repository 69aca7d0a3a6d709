"""Cut the power under a training run at chosen operations of its saves, and check what is left.

Each cycle mounts `powerloss_fs.py` over the run's disk, starts `dpokit train` on it (resuming
when the disk holds a checkpoint), and holds the run at one operation, found by observing the
file system's operations, never by timing: the N-th write, fsync, directory fsync, rename or
symlink, the rename that switches `LATEST`, or any operation at random. The run is SIGKILLed
there, everything not yet durable is dropped (the power cut), and the disk is checked:

* every checkpoint directory on it passes `ckpt verify`;
* `LATEST`, once a run reported it saved, is there, complete, and no older than reported;
* every `step-*` checkpoint a run reported saved ("saved checkpoint to ...") is there, complete.

The next cycle resumes from that disk. Points come from a first run that is observed without
a cut (`probe`). With `checkpoint.fsync=false` the same cuts must lose data: the layer is real.
Run directly for the long form:  .venv/bin/python tests/powerloss_harness.py --cuts 40
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Client
from pathlib import Path

from dpokit.checkpoint import checkpoint_dirs, read_manifest, verify_dir

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ARGS = ["model=tiny", "sample_during_eval=false", "max_length=64", "max_prompt_length=32", "n_eval_examples=4",
        "eval_batch_size=4", "batch_size=4", "eval_every=8", "do_first_eval=false", "minimum_log_interval_secs=0",
        "lr=1e-3", "exp_name=powerloss"]  # fmt: skip
EXAMPLES = 24  # the first run's length; each cycle after LATEST exists adds a step
TIMEOUT = 300.0  # seconds for any state to be reached; generous, so that a loaded machine only takes longer
SAVED = re.compile(r"^saved checkpoint to (\S+)")
KINDS = ("write", "fsync", "fsyncdir", "rename", "symlink", "latest", "any")


def fuse_unavailable() -> str | None:
    """Why the power-loss layer cannot run here, or None."""
    try:
        import mfusepy  # noqa: F401  (loads libfuse3)
    except (ImportError, OSError, AttributeError) as err:
        return f"mfusepy/libfuse3 not usable: {err}"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and no fusermount3 (Debian package fuse3)"
    return None


class Mount:
    """A mounted powerloss_fs over `work/disk` at `work/mnt`, and its control connection."""

    def __init__(self, work: Path, freeze: str | None) -> None:
        self.disk, self.point, control = work / "disk", work / "mnt", work / "control.sock"
        self.disk.mkdir(parents=True, exist_ok=True)
        self.point.mkdir(exist_ok=True)
        shadow = work / "shadow"
        shutil.rmtree(shadow, ignore_errors=True)
        control.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / "powerloss_fs.py"), str(self.disk), str(self.point), str(control),
               "--shadow", str(shadow), *(["--freeze", freeze] if freeze else [])]  # fmt: skip
        self.log_file = work / "fs.log"
        with open(self.log_file, "wb") as log:
            self.server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (os.path.ismount(self.point) and control.exists()):
            if self.server.poll() is not None or time.monotonic() > deadline:
                self.server.kill()
                raise RuntimeError(f"powerloss_fs did not mount: {self.log_file.read_text()[-2000:]}")
            time.sleep(0.01)
        self.conn = Client(str(control), family="AF_UNIX", authkey=b"powerloss")

    def request(self, *request: object) -> object:
        self.conn.send(request)
        return self.conn.recv()

    def unmount(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.request("release")  # a held operation would keep the mount busy
        self.conn.close()
        for flags in (["-u"], ["-uz"]):  # lazily if something still holds it
            if subprocess.run(["fusermount3", *flags, str(self.point)], capture_output=True).returncode == 0:
                break
        try:
            self.server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()


@contextmanager
def mounted(work: Path, freeze: str | None = None) -> Iterator[Mount]:
    mount = Mount(work, freeze)
    try:
        yield mount
    finally:
        mount.unmount()


@dataclass
class Report:
    cuts: int = 0
    points: dict[str, int] = field(default_factory=dict)  # cuts per kind of operation held
    lost: list[str] = field(default_factory=list)  # reported saves not on the disk after a cut
    damaged: list[str] = field(default_factory=list)  # checkpoint directories that fail verification
    runs_failed: list[str] = field(default_factory=list)  # runs that ended on their own with an error
    checkpoints_seen: int = 0

    def as_dict(self) -> dict:
        return {"cuts": self.cuts, "points": self.points, "damaged": len(self.damaged),
                "lost_reported_saves": len(self.lost), "runs_failed": len(self.runs_failed),
                "checkpoints_checked": self.checkpoints_seen,
                "details": self.damaged + self.lost + self.runs_failed}  # fmt: skip


def _command(run_dir: Path, examples: int, extra: list[str], nproc: int) -> list[str]:
    train = [*ARGS, *extra, f"n_examples={examples}", f"local_run_dir={run_dir}", "resume=auto"]
    if nproc == 1:
        return [str(BIN / "dpokit"), "train", *train]
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
            "--no-python", str(BIN / "dpokit"), "train", "trainer=FSDPTrainer", *train]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def probe(work: Path, extra: list[str], nproc: int = 1, examples: int = EXAMPLES) -> list[tuple[str, str]]:
    """The operations of a whole run on the layer, uncut (on a disk of its own)."""
    work.mkdir(parents=True, exist_ok=True)
    with mounted(work) as mount:
        cmd = _command(mount.point / "run", examples, extra, nproc)
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"probe run failed: {done.stderr[-3000:]}")
        log = mount.request("log")
    return log  # type: ignore[return-value]


def freeze_spec(kind: str, ops: list[tuple[str, str]], rng: random.Random) -> str:
    """A `--freeze` spec for one operation of `kind`, drawn from a probe's operations (the save
    protocol's, for the kinds a save does; any at all for `any`)."""
    if kind == "latest":  # the switch of LATEST to a new directory
        n = sum(1 for k, p in ops if k == "rename" and p.endswith("/LATEST"))
        return f"rename:{rng.randint(1, max(n, 1))}:/LATEST$"
    if kind == "any":
        return f"any:{rng.randint(1, len(ops))}"
    saves = r"/(\.staging-|\.LATEST-|step-|LATEST|\.link-)"  # inside a save, or its publishing
    n = sum(1 for k, p in ops if k == kind and re.search(saves, p))
    return f"{kind}:{rng.randint(1, max(n, 1))}:{saves}"


def _reported(stdout: str, mount_point: Path, disk: Path) -> list[Path]:
    saved = []
    for line in stdout.splitlines():
        if m := SAVED.match(line.strip()):
            saved.append(disk / Path(m.group(1)).relative_to(mount_point))
    return saved


def cut_cycle(work: Path, spec: str | None, examples: int, extra: list[str], report: Report, nproc: int = 1,
              reported_before: dict | None = None) -> dict:  # fmt: skip
    """One run on the layer, held at `spec` (None: run to its end), killed, the power cut; then
    the disk checked.
    `reported_before`: saves reported by earlier cycles on this disk (name -> step), updated."""
    reported_before = reported_before if reported_before is not None else {}
    out_file = work / "stdout.txt"
    with mounted(work, spec) as mount:
        run_dir = mount.point / "run"
        with open(out_file, "wb") as out:  # a file, not a pipe: nothing the run writes can block it
            proc = subprocess.Popen(_command(run_dir, examples, extra, nproc), stdout=out,
                                    stderr=subprocess.STDOUT, env=_env(), start_new_session=True)  # fmt: skip
        deadline, held = time.monotonic() + TIMEOUT, None
        while spec is not None and held is None and proc.poll() is None:
            held = mount.request("wait_frozen", 0.2)
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"the run never reached {spec} within {TIMEOUT:.0f} s")
        if spec is None:
            proc.wait(timeout=TIMEOUT)
        tree = _tree(proc.pid)
        for pid in tree:  # torchrun's workers are in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # pending until the held operation returns
        mount.request("cut")  # the power goes at the held operation (or after the run ended)
        proc.wait()
        _wait_gone(tree)
    stdout = out_file.read_text(errors="replace")
    if held is None and proc.returncode != 0:
        report.runs_failed.append(f"{spec}: run exited {proc.returncode}: {stdout.strip().splitlines()[-1:]}")
    report.cuts += 1
    kind = ("latest" if spec.endswith("/LATEST$") else spec.split(":")[0]) if spec and held else "after the run ended"
    report.points[kind] = report.points.get(kind, 0) + 1
    disk_run = mount.disk / "run"
    for path in _reported(stdout, mount.point, mount.disk):
        # LATEST is saved after the run's last step: its step is the examples the run trains on
        reported_before[path.name] = examples if path.name == "LATEST" else 0
    for name, step in sorted(reported_before.items()):
        path = disk_run / name
        if not path.is_dir():
            report.lost.append(f"cut at {held}: {name} had been reported saved and is gone")
        elif name == "LATEST" and (_step_of(path) or -1) < step:
            report.lost.append(f"cut at {held}: LATEST holds step {_step_of(path)}, step {step} had been reported")
    if disk_run.is_dir():
        for _, path in checkpoint_dirs(disk_run):
            report.checkpoints_seen += 1
            if problem := verify_dir(path):
                report.damaged.append(f"cut at {held}: {path.name}: {problem}")
    return held or {}


def _tree(pid: int) -> list[int]:
    """pid and every process below it."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").is_dir() else []:
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + TIMEOUT
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.01)


def _step_of(ckpt: Path) -> int | None:
    manifest = read_manifest(ckpt) if ckpt.is_dir() else None
    return manifest.get("step") if manifest else None


def last_save(ops: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The operations from the start of a run's last save (of LATEST) to its end: what a resumed
    run that trains one more step does around its saves."""
    start = max(i for i, (k, p) in enumerate(ops) if k == "mkdir" and "/.staging-" in p)
    return ops[start:]


def run(work: Path, cuts: int, seed: int = 0, extra: list[str] | None = None, nproc: int = 1,
        kinds: tuple[str, ...] = KINDS) -> Report:  # fmt: skip
    """`cuts` cycles, one kind of held operation after another (`kinds`). Each round of
    len(kinds) cycles starts a new run directory, fresh (cut anywhere in a whole run), then
    resumes it after every cut, extending it by a step so that each cycle saves LATEST again
    (cut inside those saves)."""
    extra = extra or []
    rng = random.Random(seed)
    ops = probe(work / "probe", extra, nproc)
    shutil.rmtree(work / "probe", ignore_errors=True)
    report, reported, examples = Report(), {}, EXAMPLES
    for i in range(cuts):
        if i % len(kinds) == 0:
            shutil.rmtree(work / "disk", ignore_errors=True)  # a new run, on a new disk
            reported, examples = {}, EXAMPLES
        resumed = (work / "disk" / "run" / "LATEST").exists()
        examples += 4 if resumed else 0
        spec = freeze_spec(kinds[i % len(kinds)], last_save(ops) if resumed else ops, rng)
        cut_cycle(work, spec, examples, extra, report, nproc, reported)
    return report


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=1, help="processes (FSDPTrainer under torchrun when > 1)")
    parser.add_argument("extra", nargs="*", help="more dpokit train arguments, e.g. checkpoint.async=true")
    args = parser.parse_args()
    if reason := fuse_unavailable():
        raise SystemExit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        result = run(Path(tmp), args.cuts, args.seed, args.extra, args.nproc)
        print(json.dumps({**result.as_dict(), "seconds": round(time.time() - t0)}, indent=1))
