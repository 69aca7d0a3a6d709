"""Training throughput of `dpokit train` on fixed workloads, with each speed lever on and off.

    .venv/bin/python benchmarks/train_throughput.py                   # the CPU workload, SFT and DPO
    .venv/bin/python benchmarks/train_throughput.py --repeats 3 --json out.json

Workloads: (a) CPU: the bundled tiny model and HH data, batch 8, max_length 256,
max_prompt_length 128, 512 examples; (b) when CUDA is present: a GPT-2-small-shaped model (12
layers, 768 wide) built from a config with the bundled tokenizer, batch 32, max_length 512, 2048
examples. The reference model is float32 on CPU and float16 (both tools' default) on CUDA. No
evaluation and no checkpoints inside the timed part (debug=true, no first or final eval). Each
variant runs --repeats times, alternated with the others; on CUDA the variants also include
tf32=false and all the levers together (bf16 autocast, precompute, length groups and sampler),
and where flash-attn is installed its kernels with and without packing (varlen). The
`cpu-long` workload is the CPU one with max_length 512 (long-tailed lengths: packing's case).
Printed per variant: median examples/s per step (first step excluded), real (non-pad) and padded
tokens/s through the policy, the whole process's wall time, its peak RSS (and on CUDA the peak
memory its tensors took), and model FLOP utilisation: 6 x parameters x real tokens (+ 2 x
parameters x tokens for the reference forward when it runs), attention excluded, against the
matmul peak of the policy's precision (float32, TF32 or bfloat16) measured in this run on this
device. The DPO variants include reference-free losses (SimPO, CPO, ORPO), which build no
reference model. --variants and --n-examples make a shorter check (e.g. on a borrowed GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

BIN = Path(sys.executable).parent

# the reference model in float32 on CPU (float16 matmuls there are an emulation), in float16 on
# CUDA: both tools' default
WORKLOADS = {
    "cpu": {"model": "tiny", "batch_size": 8, "max_length": 256, "max_prompt_length": 128, "n_examples": 512,
            "reference_dtype": "float32"},
    # the same with responses up to 512 tokens: HH's lengths are long-tailed (median 155, p90
    # 381), so a padded batch is 45% real tokens
    "cpu-long": {"model": "tiny", "batch_size": 8, "max_length": 512, "max_prompt_length": 256, "n_examples": 256,
                 "reference_dtype": "float32"},
    "gpu": {"model": "gpt2-small-4k", "batch_size": 32, "max_length": 512, "max_prompt_length": 256,
            "n_examples": 2048, "reference_dtype": "float16"},
}  # fmt: skip
VARIANTS = {
    "sft": {
        "baseline": [],
        "model.fused_gelu=false": ["model.fused_gelu=false"],
        "length_groups=4": ["length_groups=4"],
        "sampler=length_grouped": ["sampler=length_grouped"],
        "bf16 autocast": ["mixed_precision=bf16"],
        "packing=true": ["packing=true"],
        "packing=true + packing_max_tokens=1024": ["packing=true", "packing_max_tokens=1024"],
    },
    "dpo": {
        "baseline": [],
        "model.fused_gelu=false": ["model.fused_gelu=false"],
        "length_groups=4": ["length_groups=4"],
        "precompute reference": ["precompute_ref_log_probs=true"],
        "precompute + length_groups=4 + length_grouped sampler": [
            "precompute_ref_log_probs=true", "length_groups=4", "sampler=length_grouped"],
        "bf16 autocast": ["mixed_precision=bf16"],
        "packing=true": ["packing=true"],
        "packing=true + packing_max_tokens=1024": ["packing=true", "packing_max_tokens=1024"],
        "precompute + packing + length_grouped sampler": [
            "precompute_ref_log_probs=true", "packing=true", "sampler=length_grouped"],
        # reference-free losses: no reference model, no reference forward
        "loss=simpo (no reference)": ["loss=simpo", "loss.beta=2.0"],
        "loss=cpo (no reference)": ["loss=cpo", "loss.beta=0.1"],
        "loss=orpo (no reference)": ["loss=orpo", "loss.beta=0.1"],
    },
}  # fmt: skip
# levers that act on CUDA only
GPU_VARIANTS = {
    "sft": {"tf32=false (full float32 matmuls)": ["tf32=false"]},
    "dpo": {
        "tf32=false (full float32 matmuls)": ["tf32=false"],
        "bf16 + precompute + length_groups=4 + length_grouped sampler": [
            "mixed_precision=bf16", "precompute_ref_log_probs=true", "length_groups=4", "sampler=length_grouped"],
    },
}  # fmt: skip


def model_dir(name: str, root: Path) -> str:
    if name == "tiny":
        return name
    from transformers import GPT2Config

    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=4096, n_positions=1024, bos_token_id=0,
               eos_token_id=0).save_pretrained(out)  # fmt: skip
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(str(resources.files("dpokit") / "assets/tiny" / f)), out / f)
    return str(out)


def matmul_peaks(device: str) -> dict[str, float]:
    """FLOP/s of a large matrix multiply on this device (the best of a few), in each precision the
    policy's matmuls can run in: float32, TF32 (CUDA), bfloat16."""
    import torch

    from dpokit.distributed import configure_tf32

    n = 2048 if device == "cpu" else 8192
    peaks = {}
    for precision in ["float32", "bfloat16", *(["tf32"] if device == "cuda" else [])]:
        configure_tf32(precision == "tf32")
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        best = 0.0
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        peaks[precision] = best
    configure_tf32(False)
    return peaks


def precision_of(extra: list[str], device: str) -> str:
    """The precision of a variant's policy matmuls, whose peak its model FLOP utilisation is against."""
    if "mixed_precision=bf16" in extra:
        return "bfloat16"
    return "tf32" if device == "cuda" and "tf32=false" not in extra else "float32"


def timed_process(
    cmd: list[str], env: dict, stdout: Path | None = None, cwd: Path | None = None
) -> tuple[float, float]:
    """Run a command to its end; its wall seconds and peak RSS (MiB), or exit with its stderr.
    Its standard output goes to `stdout` if given."""
    out = open(stdout, "wb") if stdout is not None else subprocess.DEVNULL  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if stdout is not None:
        out.close()  # type: ignore[union-attr]
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed: {proc.stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
    return wall, usage.ru_maxrss / 1024


def timed_run_args(model: str, w: dict, device: str) -> list[str]:
    """`dpokit train` settings of a timed run: the workload, no evaluation, no checkpoints."""
    return [f"model.name_or_path={model}", "model.block_name=GPT2Block", f"model.reference_dtype={w['reference_dtype']}",
            f"batch_size={w['batch_size']}", f"max_length={w['max_length']}",
            f"max_prompt_length={w['max_prompt_length']}", f"n_examples={w['n_examples']}",
            "eval_every=100000000", "do_first_eval=false", "final_eval=false", "sample_during_eval=false",
            "n_eval_examples=8", "eval_batch_size=8", "minimum_log_interval_secs=0", "debug=true",
            f"device={device}", "exp_name=bench", "warmup_steps=10", "lr=1e-5"]  # fmt: skip


def collation_ms(w: dict, loss: str, n_batches: int = 40) -> float:
    """Host milliseconds to collate one training batch of the workload (median): work the loop
    does between one step's end and the next step's first forward, when a GPU has nothing queued
    (why there is no prefetch thread: it is small against a step)."""
    import contextlib
    import io

    from dpokit.data import BatchIterator, load_examples
    from dpokit.models import load_tokenizer

    with contextlib.redirect_stdout(io.StringIO()):  # the data notes are the runs' to print
        batches = BatchIterator(
            load_examples(["hh_sample"], "test"), load_tokenizer("tiny"), batch_size=w["batch_size"],
            max_length=w["max_length"], max_prompt_length=w["max_prompt_length"], sft_mode=loss == "sft",
            n_examples=w["batch_size"] * n_batches,
        )  # fmt: skip
    times, it = [], iter(batches)
    while True:
        t0 = time.perf_counter()
        if next(it, None) is None:
            return 1000 * statistics.median(times)
        times.append(time.perf_counter() - t0)


def say_run(name: str, result: dict) -> None:
    """One finished run, at once: a run stopped at a time limit still leaves the ones before it."""
    print(f"  done: {name}: {result['examples_per_second']:.2f} examples/s per step, "
          f"{result['process_seconds']:.1f} s", flush=True)  # fmt: skip


def run_once(args: list[str], root: Path) -> dict:
    run_dir = root / f"run-{time.monotonic_ns()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # a fresh cache each time: the whole process includes tokenizing (and precomputing), as a first run does
    cache = f"local_dirs=[{root / f'cache-{time.monotonic_ns()}'}]"
    wall, rss = timed_process([str(BIN / "dpokit"), "train", *args, f"local_run_dir={run_dir}", cache], env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "examples_per_second" in r][1:]  # the first step warms up
    shutil.rmtree(run_dir, ignore_errors=True)
    step_seconds = [r["counters/examples"] / r["counters/updates"] / r["examples_per_second"] for r in steps]
    cuda_peak = max((r.get("memory/cuda_peak_allocated_gib", 0.0) for r in records), default=0.0)
    return {
        "examples_per_second": statistics.median(r["examples_per_second"] for r in steps),
        "real_tokens_per_second": statistics.median(r["tokens/real"] / t for r, t in zip(steps, step_seconds, strict=True)),
        "padded_tokens_per_second": statistics.median(
            r["tokens/padded"] / t for r, t in zip(steps, step_seconds, strict=True)),
        "process_seconds": wall,
        "peak_rss_mib": rss,
        "peak_cuda_gib": cuda_peak,
    }  # fmt: skip


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workload", choices=[*WORKLOADS, "auto"], default="auto")
    parser.add_argument("--losses", default="sft,dpo")
    parser.add_argument(
        "--variants",
        default=None,
        help="variants to run besides the baseline, by name, separated by ';' (default: all)",
    )
    parser.add_argument("--n-examples", type=int, default=None, help="instead of the workload's (a shorter check)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    workload = args.workload if args.workload != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    device = "cuda" if workload == "gpu" else "cpu"
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:  # varlen kernels for packed rows
        for loss in GPU_VARIANTS:
            GPU_VARIANTS[loss] |= {"flash_attention_2": ["model.attn_implementation=flash_attention_2"],
                                   "packing + flash_attention_2": ["packing=true",
                                                                   "model.attn_implementation=flash_attention_2"]}  # fmt: skip
    w = {**WORKLOADS[workload], **({"n_examples": args.n_examples} if args.n_examples else {})}
    report: dict = {"workload": workload, "settings": w}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        model = model_dir(w["model"], root)
        from dpokit.models import load_model

        n_params = sum(p.numel() for p in load_model(model).parameters())
        peaks = matmul_peaks(device)
        report.update(parameters=n_params, matmul_peak_flops=peaks)
        common = timed_run_args(model, w, device)
        for loss in args.losses.split(","):
            loss_args = ["loss=sft"] if loss == "sft" else ["loss=dpo", "loss.beta=0.1"]
            variants = {**VARIANTS[loss], **(GPU_VARIANTS[loss] if device == "cuda" else {})}
            if args.variants:
                wanted = ["baseline", *(v for v in args.variants.split(";") if v != "baseline")]
                unknown = [v for v in wanted if v not in variants]
                if unknown:
                    raise SystemExit(f"--variants: no {unknown} for {loss}; there are {list(variants)}")
                variants = {v: variants[v] for v in wanted}
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for _ in range(args.repeats):  # alternated, so that drift in the machine hits every variant alike
                for name, extra in variants.items():
                    own_loss = any(a.startswith("loss=") for a in extra)  # a variant that is another loss
                    runs[name].append(run_once([*common, *([] if own_loss else loss_args), *extra], root))
                    say_run(f"{loss} {name}", runs[name][-1])
            base = statistics.median(r["examples_per_second"] for r in runs["baseline"])
            collate = collation_ms(w, loss)
            print(f"\n{workload} workload, {loss.upper()}: {n_params / 1e6:.1f}M parameters, batch {w['batch_size']}, "
                  f"max_length {w['max_length']}, {w['n_examples']} examples, {args.repeats} repeats (medians); "
                  f"matmul peaks (GFLOP/s): {', '.join(f'{k} {v / 1e9:.0f}' for k, v in peaks.items())}")  # fmt: skip
            print(f"  collating a batch on the host: {collate:.1f} ms, "
                  f"{100 * collate / 1000 / (w['batch_size'] / base):.1f}% of a baseline step")  # fmt: skip
            print(f"  {'variant':56s}{'ex/s':>8s}{'x base':>8s}{'real tok/s':>12s}{'padded tok/s':>14s}"
                  f"{'process s':>11s}{'peak RSS':>10s}{'MFU':>7s}"
                  + (f"{'CUDA peak':>11s}" if device == "cuda" else ""))  # fmt: skip
            report[loss] = {"collate_ms": collate}
            for name, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                reference_forward = loss == "dpo" and "precompute" not in name and "no reference" not in name
                flops = (6 + (2 if reference_forward else 0)) * n_params * med["real_tokens_per_second"]
                med["mfu"] = flops / peaks[precision_of(variants[name], device)]
                report[loss][name] = med
                print(f"  {name:56s}{med['examples_per_second']:8.2f}{med['examples_per_second'] / base:8.2f}"
                      f"{med['real_tokens_per_second']:12.0f}{med['padded_tokens_per_second']:14.0f}"
                      f"{med['process_seconds']:11.1f}{med['peak_rss_mib']:8.0f}Mi{100 * med['mfu']:6.1f}%"
                      + (f"{med['peak_cuda_gib']:8.2f}GiB" if device == "cuda" else ""))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
