"""Asynchronous saves (checkpoint.async=true) write exactly the state of the step they were asked
for, although parameters and optimizer state are copied in the background while the next batch
is computed: before_update() holds the next optimizer step until that copy is done."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import metrics_log
from dpokit.checkpoint import Checkpointer, CheckpointSettings, load_payload
from dpokit.distributed import SingleProcess
from dpokit.models import load_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _tiny_training_state(device: str = "cpu"):
    model = load_model("tiny").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tokens = torch.randint(0, 100, (2, 16), device=device)
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    return model, optimizer, scheduler


@pytest.mark.parametrize("device", DEVICES)
def test_next_step_waits_for_the_background_copy(tmp_path, monkeypatch, device):
    """The background thread is held before it copies anything; the gate opens only when
    before_update() waits. A before_update() that did not wait would let the step below change
    the parameters first, and the checkpoint would hold the changed values. On CUDA the copies
    go into pinned buffers, without waiting for the GPU."""
    model, optimizer, scheduler = _tiny_training_state(device)
    ck = Checkpointer(
        tmp_path, CheckpointSettings(async_save=True), policy=model, optimizer=optimizer, scheduler=scheduler,
        trainer_state=lambda: {"example_counter": 8}, dist=SingleProcess(device=device), log=lambda _m: None,
    )  # fmt: skip
    gate = threading.Event()
    real_background = ck._background
    monkeypatch.setattr(ck, "_background", lambda *args: (gate.wait(), real_background(*args)))
    real_wait = ck._copied.wait
    monkeypatch.setattr(ck._copied, "wait", lambda: (gate.set(), real_wait())[1])
    expected = {k: v.cpu().clone() for k, v in model.state_dict().items()}
    expected_avg = {i: s["exp_avg"].cpu().clone() for i, s in optimizer.state_dict()["state"].items()}

    try:
        target = ck.save(8)
        ck.before_update()
        waited = gate.is_set()
        with torch.no_grad():  # what optimizer.step() would do
            for p in model.parameters():
                p.add_(1.0)
            for s in optimizer.state.values():
                s["exp_avg"].add_(1.0)
    finally:
        gate.set()  # never leave the writer thread waiting, whatever failed
    ck.wait()

    assert waited, "before_update() returned while the copy was still pending"
    saved = load_payload(target / "policy.pt")["state"]
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    saved_avg = load_payload(target / "optimizer.pt")["state"]["state"]
    assert all(torch.equal(saved_avg[i]["exp_avg"], v) for i, v in expected_avg.items())
    assert all(buffer.is_pinned() == (device == "cuda") for buffer in ck._buffers.values())


@pytest.mark.parametrize("extra", [[], ["lora.enabled=true", "lora.r=4"]], ids=["full", "lora"])
def test_background_saves_equal_synchronous_saves_bit_for_bit(train, extra):
    # on the CPU everywhere: two CUDA runs of the same training need not repeat bit for bit
    args = ["batch_size=4", "n_examples=24", "eval_every=8", "optimizer=AdamW", "loss=dpo", "loss.beta=0.1",
            "device=cpu", *extra]  # fmt: skip
    sync = Path(train(*args, exp_name="sync")["run_dir"])
    background = Path(train(*args, "checkpoint.async=true", exp_name="async")["run_dir"])
    for name in ("step-8", "step-16", "LATEST"):
        for filename in ("policy.pt", "optimizer.pt", "scheduler.pt"):
            a, b = load_payload(sync / name / filename), load_payload(background / name / filename)
            assert a["step_idx"] == b["step_idx"]
            flat_a, flat_b = _tensors(a["state"]), _tensors(b["state"])
            assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), (
                f"{name}/{filename} differs"
            )
        if extra:  # PEFT's adapter files too
            for filename in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
                assert (sync / name / filename).read_bytes() == (background / name / filename).read_bytes()
    stalls = [r["checkpoint/stall_seconds"] for r in metrics_log(background) if "checkpoint/stall_seconds" in r]
    assert len(stalls) == 3 and all(s >= 0 for s in stalls)
    # tied weights stay one tensor in the file, as in a synchronous save (not two copies)
    policy = load_payload(background / "LATEST" / "policy.pt")["state"]
    assert policy["lm_head.weight"].data_ptr() == policy["transformer.wte.weight"].data_ptr()


def _tensors(state, path: str = "") -> dict[str, torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return {path: state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _tensors(value, f"{path}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in _tensors(value, f"{path}/{i}").items()}
    return {}


class _GatheringProcess(SingleProcess):
    """Collects the full state into new CPU memory, as FSDP's gather does on rank 0."""

    def full_state_dict(self, model):
        return {k: v.clone() for k, v in model.state_dict().items()}

    def full_optimizer_state_dict(self, model, optimizer):
        state = optimizer.state_dict()
        return {**state, "state": {i: {k: v.clone() for k, v in s.items()} for i, s in state["state"].items()}}


@pytest.mark.parametrize(
    "dist", [SingleProcess(device="cpu"), _GatheringProcess(device="cpu")], ids=["live", "gathered"]
)
def test_a_background_save_copies_only_what_training_changes(tmp_path, dist):
    """The model's and optimizer's own tensors are snapshotted (the next step changes them); a
    full state gathered into new memory is the save's own and is written as it is: a snapshot
    of it would be a second copy of the whole state on rank 0. Either way the files hold the
    state of the step the save was asked for."""
    model, optimizer, scheduler = _tiny_training_state()
    ck = Checkpointer(
        tmp_path, CheckpointSettings(async_save=True), policy=model, optimizer=optimizer, scheduler=scheduler,
        trainer_state=lambda: {"example_counter": 8, "rng": torch.get_rng_state()}, dist=dist, log=lambda _m: None,
    )  # fmt: skip
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    target = ck.save(8)
    ck.before_update()
    with torch.no_grad():  # what optimizer.step() would do
        for p in model.parameters():
            p.add_(1.0)
    ck.wait()
    saved = load_payload(target / "policy.pt")["state"]
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())
    snapshotted = {path.split("/")[1] for path in ck._buffers}
    if isinstance(dist, _GatheringProcess):
        assert snapshotted == set()  # the rng state too is a new tensor
    else:
        assert snapshotted == {"policy.pt", "optimizer.pt"}
