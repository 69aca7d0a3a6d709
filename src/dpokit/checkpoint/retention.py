"""Which `step-*` directories to keep: plain logic over (name, step, metric) entries.

Retention runs only after a new checkpoint is published, and never removes what `LATEST` or
`best` names; the decisions here are tested without a disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dpokit.checkpoint.discovery import step_of
from dpokit.checkpoint.format import read_manifest
from dpokit.checkpoint.storage import BEST, LATEST, Storage, link_target
from dpokit.errors import CheckpointError

Entry = tuple[str, int, "float | None"]  # (directory name, step, value of the ranking metric)


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str = "loss/eval"
    best_mode: str = "min"


def _ranked(entries: list[Entry], mode: str) -> list[tuple[str, int]]:
    """(name, step) of the entries that have a metric, best first; ties go to the newer step."""
    scored = [
        (name, step, metric if mode == "min" else -metric) for name, step, metric in entries if metric is not None
    ]
    return [(name, step) for name, step, _ in sorted(scored, key=lambda e: (e[2], -e[1]))]


def best_of(entries: list[Entry], mode: str) -> str | None:
    ranked = _ranked(entries, mode)
    return ranked[0][0] if ranked else None


def select_retained(
    entries: list[Entry],
    keep_last: int | None,
    keep_best: int | None,
    mode: str = "min",
    protected: frozenset[str] = frozenset(),
) -> set[str]:
    """Names of step directories to keep.

    No limit set keeps everything. Otherwise the union of the newest keep_last and the best
    keep_best (by metric, `mode` min or max) is kept, plus whatever is protected.
    """
    names = {name for name, _, _ in entries}
    if keep_last is None and keep_best is None:
        return names
    keep = set(protected) & names
    if keep_last is not None:
        keep |= {name for name, _, _ in sorted(entries, key=lambda e: e[1], reverse=True)[:keep_last]}
    if keep_best is not None:
        keep |= {name for name, _ in _ranked(entries, mode)[:keep_best]}
    return keep


# ============================================================================================
# on disk


def step_entries(storage: Storage, metric_name: str) -> list[Entry]:
    """(name, step, metric) of every step directory under the storage root."""
    entries: list[Entry] = []
    for p in storage.root.iterdir():
        step = step_of(p.name)
        if step is None or not p.is_dir():
            continue
        try:
            manifest = read_manifest(p)
        except CheckpointError:
            manifest = None
        metric = (manifest or {}).get("metrics", {}).get(metric_name)
        entries.append((p.name, step, float(metric) if isinstance(metric, (int, float)) else None))
    return entries


def apply_retention(storage: Storage, policy: RetentionPolicy, log: Callable[[str], None] = print) -> None:
    """Delete what the policy does not keep and, when retention by metric is asked for
    (keep_best), point `best` at the best evaluated checkpoint, LATEST's final evaluation
    included. Called only after a publish succeeded; never deletes what LATEST or best names."""
    entries = step_entries(storage, policy.best_metric)
    best = None
    if policy.keep_best is not None:
        best = best_of(entries + _latest_entry(storage, policy.best_metric), policy.best_mode)
    storage.point(BEST, best)  # None removes a `best` left from a run that asked for it
    protected = frozenset(n for n in (best, link_target(storage.root / LATEST)) if n)
    keep = select_retained(entries, policy.keep_last, policy.keep_best, policy.best_mode, protected)
    for name, _, _ in entries:
        if name not in keep:
            storage.remove(name)
            log(f"retention: removed {storage.root / name}")


def _latest_entry(storage: Storage, metric_name: str) -> list[Entry]:
    try:
        manifest = read_manifest(storage.root / LATEST)
    except CheckpointError:
        return []
    if manifest is None:
        return []
    metric = manifest.get("metrics", {}).get(metric_name)
    return [(LATEST, int(manifest["step"]), float(metric) if isinstance(metric, (int, float)) else None)]
