"""Around the loop: bad input refused before any work (nothing left on disk), progress and logs,
metrics and samples, stopping with Ctrl-C and resuming, a finished run, `dpokit runs` and
`dpokit plot` on a real short run."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import BIN, FAST, bundled_pairs, metrics_log, run_cli

SHORT = [*FAST, "batch_size=4", "n_examples=12", "eval_every=8"]


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dpokit: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def nothing_under(path: Path) -> bool:
    return not path.exists() or not any(path.rglob("*"))


# ============================================================================================
# refused before any work, leaving nothing behind


@pytest.fixture(scope="module")
def other_model_policy(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=512, n_embd=64, n_layer=2, n_head=2))
    path = tmp_path_factory.mktemp("other") / "policy.pt"
    torch.save({"step_idx": 1, "state": other.state_dict(), "metrics": {}}, path)
    return path


def test_bad_inputs_are_refused_before_the_run_directory_exists(tmp_path, other_model_policy):
    runs = tmp_path / "runs"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(bundled_pairs(1)[0]) + "\n{oops\n")
    empty, text = tmp_path / "empty.pt", tmp_path / "text.pt"
    empty.write_bytes(b"")
    text.write_text("hello\n")
    base = [*SHORT, "exp_name=bad", f"local_dirs=[{runs}]"]
    cases = {
        "local_dirs=[/proc/nonwritable]": ("local_dirs", "/proc"),
        f"local_dirs=[{a_file}]": ("local_dirs", "is a file"),
        "local_run_dir=/proc/foo": ("local_run_dir", "/proc"),
        "datasets=[nosuch]": ("nosuch",),
        "datasets=[hh_sampel]": ("did you mean 'hh_sample'",),
        f"datasets=[jsonl:{tmp_path / 'missing.jsonl'}]": ("missing.jsonl", "does not exist"),
        f"datasets=[hh:{bad_json}]": (str(bad_json), "line 2"),
        f"model.archive={tmp_path / 'nope.pt'}": ("nope.pt", "does not exist"),
        f"model.archive={empty}": (str(empty), "empty"),
        f"model.archive={text}": (str(text),),
        f"model.archive={other_model_policy}": (str(other_model_policy), "different shape"),
        "checkpoint.keep_lst=2": ("did you mean 'checkpoint.keep_last'",),
        "model.name_or_path=/no/such/model": ("model.name_or_path", "/no/such/model"),
    }

    def attempt(arg: str) -> subprocess.CompletedProcess:
        args = [a for a in base if not a.startswith("local_dirs=")] if arg.startswith("local_") else base
        return run_cli("train", *args, arg)

    # two at a time: each spends most of its few seconds importing torch
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(attempt, cases), strict=True))
    for arg, needles in cases.items():
        one_line_error(results[arg], *needles)
    assert nothing_under(runs), f"left behind: {list(runs.rglob('*'))}"
    assert not Path("/proc/foo").exists()


# ============================================================================================
# one short real run, looked at from every side


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("short")
    result = run_cli("train", *SHORT, "loss=dpo", "loss.beta=0.1", "exp_name=short", f"local_dirs=[{root}]",
                     "sample_during_eval=true", "n_eval_model_samples=4", "checkpoint.keep_best=1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return next(root.glob("*/short_*")), result


def test_output_is_a_short_summary_plain_progress_lines_and_a_log_file(short_run):
    run_dir, result = short_run
    assert "\r" not in result.stdout + result.stderr  # not a terminal: no carriage-return bars
    assert "Training:" in result.stdout and "12/12" in result.stdout  # tqdm's text, as lines
    assert "full config:" in result.stdout and "seed:" not in result.stdout  # no 55-line dump
    log = (run_dir / "train.log").read_text()
    assert "train stats after 12 examples" in log and "Writing to" in log and "full config:" in log
    assert "seed: 0" in (run_dir / "config.yaml").read_text()


def test_metrics_samples_status_and_best(short_run):
    run_dir, _ = short_run
    records = metrics_log(run_dir)
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    saves = [r for r in records if "checkpoint/bytes" in r]
    assert [r["step"] for r in saves] == [8, 12] and all(r["checkpoint/write_seconds"] > 0 for r in saves)
    for step in (0, 8, 12):  # n_eval_model_samples=4 < eval_batch_size=8 still samples
        samples = [json.loads(line) for line in (run_dir / "samples" / f"step-{step}.jsonl").read_text().splitlines()]
        assert len(samples) == 4 and all({"prompt", "policy", "reference"} <= set(s) for s in samples)
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and status["examples"] == 12
    # keep_best=1: best names the best evaluated checkpoint, LATEST's final evaluation included
    evals = {r["step"]: r["loss/eval"] for r in records if "loss/eval" in r}
    expected = "LATEST" if evals[12] <= evals[8] else "step-8"
    assert os.readlink(run_dir / "best") == expected


def test_runs_lists_the_run(short_run):
    run_dir, _ = short_run
    result = run_cli("runs", str(run_dir.parent))
    assert result.returncode == 0, result.stderr
    header, line = result.stdout.splitlines()[:2]
    assert header.split()[:3] == ["run", "status", "examples"]
    assert line.split()[:3] == [run_dir.name, "finished", "12"] and "LATEST, step-8" in line


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_the_curves(short_run, tmp_path):
    run_dir, _ = short_run
    out = tmp_path / "curves.png"
    result = run_cli("plot", str(run_dir), str(run_dir), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (1200, 800)
    one_line_error(run_cli("plot", str(tmp_path)), "metrics.jsonl")


def test_resume_of_a_finished_run_does_nothing(short_run):
    run_dir, _ = short_run
    before = (run_dir / "metrics.jsonl").read_text()
    result = run_cli("train", f"resume={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to do" in result.stdout and "train stats" not in result.stdout
    assert (run_dir / "metrics.jsonl").read_text() == before


# ============================================================================================
# Ctrl-C


@pytest.mark.parametrize("on_interrupt", ["stop", "save"])
def test_ctrl_c_stops_after_the_step_and_says_how_to_resume(tmp_path, on_interrupt):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "dpokit"), "train", *FAST, "batch_size=4", "n_examples=400", "eval_every=8", "exp_name=c",
           f"local_run_dir={run_dir}", f"checkpoint.on_interrupt={on_interrupt}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= 12 and "loss/train" in r for r in _records(run_dir)):  # past the step-8 save
        assert proc.poll() is None and time.monotonic() < deadline, "no training step in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    message = next(line for line in err.splitlines() if line.startswith("dpokit: stopped after"))
    stopped_at = int(message.split("stopped after ")[1].split()[0])
    assert f"resume with: dpokit train resume={run_dir}" in message
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    if on_interrupt == "save":
        assert f"saved {run_dir / f'step-{stopped_at}'}" in message and (run_dir / f"step-{stopped_at}").is_dir()
    else:
        assert "last complete checkpoint: " in message and not (run_dir / "LATEST").exists()
    resumed = run_cli("train", f"resume={run_dir}", "n_examples=" + str(stopped_at + 8))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"train stats after {stopped_at + 8} examples" in resumed.stdout


def _records(run_dir: Path) -> list[dict]:
    from dpokit.tracking import read_metrics

    return read_metrics(run_dir)


# ============================================================================================
# archives with numpy scalars in their metrics (as some training code writes them)


def test_archive_with_numpy_metrics_loads(tmp_path):
    import numpy as np

    from dpokit.checkpoint import load_payload
    from dpokit.models import load_model

    path = tmp_path / "policy.pt"
    torch.save({"step_idx": np.int64(5), "state": load_model("tiny").state_dict(),
                "metrics": {"loss/eval": np.float64(1.25), "acc": np.float32(0.5)}}, path)  # fmt: skip
    payload = load_payload(path)
    assert payload["step_idx"] == 5 and payload["metrics"] == {"loss/eval": 1.25, "acc": 0.5}
    assert all(type(v) is float for v in payload["metrics"].values())


# ============================================================================================
# optional sinks


def test_tensorboard_receives_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpokit.train import main

    summary = main([*SHORT, "exp_name=tb", f"local_dirs=[{tmp_path}]", "tensorboard.enabled=true"])
    events = EventAccumulator(str(Path(summary["run_dir"]) / "tensorboard"))
    events.Reload()
    train = [(e.step, e.value) for e in events.Scalars("loss/train")]
    logged = [(r["step"], r["loss/train"]) for r in metrics_log(summary["run_dir"]) if "loss/train" in r]
    assert [s for s, _ in train] == [s for s, _ in logged]
    assert all(abs(a - b) <= 1e-6 * abs(b) for (_, a), (_, b) in zip(train, logged, strict=True))  # stored as float32
    assert [e.step for e in events.Scalars("loss/eval")] == [0, 8, 12]
