"""What is decided before any model is built: the validated config, the checkpoint to resume
from, and the run directory (created, with its config.yaml)."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dpokit.checkpoint import locate, run_config_of
from dpokit.config import new_run_dir, parse_args, round_eval_every, save_config, validate
from dpokit.errors import CheckpointError, ConfigError

# Changing any of these changes the training trajectory, so resuming with a different value is
# refused unless resume_force=true.
RESUME_MUST_MATCH = (
    "model.name_or_path",
    "model.tokenizer_name_or_path",
    "model.archive",
    "model.policy_dtype",
    "loss",
    "batch_size",
    "gradient_accumulation_steps",
    "datasets",
    "seed",
    "optimizer",
    "max_length",
    "max_prompt_length",
)


def build_config(argv: list[str]) -> tuple[DictConfig, Path | None]:
    """Parse; with resume=..., the saved run's config is the base and the checkpoint is located."""
    cfg = parse_args(argv)
    if cfg.resume is None:
        return cfg, None
    ckpt_dir = locate(cfg.resume, "resume")
    saved = run_config_of(ckpt_dir)
    if saved is None:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: no manifest config and no {ckpt_dir.parent / 'config.yaml'}"
        )
    cfg = parse_args(argv, base=saved)
    if not cfg.resume_force:
        saved_cfg = OmegaConf.create(saved)
        differing = [
            key
            for key in RESUME_MUST_MATCH
            if _plain(OmegaConf.select(cfg, key)) != _plain(OmegaConf.select(saved_cfg, key))
        ]
        if differing:
            raise ConfigError(
                f"cannot resume from {ckpt_dir}: config keys {', '.join(differing)} differ from the saved run "
                f"(pass resume_force=true to resume anyway)"
            )
    cfg.local_run_dir = str(ckpt_dir.parent)
    return cfg, ckpt_dir


def _plain(value):
    return (
        OmegaConf.to_container(value, resolve=True)
        if isinstance(value, DictConfig) or OmegaConf.is_list(value)
        else value
    )


def prepare(argv: list[str], world_size: int) -> tuple[DictConfig, Path | None]:
    """Everything decided before any model is built: the validated config, the checkpoint to
    resume from, and the run directory (created, with its config.yaml)."""
    cfg, resume_dir = build_config(argv)
    validate(cfg, world_size)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        round_eval_every(cfg)
    if cfg.local_run_dir is None:
        cfg.local_run_dir = new_run_dir(cfg.exp_name, list(cfg.local_dirs))
    print(OmegaConf.to_yaml(cfg))
    save_config(cfg, cfg.local_run_dir)
    print("=" * 80 + f"\nWriting to {socket.gethostname()}:{cfg.local_run_dir}\n" + "=" * 80, flush=True)
    return cfg, resume_dir
