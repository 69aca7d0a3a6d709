"""dpokit against TRL's DPOTrainer on the identical CPU workload, alternated A B A B in one run.

    .venv/bin/python benchmarks/peers.py                      # creates .venv-peers on first use
    .venv/bin/python benchmarks/peers.py --repeats 3 --json peers.json

The workload: DPO on the bundled tiny model (its seeded initial weights saved as one model
directory that both tools load), batch 8, beta 0.1, RMSprop at 1e-5 after 10 warmup steps, a
float32 reference model computed on the fly, one pass over 512 pairs of the bundled HH data. The
pairs are those whose prompt plus longer response (EOS included) fit in max_length 256 with a
margin of two tokens, written as {prompt, chosen, rejected} JSONL: neither tool truncates, so both
see the same tokens although their truncation rules differ. No evaluation and no checkpoints.

TRL runs in its own virtualenv (.venv-peers: torch pinned as for dpokit, TRL pinned below, every
package that both use at the version of constraints.txt). Printed per tool: median examples/s
per optimizer step (first step excluded; from the fetched batch to the optimizer step), the same
over step-to-step intervals (TRL only: it includes fetching the batch), the whole process's wall
time (start-up, data preparation, training, exit) and its peak RSS; then dpokit / TRL, for dpokit's
defaults and for dpokit with its opt-in levers (precomputed reference log-probs, length groups,
the length-grouped sampler).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from train_throughput import run_once, timed_process, timed_run_args  # noqa: E402

TRL_VERSION = "1.16.0"
LEVERS = "dpokit+levers"  # dpokit with its opt-in speed levers
LEVER_ARGS = ["precompute_ref_log_probs=true", "length_groups=4", "sampler=length_grouped"]
WORKLOAD = {"batch_size": 8, "max_length": 256, "max_prompt_length": 128, "n_examples": 512, "lr": 1e-5,
            "warmup_steps": 10, "beta": 0.1, "reference_dtype": "float32"}  # fmt: skip


def peer_python(venv: Path) -> Path:
    """The peer virtualenv's python, created on first use."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import trl, sys; sys.exit(trl.__version__ != {TRL_VERSION!r})"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    torch_version = os.environ.get("TORCH_VERSION", "2.13.0")
    print(f"creating {venv} (torch {torch_version}, trl {TRL_VERSION}) ...", flush=True)
    subprocess.run([os.environ.get("PYTHON", "python3"), "-m", "venv", str(venv)], check=True)
    pip = [
        str(python),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "-c",
        str(REPO / "constraints.txt"),
    ]
    subprocess.run([*pip, f"torch=={torch_version}"], check=True)
    subprocess.run([*pip, f"trl=={TRL_VERSION}"], check=True)
    return python


def versions(python: Path | str, packages: list[str]) -> str:
    code = f"import importlib.metadata as m; print(' '.join(p + ' ' + m.version(p) for p in {packages!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def prepare(root: Path, w: dict) -> tuple[Path, Path, Path]:
    """The model directory both tools load, and the train and test pairs as JSONL."""
    from transformers.utils import logging

    from dpokit.models import load_model, load_tokenizer
    from dpokit.sources import get_dataset

    logging.disable_progress_bar()

    model_dir = root / "tiny"
    load_model("tiny").save_pretrained(model_dir)
    tokenizer = load_tokenizer("tiny")
    tokenizer.save_pretrained(model_dir)

    def fitting(split: str, n: int) -> list[dict]:
        rows = []
        for prompt, entry in get_dataset("hh_sample", split, log=lambda _m: None).items():
            chosen, rejected = (entry["responses"][i] for i in entry["pairs"][0])
            ids = tokenizer([prompt, chosen, rejected], add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids[0]) + max(len(ids[1]), len(ids[2])) + 1 <= w["max_length"] - 2:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(rows) == n:
                return rows
        raise SystemExit(f"only {len(rows)} {split} pairs of the bundled data fit in max_length {w['max_length']}")

    paths = []
    for split, n in (("train", w["n_examples"]), ("test", 8)):
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in fitting(split, n)))
        paths.append(path)
    return model_dir, paths[0], paths[1]


def run_dpokit(model_dir: Path, train: Path, test: Path, root: Path, w: dict, extra: list[str]) -> dict:
    args = [*timed_run_args(str(model_dir), w, "cpu"), f"datasets=[jsonl:{train}?test={test}]", "loss=dpo",
            f"loss.beta={w['beta']}", f"warmup_steps={w['warmup_steps']}", f"lr={w['lr']}", *extra]  # fmt: skip
    r = run_once(args, root)
    return {"examples_per_second": r["examples_per_second"], "interval_examples_per_second": None,
            "process_seconds": r["process_seconds"], "peak_rss_mib": r["peak_rss_mib"]}  # fmt: skip


def run_trl(python: Path, model_dir: Path, train: Path, root: Path, w: dict) -> dict:
    out = root / f"trl-{time.monotonic_ns()}.json"
    cmd = [str(python), str(HERE / "trl_dpo.py"), str(model_dir), str(train), str(out),
           f"--batch-size={w['batch_size']}", f"--max-length={w['max_length']}", f"--lr={w['lr']}",
           f"--warmup-steps={w['warmup_steps']}", f"--beta={w['beta']}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf-datasets")}
    wall, rss = timed_process(cmd, env)
    times = json.loads(out.read_text())
    steps = times["step_seconds"][1:]  # the first step warms up
    expected = w["n_examples"] // w["batch_size"]
    if len(times["step_seconds"]) != expected:
        raise SystemExit(f"TRL ran {len(times['step_seconds'])} steps, expected {expected}")
    return {
        "examples_per_second": statistics.median(w["batch_size"] / s for s in steps),
        "interval_examples_per_second": statistics.median(w["batch_size"] / s for s in times["step_intervals"][1:]),
        "process_seconds": wall,
        "peak_rss_mib": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--venv", default=str(REPO / ".venv-peers"), help="TRL's virtualenv (created if missing)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    w = WORKLOAD
    python = peer_python(Path(args.venv))
    report: dict = {"workload": w, "dpokit_env": versions(sys.executable, ["dpokit", "torch", "transformers"]),
                    "trl_env": versions(python, ["trl", "torch", "transformers", "accelerate", "datasets"])}  # fmt: skip
    runs: dict[str, list[dict]] = {"dpokit": [], LEVERS: [], "TRL": []}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        model_dir, train, test = prepare(root, w)
        for _ in range(args.repeats):  # alternated: drift in the machine hits both alike
            runs["dpokit"].append(run_dpokit(model_dir, train, test, root, w, []))
            runs[LEVERS].append(run_dpokit(model_dir, train, test, root, w, LEVER_ARGS))
            runs["TRL"].append(run_trl(python, model_dir, train, root, w))
    print(f"\nDPO, CPU, bundled tiny model, batch {w['batch_size']}, max_length {w['max_length']}, "
          f"{w['n_examples']} pairs, {args.repeats} alternated repeats (medians)")  # fmt: skip
    print(f"  dpokit: {report['dpokit_env']}\n  TRL:    {report['trl_env']}")
    print(f"  {'tool':14s}{'ex/s per step':>15s}{'ex/s step to step':>19s}{'process s':>11s}{'peak RSS':>10s}")
    med: dict[str, dict] = {}
    for tool, rs in runs.items():
        med[tool] = {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None for k in rs[0]}
        m = med[tool]
        interval = f"{m['interval_examples_per_second']:19.2f}" if m["interval_examples_per_second"] else f"{'-':>19s}"
        print(f"  {tool:14s}{m['examples_per_second']:15.2f}{interval}{m['process_seconds']:11.1f}"
              f"{m['peak_rss_mib']:8.0f}Mi")  # fmt: skip
    for tool in ("dpokit", LEVERS):
        ratio_step = med[tool]["examples_per_second"] / med["TRL"]["examples_per_second"]
        ratio_wall = med["TRL"]["process_seconds"] / med[tool]["process_seconds"]
        med[tool].update(step_ratio_to_trl=ratio_step, process_speedup_over_trl=ratio_wall)
        print(f"  {tool} / TRL: {ratio_step:.2f}x examples/s per step, {ratio_wall:.2f}x faster whole process")
    report.update(runs=runs, medians=med)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
