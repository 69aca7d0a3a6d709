"""Power loss, not only killed processes: a FUSE layer drops what was not made durable.

The layer (powerloss_fs.py) is checked first, then training runs on it are held at operations
of their saves, killed, and the power cut (powerloss_harness.py): no checkpoint is damaged and
none that was reported saved is lost. The long form: `python tests/powerloss_harness.py`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from powerloss_harness import Report, cut_cycle, fuse_unavailable, mounted, run

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None, reason=f"power-loss layer: {fuse_unavailable()}")


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def test_layer_keeps_what_was_fsynced_and_drops_the_rest(tmp_path):
    """Unsynced data disappears, fsynced data survives, a rename (unlink, symlink, mkdir) is
    undone unless its directory was fsynced; after the cut every operation fails."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "old").write_bytes(b"on the disk before the mount")
    with mounted(tmp_path) as mount:
        m = mount.point
        _write(m / "synced", b"data and name made durable", fsync=True)
        _write(m / "name-only", b"data never fsynced", fsync=False)
        _write(m / "renamed-synced", b"r1", fsync=True)
        _write(m / "renamed-unsynced", b"r2", fsync=True)
        _write(m / "removed", b"x", fsync=True)
        _sync(m)
        _write(m / "synced", b"rewritten in place, not fsynced", fsync=False)
        os.rename(m / "renamed-synced", m / "r1")
        _sync(m)
        _write(m / "never-named", b"fsynced, its directory not", fsync=True)
        os.rename(m / "renamed-unsynced", m / "r2")
        os.unlink(m / "removed")
        os.symlink("synced", m / "link")
        (m / "sub").mkdir()
        (m / "sub" / "inner").write_bytes(b"in a directory never fsynced")
        os.unlink(m / "old")
        assert sorted(p.name for p in m.iterdir()) == sorted(
            ["synced", "name-only", "r1", "r2", "link", "sub", "never-named"]
        )
        outcome = mount.request("cut")
        assert isinstance(outcome, dict) and outcome["entries_after"] < outcome["entries_before"]
        with pytest.raises(OSError):
            os.listdir(m)
    disk = tmp_path / "disk"
    assert sorted(p.name for p in disk.iterdir()) == sorted(
        ["old", "synced", "name-only", "r1", "renamed-unsynced", "removed"]
    )
    assert (disk / "synced").read_bytes() == b"data and name made durable"
    assert (disk / "name-only").read_bytes() == b""  # its name was durable, its data never was
    assert (disk / "r1").read_bytes() == b"r1" and (disk / "renamed-unsynced").read_bytes() == b"r2"
    assert (disk / "old").read_bytes() == b"on the disk before the mount"


def test_layer_holds_the_chosen_operation_until_released(tmp_path):
    """The freeze point stops the caller inside the N-th fsync, after it took effect."""
    (tmp_path / "disk").mkdir()
    with mounted(tmp_path, freeze="fsync:2") as mount:
        script = textwrap.dedent(f"""
            import os
            for name in ("a", "b", "c"):
                with open({str(mount.point)!r} + "/" + name, "wb") as f:
                    f.write(name.encode()); f.flush(); os.fsync(f.fileno())
        """)
        proc = subprocess.Popen([sys.executable, "-c", script])
        held = mount.request("wait_frozen", 120.0)
        assert isinstance(held, dict) and held["kind"] == "fsync" and held["path"] == "/b"
        # stopped inside the fsync of b (the mount itself is not looked at: its one thread is held)
        assert proc.poll() is None
        assert [op for op in mount.request("log") if op[1] == "/c"] == []  # type: ignore[union-attr]
        mount.request("release")
        assert proc.wait(timeout=120) == 0
        assert (mount.point / "c").read_bytes() == b"c"


def _assert_clean(report: Report, cuts: int) -> None:
    assert report.damaged == [] and report.lost == [] and report.runs_failed == [], report.as_dict()
    assert report.cuts == cuts and report.checkpoints_seen > 0
    assert report.points.get("after the run ended", 0) < cuts, report.points  # cuts really landed in runs


def test_power_cut_inside_saves_damages_nothing_and_loses_no_reported_checkpoint(tmp_path):
    """The default configuration, held once at each kind of operation of the save protocol (a
    write, an fsync, a directory fsync, a rename, the LATEST link's symlink and its switch) and
    at a random operation, each followed by a power cut and a resume from what is left."""
    report = run(tmp_path, cuts=7, seed=0)
    _assert_clean(report, 7)
    assert sum(n for kind, n in report.points.items() if kind != "after the run ended") >= 5, report.points


@pytest.mark.parametrize("extra", [["checkpoint.async=true"], ["checkpoint.async=true", "checkpoint.format=sharded"]])
def test_power_cut_inside_background_saves(tmp_path, extra):
    report = run(tmp_path, cuts=3, seed=1, extra=extra, kinds=("fsync", "latest", "any"))
    _assert_clean(report, 3)


def test_power_cut_inside_sharded_saves_of_two_processes(tmp_path):
    report = run(
        tmp_path, cuts=3, seed=2, extra=["checkpoint.format=sharded"], nproc=2, kinds=("fsync", "rename", "latest")
    )
    _assert_clean(report, 3)


def test_without_fsync_a_power_cut_loses_reported_checkpoints(tmp_path):
    """checkpoint.fsync=false keeps crash safety against killed processes only: the same power
    cut after a finished run loses what it reported saved. With fsync it loses nothing."""
    for fsync, must_lose in (("false", True), ("true", False)):
        work = tmp_path / fsync
        work.mkdir()
        report = Report()
        cut_cycle(work, None, 16, [f"checkpoint.fsync={fsync}"], report)
        assert report.damaged == [] and report.runs_failed == [], report.as_dict()
        assert bool(report.lost) == must_lose, report.as_dict()
        if must_lose:
            assert any("LATEST" in line for line in report.lost) and any("step-8" in line for line in report.lost)
