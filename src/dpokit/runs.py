"""`dpokit runs`: the run directories under a directory, one line each: status, examples seen,
last train loss, latest eval loss and reward accuracy, checkpoints."""

from __future__ import annotations

from pathlib import Path

from dpokit.checkpoint import checkpoint_dirs
from dpokit.tracking import read_metrics, read_status


def find_runs(root: Path) -> list[Path]:
    """Run directories (they hold config.yaml) at root, below it, or two levels down."""
    if (root / "config.yaml").is_file():
        return [root]
    found = [p.parent for p in root.glob("*/config.yaml")] + [p.parent for p in root.glob("*/*/config.yaml")]
    return sorted(set(found), key=lambda p: p.stat().st_mtime)


def describe(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    train = [r for r in records if "loss/train" in r]
    evals = [r for r in records if "loss/eval" in r]
    status = read_status(run_dir).get("status")
    checkpoints = [p.name for _, p in checkpoint_dirs(run_dir)]
    if status is None:  # written before run.json existed, or by the reference
        status = "finished" if "LATEST" in checkpoints else "unknown"
    last_eval = evals[-1] if evals else {}
    return {
        "run": run_dir.name,
        "status": status,
        "examples": max((r.get("step", 0) for r in records), default=0),
        "train loss": train[-1]["loss/train"] if train else None,
        "eval loss": last_eval.get("loss/eval"),
        "reward acc": last_eval.get("rewards_eval/accuracies"),
        "checkpoints": ", ".join(checkpoints) or "-",
        "path": str(run_dir),
    }


def table(rows: list[dict]) -> str:
    columns = ["run", "status", "examples", "train loss", "eval loss", "reward acc", "checkpoints"]

    def cell(value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)
