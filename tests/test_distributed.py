"""FSDPTrainer under torchrun: 2 CPU processes (gloo), the tiny model, real subprocesses.

These run on the CPU on every machine (device=cpu, and no GPU visible to the subprocesses): two
processes cannot share one GPU, and the 1-process runs they are compared with must use the same
arithmetic.

What is exact stays exact: the same 2-process job gives the same bits whether it saved full or
sharded checkpoints, was resumed, or lost workers to SIGKILL along the way. What is not exact
(1 process against 2 sums the same gradients in another order) is compared against a float64
run: the 2-process result may be no further from it than the 1-process float32 result is.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import assert_no_further_from_exact, metrics_log, run_cli

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
FAST = [
    "model=tiny",
    "device=cpu",
    "sample_during_eval=false",
    "max_length=48",
    "max_prompt_length=24",
    "n_eval_examples=8",
    "eval_batch_size=8",
    "minimum_log_interval_secs=0",
    "warmup_steps=2",
    "batch_size=4",
    "eval_every=8",
]
SFT_SGD = [*FAST, "loss=sft", "optimizer=SGD", "lr=1e-2", "n_examples=16", "do_first_eval=false"]
DPO = [*FAST, "loss=dpo", "loss.beta=0.1", "lr=1e-3", "n_examples=32"]
EPS32 = torch.finfo(torch.float32).eps


def torchrun(
    *args: str, nproc: int = 2, extra: tuple[str, ...] = (), timeout: int = 300
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra]
    return _run([*cmd, "-m", "dpokit.train", "trainer=FSDPTrainer", *args], timeout)


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **CPU_ONLY}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_cli_cpu(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env=CPU_ONLY)


def one_process(*args: str) -> dict:
    from dpokit.train import main

    return main(list(args))


def policy(run_dir: Path, ckpt: str = "LATEST") -> dict:
    return torch.load(run_dir / ckpt / "policy.pt", map_location="cpu", weights_only=True)["state"]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss/train"] for m in metrics_log(run_dir) if "loss/train" in m}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def cut_after(run_dir: Path, dest: Path, keep: str) -> Path:
    """The run as a crash right after `keep` would have left it."""
    shutil.copytree(run_dir, dest, symlinks=True)
    for p in dest.iterdir():
        later_step = p.name.startswith("step-") and int(p.name[5:]) > int(keep[5:])
        if later_step or p.name in ("LATEST", "best") or p.name.startswith(".LATEST-"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return dest


# ============================================================================================
# the runs the tests look at (each once per session)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def sft_sgd(root) -> dict[str, Path]:
    """SFT with SGD: 2 processes (started by `dpokit train` itself), 1 process fp32 and fp64."""
    two = root / "sft2"
    result = run_cli_cpu("train", *SFT_SGD, "trainer=FSDPTrainer", "nproc=2", "exp_name=sft2", f"local_run_dir={two}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "starting 2 processes" in result.stdout
    one = Path(one_process(*SFT_SGD, "exp_name=sft1", f"local_run_dir={root / 'sft1'}")["run_dir"])
    exact = Path(
        one_process(*SFT_SGD, "model.policy_dtype=float64", "exp_name=sft64", f"local_run_dir={root / 'sft64'}")[
            "run_dir"
        ]
    )
    return {"two": two, "one": one, "exact": exact}


@pytest.fixture(scope="module")
def dpo_full(root) -> Path:
    run = root / "dpo_full"
    torchrun(*DPO, "exp_name=dpo", f"local_run_dir={run}")
    return run


@pytest.fixture(scope="module")
def dpo_sharded(root) -> Path:
    run = root / "dpo_sharded"
    torchrun(*DPO, "exp_name=dpo", f"local_run_dir={run}", "checkpoint.format=sharded", "activation_checkpointing=true")
    return run


@pytest.fixture(scope="module")
def dpo_sharded_async(root) -> Path:
    run = root / "dpo_sharded_async"
    torchrun(*DPO, "exp_name=dpo", f"local_run_dir={run}", "checkpoint.format=sharded", "checkpoint.async=true")
    return run


@pytest.fixture(scope="module")
def dpo_full_async(root) -> Path:
    run = root / "dpo_full_async"
    torchrun(*DPO, "exp_name=dpo", f"local_run_dir={run}", "checkpoint.async=true")
    return run


@pytest.fixture(scope="module")
def dpo_one(root) -> Path:
    return Path(one_process(*DPO, "exp_name=dpo1", f"local_run_dir={root / 'dpo_one'}")["run_dir"])


# ============================================================================================
# training matches one process


def test_two_processes_match_one_process_with_sgd(sft_sgd):
    """SGD is linear in the gradient, so the only difference is float32 summation order: the
    2-process weights are no further from a float64 run than the 1-process float32 weights are."""
    two, one, exact = (policy(sft_sgd[k]) for k in ("two", "one", "exact"))
    assert_no_further_from_exact(two, one, exact)
    # and they really trained: the weights moved by far more than they differ
    from dpokit.models import load_model

    initial = load_model("tiny").state_dict()["transformer.h.0.mlp.c_fc.weight"]
    key = "transformer.h.0.mlp.c_fc.weight"
    assert (one[key] - initial).abs().max() > 1000 * (one[key] - two[key]).abs().max()


def test_dpokits_launcher_and_torchrun_run_the_same_job_bit_for_bit(sft_sgd, tmp_path):
    """`dpokit train trainer=FSDPTrainer nproc=2` starts its processes as torchrun does, one
    intra-op thread each (another thread count sums the matmuls in another order)."""
    torchrun(*SFT_SGD, "exp_name=sft", f"local_run_dir={tmp_path / 'torchrun'}")
    assert_bitwise_equal(policy(tmp_path / "torchrun"), policy(sft_sgd["two"]))


def test_two_process_policy_loads_into_a_plain_model(sft_sgd):
    from dpokit.models import load_model

    state = torch.load(sft_sgd["two"] / "LATEST" / "policy.pt", map_location="cpu")["state"]
    model = load_model("tiny", seed=1)
    assert list(state) == list(model.state_dict())  # the model's own names, in its order
    model.load_state_dict(state)
    # tied weights stay one tensor, as in model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    optimizer = torch.load(sft_sgd["two"] / "LATEST" / "optimizer.pt", weights_only=True)["state"]
    assert "transformer.h.0.attn.c_attn.weight" in optimizer["state"] or optimizer["state"] == {}  # SGD keeps none
    assert optimizer["param_groups"][0]["params"][0] == "transformer.wte.weight"


def test_dpo_losses_match_one_process(dpo_full, dpo_one):
    """RMSprop divides by a running RMS of the gradient, so rounding-level differences in tiny
    gradients become visible in the weights; the loss, a sum over the whole sequence, stays
    within 1e-3 relative of the 1-process run over these 8 steps (measured: about 1e-5)."""
    a, b = train_losses(dpo_full), train_losses(dpo_one)
    assert sorted(a) == sorted(b) == list(range(4, 33, 4))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-3), step
    assert a[4] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference at the start


# ============================================================================================
# checkpoints


def test_sharded_checkpoints_consolidate_to_the_full_ones(dpo_full, dpo_sharded, tmp_path):
    """The same job saved both ways: consolidating the shards gives the full files' bits (tied
    weights stored once in both)."""
    for name in ("step-16", "LATEST"):
        manifest = json.loads((dpo_sharded / name / "manifest.json").read_text())
        assert manifest["layout"] == "sharded"
        shards = sorted(k for k in manifest["files"] if k.startswith("sharded/"))
        assert shards == ["sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"]
        assert not (dpo_sharded / name / "policy.pt").exists()
        out = tmp_path / name
        result = run_cli_cpu("ckpt", "consolidate", str(dpo_sharded / name), str(out))
        assert result.returncode == 0, result.stderr
        assert_bitwise_equal(policy(out, "."), policy(dpo_full, name))
        # the tied embedding is stored once, and is one tensor again in policy.pt, as in the full file
        stored = FileSystemReader(str(dpo_sharded / name / "sharded")).read_metadata().state_dict_metadata
        assert "model.transformer.wte.weight" in stored and "model.lm_head.weight" not in stored
        consolidated = policy(out, ".")
        assert consolidated["lm_head.weight"].data_ptr() == consolidated["transformer.wte.weight"].data_ptr()
        full_optim = torch.load(dpo_full / name / "optimizer.pt", weights_only=True)["state"]
        cons_optim = torch.load(out / "optimizer.pt", weights_only=True)["state"]
        assert full_optim["state"].keys() == cons_optim["state"].keys()
        for param, entry in full_optim["state"].items():
            assert_bitwise_equal(entry, cons_optim["state"][param])
    verify = run_cli_cpu("ckpt", "verify", str(dpo_sharded))
    assert verify.returncode == 0 and verify.stdout.count("OK ") == 4, verify.stdout


def test_background_sharded_saves_consolidate_to_the_synchronous_full_ones(dpo_full, dpo_sharded_async, tmp_path):
    """Each process snapshots its shards and writes them from its own thread (Distributed
    Checkpoint over a process group of its own, while training goes on over the default one);
    every checkpoint, consolidated, has the bits of the same job's synchronous full save."""
    saved = sorted(p.name for p in dpo_sharded_async.iterdir() if p.name.startswith("step-") or p.name == "LATEST")
    assert saved == sorted(p.name for p in dpo_full.iterdir() if p.name.startswith("step-") or p.name == "LATEST")
    for name in saved:
        shards = json.loads((dpo_sharded_async / name / "manifest.json").read_text())["files"]
        assert sorted(k for k in shards if k.startswith("sharded/")) == [
            "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"]  # fmt: skip
        out = tmp_path / name
        result = run_cli_cpu("ckpt", "consolidate", str(dpo_sharded_async / name), str(out))
        assert result.returncode == 0, result.stderr
        assert_bitwise_equal(policy(out, "."), policy(dpo_full, name))
        full_optim = torch.load(dpo_full / name / "optimizer.pt", weights_only=True)["state"]["state"]
        cons_optim = torch.load(out / "optimizer.pt", weights_only=True)["state"]["state"]
        assert full_optim.keys() == cons_optim.keys()
        for param, entry in full_optim.items():
            assert_bitwise_equal(entry, cons_optim[param])
    stalls = [r["checkpoint/stall_seconds"] for r in metrics_log(dpo_sharded_async) if "checkpoint/stall_seconds" in r]
    assert len(stalls) == len(saved) and all(s >= 0 for s in stalls)
    verify = run_cli_cpu("ckpt", "verify", str(dpo_sharded_async))
    assert verify.returncode == 0 and verify.stdout.count("OK ") == len(saved), verify.stdout


def test_background_full_saves_equal_the_synchronous_ones(dpo_full, dpo_full_async):
    """The full state is gathered onto rank 0 collectively, then written from its thread as it is
    (it is the save's own memory: no second copy); every file has the synchronous save's bits."""
    saved = sorted(p.name for p in dpo_full_async.iterdir() if p.name.startswith("step-") or p.name == "LATEST")
    assert saved == sorted(p.name for p in dpo_full.iterdir() if p.name.startswith("step-") or p.name == "LATEST")
    for name in saved:
        assert_bitwise_equal(policy(dpo_full_async, name), policy(dpo_full, name))
        background = torch.load(dpo_full_async / name / "optimizer.pt", weights_only=True)["state"]
        synchronous = torch.load(dpo_full / name / "optimizer.pt", weights_only=True)["state"]
        assert background["param_groups"] == synchronous["param_groups"]
        assert background["state"].keys() == synchronous["state"].keys()
        for param, entry in synchronous["state"].items():
            assert_bitwise_equal(background["state"][param], entry)


def test_verify_checks_every_shard(dpo_sharded, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(dpo_sharded / "step-8", copy)
    shard = copy / "sharded" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run_cli_cpu("ckpt", "verify", str(copy))
    assert result.returncode == 1 and "__1_0.distcp does not match its checksum" in result.stdout


# ============================================================================================
# resume with another number of processes


@pytest.mark.parametrize("layout", ["full", "sharded"])
def test_resume_two_processes_on_one(layout, dpo_full, dpo_sharded, tmp_path):
    source = dpo_full if layout == "full" else dpo_sharded
    cut = cut_after(source, tmp_path / "run", "step-16")
    one_process(f"resume={cut}", "trainer=BasicTrainer")
    before, after = train_losses(source), train_losses(cut)
    assert sorted(after) == sorted(before)
    for step in range(20, 33, 4):  # the steps trained after resuming, by one process
        assert after[step] == pytest.approx(before[step], rel=1e-3), step


def test_resume_one_process_on_two(dpo_one, tmp_path):
    cut = cut_after(dpo_one, tmp_path / "run", "step-16")
    torchrun(f"resume={cut}")
    before, after = train_losses(dpo_one), train_losses(cut)
    for step in range(20, 33, 4):
        assert after[step] == pytest.approx(before[step], rel=1e-3), step
    assert torch.load(cut / "LATEST" / "trainer_state.pt", weights_only=True)["state"]["example_counter"] == 32


# ============================================================================================
# when a process dies


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.002)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_killed_workers_are_restarted_and_finish_with_the_uninterrupted_weights(dpo_full, tmp_path):
    """torchrun --max-restarts with resume=auto: SIGKILL a random worker three times, twice
    inside a save; the job finishes, every checkpoint verifies, and LATEST/policy.pt has the
    bits of the uninterrupted 2-process run."""
    run = tmp_path / "run"
    kills = 3
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={kills}", "--monitor-interval=0.1", "-m", "dpokit.train", "trainer=FSDPTrainer",
           *DPO, "exp_name=dpo", "resume=auto", f"local_run_dir={run}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **CPU_ONLY}
    with open(tmp_path / "log.txt", "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    rng = random.Random(0)

    def staging_dirs() -> set[str]:
        return {p.name for p in run.iterdir() if p.name.startswith(".staging-")} if run.is_dir() else set()

    def train_records() -> int:
        log_file = run / "metrics.jsonl"
        return log_file.read_text().count("loss/train") if log_file.exists() else 0

    try:
        for kill in range(kills):
            _wait_for(lambda: len(_children(job.pid)) == 2 or job.poll() is not None, "two workers")
            assert job.poll() is None, f"the job ended before kill {kill + 1}"
            seen, trained = staging_dirs(), train_records()
            if kill == 0:  # inside the save after step-8 is complete, so that the restart resumes
                _wait_for(lambda s=seen: (run / "step-8").is_dir() and staging_dirs() - s, "a save after step-8")
                time.sleep(rng.uniform(0, 0.02))
            elif kill == 1:  # inside the next save of the restarted group
                _wait_for(lambda s=seen: staging_dirs() - s, "a save")
                time.sleep(rng.uniform(0, 0.02))
            else:  # between saves, once the restarted group has trained a step
                _wait_for(lambda t=trained: train_records() > t, "a training step")
                time.sleep(rng.uniform(0, 0.2))
            victim = rng.choice(_children(job.pid))
            os.kill(victim, signal.SIGKILL)
            _wait_for(lambda v=victim: v not in _children(job.pid), "the killed worker to be reaped")
        assert job.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = (tmp_path / "log.txt").read_text()
    assert text.count("resumed from") >= 1, text[-3000:]
    verify = run_cli_cpu("ckpt", "verify", str(run))
    assert verify.returncode == 0, verify.stdout
    assert_bitwise_equal(policy(run), policy(dpo_full))


# ============================================================================================
# two machines, as the README starts them: one torchrun agent per machine, c10d rendezvous


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent(node: int, port: int, args: list[str], log: Path, cwd: Path | None = None, elastic: tuple = (),
           env: dict | None = None):  # fmt: skip
    """One machine's torchrun agent (`--nnodes=2 --nproc_per_node=1`, plus torchrun's `elastic`
    options), in its own session. Both agents run here: the run directory is shared."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-machines",
           "--monitor-interval=0.1", *elastic, "-m", "dpokit.train", "trainer=FSDPTrainer", *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **CPU_ONLY,
           **(env or {})}  # fmt: skip
    with open(log, "a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def _start_host(port: int, args: list[str], log: Path, cwd: Path | None = None, **agent):
    """The first machine's agent, once it hosts the rendezvous store (both agents would try to;
    the one that binds the port first does, the other connects to it)."""
    import socket

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    host = _agent(0, port, args, log, cwd=cwd, **agent)
    _wait_for(lambda: listening() or host.poll() is not None, "the rendezvous store")
    return host


def _two_machines(args: list[str], logs: Path, timeout: int = 300, cwds: tuple = (None, None)) -> list[int]:
    """Both agents to their end; their exit codes."""
    port = _free_port()
    agents = [_start_host(port, args, logs / "node0.txt", cwd=cwds[0])]
    agents.append(_agent(1, port, args, logs / "node1.txt", cwd=cwds[1]))
    try:
        return [a.wait(timeout=timeout) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)


def _logs(logs: Path) -> str:
    return "".join(p.read_text()[-3000:] for p in sorted(logs.glob("node*.txt")))


def test_two_machines_train_as_one_job_in_both_checkpoint_formats(sft_sgd, dpo_full, tmp_path):
    """SFT (full checkpoints) and DPO (sharded) on two torchrun agents of one process each are
    the 2-process job on one machine, bit for bit: the same world size, the same arithmetic."""
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    assert _two_machines([*SFT_SGD, "exp_name=sft", f"local_run_dir={sft}"], tmp_path) == [0, 0], _logs(tmp_path)
    assert_bitwise_equal(policy(sft), policy(sft_sgd["two"]))
    args = [*DPO, "exp_name=dpo", f"local_run_dir={dpo}", "checkpoint.format=sharded"]
    assert _two_machines(args, tmp_path) == [0, 0], _logs(tmp_path)
    assert train_losses(dpo) == train_losses(dpo_full)
    result = run_cli_cpu("ckpt", "consolidate", str(dpo / "LATEST"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal(policy(tmp_path / "out", "."), policy(dpo_full))


def _process_tree(pid: int) -> list[int]:
    """A process and its descendants (torchrun's workers are in sessions of their own)."""
    return [pid, *(p for child in _children(pid) for p in _process_tree(child))]


# the shared rendezvous store of torch 2.13 never gives an agent that joins a later round the
# master address (it is published under the first round's keys only), so a machine that
# replaces a lost one needs a store per round
REPLACEABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_lost_machine_is_replaced_and_the_job_finishes_with_the_uninterrupted_weights(dpo_full, tmp_path):
    """The second machine dies mid-run (its agent and its worker SIGKILLed) and a new agent takes
    its place, as a cluster scheduler would start one; with --max-restarts and resume=auto the
    first machine's agent restarts its worker, both rejoin in the next rendezvous round and
    resume from the newest complete checkpoint: LATEST has the bits of the uninterrupted run."""
    run = tmp_path / "run"
    args = [*DPO, "exp_name=dpo", "resume=auto", f"local_run_dir={run}"]
    options = {"elastic": ("--max-restarts=2",), "env": REPLACEABLE}
    port = _free_port()
    agents = [_start_host(port, args, tmp_path / "node0.txt", **options),
              _agent(1, port, args, tmp_path / "node1.txt", **options)]  # fmt: skip
    try:
        records = lambda: (run / "metrics.jsonl").read_text().count("loss/train") if run.is_dir() else 0  # noqa: E731
        _wait_for(lambda: (run / "step-8").is_dir() or agents[0].poll() is not None, "step-8")
        trained = records()
        _wait_for(lambda: records() > trained or agents[0].poll() is not None, "a training step after step-8")
        assert agents[0].poll() is None, _logs(tmp_path)
        for pid in _process_tree(agents[1].pid):  # the whole machine
            os.kill(pid, signal.SIGKILL)
        agents[1].wait()
        agents[1] = _agent(1, port, args, tmp_path / "node1.txt", **options)  # its replacement
        assert [a.wait(timeout=300) for a in agents] == [0, 0], _logs(tmp_path)
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    text = (tmp_path / "node0.txt").read_text()
    assert "resumed from" in text, text[-3000:]  # the restarted group continued from a checkpoint
    verify = run_cli_cpu("ckpt", "verify", str(run))
    assert verify.returncode == 0, verify.stdout
    assert_bitwise_equal(policy(run), policy(dpo_full))


def test_a_restartable_job_of_several_machines_on_the_shared_store_is_told_it_cannot_replace_one(monkeypatch):
    from dpokit.distributed import replacement_note

    elastic = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "2"}
    for key, value in elastic.items():
        monkeypatch.setenv(key, value)
    assert "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in (replacement_note() or "")
    for key, harmless in (("TORCHELASTIC_USE_AGENT_STORE", "False"), ("GROUP_WORLD_SIZE", "1"),
                          ("TORCHELASTIC_MAX_RESTARTS", "0")):  # fmt: skip
        monkeypatch.setenv(key, harmless)
        assert replacement_note() is None, key
        monkeypatch.setenv(key, elastic[key])


def test_a_run_directory_each_machine_sees_its_own_copy_of_is_refused(tmp_path):
    """Machines that do not share the run directory: the same relative local_run_dir names a
    different directory on each (here: each agent in its own working directory). Every process
    stops with one sentence naming the processes that do not see it, before any model is built,
    and the run directory the first one had just made is removed."""
    cwds = (tmp_path / "machine0", tmp_path / "machine1")
    for d in cwds:
        d.mkdir()
    codes = _two_machines([*DPO, "exp_name=dpo", "local_run_dir=runs/dpo", "local_dirs=[cache]"], tmp_path, cwds=cwds)
    text = _logs(tmp_path)
    assert codes != [0, 0], text
    assert "is not shared: process(es) 1 (on" in text and "shared file system" in text, text
    assert "building policy" not in text, text
    assert not any((d / "runs" / "dpo").exists() for d in cwds), text


def test_precomputed_reference_log_probs_match_one_process(tmp_path):
    """Each process computes the reference log-probs of its half of every batch; gathered into
    the table by item index they are one process's, up to float32 rounding (4 pairs per forward
    through the same matmuls instead of 8: ~1e-6 relative of sums in the hundreds)."""
    args = [*DPO, "n_examples=8", "precompute_ref_log_probs=true", "do_first_eval=false"]
    torchrun(*args, "exp_name=pre2", f"local_run_dir={tmp_path / 'two'}", f"local_dirs=[{tmp_path / 'cache2'}]")
    one_process(*args, "exp_name=pre1", f"local_run_dir={tmp_path / 'one'}", f"local_dirs=[{tmp_path / 'cache1'}]")
    two, one = (
        torch.load(next((tmp_path / cache).rglob("reference_logps/*.pt")), weights_only=True)
        for cache in ("cache2", "cache1")
    )
    assert two.keys() == one.keys() == {"train", "eval"}
    for split, table in one.items():
        assert torch.equal(table.isnan(), two[split].isnan())  # the same items, each once
        assert (~table.isnan()).all(1).sum() >= 8
        torch.testing.assert_close(two[split], table, rtol=1e-5, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize(
    "loss_args",
    [["loss=simpo", "loss.beta=2.0"], ["loss=kto", "loss.beta=0.1"], ["loss=dpo", "loss.beta=0.1", "packing=true"]],
    ids=["simpo (no reference model)", "kto (KL estimate over the global batch)", "dpo packed (each its share)"],
)
def test_other_losses_on_two_processes_match_one_process(tmp_path, loss_args):
    """The loss of each step is one process's within float32 summation order (see the DPO test
    above); for KTO the mismatched KL rows and their estimate span the whole global batch, so
    splitting it between processes changes nothing either. SimPO builds no reference model.
    Packed, each process packs its own share of the micro-batch."""
    args = [*FAST, *loss_args, "lr=1e-3", "n_examples=16", "do_first_eval=false"]
    result = torchrun(*args, "exp_name=two", f"local_run_dir={tmp_path / 'two'}")
    one = Path(one_process(*args, "exp_name=one", f"local_run_dir={tmp_path / 'one'}")["run_dir"])
    a, b = train_losses(tmp_path / "two"), train_losses(one)
    assert sorted(a) == sorted(b) == [4, 8, 12, 16]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-3), step
    assert ("building reference model" in result.stdout) == ("loss=simpo" not in loss_args)
    if "loss=kto" in loss_args:
        kl = [m["kl/train"] for m in metrics_log(tmp_path / "two") if "kl/train" in m]
        kl_one = [m["kl/train"] for m in metrics_log(one) if "kl/train" in m]
        assert kl == pytest.approx(kl_one, rel=1e-3, abs=1e-6)


def test_tr_dpo_reference_is_saved_in_shards_and_resumed_from_them(tmp_path):
    """TR-DPO's moving reference in both layouts of 2 processes: the sharded checkpoint holds
    it (consolidate writes the full format's reference.pt, bit for bit), and a run resumed from
    the shards ends where the uninterrupted one does."""
    args = [*DPO, "n_examples=16", "loss.sync_ref_model=true", "loss.ref_model_sync_steps=1", "do_first_eval=false"]
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    torchrun(*args, "exp_name=f", f"local_run_dir={full}")
    torchrun(*args, "exp_name=s", f"local_run_dir={sharded}", "checkpoint.format=sharded")
    result = run_cli_cpu("ckpt", "consolidate", str(sharded / "step-8"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    reference = lambda d: torch.load(d / "reference.pt", weights_only=True)["state"]  # noqa: E731
    assert_bitwise_equal(reference(tmp_path / "out"), reference(full / "step-8"))
    resumed = cut_after(sharded, tmp_path / "resumed", keep="step-8")
    torchrun(*args, "exp_name=s", f"local_run_dir={resumed}", "checkpoint.format=sharded", f"resume={resumed}")
    final = tmp_path / "final"
    for run, out in ((sharded, final / "a"), (resumed, final / "b")):
        assert run_cli_cpu("ckpt", "consolidate", str(run / "LATEST"), str(out)).returncode == 0
    assert_bitwise_equal(reference(final / "a"), reference(final / "b"))
    assert_bitwise_equal(policy(final / "a", "."), policy(final / "b", "."))


def test_lora_on_two_processes_matches_one_in_both_layouts_and_resumes(tmp_path):
    """FSDP2 over a model whose base weights are frozen: the losses are one process's (within
    float32 summation order, as above), policy.pt (merged, gathered) loads into a plain model,
    the adapter into PEFT, a checkpoint of 2 processes resumes on 1, and the sharded layout
    consolidates to the full one and resumes exactly."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from dpokit.models import load_model

    args = [*DPO, "n_examples=16", "lora.enabled=true", "lora.r=4", "do_first_eval=false"]
    two, one = tmp_path / "two", tmp_path / "one"
    result = torchrun(*args, "exp_name=two", f"local_run_dir={two}")
    assert "building reference model" not in result.stdout
    one_process(*args, "exp_name=one", f"local_run_dir={one}")
    a, b = train_losses(two), train_losses(one)
    assert sorted(a) == sorted(b) == [4, 8, 12, 16]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-3), step
    merged = load_model("tiny", seed=3)
    merged.load_state_dict(policy(two))
    adapted = PeftModel.from_pretrained(load_model("tiny"), str(two / "LATEST" / "adapter")).eval()
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adapted(ids).logits, merged.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    # without merged weights: the adapter alone, which merges into the same bits
    from dpokit.weights import read_policy

    adapter_only = tmp_path / "adapter_only"
    torchrun(*args, "exp_name=ao", f"local_run_dir={adapter_only}", "lora.save_merged=false")
    assert not (adapter_only / "LATEST" / "policy.pt").exists()
    assert_bitwise_equal(read_policy(adapter_only)["state"], policy(two))

    resumed = cut_after(two, tmp_path / "resumed", keep="step-8")
    one_process(f"resume={resumed}", "trainer=BasicTrainer")
    assert train_losses(resumed)[16] == pytest.approx(a[16], rel=1e-3)
    x, y = (load_file(str(d / "LATEST" / "adapter" / "adapter_model.safetensors")) for d in (two, resumed))
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-3, atol=1e-6) for k in x)

    # sharded: the adapters are in the shards; consolidate merges them into the full format's bits
    sharded = tmp_path / "sharded"
    torchrun(*args, "exp_name=sh", f"local_run_dir={sharded}", "checkpoint.format=sharded")
    out = tmp_path / "consolidated"
    assert run_cli_cpu("ckpt", "consolidate", str(sharded / "LATEST"), str(out)).returncode == 0
    assert_bitwise_equal(policy(out, "."), policy(two))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "adapter" / name).read_bytes() == (two / "LATEST" / "adapter" / name).read_bytes()
    # and a sharded LoRA checkpoint resumes, on the same processes, to the same bits
    again = cut_after(sharded, tmp_path / "again", keep="step-8")
    torchrun(f"resume={again}")
    out_again = tmp_path / "consolidated_again"
    assert run_cli_cpu("ckpt", "consolidate", str(again / "LATEST"), str(out_again)).returncode == 0
    assert_bitwise_equal(policy(out_again, "."), policy(out, "."))


# ============================================================================================
# precision, sampling, and bad input


def test_bf16_mixed_precision_with_sampling(root):
    run = root / "bf16"
    torchrun(*DPO, "n_examples=8", "exp_name=bf16", f"local_run_dir={run}", "model.fsdp_policy_mp=bfloat16",
             "sample_during_eval=true", "n_eval_model_samples=4")  # fmt: skip
    state = policy(run)
    assert all(t.dtype == torch.float32 for t in state.values())  # master weights stay fp32
    for step in (0, 8):  # at the first eval and the last
        samples = [json.loads(line) for line in (run / "samples" / f"step-{step}.jsonl").read_text().splitlines()]
        assert len(samples) == 4  # 4 prompts, 2 sampled by each process
        # each sample is the (possibly truncated) prompt and its continuation, as the reference decodes it
        assert all(s["prompt"].endswith("\n\nAssistant:") and "Assistant:" in s["policy"] for s in samples)
        assert all(isinstance(s["reference"], str) for s in samples)
    assert all(torch.isfinite(t).all() for t in state.values())


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dpokit: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_input_is_refused_before_any_process_or_directory(tmp_path, dpo_sharded):
    runs = tmp_path / "runs"
    common = ["trainer=FSDPTrainer", "nproc=2", "exp_name=bad", f"local_dirs=[{runs}]", *FAST[1:]]
    commands = {
        "block": ("train", *common, "model.block_name=GPT2Layer"),
        "batch": ("train", *common, "batch_size=6", "gradient_accumulation_steps=2"),
        "archive": ("train", *FAST, f"local_dirs=[{runs}]", "exp_name=x", "loss=dpo", "loss.beta=0.1",
                    f"model.archive={dpo_sharded / 'step-8'}"),
        "diff": ("ckpt", "diff", str(dpo_sharded / "step-8"), str(dpo_sharded / "LATEST")),
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:  # each mostly imports torch
        result = dict(zip(commands, pool.map(lambda c: run_cli_cpu(*c), commands.values()), strict=True))
    _one_line_error(result["block"], "model.block_name", "GPT2Block")
    _one_line_error(result["batch"], "batch_size' (6)", "gradient_accumulation_steps (2)", "processes (2)")
    assert not runs.exists()
    message = _one_line_error(result["archive"])
    assert "sharded" in message and "dpokit ckpt consolidate" in message
    assert "consolidate" in _one_line_error(result["diff"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 on CUDA with NCCL")
def test_fsdp_on_a_gpu_trains_saves_shards_in_the_background_and_consolidates(tmp_path):
    """FSDPTrainer on one GPU (NCCL, CUDA shards, background sharded saves from CUDA): the run
    finishes, every checkpoint verifies and consolidates into a policy.pt of CPU tensors."""
    run = tmp_path / "run"
    result = run_cli("train", *[a for a in DPO if a != "device=cpu"], "device=cuda", "trainer=FSDPTrainer",
                     "nproc=1", "checkpoint.format=sharded", "checkpoint.async=true", "exp_name=gpu",
                     f"local_run_dir={run}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = sorted(p.name for p in run.iterdir() if p.name.startswith("step-") or p.name == "LATEST")
    assert saved == ["LATEST", "step-16", "step-24", "step-8"]
    for name in saved:
        assert run_cli("ckpt", "verify", str(run / name)).returncode == 0, name
        out = tmp_path / f"consolidated-{name}"
        assert run_cli("ckpt", "consolidate", str(run / name), str(out)).returncode == 0, name
        state = torch.load(out / "policy.pt", weights_only=True)["state"]
        assert all(v.device.type == "cpu" and v.isfinite().all() for v in state.values())


def test_more_processes_than_gpus_on_a_machine_are_refused_before_anything_starts(monkeypatch):
    """Two processes on one GPU would both take it and meet NCCL's duplicate-GPU error at the first
    collective, as a traceback: refused before any model or directory, naming the way out."""
    from dpokit.errors import ConfigError
    from dpokit.startup import build_config, preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node=2
    cfg, _ = build_config(["trainer=FSDPTrainer", "exp_name=gpus", *FAST[2:]])
    with pytest.raises(ConfigError, match=r"2 processes on this machine would share its 1 visible GPU.*device=cpu"):
        preflight(cfg, 2)
    cfg.device = "cpu"
    preflight(cfg, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process on each of two machines
    cfg.device = "auto"
    preflight(cfg, 2)


# ============================================================================================
# the reference's own command lines


def _meta_model(config):
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def test_block_class_is_found_for_the_reference_architectures():
    import transformers

    from dpokit.distributed import find_block_class

    small = {"vocab_size": 4096, "bos_token_id": 0, "eos_token_id": 0}
    configs = {
        "GPT2Block": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, **small),
        "GPTNeoXLayer": transformers.GPTNeoXConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, **small
        ),
        "LlamaDecoderLayer": transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, **small
        ),
        "GPTJBlock": transformers.GPTJConfig(n_embd=64, n_layer=2, n_head=2, **small),
    }
    for block, config in configs.items():
        model = _meta_model(config)
        assert find_block_class(model, None).__name__ == block  # inferred
        assert find_block_class(model, block).__name__ == block  # named, as the model groups do


def test_reference_fsdp_command_lines_run(tmp_path):
    """The reference README's pythia28 SFT then DPO lines, with a local (tiny) GPT-NeoX model
    directory for the hub name, the bundled HH sample for the hub dataset and a short run."""
    import transformers

    from dpokit.models import resolve_model_path

    model_dir = tmp_path / "pythia"
    transformers.GPTNeoXConfig(
        vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
    ).save_pretrained(model_dir)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(resolve_model_path("tiny")) / name, model_dir / name)
    # a short run: one step, and sequences cut shorter than the reference's 512 to keep it quick on a CPU
    common = [f"model.name_or_path={model_dir}", "datasets=[hh_sample]", "n_examples=64", "n_eval_examples=32",
              "max_length=128", "max_prompt_length=64", f"local_dirs=[{tmp_path / 'runs'}]"]  # fmt: skip
    reference_line = [
        "model=pythia28",
        "loss=sft",
        "exp_name=anthropic_dpo_pythia28",
        "gradient_accumulation_steps=2",
        "batch_size=64",
        "eval_batch_size=32",
        "trainer=FSDPTrainer",
        "sample_during_eval=false",
        "model.fsdp_policy_mp=bfloat16",
    ]
    sft = run_cli_cpu("train", *reference_line, *common)
    assert sft.returncode == 0, sft.stdout[-2000:] + sft.stderr[-2000:]
    sft_run = next((tmp_path / "runs").glob("*/anthropic_dpo_pythia28_*"))
    dpo_line = [a.replace("loss=sft", "loss=dpo") for a in reference_line] + [
        "loss.beta=0.1", f"model.archive={sft_run}/LATEST/policy.pt"]  # fmt: skip
    dpo = run_cli_cpu("train", *dpo_line, *common)
    assert dpo.returncode == 0, dpo.stdout[-2000:] + dpo.stderr[-2000:]
    assert "loading pre-trained weights at step 64" in dpo.stdout
    first_eval = next(m for m in metrics_log(next(p for p in (tmp_path / "runs").glob("*/anthropic_*") if p != sft_run))
                      if "loss/eval" in m)  # fmt: skip
    assert first_eval["loss/eval"] == pytest.approx(0.6931471805599453, abs=1e-3)  # policy == reference == SFT
