"""`dpokit ckpt show|verify|diff|export`, run as the real command in subprocesses, on checkpoints
written by our store and on directories written the way the DPO reference writes them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import Store
from dpokit.checkpoint import CONTRACT_FILES

DPOKIT = Path(sys.executable).parent / "dpokit"
TINY_CONFIG = {"model": {"name_or_path": "tiny", "tokenizer_name_or_path": None}, "loss": {"name": "dpo"}}
METRICS = {"loss/eval": 0.6931471805599453, "rewards_eval/accuracies": 0.75}
PERTURBED = "transformer.h.1.mlp.c_fc.bias"


def dpokit(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("DPOKIT_TRACEBACK", None)
    return subprocess.run([str(DPOKIT), "ckpt", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def run_all(jobs: dict) -> dict:
    """Run independent `dpokit ckpt` commands two at a time (each spends most of its time importing
    torch); returns {key: CompletedProcess}."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(dpokit, *args) for key, args in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, exactly one line on stderr starting 'dpokit: error:', no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dpokit: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def reference_save(directory: Path, step: int, states: dict, metrics: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in CONTRACT_FILES:
        torch.save({"step_idx": step, "state": states[name], "metrics": metrics or {}}, directory / name)
    return directory


def store_save(store: Store, name: str, step: int, states: dict, metrics: dict | None) -> Path:
    return store.publish(name, step, metrics, {f: states[f] for f in CONTRACT_FILES})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Our run dir (step-8 and LATEST, manifest config naming tiny), a reference checkpoint dir
    (no manifest, no config) with the same policy, and the numbers the tools should report."""
    from dpokit.models import load_model

    base = tmp_path_factory.mktemp("ckpt_tools")
    model = load_model("tiny", seed=0)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.01
    optimizer.step()  # the weights now differ from a fresh tiny model's
    scheduler.step()
    states = {
        "policy.pt": model.state_dict(),
        "optimizer.pt": optimizer.state_dict(),
        "scheduler.pt": scheduler.state_dict(),
    }
    n_params = sum(p.numel() for p in model.parameters())  # unique (the LM head is tied)

    run = base / "run"
    store = Store(run, config=TINY_CONFIG)
    ours = store_save(store, "step-8", 8, states, METRICS)
    store_save(store, "LATEST", 8, states, {})
    ref = reference_save(base / "ref" / "LATEST", 16, states, {"loss/eval": 0.5})
    return {
        "base": base,
        "run": run,
        "ours": ours,
        "ref": ref,
        "states": states,
        "n_params": n_params,
        "n_tensors": len(states["policy.pt"]),
    }


def policy_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.strip().startswith("policy.pt:"))


# ============================================================================================
# show


@pytest.fixture(scope="module")
def mixed_precision_policy(world):
    """A single policy.pt with matrices in bfloat16 and vectors in float32 (tied tensors stay shared)."""
    converted: dict[int, torch.Tensor] = {}
    state = OrderedDict()
    for k, v in world["states"]["policy.pt"].items():
        if v.data_ptr() not in converted:
            converted[v.data_ptr()] = v.to(torch.bfloat16) if v.dim() >= 2 else v
        state[k] = converted[v.data_ptr()]
    path = world["base"] / "single" / "policy.pt"
    path.parent.mkdir()
    torch.save({"step_idx": 24, "state": state, "metrics": {"loss/eval": 1.25}}, path)
    return path


@pytest.fixture(scope="module")
def shown(world, mixed_precision_policy):
    return run_all(
        {"ours": ["show", world["ours"]], "ref": ["show", world["ref"]], "single": ["show", mixed_precision_policy]}
    )


def test_show_our_checkpoint(world, shown):
    proc = shown["ours"]
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "manifest: step 8" in out
    assert "model: tiny, loss: dpo" in out
    line = policy_line(out)
    assert "step_idx 8" in line
    assert f"{world['n_tensors']} tensors" in line
    assert f"{world['n_params']:,} parameters" in line
    assert "dtypes float32" in line
    assert '"loss/eval": 0.69315' in out and '"rewards_eval/accuracies": 0.75' in out
    assert "optimizer.pt:" in out and "scheduler.pt:" in out and "last_epoch 1" in out
    assert "manifest.json" in out


def test_show_reference_checkpoint(world, shown):
    proc = shown["ref"]
    assert proc.returncode == 0, proc.stderr
    assert "manifest: none" in proc.stdout
    line = policy_line(proc.stdout)
    assert "step_idx 16" in line and f"{world['n_params']:,} parameters" in line and "dtypes float32" in line
    assert '"loss/eval": 0.5' in proc.stdout
    for name in CONTRACT_FILES:
        assert f"{name}:" in proc.stdout


def test_show_single_mixed_precision_policy_file(world, shown):
    proc = shown["single"]
    assert proc.returncode == 0, proc.stderr
    line = policy_line(proc.stdout)
    assert "step_idx 24" in line
    assert f"{world['n_params']:,} parameters" in line
    assert "dtypes bfloat16, float32" in line
    assert '"loss/eval": 1.25' in proc.stdout
    assert "optimizer.pt" not in proc.stdout


# ============================================================================================
# verify


DAMAGES = ("truncated", "missing", "corrupted")


def damage(directory: Path, how: str) -> Path:
    if how == "truncated":
        path = directory / "optimizer.pt"
        path.write_bytes(path.read_bytes()[:-1000])
    elif how == "missing":
        path = directory / "scheduler.pt"
        path.unlink()
    else:
        path = directory / "policy.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def verified(world):
    base = world["base"] / "verify"
    jobs, info = {"ours": ["verify", world["ours"]], "ref": ["verify", world["ref"]]}, {}
    for how in DAMAGES:
        target = Path(shutil.copytree(world["ours"], base / how / "step-8"))
        info[how] = (target, damage(target, how))
        jobs[how] = ["verify", target]

    # a run dir: ours (LATEST, step-8, step-4), a reference-written step-2, a corrupted step-6
    run = Path(shutil.copytree(world["run"], base / "run", symlinks=True))
    reference_save(run / "step-2", 2, world["states"])
    shutil.copytree(world["ours"], run / "step-4")
    info["run"] = (run, damage(Path(shutil.copytree(world["ours"], run / "step-6")), "corrupted"))
    jobs["run"] = ["verify", run]

    # a reference run killed while writing LATEST
    refrun = base / "refrun"
    reference_save(refrun / "step-2", 2, world["states"])
    latest = reference_save(refrun / "LATEST", 4, world["states"])
    (latest / "policy.pt").write_bytes((latest / "policy.pt").read_bytes()[:5000])
    info["refrun"] = (refrun, latest / "policy.pt")
    jobs["refrun"] = ["verify", refrun]
    return run_all(jobs), info


def test_verify_good_dirs(world, verified):
    results, _ = verified
    for key in ("ours", "ref"):
        proc = results[key]
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip() == f"OK {world[key]}"


@pytest.mark.parametrize("how", DAMAGES)
def test_verify_damaged_dir(verified, how):
    results, info = verified
    proc, (target, path) = results[how], info[how]
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"FAIL {target}: ") and str(path) in lines[0], proc.stdout
    assert "Traceback" not in proc.stderr


def test_verify_run_dir_checks_every_checkpoint(verified):
    results, info = verified
    proc, (run, bad) = results["run"], info["run"]
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    oks = sorted(line for line in lines if line.startswith("OK "))
    fails = [line for line in lines if line.startswith("FAIL ")]
    assert oks == sorted(f"OK {run / name}" for name in ("LATEST", "step-8", "step-4", "step-2"))
    assert len(fails) == 1 and fails[0].startswith(f"FAIL {run / 'step-6'}: ") and str(bad) in fails[0]
    assert len(lines) == 5


def test_verify_run_dir_with_damaged_reference_latest(verified):
    """A reference run killed while writing LATEST: verifying the run must not say all is well."""
    results, info = verified
    proc, (refrun, bad) = results["refrun"], info["refrun"]
    assert proc.returncode == 1, proc.stdout
    assert f"OK {refrun / 'step-2'}" in proc.stdout.splitlines()
    assert any(line.startswith(f"FAIL {refrun / 'LATEST'}") and str(bad) in line for line in proc.stdout.splitlines())


# ============================================================================================
# diff


@pytest.fixture(scope="module")
def diffed(world):
    state = OrderedDict(world["states"]["policy.pt"])
    state[PERTURBED] = state[PERTURBED] + 1e-3
    other = reference_save(world["base"] / "perturbed" / "LATEST", 8, {**world["states"], "policy.pt": state})
    return run_all({"same": ["diff", world["ours"], world["ref"]], "perturbed": ["diff", world["run"], other]})


def test_diff_identical(world, diffed):
    proc = diffed["same"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"0 of {world['n_tensors']} common tensors differ" in proc.stdout
    assert "differs:" not in proc.stdout


def test_diff_one_tensor_perturbed(world, diffed):
    proc = diffed["perturbed"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    differs = [line for line in proc.stdout.splitlines() if line.startswith("differs:")]
    assert len(differs) == 1 and differs[0].startswith(f"differs: {PERTURBED}:"), proc.stdout
    assert f"1 of {world['n_tensors']} common tensors differ" in proc.stdout


# ============================================================================================
# export


TOKEN_IDS = torch.tensor([[0, 5, 17, 300, 1024, 4095, 42, 7, 99, 2000]])


def logits_of_state(state: dict) -> torch.Tensor:
    from dpokit.models import load_model

    model = load_model("tiny", seed=123)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(TOKEN_IDS).logits


def check_export(out: Path, state: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.models import load_model

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names, names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".staging")]
    exported = AutoModelForCausalLM.from_pretrained(out)
    exported.eval()
    with torch.no_grad():
        got = exported(TOKEN_IDS).logits
    want = logits_of_state(state)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
    fresh = load_model("tiny", seed=0).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(TOKEN_IDS).logits, want, atol=1e-4), "the checkpoint must differ from init"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id is not None and len(tokenizer("hello world").input_ids) > 0


@pytest.fixture(scope="module")
def exported(world):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = world["base"] / "export"
    base.mkdir()
    stale = base / "ref-hf"
    stale.mkdir()
    (stale / "stale.txt").write_text("old export")
    busy = base / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("do not touch")

    other = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    mismatched = base / "small" / "LATEST" / "policy.pt"
    mismatched.parent.mkdir(parents=True)
    torch.save({"step_idx": 3, "state": other.state_dict(), "metrics": {}}, mismatched)

    jobs = {
        "ours": ["export", world["ours"], base / "ours-hf"],
        "ref": ["export", world["ref"], stale, "--model", "tiny", "--force"],
        "busy": ["export", world["ours"], busy],
        "mismatched": ["export", mismatched, base / "never", "--model", "tiny"],
    }
    return run_all(jobs), {
        "ours": base / "ours-hf",
        "ref": stale,
        "busy": busy,
        "mismatched": mismatched,
        "never": base / "never",
    }


def test_export_our_checkpoint_uses_manifest_config(world, exported):
    results, paths = exported
    proc = results["ours"]
    assert proc.returncode == 0, proc.stderr
    assert str(paths["ours"]) in proc.stdout
    check_export(paths["ours"], world["states"]["policy.pt"])


def test_export_reference_dir_with_model_and_force(world, exported):
    results, paths = exported
    proc = results["ref"]
    assert proc.returncode == 0, proc.stderr
    assert not (paths["ref"] / "stale.txt").exists()
    check_export(paths["ref"], world["states"]["policy.pt"])


def test_export_into_non_empty_dir_needs_force(exported):
    results, paths = exported
    assert_user_error(results["busy"], str(paths["busy"]), "--force")
    assert sorted(p.name for p in paths["busy"].iterdir()) == ["keep.txt"]


def test_export_mismatched_checkpoint(exported):
    results, paths = exported
    line = assert_user_error(results["mismatched"], str(paths["mismatched"]), "does not fit")
    assert "missing" in line and "with a different shape" in line
    assert not paths["never"].exists()


# ============================================================================================
# bad input: one sentence (or a FAIL line for verify), no traceback


TOOLS = ("show", "verify", "diff", "export")


@pytest.fixture(scope="module")
def bad_inputs(world):
    base = world["base"] / "bad"
    text_policy = base / "LATEST" / "policy.pt"
    text_policy.parent.mkdir(parents=True)
    text_policy.write_text("hello, this is not a checkpoint\n")
    missing = base / "no-such-checkpoint"
    out_file = base / "out-file"
    out_file.write_text("a file, not a directory")
    never = base / "never-written"

    def args(tool: str, target: Path) -> list:
        return {
            "show": ["show", target],
            "verify": ["verify", target],
            "diff": ["diff", world["ours"], target],
            "export": ["export", target, never, "--model", "tiny"],
        }[tool]

    jobs = {("missing", tool): args(tool, missing) for tool in TOOLS}
    jobs.update({("text", tool): args(tool, text_policy) for tool in TOOLS})
    jobs["export-into-file"] = ["export", world["ours"], out_file]
    return run_all(jobs), {"missing": missing, "text": text_policy, "out_file": out_file, "never": never}


@pytest.mark.parametrize("tool", TOOLS)
def test_missing_path(bad_inputs, tool):
    results, paths = bad_inputs
    proc, missing = results[("missing", tool)], paths["missing"]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    if tool == "verify":
        assert proc.returncode == 1 and proc.stdout.strip() == f"FAIL {missing}: does not exist"
    else:
        assert_user_error(proc, str(missing))
    assert not paths["never"].exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_text_file_pretending_to_be_policy(bad_inputs, tool):
    results, paths = bad_inputs
    proc, text_policy = results[("text", tool)], paths["text"]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    if tool == "verify":
        lines = proc.stdout.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("FAIL") and str(text_policy) in lines[0]
    else:
        assert_user_error(proc, str(text_policy))
    assert not paths["never"].exists()


def test_export_into_a_file(bad_inputs):
    results, paths = bad_inputs
    assert_user_error(results["export-into-file"], str(paths["out_file"]))
    assert paths["out_file"].read_text() == "a file, not a directory"
