"""Export a trained policy to a Hugging Face model directory (config, safetensors, tokenizer)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from dpokit.checkpoint import fsync_dir, load_payload, read_manifest, resolve_archive
from dpokit.errors import DpokitError


def base_model_of(policy_path: Path) -> tuple[str, str | None]:
    """(model.name_or_path, model.tokenizer_name_or_path) of the run that wrote the checkpoint:
    from the checkpoint's manifest, else the run's config.yaml beside the checkpoint directory."""
    ckpt_dir = policy_path.parent
    manifest = read_manifest(ckpt_dir)
    model = ((manifest or {}).get("config") or {}).get("model")
    if not model:
        config_yaml = ckpt_dir.parent / "config.yaml"
        if not config_yaml.is_file():
            raise DpokitError(
                f"cannot tell the base model of {policy_path}: no manifest config and no {config_yaml}; "
                f"pass --model NAME_OR_PATH"
            )
        model = OmegaConf.to_container(OmegaConf.load(config_yaml)).get("model") or {}
    if not model.get("name_or_path"):
        raise DpokitError(f"the run config of {policy_path} names no model.name_or_path; pass --model NAME_OR_PATH")
    return model["name_or_path"], model.get("tokenizer_name_or_path")


def export_hf(ckpt: Path, out_dir: Path, model_name: str | None = None, force: bool = False) -> Path:
    """Build the base model, load the policy weights into it and save_pretrained (safetensors).

    Written into a staging directory beside out_dir and renamed into place, so out_dir is either
    absent or a complete export.
    """
    from dpokit.models import check_state_dict_fits, load_model, load_tokenizer

    policy_path = resolve_archive(ckpt)
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
    model = load_model(base, dtype=dtype)
    check_state_dict_fits(model, state, str(policy_path))
    model.load_state_dict(state)
    tokenizer = load_tokenizer(tokenizer_name or base)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".staging-export-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        fsync_dir(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
        fsync_dir(out_dir.parent)
    except OSError as err:
        raise DpokitError(f"cannot write export directory {out_dir}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
