"""dpokit against the DPO reference implementation itself, on the same command line, alternated.

    .venv/bin/python benchmarks/reference.py --reference-dir /path/to/direct-preference-optimization
    .venv/bin/python benchmarks/reference.py --reference-dir DIR --repeats 3 --json reference.json

The reference is not bundled: pass a checkout of the paper's repository
(github.com/eric-mitchell/direct-preference-optimization). It runs unchanged, in its own
virtualenv (.venv-reference: torch pinned as for dpokit; transformers and datasets at the
versions of constraints.txt, so that only the trainers differ; hydra, wandb, tensor_parallel
and bs4, which it imports, pinned below), through reference_shim.py, which feeds it local data
(and, without CUDA, keeps its batches on the CPU).

The workload, on CPU: DPO seeded from one SFT archive (the bundled tiny model's weights, saved as
the reference saves policy.pt), 192 pairs, batch 8, max_length 256, max_prompt_length 128,
RMSprop at 1e-5 after 10 warmup steps, beta 0.1; with CUDA: a GPT-2-small-shaped model (12 x
768, the bundled tokenizer), 2048 pairs, batch 32, max_length 512, max_prompt_length 256. Both
tools get the same command line and keep the reference's defaults for everything else: the first
evaluation on 256 test pairs in batches of 16, no sampling, the LATEST save at the end. The
reference model is float32 on CPU (float16 matmuls there are an emulation) and float16, the
reference's default, on CUDA. The pairs are the bundled HH file in the hub's schema, first 2000
rows `train`, the rest `test`, without the rows dpokit refuses (an empty response, or a rejected
dialogue with another prompt: 7 of 2312), so both see the same pairs.

Variants: the reference; dpokit with final_eval=false (the same work: the reference does not
evaluate after its last step), also with model.fused_gelu=false (GPT-2's activation computed
as the reference computes it), also with length_groups=4 and with packing=true (each the same
loss and gradient, less padding); dpokit with its defaults (plus that final evaluation); dpokit with
the levers (precomputed reference log-probs, length groups, the length-grouped sampler). Each
gets a fresh cache directory, as a first run does. Printed: median examples/s per step (first
step excluded) read from the `train stats` lines both print, the whole process's wall time
(start-up to exit), peak RSS, and each dpokit variant against the reference.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from peers import versions  # noqa: E402
from train_throughput import BIN, model_dir, say_run, timed_process  # noqa: E402

# what the reference imports beyond torch, transformers and datasets, at versions it ran with here
REFERENCE_PACKAGES = ["hydra-core==1.3.2", "wandb==0.31.0", "tensor_parallel==2.0.0", "beautifulsoup4==4.15.0",
                      "accelerate", "setuptools<81"]  # fmt: skip  # accelerate: constraints.txt pins it; tensor_parallel imports pkg_resources
WORKLOADS = {
    "cpu": {"model": "tiny", "batch_size": 8, "max_length": 256, "max_prompt_length": 128, "n_examples": 192,
            "reference_dtype": "float32"},
    "gpu": {"model": "gpt2-small-4k", "batch_size": 32, "max_length": 512, "max_prompt_length": 256,
            "n_examples": 2048, "reference_dtype": "float16"},
}  # fmt: skip
VARIANTS = {
    "dpokit, same work (final_eval=false)": ["final_eval=false"],
    "dpokit, same work, model.fused_gelu=false": ["final_eval=false", "model.fused_gelu=false"],
    "dpokit, same work + length_groups=4": ["final_eval=false", "length_groups=4"],
    "dpokit, same work + packing": ["final_eval=false", "packing=true"],
    "dpokit, defaults (+ final eval)": [],
    "dpokit, precompute + length_groups=4 + length_grouped": [
        "final_eval=false", "precompute_ref_log_probs=true", "length_groups=4", "sampler=length_grouped"],
}  # fmt: skip
GPU_VARIANTS = {  # levers that act on CUDA only
    "dpokit, same work, tf32=false": ["final_eval=false", "tf32=false"],
    "dpokit, bf16 + precompute + length_groups=4 + length_grouped": [
        "final_eval=false", "mixed_precision=bf16", "precompute_ref_log_probs=true", "length_groups=4",
        "sampler=length_grouped"],
}  # fmt: skip
STATS = re.compile(r"^train stats after (\d+) examples: (\{.*\})$", re.M)


def reference_python(venv: Path, given: str | None) -> Path:
    """The reference's python: `given` (an interpreter that has hydra, datasets and transformers,
    e.g. on a machine without internet), or the virtualenv's, created on first use."""
    if given is not None:
        check = [given, "-c", "import hydra, datasets, transformers"]
        if subprocess.run(check, capture_output=True).returncode != 0:
            raise SystemExit(f"--python {given}: cannot import hydra, datasets and transformers")
        return Path(given)
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import hydra, wandb, tensor_parallel, bs4, datasets, transformers"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    torch_version = os.environ.get("TORCH_VERSION", "2.13.0")
    print(f"creating {venv} (torch {torch_version}, the reference's imports) ...", flush=True)
    subprocess.run([os.environ.get("PYTHON", "python3"), "-m", "venv", str(venv)], check=True)
    # hydra 1.3 needs omegaconf < 2.4, which dpokit's constraints pin higher: those two are left free
    constraints = venv / "constraints.txt"
    lines = (REPO / "constraints.txt").read_text().splitlines()
    constraints.write_text("\n".join(x for x in lines if not x.lower().startswith(("omegaconf", "antlr4"))) + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(constraints)]
    subprocess.run([*pip, f"torch=={torch_version}"], check=True)
    subprocess.run([*pip, "transformers", "datasets", *REFERENCE_PACKAGES], check=True)
    return python


def prepare(root: Path, w: dict) -> tuple[str, Path, Path]:
    """The model directory, the SFT archive both tools start from, and HH train/test files."""
    import torch

    from dpokit.models import load_model, load_tokenizer
    from dpokit.sources import BadRows, split_dialogues

    model = model_dir(w["model"], root)
    if model == "tiny":
        model = str(root / "tiny")
        load_model("tiny").save_pretrained(model)
        load_tokenizer("tiny").save_pretrained(model)
    archive = root / "sft" / "policy.pt"
    archive.parent.mkdir()
    torch.save({"step_idx": 0, "state": load_model(model).state_dict(), "metrics": {}}, archive)
    hh = root / "hh"
    hh.mkdir()
    source = REPO / "src/dpokit/assets/hh_sample/harmless-base-test.jsonl.gz"
    with gzip.open(source, "rt") as f:
        rows = [line for line in f if split_dialogues(*_pair(line), "", BadRows())]
    (hh / "train.jsonl").write_text("".join(rows[:2000]))
    (hh / "test.jsonl").write_text("".join(rows[2000:]))
    return model, archive, hh


def _pair(line: str) -> tuple[str, str]:
    row = json.loads(line)
    return row["chosen"], row["rejected"]


def command_line(model: str, archive: Path, w: dict, cache: Path) -> list[str]:
    """What both tools are given: the reference's own keys."""
    return ["model=blank_model", f"model.name_or_path={model}", f"model.archive={archive}",
            f"model.reference_dtype={w['reference_dtype']}", "loss=dpo", "loss.beta=0.1", "exp_name=bench",
            f"batch_size={w['batch_size']}", "eval_batch_size=16", "trainer=BasicTrainer",
            "sample_during_eval=false", f"n_examples={w['n_examples']}", f"max_length={w['max_length']}",
            f"max_prompt_length={w['max_prompt_length']}", "wandb.enabled=false", f"local_dirs=[{cache}]",
            "minimum_log_interval_secs=0", "lr=1e-5", "warmup_steps=10"]  # fmt: skip


def run(cmd: list[str], root: Path, w: dict) -> dict:
    log = root / f"stdout-{time.monotonic_ns()}.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    wall, rss = timed_process(cmd, env, stdout=log, cwd=root)
    steps = [ast.literal_eval(stats) for _, stats in STATS.findall(log.read_text())]
    if len(steps) != w["n_examples"] // w["batch_size"]:
        raise SystemExit(f"{' '.join(cmd[:3])} ... printed {len(steps)} train stats lines, expected one a step")
    return {
        "examples_per_second": statistics.median(float(s["examples_per_second"]) for s in steps[1:]),
        "process_seconds": wall,
        "peak_rss_mib": rss,
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-dir", default=os.environ.get("DPO_REFERENCE_DIR"))
    parser.add_argument("--venv", default=str(REPO / ".venv-reference"), help="the reference's virtualenv")
    parser.add_argument("--python", default=None, help="run the reference with this interpreter instead of --venv's")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workload", choices=["cpu", "gpu", "auto"], default="auto")
    parser.add_argument(
        "--variants", default=None, help="dpokit variants to run, by name, separated by ';' (default: all)"
    )
    parser.add_argument("--n-examples", type=int, default=None, help="instead of the workload's (a shorter check)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    reference = Path(args.reference_dir or "").resolve()  # the runs start in a scratch directory
    if not args.reference_dir or not (reference / "train.py").is_file() or not (reference / "trainers.py").is_file():
        raise SystemExit("benchmarks/reference.py needs a checkout of the DPO reference repository: "
                         "--reference-dir DIR (or DPO_REFERENCE_DIR) with its train.py and trainers.py")  # fmt: skip
    workload = args.workload if args.workload != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    w = {**WORKLOADS[workload], **({"n_examples": args.n_examples} if args.n_examples else {})}
    variants = {**VARIANTS, **(GPU_VARIANTS if workload == "gpu" else {})}
    if args.variants:
        unknown = [v for v in args.variants.split(";") if v not in variants]
        if unknown:
            raise SystemExit(f"--variants: no {unknown}; there are {list(variants)}")
        variants = {v: variants[v] for v in args.variants.split(";")}
    python = reference_python(Path(args.venv), args.python)
    report: dict = {"workload": workload, "settings": w,
                    "dpokit_env": versions(sys.executable, ["dpokit", "torch", "transformers", "datasets"]),
                    "reference_env": versions(python, ["torch", "transformers", "datasets", "hydra-core"])}  # fmt: skip
    names = ["reference", *variants]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp).resolve()
        model, archive, hh = prepare(root, w)
        for _ in range(args.repeats):  # alternated: drift in the machine hits every variant alike
            for name in names:
                common = command_line(model, archive, w, root / f"cache-{time.monotonic_ns()}")
                if name == "reference":
                    cmd = [str(python), str(HERE / "reference_shim.py"), str(reference), str(hh), *common,
                           "datasets=[hh]"]  # fmt: skip
                else:
                    cmd = [str(BIN / "dpokit"), "train", *common, f"datasets=[hh:{hh}]", *variants[name]]
                runs[name].append(run(cmd, root, w))
                say_run(name, runs[name][-1])
    print(f"\nDPO from an SFT archive, {workload}: {w['model']}, batch {w['batch_size']}, max_length {w['max_length']}, "
          f"{w['n_examples']} pairs, first eval on 256 pairs, {args.repeats} alternated repeats (medians)")  # fmt: skip
    print(f"  dpokit:    {report['dpokit_env']}\n  reference: {report['reference_env']}")
    print(f"  {'':56s}{'ex/s/step':>10s}{'x ref':>7s}{'process s':>11s}{'x ref':>7s}{'peak RSS':>10s}")
    med: dict[str, dict] = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    ref = med["reference"]
    for name, m in med.items():
        m["step_ratio"] = m["examples_per_second"] / ref["examples_per_second"]
        m["process_speedup"] = ref["process_seconds"] / m["process_seconds"]
        print(f"  {name:56s}{m['examples_per_second']:10.2f}{m['step_ratio']:7.2f}{m['process_seconds']:11.1f}"
              f"{m['process_speedup']:7.2f}{m['peak_rss_mib']:8.0f}Mi")  # fmt: skip
    print("  (x ref: examples/s per step as a multiple of the reference's; whole process: reference time / this time)")
    report.update(runs=runs, medians=med)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
