"""Export a trained policy to a Hugging Face model directory (config, safetensors, tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpokit.checkpoint import Storage, checkpoint_dir_of, locate, run_config_of
from dpokit.errors import CheckpointError, DpokitError


def base_model_of(policy_path: Path) -> tuple[str, str | None]:
    """(model.name_or_path, model.tokenizer_name_or_path) of the run that wrote the checkpoint:
    from the checkpoint's manifest, else the run's config.yaml beside the checkpoint directory."""
    ckpt_dir = checkpoint_dir_of(policy_path)
    config = run_config_of(ckpt_dir)
    if config is None:
        raise DpokitError(
            f"cannot tell the base model of {policy_path}: no manifest config and no "
            f"{ckpt_dir.parent / 'config.yaml'}; pass --model NAME_OR_PATH"
        )
    model = config.get("model") or {}
    if not model.get("name_or_path"):
        raise DpokitError(f"the run config of {policy_path} names no model.name_or_path; pass --model NAME_OR_PATH")
    return model["name_or_path"], model.get("tokenizer_name_or_path")


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DpokitError(f"export path {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise DpokitError(f"export directory {out_dir} exists and is not empty (pass --force to replace it)")


def export_adapter(ckpt: Path, out_dir: Path, force: bool = False) -> Path:
    """Copy a LoRA run's adapter (PEFT's adapter_config.json and adapter_model.safetensors) out of
    a checkpoint, checked against the manifest's checksums, atomically as export_hf writes."""
    import shutil

    from dpokit.checkpoint import checksum_file
    from dpokit.checkpoint.format import manifest_files
    from dpokit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    ckpt_dir = checkpoint_dir_of(locate(ckpt, "weights"))
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    known = manifest_files(ckpt_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        path = ckpt_dir / name
        if not path.is_file():
            raise DpokitError(f"{ckpt_dir} has no LoRA adapter ({name}): it was trained without lora.enabled")
        if name in known and checksum_file(path) != known[name]["xxh3_64"]:
            raise DpokitError(f"{path} does not match its checksum in {ckpt_dir / 'manifest.json'}: it was damaged")

    def write(staging: Path) -> None:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(ckpt_dir / name, staging / Path(name).name)

    return _write_atomically(out_dir, write)


def export_hf(ckpt: Path, out_dir: Path, model_name: str | None = None, force: bool = False) -> Path:
    """Build the base model, load the policy weights into it (an adapter-only LoRA checkpoint:
    merged into its base first) and save_pretrained (safetensors).

    Written into a staging directory beside out_dir and renamed into place, so out_dir is either
    absent (or its old content) or a complete export.
    """
    from dpokit.models import check_state_dict_fits, load_model, load_tokenizer
    from dpokit.weights import merged_model, read_policy

    policy_path = locate(ckpt, "weights")
    base, tokenizer_name = (model_name, None) if model_name else base_model_of(policy_path)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)

    quiet = lambda _m: None  # noqa: E731
    model: Any = None if model_name else merged_model(policy_path, log=quiet)  # adapter-only: its own base
    if model is None:
        state = read_policy(policy_path, "weights", log=quiet)["state"]
        first = next((v for v in state.values() if hasattr(v, "dtype")), None)
        dtype = str(first.dtype).replace("torch.", "") if first is not None else "float32"
        model = load_model(base, dtype=dtype)
        check_state_dict_fits(model, state, str(policy_path))
        model.load_state_dict(state)
    tokenizer = load_tokenizer(tokenizer_name or base)

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    return _write_atomically(out_dir, write)


def _write_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run `write` into a staging directory beside out_dir, then rename it into place: out_dir
    is either its old content or complete."""
    storage = Storage(out_dir.parent)
    try:
        staging = storage.stage()
    except CheckpointError as err:
        raise DpokitError(f"cannot write export directory {out_dir}: {err}") from None
    try:
        write(staging)
    except OSError as err:
        storage.discard(staging)
        raise DpokitError(f"cannot write export directory {out_dir}: {err.strerror or err}") from None
    except BaseException:
        storage.discard(staging)
        raise
    return storage.commit(staging, out_dir.name)
