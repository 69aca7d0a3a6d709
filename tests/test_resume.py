"""Exact resume: a run resumed from step-K matches the uninterrupted run bit for bit (CPU)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, metrics_log
from dpokit.errors import CheckpointError, ConfigError
from dpokit.startup import build_config
from dpokit.train import main


def _train_losses(log: list[dict]) -> list[tuple[int, float]]:
    return [(m["step"], m["loss/train"]) for m in log if "loss/train" in m]


def _interrupted_copy(run_dir: Path, dest: Path, keep: str) -> Path:
    """The run as a crash after `keep` would have left it: later checkpoints never written."""
    shutil.copytree(run_dir, dest, symlinks=True)
    for p in dest.iterdir():
        if (
            p.name.startswith("step-")
            and p.name != keep
            or p.name in ("LATEST", "best")
            or p.name.startswith(".LATEST-")
        ):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return dest


RESUMED_LOSSES = {
    "sft": ["loss=sft"],
    "dpo": ["loss=dpo", "loss.beta=0.1"],
    # the running mean of past rewards shifts the loss: training state, in the checkpoint
    "bco_pair": ["loss=bco_pair", "loss.beta=0.1"],
    # the reference moves during training: its weights are in the checkpoint
    "tr_dpo": ["loss=dpo", "loss.beta=0.1", "loss.sync_ref_model=true", "loss.ref_model_sync_steps=2"],
    "kto": ["loss=kto", "loss.beta=0.1"],
    # packed rows: the same arithmetic on resume as before it
    "dpo_packing": ["loss=dpo", "loss.beta=0.1", "packing=true"],
    # LoRA: the adapter comes back from PEFT's safetensors file, the base from the run's start
    "lora_dpo": ["loss=dpo", "loss.beta=0.1", "lora.enabled=true", "lora.r=4", "lora.target_modules=[c_attn,c_fc]"],
}


@pytest.mark.parametrize("loss_args", list(RESUMED_LOSSES.values()), ids=list(RESUMED_LOSSES))
def test_resume_matches_uninterrupted_run(tmp_path, loss_args):
    common = [
        *FAST,
        # on the CPU everywhere: CUDA kernels (SDPA backward, atomics in reductions) need not
        # repeat bit for bit, so there a resumed run matches the uninterrupted one only within rounding
        "device=cpu",
        "exp_name=r",
        f"local_dirs=[{tmp_path / 'runs'}]",
        *loss_args,
        "batch_size=4",
        "n_examples=28",
        "eval_every=8",
        "sample_during_eval=true",
        "n_eval_model_samples=8",
        "max_length=48",
        "optimizer=AdamW",
        "warmup_steps=3",
    ]
    full = main(common)
    full_dir = Path(full["run_dir"])
    resumed_dir = _interrupted_copy(full_dir, tmp_path / "resumed_run", keep="step-8")

    resumed = main([*common, f"resume={resumed_dir}"])

    assert Path(resumed["run_dir"]) == resumed_dir  # writes into the same run directory
    # the copy held the full run's records; those past step 8 were dropped when it resumed, so the
    # records after 8 are the resumed run's own, and the log never goes backwards
    log = metrics_log(resumed_dir)
    assert [m["step"] for m in log] == sorted(m["step"] for m in log)
    after_resume = [(s, loss) for s, loss in _train_losses(log) if s > 8]
    expected = [(s, loss) for s, loss in _train_losses(metrics_log(full_dir)) if s > 8]
    assert after_resume == expected and len(expected) == 5  # steps 12..28, exact floats
    a = torch.load(full_dir / "LATEST" / "policy.pt", weights_only=True)
    b = torch.load(resumed_dir / "LATEST" / "policy.pt", weights_only=True)
    assert a["step_idx"] == b["step_idx"] == 28
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    if "lora.enabled=true" in loss_args:
        assert (resumed_dir / "LATEST" / "adapter" / "adapter_model.safetensors").read_bytes() == (
            full_dir / "LATEST" / "adapter" / "adapter_model.safetensors"
        ).read_bytes()
    if "loss.sync_ref_model=true" in loss_args:
        ra = torch.load(full_dir / "LATEST" / "reference.pt", weights_only=True)["state"]
        rb = torch.load(resumed_dir / "LATEST" / "reference.pt", weights_only=True)["state"]
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    oa = torch.load(full_dir / "LATEST" / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(resumed_dir / "LATEST" / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])
    assert sorted(p.name for p in resumed_dir.iterdir() if p.name.startswith("step-")) == [
        "step-16",
        "step-24",
        "step-8",
    ]


def test_resume_without_optimizer_state_is_refused(tmp_path, monkeypatch):
    common = [
        *FAST,
        "exp_name=r",
        f"local_dirs=[{tmp_path / 'runs'}]",
        "batch_size=4",
        "n_examples=8",
        "eval_every=4",
        "checkpoint.save_optimizer=false",
    ]
    run_dir = Path(main(common)["run_dir"])
    assert sorted(p.name for p in (run_dir / "step-4").iterdir()) == ["manifest.json", "policy.pt"]
    import dpokit.models

    with monkeypatch.context() as patched:  # refused when deciding, before any model is built
        patched.setattr(dpokit.models, "load_model", lambda *a, **k: pytest.fail("a model was built"))
        with pytest.raises(CheckpointError, match="save_optimizer=false"):
            main([*common, f"resume={run_dir}"])


def test_resume_is_decided_once_and_reads_each_checkpoint_file_through_once(tmp_path, monkeypatch):
    """`dpokit train resume=RUN`: the command (which decides whether to start processes) and the
    run find the same checkpoint, but only the run's decision verifies it with its checksums,
    so each file of a large checkpoint is read through once before training; the trainer
    continues from what that decision says (the counters of trainer_state.pt)."""
    import dpokit.checkpoint.format as fmt
    from dpokit.train import train_or_launch
    from dpokit.trainers import BasicTrainer

    common = [*FAST, "exp_name=r", f"local_dirs=[{tmp_path / 'runs'}]", "batch_size=4", "eval_every=4"]
    run_dir = Path(main([*common, "n_examples=8"])["run_dir"])
    read: list[str] = []  # the files checksummed, in order
    checksum, train = fmt.checksum_file, BasicTrainer.train
    monkeypatch.setattr(fmt, "checksum_file", lambda path: read.append(Path(path).name) or checksum(path))
    when_training: list[list[str]] = []
    monkeypatch.setattr(BasicTrainer, "train", lambda self: when_training.append(list(read)) or train(self))
    assert train_or_launch([*common, "n_examples=12", f"resume={run_dir}"]) == 0
    assert sorted(when_training[0]) == sorted([*fmt.CONTRACT_FILES, fmt.TRAINER_STATE])  # each once
    steps = [m["step"] for m in metrics_log(run_dir) if "loss/train" in m]
    assert steps == [4, 8, 12]  # continued at 8, not evaluated again there
    assert [m["step"] for m in metrics_log(run_dir) if "loss/eval" in m] == [0, 4, 8, 12]


def test_resume_with_incompatible_config_names_the_keys(tmp_path):
    run_dir = Path(
        main(
            [*FAST, "exp_name=r", f"local_dirs=[{tmp_path / 'runs'}]", "batch_size=4", "n_examples=8", "eval_every=4"]
        )["run_dir"]
    )
    with pytest.raises(ConfigError, match="batch_size.*resume_force") as err:
        build_config([f"resume={run_dir}", "batch_size=8"])
    assert "loss" not in str(err.value).split("keys")[1].split("differ")[0]
    with pytest.raises(ConfigError, match="loss"):
        build_config([f"resume={run_dir}", "loss=dpo", "loss.beta=0.1"])
    cfg, point = build_config([f"resume={run_dir}", "batch_size=8", "resume_force=true"])
    assert cfg.batch_size == 8 and point.checkpoint == run_dir / "LATEST" and (point.examples, point.batches) == (8, 2)
    # the saved config is the base: nothing else needs repeating, and extending the run is allowed
    cfg, _ = build_config([f"resume={run_dir}", "n_examples=16"])
    assert cfg.n_examples == 16 and cfg.max_length == 64 and cfg.local_run_dir == str(run_dir)


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
    run_dir = Path(
        main(
            [*FAST, "exp_name=r", f"local_dirs=[{tmp_path / 'runs'}]", "batch_size=4", "n_examples=12", "eval_every=4"]
        )["run_dir"]
    )
    latest_policy = run_dir / "LATEST" / "policy.pt"
    data = bytearray(latest_policy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest_policy.write_bytes(bytes(data))
    _, point = build_config([f"resume={run_dir}"])
    assert point.checkpoint == run_dir / "step-8" and not point.is_end
    assert "skipping damaged checkpoint" in capsys.readouterr().out


def test_a_run_saved_with_more_gpus_restores_its_cuda_streams_on_fewer(monkeypatch):
    """A process of an 8-GPU job saves the state of every GPU it saw; resumed where fewer are
    visible, each visible GPU takes its own, instead of an IndexError."""
    from dpokit.trainers import rng_state, set_rng_state

    restored: list = []
    state = {k: v for k, v in rng_state().items() if k != "cuda"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    set_rng_state({**state, "cuda": saved})
    assert len(restored) == 1 and len(restored[0]) == 1 and torch.equal(restored[0][0], saved[0])


def test_rng_state_round_trip():
    from dpokit.trainers import rng_state, set_rng_state

    def draw() -> tuple:
        on_gpu = (torch.rand(3, device="cuda").cpu(),) if torch.cuda.is_available() else ()
        return random.random(), np.random.rand(), torch.rand(3), *on_gpu

    state = rng_state()
    first = draw()
    set_rng_state(state)
    again = draw()
    assert first[0] == again[0] and first[1] == again[1]
    assert all(torch.equal(a, b) for a, b in zip(first[2:], again[2:], strict=True))
