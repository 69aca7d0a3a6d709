"""The checkpoint store (dpokit.checkpoint): the reference's three-file contract, manifests,
crash-safe publishing, verification, sweeping leftovers, retention and safe loading.

No training here: checkpoint directories are built directly with the checkpoint components, or with plain
torch.save for directories "written by the reference" (three files, no manifest)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import xxhash

from conftest import Store
from dpokit.checkpoint import (
    CONTRACT_FILES,
    atomic_write,
    best_of,
    load_payload,
    locate,
    select_retained,
    verify_dir,
)
from dpokit.errors import CheckpointError

PAYLOAD_KEYS = {"step_idx", "state", "metrics"}


# ============================================================================================
# shared state: the tiny model's weights, an RMSprop state and a LambdaLR state (built once)


@pytest.fixture(scope="module")
def states():
    from dpokit.models import load_model

    model = load_model("tiny", seed=0)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    optimizer.step()
    scheduler.step()
    policy = model.state_dict()
    assert isinstance(policy, OrderedDict)
    return {"policy.pt": policy, "optimizer.pt": optimizer.state_dict(), "scheduler.pt": scheduler.state_dict()}


SMALL = {
    "policy.pt": OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.zeros(3)),
    "optimizer.pt": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
    "scheduler.pt": {"last_epoch": 1, "base_lrs": [1e-3]},
}


def publish(store: Store, name: str, step: int, metrics: dict | None, states: dict, parent: Path | None = None) -> Path:
    return store.publish(name, step, metrics, {f: states[f] for f in CONTRACT_FILES}, parent)


def write_reference(
    directory: Path, step: int, states: dict, metrics: dict | None = None, steps: dict | None = None
) -> Path:
    """A checkpoint directory as the DPO reference writes it: three torch.save files, no manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    for filename in CONTRACT_FILES:
        s = (steps or {}).get(filename, step)
        torch.save({"step_idx": s, "state": states[filename], "metrics": metrics or {}}, directory / filename)
    return directory


def xxh3(path: Path) -> str:
    return xxhash.xxh3_64(path.read_bytes()).hexdigest()


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ============================================================================================
# publishing


def test_published_dir_has_contract_files_and_matching_manifest(tmp_path, states):
    store = Store(tmp_path / "run", config={"model": {"name_or_path": "tiny"}})
    metrics = {"loss/eval": 0.69, "rewards_eval/accuracies": 0.5}
    target = publish(store, "step-64", 64, metrics, states)

    assert target == tmp_path / "run" / "step-64"
    assert sorted(p.name for p in target.iterdir()) == sorted([*CONTRACT_FILES, "manifest.json"])
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["format"] == "dpokit-checkpoint"
    assert manifest["step"] == 64
    assert manifest["metrics"] == metrics
    assert manifest["config"] == {"model": {"name_or_path": "tiny"}}
    assert set(manifest["versions"]) >= {"dpokit", "torch", "transformers", "python"}
    assert set(manifest["files"]) == set(CONTRACT_FILES)
    for filename in CONTRACT_FILES:
        rec, path = manifest["files"][filename], target / filename
        assert rec["size"] == path.stat().st_size
        assert rec["xxh3_64"] == xxh3(path)
        assert rec["step_idx"] == 64
        # readable by the reference's loader and by a weights-only loader
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert set(payload) == PAYLOAD_KEYS
        assert payload["step_idx"] == 64 and payload["metrics"] == metrics
    policy = torch.load(target / "policy.pt", map_location="cpu", weights_only=True)["state"]
    assert_same_state(policy, states["policy.pt"])
    opt = torch.load(target / "optimizer.pt", weights_only=True)["state"]
    assert opt["param_groups"] == states["optimizer.pt"]["param_groups"]
    assert torch.equal(opt["state"][0]["square_avg"], states["optimizer.pt"]["state"][0]["square_avg"])
    assert torch.load(target / "scheduler.pt", weights_only=True)["state"]["last_epoch"] == 1

    # nothing left behind: no staging dir, no temp file, inside or beside the checkpoint
    assert hidden(tmp_path / "run") == []
    assert hidden(target) == []
    assert verify_dir(target) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a checkpoint of CUDA tensors")
def test_what_a_gpu_run_saves_loads_on_a_machine_without_one(tmp_path):
    """A model and optimizer on CUDA, saved: a process that sees no GPU loads the files with
    weights_only=True and no map_location, gets the same values, and the tied embedding is
    still one tensor."""
    import subprocess
    import sys

    from dpokit.checkpoint.format import write_payload
    from dpokit.models import load_model

    model = load_model("tiny", seed=0).cuda()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    optimizer.step()
    states = {"policy.pt": model.state_dict(), "optimizer.pt": optimizer.state_dict()}
    for name, state in states.items():
        write_payload(tmp_path / name, 1, state, {})
    torch.save({k: v.cpu() for k, v in states["policy.pt"].items()}, tmp_path / "expected.pt")
    check = f"""
import torch
policy = torch.load({str(tmp_path / "policy.pt")!r}, weights_only=True)["state"]
optimizer = torch.load({str(tmp_path / "optimizer.pt")!r}, weights_only=True)["state"]
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
assert all(v.device.type == "cpu" for v in policy.values())
assert all(torch.equal(policy[k], expected[k]) for k in expected) and list(policy) == list(expected)
assert policy["lm_head.weight"].data_ptr() == policy["transformer.wte.weight"].data_ptr()
assert all(t.device.type == "cpu" for s in optimizer["state"].values() for t in s.values())
print("ok")
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_metrics_none_is_stored_as_empty_dict(tmp_path):
    store = Store(tmp_path / "run", fsync=False)
    target = publish(store, "LATEST", 3, None, SMALL)
    for filename in CONTRACT_FILES:
        assert torch.load(target / filename, weights_only=True)["metrics"] == {}


def test_latest_is_a_symlink_swapped_on_each_publish(tmp_path, states):
    run = tmp_path / "run"
    store = Store(run)
    publish(store, "LATEST", 10, {"loss/eval": 1.0}, SMALL)
    latest = run / "LATEST"
    assert latest.is_symlink()
    first = os.readlink(latest)
    assert first.startswith(".LATEST-") and "/" not in first  # relative, hidden
    assert (run / first).is_dir()

    publish(store, "LATEST", 20, {"loss/eval": 0.5}, states)
    assert latest.is_symlink()
    second = os.readlink(latest)
    assert second != first and second.startswith(".LATEST-")
    assert not (run / first).exists(), "the old hidden LATEST directory must be deleted"
    assert hidden(run) == [second]
    payload = load_payload(latest / "policy.pt")
    assert payload["step_idx"] == 20 and payload["metrics"] == {"loss/eval": 0.5}
    assert_same_state(payload["state"], states["policy.pt"])
    assert json.loads((latest / "manifest.json").read_text())["step"] == 20
    assert verify_dir(latest) is None


def test_plain_reference_latest_directory_is_replaced(tmp_path, states):
    run = tmp_path / "run"
    write_reference(run / "LATEST", 5, SMALL)
    (run / "LATEST" / "notes.txt").write_text("from the reference")
    store = Store(run)
    publish(store, "LATEST", 40, {"loss/eval": 0.25}, states)

    latest = run / "LATEST"
    assert latest.is_symlink()
    assert sorted(p.name for p in latest.iterdir()) == sorted([*CONTRACT_FILES, "manifest.json"])
    for filename in CONTRACT_FILES:
        assert load_payload(latest / filename)["step_idx"] == 40
    assert_same_state(load_payload(latest / "policy.pt")["state"], states["policy.pt"])
    assert hidden(run) == [os.readlink(latest)], "the old plain LATEST must not linger in the trash"
    assert verify_dir(latest) is None


def test_publishing_an_existing_step_dir_replaces_it_whole(tmp_path, states):
    run = tmp_path / "run"
    store = Store(run)
    old = publish(store, "step-8", 8, {"loss/eval": 2.0}, SMALL)
    (old / "stale.bin").write_bytes(b"from the first save")
    new = publish(store, "step-8", 8, {"loss/eval": 1.0}, states)

    assert new == old
    assert sorted(p.name for p in new.iterdir()) == sorted([*CONTRACT_FILES, "manifest.json"])
    assert_same_state(load_payload(new / "policy.pt")["state"], states["policy.pt"])
    assert json.loads((new / "manifest.json").read_text())["metrics"] == {"loss/eval": 1.0}
    assert hidden(run) == []
    assert verify_dir(new) is None


def test_publish_into_other_parent(tmp_path):
    store = Store(tmp_path / "run", fsync=False)
    target = publish(store, "export-ckpt", 7, {}, SMALL, parent=tmp_path / "elsewhere")
    assert target == tmp_path / "elsewhere" / "export-ckpt"
    assert verify_dir(target) is None
    assert hidden(tmp_path / "elsewhere") == []


def test_write_into_published_dir_is_copy_on_write(tmp_path, states):
    run = tmp_path / "run"
    store = Store(run)
    target = publish(store, "step-16", 16, {"loss/eval": 0.7}, states)
    before = json.loads((target / "manifest.json").read_text())["files"]
    policy_bytes = (target / "policy.pt").read_bytes()
    optimizer_bytes = (target / "optimizer.pt").read_bytes()

    new_sched = {"last_epoch": 99, "base_lrs": [0.5]}
    store.write(target, "scheduler.pt", 16, new_sched, {"loss/eval": 0.7})

    assert sorted(p.name for p in target.iterdir()) == sorted([*CONTRACT_FILES, "manifest.json"])
    assert (target / "policy.pt").read_bytes() == policy_bytes
    assert (target / "optimizer.pt").read_bytes() == optimizer_bytes
    assert load_payload(target / "scheduler.pt")["state"] == new_sched
    after = json.loads((target / "manifest.json").read_text())["files"]
    assert after["policy.pt"] == before["policy.pt"]
    assert after["optimizer.pt"] == before["optimizer.pt"]
    assert after["scheduler.pt"]["xxh3_64"] == xxh3(target / "scheduler.pt") != before["scheduler.pt"]["xxh3_64"]
    assert after["scheduler.pt"]["size"] == (target / "scheduler.pt").stat().st_size
    assert verify_dir(target) is None
    assert hidden(run) == [] and hidden(target) == []


def test_write_into_latest_and_reference_dirs(tmp_path):
    run = tmp_path / "run"
    store = Store(run, fsync=False)
    publish(store, "LATEST", 4, {}, SMALL)
    store.write(run / "LATEST", "trainer_state.pt", 4, {"example_counter": 4}, {})
    latest = run / "LATEST"
    assert latest.is_symlink()
    files = json.loads((latest / "manifest.json").read_text())["files"]
    assert set(files) == {*CONTRACT_FILES, "trainer_state.pt"}
    assert verify_dir(latest) is None
    assert hidden(run) == [os.readlink(latest)]

    # a reference-written directory gains a manifest covering its old files
    ref = write_reference(run / "step-2", 2, SMALL)
    store.write(ref, "trainer_state.pt", 2, {"example_counter": 2}, {})
    manifest = json.loads((ref / "manifest.json").read_text())
    assert set(manifest["files"]) == {*CONTRACT_FILES, "trainer_state.pt"}
    assert manifest["files"]["policy.pt"]["step_idx"] == 2
    assert verify_dir(ref) is None


# ============================================================================================
# verification


@pytest.fixture(scope="module")
def good_dirs(tmp_path_factory, states):
    base = tmp_path_factory.mktemp("good")
    ours = publish(Store(base / "run"), "step-32", 32, {"loss/eval": 0.6}, states)
    ref = write_reference(base / "ref" / "LATEST", 32, states, {"loss/eval": 0.6})
    return ours, ref


@pytest.fixture
def ours_copy(tmp_path, good_dirs):
    return Path(shutil.copytree(good_dirs[0], tmp_path / "step-32"))


@pytest.fixture
def ref_copy(tmp_path, good_dirs):
    return Path(shutil.copytree(good_dirs[1], tmp_path / "LATEST"))


def test_verify_ok(good_dirs):
    ours, ref = good_dirs
    assert verify_dir(ours) is None
    assert verify_dir(ref) is None


def test_verify_truncated_file(ours_copy):
    path = ours_copy / "optimizer.pt"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    reason = verify_dir(ours_copy)
    assert reason is not None and str(path) in reason
    assert str(len(data) - 100) in reason and str(len(data)) in reason


def test_verify_flipped_byte_same_size(ours_copy):
    path = ours_copy / "policy.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    reason = verify_dir(ours_copy)
    assert reason is not None and str(path) in reason and "checksum" in reason
    # sizes alone cannot see it
    assert verify_dir(ours_copy, checksums=False) is None


def test_verify_missing_file(ours_copy):
    (ours_copy / "scheduler.pt").unlink()
    reason = verify_dir(ours_copy)
    assert reason is not None and str(ours_copy / "scheduler.pt") in reason and "missing" in reason


@pytest.mark.parametrize("content", ["{ not json", '["a list"]', '{"format": "something-else", "files": {}}'])
def test_verify_unreadable_manifest(ours_copy, content):
    (ours_copy / "manifest.json").write_text(content)
    reason = verify_dir(ours_copy)
    assert reason is not None and str(ours_copy / "manifest.json") in reason


def test_verify_not_a_directory(tmp_path):
    reason = verify_dir(tmp_path / "nope")
    assert reason is not None and str(tmp_path / "nope") in reason
    (tmp_path / "empty").mkdir()
    reason = verify_dir(tmp_path / "empty")
    assert reason is not None and str(tmp_path / "empty") in reason


def test_verify_reference_mixed_steps(tmp_path):
    d = write_reference(tmp_path / "LATEST", 10, SMALL, steps={"optimizer.pt": 20})
    reason = verify_dir(d)
    assert reason is not None and str(d) in reason
    assert "optimizer.pt has step 20" in reason and "policy.pt has step 10" in reason


def test_verify_reference_truncated_policy(ref_copy):
    path = ref_copy / "policy.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    reason = verify_dir(ref_copy)
    assert reason is not None and str(path) in reason


def test_verify_reference_without_policy(tmp_path):
    d = write_reference(tmp_path / "LATEST", 1, SMALL)
    (d / "policy.pt").unlink()
    reason = verify_dir(d)
    assert reason is not None and str(d) in reason and "policy.pt" in reason


# ============================================================================================
# sweeping leftovers of killed saves


def test_sweep_removes_leftovers_and_keeps_checkpoints(tmp_path):
    run = tmp_path / "run"
    store = Store(run, fsync=False)
    publish(store, "step-10", 10, {}, SMALL)
    publish(store, "LATEST", 10, {}, SMALL)
    live = os.readlink(run / "LATEST")
    (run / "config.yaml").write_text("seed: 0\n")

    leftovers = {".staging-0123456789ab", ".trash-step-5-deadbeef", ".trash-LATEST-cafebabe", ".LATEST-orphan000000"}
    for name in leftovers:
        (run / name).mkdir()
        (run / name / "policy.pt").write_bytes(b"half")
    (run / ".link-1234abcd").symlink_to(live)
    (run / ".link-dangling1").symlink_to(".nowhere")
    (run / ".config.yaml.tmp-0badf00d").write_text("partial")
    leftovers |= {".link-1234abcd", ".link-dangling1", ".config.yaml.tmp-0badf00d"}

    removed = store.sweep()
    assert set(removed) == leftovers
    assert sorted(p.name for p in run.iterdir()) == sorted(["LATEST", live, "step-10", "config.yaml"])
    assert (run / "LATEST").is_symlink() and os.readlink(run / "LATEST") == live
    assert verify_dir(run / "LATEST") is None and verify_dir(run / "step-10") is None
    assert (run / "config.yaml").read_text() == "seed: 0\n"
    assert store.sweep() == []


def test_sweep_with_plain_latest_and_missing_run_dir(tmp_path):
    run = tmp_path / "run"
    assert Store(run).sweep() == []
    write_reference(run / "LATEST", 3, SMALL)
    (run / ".LATEST-0123456789ab").mkdir()
    assert Store(run).sweep() == [".LATEST-0123456789ab"]
    assert sorted(p.name for p in run.iterdir()) == ["LATEST"]
    assert verify_dir(run / "LATEST") is None


# ============================================================================================
# retention: the plain logic


ENTRIES = [("step-10", 10, 0.5), ("step-20", 20, 0.3), ("step-30", 30, 0.4), ("step-40", 40, None)]
NAMES = {e[0] for e in ENTRIES}


def test_select_retained_no_limits_keeps_everything():
    assert select_retained(ENTRIES, None, None) == NAMES
    assert select_retained([], 2, 1) == set()


@pytest.mark.parametrize(
    "keep_last, expected", [(1, {"step-40"}), (2, {"step-40", "step-30"}), (10, NAMES), (0, set())]
)
def test_select_retained_keep_last(keep_last, expected):
    assert select_retained(ENTRIES, keep_last, None) == expected


@pytest.mark.parametrize(
    "mode, keep_best, expected",
    [
        ("min", 1, {"step-20"}),
        ("min", 2, {"step-20", "step-30"}),
        ("max", 1, {"step-10"}),
        ("max", 2, {"step-10", "step-30"}),
        ("min", 10, {"step-10", "step-20", "step-30"}),  # an entry without the metric is never "best"
    ],
)
def test_select_retained_keep_best(mode, keep_best, expected):
    assert select_retained(ENTRIES, None, keep_best, mode) == expected


def test_select_retained_both_is_the_union():
    assert select_retained(ENTRIES, 1, 1, "min") == {"step-40", "step-20"}
    assert select_retained(ENTRIES, 2, 1, "max") == {"step-40", "step-30", "step-10"}
    assert select_retained(ENTRIES, 2, 1, "min") == {"step-40", "step-30", "step-20"}


def test_select_retained_protected():
    assert select_retained(ENTRIES, 1, None, protected=frozenset({"step-10", "not-an-entry"})) == {"step-40", "step-10"}
    # protection adds nothing when there is no limit (everything is kept anyway)
    assert select_retained(ENTRIES, None, None, protected=frozenset({"x"})) == NAMES


def test_best_of():
    assert best_of(ENTRIES, "min") == "step-20"
    assert best_of(ENTRIES, "max") == "step-10"
    assert best_of([("step-1", 1, None)], "min") is None
    assert best_of([], "max") is None
    # ties go to the newer checkpoint, in both modes, and agree with select_retained
    tied = [("step-1", 1, 0.3), ("step-2", 2, 0.3), ("step-3", 3, 0.9)]
    assert best_of(tied, "min") == "step-2"
    assert select_retained(tied, None, 1, "min") == {"step-2"}
    assert best_of(tied, "max") == "step-3"


# ============================================================================================
# retention on disk


def test_keep_last_on_disk(tmp_path):
    run = tmp_path / "run"
    log: list[str] = []
    store = Store(run, fsync=False, keep_last=2, log=log.append)
    for step in (10, 20, 30, 40):
        publish(store, f"step-{step}", step, {"loss/train": 1.0 / step}, SMALL)
        publish(store, "LATEST", step, {}, SMALL)
        store.after_publish()
    names = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert names == ["LATEST", "step-30", "step-40"]
    assert not (run / "best").exists(), "no step dir has loss/eval, so there is no best"
    assert load_payload(run / "LATEST" / "policy.pt")["step_idx"] == 40
    assert hidden(run) == [os.readlink(run / "LATEST")]
    assert any(str(run / "step-10") in line for line in log) and any(str(run / "step-20") in line for line in log)


@pytest.mark.parametrize(
    "mode, metric, values, best",
    [
        ("min", "loss/eval", {10: 0.5, 20: 0.2, 30: 0.4}, "step-20"),
        ("max", "rewards_eval/accuracies", {10: 0.5, 20: 0.2, 30: 0.4}, "step-10"),
    ],
)
def test_keep_best_on_disk(tmp_path, mode, metric, values, best):
    run = tmp_path / "run"
    store = Store(run, fsync=False, keep_best=1, best_metric=metric, best_mode=mode, log=lambda s: None)
    for step, value in values.items():
        publish(store, f"step-{step}", step, {metric: value}, SMALL)
        store.after_publish()
        current = sorted(p.name for p in run.glob("step-*"))
        assert os.readlink(run / "best") in current
    assert sorted(p.name for p in run.glob("step-*")) == [best]
    assert (run / "best").is_symlink() and os.readlink(run / "best") == best
    assert verify_dir(run / "best") is None
    assert json.loads((run / "best" / "manifest.json").read_text())["metrics"][metric] == values[int(best[5:])]
    assert hidden(run) == []


def test_keep_last_and_best_on_disk(tmp_path):
    run = tmp_path / "run"
    store = Store(run, fsync=False, keep_last=1, keep_best=1, log=lambda s: None)
    for step, loss in ((10, 0.9), (20, 0.1), (30, 0.5), (40, 0.7)):
        publish(store, f"step-{step}", step, {"loss/eval": loss}, SMALL)
        store.after_publish()
    assert sorted(p.name for p in run.glob("step-*")) == ["step-20", "step-40"]
    assert os.readlink(run / "best") == "step-20"


def test_best_exists_only_when_retention_by_metric_is_asked_for(tmp_path):
    run = tmp_path / "run"
    store = Store(run, fsync=False)
    for step, loss in ((1, 0.9), (2, 0.3), (3, 0.5)):
        publish(store, f"step-{step}", step, {"loss/eval": loss}, SMALL)
        store.after_publish()
    assert sorted(p.name for p in run.glob("step-*")) == ["step-1", "step-2", "step-3"]
    assert not (run / "best").exists() and not (run / "best").is_symlink()


def test_best_includes_the_final_evaluation_of_latest(tmp_path):
    run = tmp_path / "run"
    store = Store(run, fsync=False, keep_best=1, log=lambda s: None)
    publish(store, "step-4", 4, {"loss/eval": 229.13}, SMALL)
    store.after_publish()
    assert os.readlink(run / "best") == "step-4"
    publish(store, "LATEST", 8, {"loss/eval": 224.16}, SMALL)  # the end of training, better
    store.after_publish()
    assert os.readlink(run / "best") == "LATEST"
    assert load_payload(run / "best" / "policy.pt")["step_idx"] == 8
    assert (run / "step-4").is_dir()  # keep_best counts step-* directories; LATEST is always kept


# ============================================================================================
# load_payload: every failure is one CheckpointError sentence naming the file


class NotATensor:
    def __init__(self):
        self.x = 1


def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_payload(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    return message


def test_load_payload_ok(good_dirs, states):
    payload = load_payload(good_dirs[1] / "policy.pt")
    assert set(payload) == PAYLOAD_KEYS and payload["step_idx"] == 32
    assert_same_state(payload["state"], states["policy.pt"])


def test_load_payload_missing_and_directory(tmp_path):
    _expect_error(tmp_path / "policy.pt", "does not exist")
    (tmp_path / "dir.pt").mkdir()
    _expect_error(tmp_path / "dir.pt", "is a directory")


@pytest.mark.parametrize("keep", ["10 bytes", "5000 bytes", "half", "all but one"])
def test_load_payload_truncated(tmp_path, good_dirs, keep):
    data = (good_dirs[1] / "policy.pt").read_bytes()
    n = {"10 bytes": 10, "5000 bytes": 5000, "half": len(data) // 2, "all but one": len(data) - 1}[keep]
    path = tmp_path / "policy.pt"
    path.write_bytes(data[:n])
    _expect_error(path, "truncated or not a torch checkpoint")


@pytest.mark.parametrize(
    "text", ["hello, this is not a checkpoint\n", "this is not a checkpoint\n", "not a checkpoint\n", ""]
)
def test_load_payload_text_file(tmp_path, text):
    path = tmp_path / "policy.pt"
    path.write_text(text)
    message = _expect_error(path, "truncated or not a torch checkpoint")
    assert "arbitrary pickle" not in message


def test_load_payload_refuses_arbitrary_pickle(tmp_path):
    path = tmp_path / "policy.pt"
    torch.save({"step_idx": 1, "state": {"x": NotATensor()}, "metrics": {}}, path)
    _expect_error(path, "arbitrary pickle")


def test_load_payload_wrong_shape_of_payload(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(torch.ones(3), bare)
    _expect_error(bare, "not a dpokit/DPO-reference checkpoint", "Tensor")
    no_state = tmp_path / "nostate.pt"
    torch.save({"step_idx": 1, "metrics": {}}, no_state)
    _expect_error(no_state, "not a dpokit/DPO-reference checkpoint")
    state_dict_only = tmp_path / "sd.pt"
    torch.save(SMALL["policy.pt"], state_dict_only)
    _expect_error(state_dict_only, "not a dpokit/DPO-reference checkpoint")


# ============================================================================================
# atomic_write


def test_atomic_write_success_records_size_and_checksum(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    rec = atomic_write(target, lambda f: (f.write(b"new "), f.write(b"content")))
    assert target.read_bytes() == b"new content"
    assert rec.size == len(b"new content")
    assert rec.xxh3_64 == xxhash.xxh3_64(b"new content").hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_atomic_write_failure_keeps_old_content(tmp_path):
    target = tmp_path / "policy.pt"
    target.write_bytes(b"old content")

    def boom(f):
        f.write(b"half of the new")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.pt"]

    def disk_full(f):
        f.write(b"x")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError) as info:
        atomic_write(target, disk_full)
    assert str(target) in str(info.value) and "No space left" in str(info.value)
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.pt"]

    new = tmp_path / "new.pt"
    with pytest.raises(RuntimeError):
        atomic_write(new, boom)
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.pt"]


def test_failed_copy_on_write_leaves_published_dir_intact(tmp_path):
    run = tmp_path / "run"
    store = Store(run, fsync=False)
    target = publish(store, "step-1", 1, {}, SMALL)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    # pickle refuses a local lambda with PicklingError or AttributeError, depending on where it looks first
    with pytest.raises((pickle.PicklingError, AttributeError)):
        store.write(target, "scheduler.pt", 1, {"fn": lambda: None}, {})  # a lambda cannot be pickled
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert verify_dir(target) is None
    assert hidden(run) == []


# ============================================================================================
# locate(..., 'archive'): what model.archive means


def test_archive_may_be_a_file_a_checkpoint_or_a_run(tmp_path):
    run = tmp_path / "run"
    store = Store(run, fsync=False)
    step = publish(store, "step-5", 5, {}, SMALL)
    assert locate(step / "policy.pt", "archive") == step / "policy.pt"
    assert locate(step, "archive") == step / "policy.pt"
    publish(store, "LATEST", 6, {}, SMALL)
    assert locate(run, "archive") == run / "LATEST" / "policy.pt"

    # a reference run dir with LATEST as a plain directory
    ref_run = tmp_path / "ref"
    write_reference(ref_run / "LATEST", 8, SMALL)
    assert locate(ref_run, "archive") == ref_run / "LATEST" / "policy.pt"


def test_resolve_archive_newest_step_dir(tmp_path, capsys):
    run = tmp_path / "run"
    store = Store(run, fsync=False)
    for step in (5, 20, 10):
        publish(store, f"step-{step}", step, {}, SMALL)
    write_reference(run / "step-15", 15, SMALL)
    assert locate(run, "archive") == run / "step-20" / "policy.pt"

    # a damaged newest checkpoint is skipped, loudly
    (run / "step-20" / "policy.pt").write_bytes(b"cut")
    assert locate(run, "archive") == run / "step-15" / "policy.pt"
    assert "step-20" in capsys.readouterr().out


def test_resolve_archive_errors(tmp_path):
    with pytest.raises(CheckpointError) as info:
        locate(tmp_path / "missing", "archive")
    assert str(tmp_path / "missing") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as info:
        locate(tmp_path / "empty", "archive")
    assert str(tmp_path / "empty") in str(info.value)
