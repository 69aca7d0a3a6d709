"""The `dpokit` command: `train` and the checkpoint tools `ckpt show|verify|diff|export`.

User mistakes (`DpokitError`) print one sentence and exit non-zero; set DPOKIT_TRACEBACK=1 (or
pass --traceback) to see the full traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpokit.errors import EXIT_USER_ERROR, DpokitError, run_guarded

# ============================================================================================
# ckpt tools


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _describe_state(state: dict) -> str:
    import torch

    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
    unique = {t.data_ptr(): t.numel() for t in tensors if t.numel()}
    return f"{len(tensors)} tensors, {sum(unique.values()):,} parameters, dtypes {', '.join(dtypes) or '-'}"


def cmd_show(path: Path) -> int:
    from dpokit.checkpoint import CONTRACT_FILES, is_adapter_only, is_sharded, load_payload, read_manifest

    if not path.exists():
        raise DpokitError(f"{path} does not exist")
    files = [path] if path.is_file() else [path / n for n in CONTRACT_FILES if (path / n).is_file()]
    manifest = read_manifest(path) if path.is_dir() else None
    sharded = is_sharded(manifest)
    if not files and not sharded and not is_adapter_only(manifest):
        raise DpokitError(f"{path} holds none of {', '.join(CONTRACT_FILES)}")
    print(f"checkpoint {path}")
    if path.is_dir():
        if manifest is None:
            print("  manifest: none (written by the DPO reference or another tool)")
        else:
            v = manifest.get("versions", {})
            print(
                f"  manifest: step {manifest['step']}, written {manifest.get('created')}, "
                f"dpokit {v.get('dpokit')}, torch {v.get('torch')}, transformers {v.get('transformers')}"
            )
            model = (manifest.get("config") or {}).get("model", {})
            loss = (manifest.get("config") or {}).get("loss", {})
            if model:
                print(f"  model: {model.get('name_or_path')}, loss: {loss.get('name')}")
            if is_adapter_only(manifest):
                base = manifest.get("base") or {}
                print(f"  weights: the LoRA adapter alone (lora.save_merged=false), merged when read into its base "
                      f"{base.get('name_or_path')}" + (f" + {base['archive']}" if base.get("archive") else ""))  # fmt: skip
            if sharded:
                shards = {k: v for k, v in manifest["files"].items() if "/" in k}
                size = sum(v["size"] for v in shards.values())
                print(
                    f"  layout: sharded ({len(shards)} Distributed Checkpoint files, {_human(size)}: "
                    f"{', '.join(manifest.get('sharded_state', []))}); "
                    f"'dpokit ckpt consolidate {path} OUT' writes policy.pt and optimizer.pt"
                )
        for extra in sorted(p for p in path.iterdir() if p.is_file() and p not in files and not p.name.startswith(".")):
            print(f"  {extra.name}: {_human(extra.stat().st_size)}")
    metrics_shown = False
    for f in files:
        payload = load_payload(f)
        state = payload["state"]
        what = _describe_state(state) if f.name != "optimizer.pt" else f"{len(state.get('state', {}))} parameter states"
        if f.name == "scheduler.pt":
            what = f"last_epoch {state.get('last_epoch')}"
        print(f"  {f.name}: {_human(f.stat().st_size)}, step_idx {payload['step_idx']}, {what}")
        if not metrics_shown:
            metrics = payload.get("metrics") or {}
            print(
                "  metrics: "
                + (
                    json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()})
                    if metrics
                    else "{}"
                )
            )
            metrics_shown = True
    return 0


def cmd_verify(path: Path) -> int:
    from dpokit.checkpoint import PathKind, checkpoint_dir_of, checkpoint_dirs, kind_of, verify_dir
    from dpokit.weights import base_problem

    if not path.exists():
        print(f"FAIL {path}: does not exist")
        return 1
    if path.is_file():
        path = checkpoint_dir_of(path)
    targets = [p for _, p in checkpoint_dirs(path)] if kind_of(path) is PathKind.RUN else [path]
    bad = 0
    for target in targets:
        problem = verify_dir(target) or base_problem(target)
        if problem is None:
            print(f"OK {target}")
        else:
            bad += 1
            print(f"FAIL {target}: {problem}")
    return 1 if bad else 0


def cmd_diff(a: Path, b: Path, tolerance: float) -> int:
    from dpokit.weights import read_policy

    sa, sb = (read_policy(p, "weights", log=lambda _m: None)["state"] for p in (a, b))
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    differing = []
    for key in (k for k in sa if k in sb):
        ta, tb = sa[key], sb[key]
        if ta.shape != tb.shape:
            differing.append((key, f"shape {tuple(ta.shape)} vs {tuple(tb.shape)}"))
            continue
        diff = (ta.double() - tb.double()).abs()
        max_abs = diff.max().item() if diff.numel() else 0.0
        if max_abs > tolerance:
            rel = (diff.norm() / ta.double().norm().clamp_min(1e-12)).item()
            differing.append((key, f"max |a-b| {max_abs:.3g}, relative L2 {rel:.3g}"))
    for key in only_a:
        print(f"only in A: {key}")
    for key in only_b:
        print(f"only in B: {key}")
    for key, what in differing:
        print(f"differs: {key}: {what}")
    common = len(set(sa) & set(sb))
    print(
        f"{len(differing)} of {common} common tensors differ (tolerance {tolerance}); "
        f"{len(only_a)} only in A, {len(only_b)} only in B"
    )
    return 1 if (differing or only_a or only_b) else 0


def cmd_consolidate(ckpt: Path, out_dir: Path) -> int:
    from dpokit.checkpoint import PathKind, kind_of, newest_complete
    from dpokit.checkpoint.sharded import consolidate

    if kind_of(ckpt) is PathKind.RUN:
        found = newest_complete(ckpt)
        if found is None:
            raise DpokitError(f"{ckpt} holds no complete checkpoint")
        ckpt = found
    consolidate(ckpt, out_dir)
    print(
        f"consolidated {ckpt} into {out_dir} (policy.pt, optimizer.pt, scheduler.pt, trainer_state.pt, manifest.json)"
    )
    return 0


def cmd_export(ckpt: Path, out_dir: Path, model_name: str | None, force: bool, adapter: bool = False) -> int:
    from dpokit.export import export_adapter, export_hf

    if adapter:
        export_adapter(ckpt, out_dir, force)
        print(f"exported the LoRA adapter of {ckpt} to {out_dir} (load it with "
              f"PeftModel.from_pretrained(base, '{out_dir}'), base: the weights the run started from)")  # fmt: skip
        return 0
    export_hf(ckpt, out_dir, model_name, force)
    print(f"exported {ckpt} to {out_dir} (load it with AutoModelForCausalLM.from_pretrained('{out_dir}'))")
    return 0


# ============================================================================================
# entry point


def _ckpt_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpokit ckpt", description="Inspect, check, compare and export checkpoints.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show", help="step, metrics, files, sizes, parameter count and dtypes")
    p.add_argument("path", type=Path, help="checkpoint directory or .pt file (ours or the reference's)")
    p = sub.add_parser("verify", help="exit 0 if complete and matching its manifest, 1 with the reason otherwise")
    p.add_argument("path", type=Path, help="checkpoint directory, or a run directory (checks all its checkpoints)")
    p = sub.add_parser("diff", help="which policy tensors differ between two checkpoints, and by how much")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--tolerance", type=float, default=0.0, help="ignore absolute differences up to this")
    p = sub.add_parser("export", help="write a Hugging Face model directory (safetensors, config, tokenizer)")
    p.add_argument("ckpt", type=Path, help="policy.pt, checkpoint directory or run directory")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--model", default=None, help="base model (name or path); default: the run's config.yaml")
    p.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--adapter", action="store_true", help="a LoRA run: write PEFT's adapter directory alone")
    p = sub.add_parser("consolidate", help="turn a sharded checkpoint into policy.pt, optimizer.pt, scheduler.pt")
    p.add_argument("ckpt", type=Path, help="sharded checkpoint directory (or a run directory: its newest)")
    p.add_argument("out_dir", type=Path, help="new directory to write (must not exist)")
    return parser


def ckpt_main(argv: list[str]) -> int:
    args = _ckpt_parser().parse_args(argv)
    commands = {
        "show": lambda: cmd_show(args.path),
        "verify": lambda: cmd_verify(args.path),
        "diff": lambda: cmd_diff(args.a, args.b, args.tolerance),
        "export": lambda: cmd_export(args.ckpt, args.out_dir, args.model, args.force, args.adapter),
        "consolidate": lambda: cmd_consolidate(args.ckpt, args.out_dir),
    }
    return run_guarded(commands[args.command], args.traceback)


def runs_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dpokit runs", description="List run directories with their progress.")
    parser.add_argument("dir", nargs="?", type=Path, default=None,
                        help="where the runs are (default: {first existing of .cache ...}/{user}, as local_dirs)")  # fmt: skip

    def run() -> int:
        from dpokit.config import Config, get_local_dir
        from dpokit.runs import describe, find_runs, table

        root = args.dir if args.dir is not None else Path(get_local_dir(Config().local_dirs))
        if not root.is_dir():
            raise DpokitError(f"{root} is not a directory")
        found = find_runs(root)
        if not found:
            print(f"no run directories under {root}")
            return 0
        print(table([describe(r) for r in found]))
        return 0

    args = parser.parse_args(argv)
    return run_guarded(run)


def plot_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dpokit plot", description="Plot training curves of one or more runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="PNG to write (default: RUN_DIR/metrics.png for one run, ./runs.png for several)")  # fmt: skip
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    def run() -> int:
        from dpokit.plotting import plot_runs

        out = args.output or (args.run_dirs[0] / "metrics.png" if len(args.run_dirs) == 1 else Path("runs.png"))
        print(f"wrote {plot_runs(args.run_dirs, out, args.title)}")
        return 0

    return run_guarded(run)


USAGE = """usage: dpokit COMMAND ...

commands:
  train KEY=VALUE ...     train with SFT, DPO or IPO (dpokit train --help lists every key);
                          trainer=FSDPTrainer starts torchrun (one process per GPU, nproc=N on CPU);
  ckpt show PATH          step, metrics, files, sizes, parameters of a checkpoint
  ckpt verify PATH        check a checkpoint (or every checkpoint of a run directory)
  ckpt diff A B           compare the policy tensors of two checkpoints
  ckpt export CKPT OUT    export the policy to a Hugging Face model directory (--adapter: a LoRA run's adapter)
  ckpt consolidate DIR OUT   turn a sharded checkpoint into the three-file one
  runs [DIR]              the runs under DIR: status, examples, losses, reward accuracy, checkpoints
  plot RUN_DIR ... [-o F] loss, reward accuracy and margin, log-probs against examples, one line per run
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        if "-h" in rest or "--help" in rest:
            from dpokit.config import help_text

            print(help_text())
            return 0
        show_tb = "--traceback" in rest
        rest = [a for a in rest if a != "--traceback"]
        from dpokit.train import train_or_launch

        return run_guarded(lambda: train_or_launch(rest), show_tb)
    if command == "ckpt":
        return ckpt_main(rest)
    if command == "runs":
        return runs_main(rest)
    if command == "plot":
        return plot_main(rest)
    print(f"dpokit: error: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
