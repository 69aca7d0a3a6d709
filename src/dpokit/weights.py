"""The policy weights a checkpoint holds, for everything that reads them (`model.archive`,
`ckpt export`, `ckpt diff`): its `policy.pt`; or, for a LoRA checkpoint saved with
`lora.save_merged=false`, the weights its run started from (the manifest's `base`: the model,
its dtype and seed, and the `model.archive` it loaded) with its adapter merged, the same numbers
the merged `policy.pt` would have held. An adapter-only archive's base may be adapter-only
itself (LoRA SFT -> LoRA DPO): it is merged the same way, recursively.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpokit.checkpoint import checkpoint_dir_of, checksum_file, is_adapter_only, load_payload, locate, read_manifest
from dpokit.checkpoint.discovery import Purpose
from dpokit.checkpoint.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, manifest_files
from dpokit.errors import CheckpointError


def base_record(run_config: dict) -> dict:
    """What an adapter-only checkpoint records of its base: the run's model (a local directory
    made absolute), policy dtype and seed (a model built from its config gets its weights from
    the seed), and the located model.archive with its checksum, so that an archive moved,
    replaced or trained further is refused rather than merged into."""
    model = run_config.get("model") or {}
    name = model.get("name_or_path")
    record: dict[str, Any] = {
        "name_or_path": os.path.abspath(name) if name and os.path.exists(name) else name,
        "dtype": model.get("policy_dtype", "float32"),
        "seed": run_config.get("seed", 0),
        "quantized": (run_config.get("lora") or {}).get("quantize"),  # QLoRA: merged into the full-precision base
        "archive": None,
        "archive_xxh3": None,
    }
    if model.get("archive") is not None:
        path = locate(model["archive"], "archive", log=lambda _m: None)
        record["archive"], record["archive_xxh3"] = os.path.abspath(path), _checksum(path)
    return record


def _checksum(path: Path) -> str:
    """A weights file's checksum: its manifest's record (no reading), else computed (a file
    written by the reference)."""
    ckpt_dir = checkpoint_dir_of(path)
    record = manifest_files(ckpt_dir).get(path.relative_to(ckpt_dir).as_posix())
    return record["xxh3_64"] if record else checksum_file(path)


def _adapter_manifest(located: Path) -> dict | None:
    """The manifest of an adapter-only checkpoint `locate` pointed into, else None."""
    if located.name != Path(ADAPTER_WEIGHTS).name:
        return None
    manifest = read_manifest(checkpoint_dir_of(located))
    return manifest if is_adapter_only(manifest) else None


def read_policy(path: str | Path, purpose: Purpose = "weights", log: Callable[[str], None] = print) -> dict:
    """{'step_idx', 'state', 'metrics'} of the policy at `path` (a file, checkpoint or run
    directory), as its policy.pt holds them or as merging its adapter into its base gives them."""
    located = locate(path, purpose, log=log)
    manifest = _adapter_manifest(located)
    if manifest is None:
        return load_payload(located)
    _, merged = _merge(located, manifest, log)
    return {"step_idx": manifest["step"], "state": merged, "metrics": manifest.get("metrics") or {}}


def merged_model(path: str | Path, log: Callable[[str], None] = print) -> torch.nn.Module | None:
    """For an adapter-only checkpoint at `path`: its base model with the adapter merged into its
    weights (`ckpt export` saves it: one copy of the model in memory); None for any other."""
    located = locate(path, "weights", log=log)
    manifest = _adapter_manifest(located)
    if manifest is None:
        return None
    model, merged = _merge(located, manifest, log)
    model.load_state_dict(merged)
    return model


def _merge(located: Path, manifest: dict, log: Callable[[str], None]) -> tuple[torch.nn.Module, dict]:
    """The base model of an adapter-only checkpoint and its merged state dict."""
    from safetensors.torch import load_file

    from dpokit import lora

    ckpt_dir = checkpoint_dir_of(located)
    log(f"merging the LoRA adapter of {ckpt_dir} into its base (saved with lora.save_merged=false)")
    config = json.loads((ckpt_dir / ADAPTER_CONFIG).read_text())
    model = base_model(ckpt_dir, manifest, log)
    base = {k: v.detach() for k, v in model.state_dict().items()}
    return model, lora.merge_saved(base, load_file(str(located)), config)


def base_model(ckpt_dir: Path, manifest: dict, log: Callable[[str], None] = print) -> torch.nn.Module:
    """The model an adapter-only checkpoint's run started from, rebuilt as its run built it."""
    from dpokit.models import check_state_dict_fits, load_model

    base = _base_of(ckpt_dir, manifest)
    model = load_model(base["name_or_path"], base["dtype"], seed=base["seed"])
    if base["archive"] is not None:
        state = read_policy(base["archive"], "archive", log=log)["state"]
        check_state_dict_fits(model, state, base["archive"])
        model.load_state_dict(state)
    return model


def _base_of(ckpt_dir: Path, manifest: dict) -> dict:
    """The manifest's base record, its archive still the file the run trained on."""
    base = manifest.get("base")
    if not isinstance(base, dict) or not base.get("name_or_path"):
        raise CheckpointError(
            f"{ckpt_dir / 'manifest.json'} has no base record, which an adapter-only checkpoint needs"
        )
    archive = base.get("archive")
    if archive is not None:
        if not Path(archive).is_file():
            raise CheckpointError(
                f"the base of {ckpt_dir} is gone: {archive} (the model.archive its run started from) does not exist; "
                f"an adapter-only checkpoint (lora.save_merged=false) needs it to be merged"
            )
        if _checksum(Path(archive)) != base.get("archive_xxh3"):
            raise CheckpointError(
                f"the base of {ckpt_dir} has changed: {archive} is not the file its run started from (its checksum "
                f"differs), so its adapter cannot be merged into it"
            )
    return base


def base_problem(ckpt_dir: Path) -> str | None:
    """Why an adapter-only checkpoint could not be merged (its base, recursively: gone or
    changed), cheaply: nothing is loaded. None for every other checkpoint."""
    try:
        manifest = read_manifest(ckpt_dir)
        while is_adapter_only(manifest):
            assert manifest is not None
            base = _base_of(ckpt_dir, manifest)
            if base["archive"] is None:
                return None
            archive = Path(base["archive"])
            ckpt_dir = checkpoint_dir_of(archive)
            manifest = read_manifest(ckpt_dir) if _adapter_manifest(archive) is not None else None
    except CheckpointError as err:
        return str(err)
    return None


def check_archive(archive: str, name_or_path: str, log: Callable[[str], None] = print) -> Path:
    """`model.archive` exists, is a checkpoint, and its tensors fit the model: names and shapes
    read from the file's index (memory-mapped) against the weightless model, so no weights are
    loaded and no model is built to find out. An adapter-only archive: its base is there and
    unchanged, and its model has this model's names and shapes."""
    from dpokit.models import check_state_dict_fits, model_skeleton

    path = locate(archive, "archive", log=log)
    manifest = _adapter_manifest(path)
    if manifest is not None:
        problem = base_problem(checkpoint_dir_of(path))
        if problem is not None:
            raise CheckpointError(f"model.archive {archive}: {problem}")
        base_model = model_skeleton(manifest["base"]["name_or_path"])
        check_state_dict_fits(model_skeleton(name_or_path), base_model.state_dict(), str(path))
        return path
    state = load_payload(path, mmap=True)["state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict under 'state'")
    check_state_dict_fits(model_skeleton(name_or_path), state, str(path))
    return path


def load_archive(archive: str, models: list[torch.nn.Module], log: Callable[[str], None] = print) -> dict:
    """Load `model.archive` (a policy.pt, checkpoint directory or run directory) into each model."""
    from dpokit.models import check_state_dict_fits

    payload = read_policy(archive, "archive", log=log)
    state = payload["state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{archive} holds no state dict under 'state'")
    log(
        f"loading pre-trained weights at step {payload['step_idx']} from {archive} with metrics "
        f"{json.dumps(payload.get('metrics', {}), indent=2, default=str)}"
    )
    for model in models:
        check_state_dict_fits(model, state, str(archive))
        model.load_state_dict(state)
    log("loaded pre-trained weights")
    return payload
