"""What is decided before any model is built: the validated config, the checkpoint to resume
from, and the run directory (created, with its config.yaml)."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dpokit.checkpoint import locate, newest_complete, run_config_of
from dpokit.config import get_local_dir, new_run_dir, parse_args, round_eval_every, save_config, validate
from dpokit.errors import CheckpointError, ConfigError

# Changing any of these changes the training trajectory, so resuming with a different value is
# refused unless resume_force=true. (The number of processes may change: the global batch is the same.)
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


def auto_resume_dir(cfg: DictConfig) -> Path:
    """The run directory `resume=auto` looks in, the same for every restart of the same job."""
    if cfg.local_run_dir:
        return Path(cfg.local_run_dir)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":  # torchrun --standalone or --rdzv-id: stable across its restarts
        return Path(get_local_dir(list(cfg.local_dirs))) / f"{cfg.exp_name}_{run_id}"
    raise ConfigError(
        "config key 'resume' is 'auto' but no run directory is fixed: set local_run_dir=DIR (or run under torchrun "
        "with --standalone or --rdzv-id, whose run id names the directory) so that a restarted run finds its checkpoints"
    )


def build_config(argv: list[str]) -> tuple[DictConfig, Path | None]:
    """Parse; with resume=..., the saved run's config is the base and the checkpoint is located."""
    cfg = parse_args(argv)
    if cfg.resume is None:
        return cfg, None
    if cfg.resume == "auto":
        run_dir = auto_resume_dir(cfg)
        found = newest_complete(run_dir) if run_dir.is_dir() else None
        if found is None:
            print(f"resume=auto: no complete checkpoint in {run_dir}; starting a new run there", flush=True)
            cfg.local_run_dir = str(run_dir)
            return cfg, None
        ckpt_dir = found
    else:
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


def preflight(cfg: DictConfig, world_size: int) -> None:
    """Refuse, before any process, directory or model weights exist, what would fail later."""
    from dpokit.distributed import find_block_class
    from dpokit.models import model_skeleton

    validate(cfg, world_size)
    if world_size > 1 and cfg.trainer == "BasicTrainer":
        raise ConfigError(
            f"config key 'trainer' is BasicTrainer, which runs one process, but {world_size} were started; "
            f"use trainer=FSDPTrainer"
        )
    if cfg.trainer == "FSDPTrainer":
        find_block_class(model_skeleton(cfg.model.name_or_path), cfg.model.block_name)


def prepare(argv: list[str], world_size: int) -> tuple[DictConfig, Path | None]:
    """Everything decided before any model is built: the validated config, the checkpoint to
    resume from, and the run directory (created, with its config.yaml)."""
    cfg, resume_dir = build_config(argv)
    preflight(cfg, world_size)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        round_eval_every(cfg)
    if cfg.local_run_dir is None:
        cfg.local_run_dir = new_run_dir(cfg.exp_name, list(cfg.local_dirs))
    print(OmegaConf.to_yaml(cfg))
    save_config(cfg, cfg.local_run_dir)
    print("=" * 80 + f"\nWriting to {socket.gethostname()}:{cfg.local_run_dir}\n" + "=" * 80, flush=True)
    return cfg, resume_dir
