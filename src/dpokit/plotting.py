"""`dpokit plot`: training curves of one or more runs from their metrics.jsonl (matplotlib).

Four panels against examples seen: loss, reward accuracy, reward margin, and the policy's
log-probabilities of chosen and rejected responses. Train records are thin lines, evaluations
are lines with markers; one colour per run, so runs (DPO and IPO, before and after a resume)
compare at a glance. SFT runs have loss and chosen log-probabilities only.
"""

from __future__ import annotations

import re
from pathlib import Path

from dpokit.errors import DpokitError
from dpokit.tracking import METRICS, read_metrics

PANELS = (
    ("loss", "loss/{split}", "loss"),
    ("reward accuracy", "rewards_{split}/accuracies", "accuracy"),
    ("reward margin (chosen - rejected)", "rewards_{split}/margins", "margin"),
    ("log p(response), chosen and rejected", "logps_{split}/chosen", "log-prob"),
)


TIMESTAMP = re.compile(r"_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+$")


def short_names(run_dirs: list[Path]) -> list[str]:
    """Run names without their timestamps, when that keeps them apart."""
    names = [TIMESTAMP.sub("", p.name) for p in run_dirs]
    return names if len(set(names)) == len(names) else [p.name for p in run_dirs]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for run_dir, name in zip(run_dirs, short_names(run_dirs), strict=True):
        if not (run_dir / METRICS).is_file():
            raise DpokitError(f"{run_dir} has no {METRICS} (is it a dpokit run directory?)")
        runs.append((name, read_metrics(run_dir)))
    # SFT's loss (a negative log-likelihood in the hundreds) and DPO/IPO's (about log 2) do not
    # share a scale: preference losses get their own axis on the right when both are drawn
    preference = {name for name, records in runs if any("rewards_train/accuracies" in r for r in records)}
    mixed = bool(preference) and len(preference) < len(runs)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (panel, pattern, ylabel), main_ax in zip(PANELS, axes.flat, strict=True):
        drawn = False
        right = main_ax.twinx() if mixed and pattern.startswith("loss") else None
        if right is not None:
            right.set_ylabel("DPO / IPO loss")
            main_ax.set_ylabel("SFT loss (negative log-likelihood)")
        for i, (name, records) in enumerate(runs):
            color = colors[i % len(colors)]
            ax = right if right is not None and name in preference else main_ax
            keys = [pattern]
            if "chosen" in pattern:
                keys.append(pattern.replace("chosen", "rejected"))
            for key in keys:
                dashed = "rejected" in key
                steps, values = _series(records, key.format(split="train"))
                if steps:
                    ax.plot(steps, values, color=color, alpha=0.35, linewidth=1, linestyle="--" if dashed else "-")
                    drawn = True
                steps, values = _series(records, key.format(split="eval"))
                if steps:
                    label = f"{name} eval" + (" (rejected)" if dashed else " (chosen)" if "chosen" in key else "")
                    ax.plot(steps, values, color=color, marker="o", markersize=4, linewidth=2,
                            linestyle="--" if dashed else "-", label=label)  # fmt: skip
                    drawn = True
        main_ax.set_title(panel)
        main_ax.set_xlabel("examples seen")
        if right is None:
            main_ax.set_ylabel(ylabel)
        main_ax.grid(alpha=0.3)
        if drawn:
            handles = [h for a in (main_ax, right) if a is not None for h in a.get_legend_handles_labels()[0]]
            main_ax.legend(handles=handles, fontsize=7, loc="best")
        else:
            main_ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=main_ax.transAxes)
    fig.suptitle(title or "  vs  ".join(name for name, _ in runs) + "   (thin: train, markers: eval)", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
