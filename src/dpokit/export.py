"""Export a trained policy to a Hugging Face model directory (config, safetensors, tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpokit.checkpoint import Storage, load_payload, locate, run_config_of
from dpokit.errors import CheckpointError, DpokitError


def base_model_of(policy_path: Path) -> tuple[str, str | None]:
    """(model.name_or_path, model.tokenizer_name_or_path) of the run that wrote the checkpoint:
    from the checkpoint's manifest, else the run's config.yaml beside the checkpoint directory."""
    config = run_config_of(policy_path.parent)
    if config is None:
        raise DpokitError(
            f"cannot tell the base model of {policy_path}: no manifest config and no "
            f"{policy_path.parent.parent / 'config.yaml'}; pass --model NAME_OR_PATH"
        )
    model = config.get("model") or {}
    if not model.get("name_or_path"):
        raise DpokitError(f"the run config of {policy_path} names no model.name_or_path; pass --model NAME_OR_PATH")
    return model["name_or_path"], model.get("tokenizer_name_or_path")


def export_hf(ckpt: Path, out_dir: Path, model_name: str | None = None, force: bool = False) -> Path:
    """Build the base model, load the policy weights into it and save_pretrained (safetensors).

    Written into a staging directory beside out_dir and renamed into place, so out_dir is either
    absent (or its old content) or a complete export.
    """
    from dpokit.models import check_state_dict_fits, load_model, load_tokenizer

    policy_path = locate(ckpt, "weights")
    base, tokenizer_name = (model_name, None) if model_name else base_model_of(policy_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DpokitError(f"export path {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise DpokitError(f"export directory {out_dir} exists and is not empty (pass --force to replace it)")

    payload = load_payload(policy_path)
    state = payload["state"]
    first = next((v for v in state.values() if hasattr(v, "dtype")), None)
    dtype = str(first.dtype).replace("torch.", "") if first is not None else "float32"
    model: Any = load_model(base, dtype=dtype)
    check_state_dict_fits(model, state, str(policy_path))
    model.load_state_dict(state)
    tokenizer = load_tokenizer(tokenizer_name or base)

    storage = Storage(out_dir.parent)
    try:
        staging = storage.stage()
    except CheckpointError as err:
        raise DpokitError(f"cannot write export directory {out_dir}: {err}") from None
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    except OSError as err:
        storage.discard(staging)
        raise DpokitError(f"cannot write export directory {out_dir}: {err.strerror or err}") from None
    except BaseException:
        storage.discard(staging)
        raise
    return storage.commit(staging, out_dir.name)
