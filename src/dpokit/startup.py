"""What is decided before any model is built: the validated config, the checkpoint to resume
from, and the run directory (created, with its config.yaml)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpokit.checkpoint import ResumePoint, locate, newest_complete, resume_point, run_config_of
from dpokit.config import (
    Config,
    check_writable,
    get_local_dir,
    new_run_dir,
    parse_args,
    round_eval_every,
    save_config,
    validate,
)
from dpokit.errors import CheckpointError, ConfigError

# Changing any of these changes the training trajectory, so resuming with a different value is
# refused unless resume_force=true. (The number of processes may change: the global batch is the same.)
RESUME_MUST_MATCH = (
    "model.name_or_path",
    "model.tokenizer_name_or_path",
    "model.archive",
    "model.policy_dtype",
    "loss",
    "lora.enabled",  # a run saved before LoRA existed has none of these keys: it had the defaults
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.modules_to_save",
    "lora.quantize",
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


def build_config(argv: list[str]) -> tuple[DictConfig, ResumePoint | None]:
    """Parse; with resume=..., the saved run's config is the base, and the resume point (the
    checkpoint, verified with its checksums, and how far it had come) is decided: the one
    decision every process of the run receives."""
    cfg, ckpt_dir = _config_and_checkpoint(argv, checksums=True)
    return cfg, None if ckpt_dir is None else resume_point(ckpt_dir)


def launch_config(argv: list[str]) -> DictConfig:
    """The config as far as the command needs it to know whether and how to start processes
    (the trainer, their number): with resume=..., the saved run's, its checkpoint found without
    reading it through. The first process verifies it, once, when it decides (`build_config`)."""
    return _config_and_checkpoint(argv, checksums=False)[0]


def _config_and_checkpoint(argv: list[str], checksums: bool) -> tuple[DictConfig, Path | None]:
    cfg = parse_args(argv)
    if cfg.resume is None:
        return cfg, None
    if cfg.resume == "auto":
        run_dir = auto_resume_dir(cfg)
        found = newest_complete(run_dir, checksums=checksums) if run_dir.is_dir() else None
        if found is None:
            if checksums:
                print(f"resume=auto: no complete checkpoint in {run_dir}; starting a new run there", flush=True)
            cfg.local_run_dir = str(run_dir)
            return cfg, None
        ckpt_dir = found
    else:
        ckpt_dir = locate(cfg.resume, "resume", checksums=checksums)
    saved = run_config_of(ckpt_dir)
    if saved is None:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: no manifest config and no {ckpt_dir.parent / 'config.yaml'}"
        )
    cfg = parse_args(argv, base=saved)
    if not cfg.resume_force:
        saved_cfg = OmegaConf.create(saved)
        defaults = OmegaConf.structured(Config)
        differing = [
            key
            for key in RESUME_MUST_MATCH
            if _plain(OmegaConf.select(cfg, key))
            != _plain(OmegaConf.select(saved_cfg, key, default=OmegaConf.select(defaults, key)))
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
    import torch

    from dpokit.distributed import find_block_class
    from dpokit.models import model_skeleton

    validate(cfg, world_size)
    if world_size > 1 and cfg.trainer == "BasicTrainer":
        raise ConfigError(
            f"config key 'trainer' is BasicTrainer, which runs one process, but {world_size} were started; "
            f"use trainer=FSDPTrainer"
        )
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # torchrun's processes on this machine
    if world_size > 1 and cfg.device != "cpu" and torch.cuda.is_available() and here > torch.cuda.device_count():
        raise ConfigError(
            f"{here} processes on this machine would share its {torch.cuda.device_count()} visible GPU(s), and "
            f"NCCL needs one GPU per process: start at most {torch.cuda.device_count()} (config key 'nproc', "
            f"or torchrun's --nproc_per_node), or pass device=cpu"
        )
    # the model's config loads and has the attention kernel asked for (no weights yet)
    skeleton = model_skeleton(cfg.model.name_or_path, cfg.model.attn_implementation)
    if cfg.trainer == "FSDPTrainer":
        find_block_class(skeleton, cfg.model.block_name)
    if cfg.packing:
        from dpokit.packing import check_model_supports

        check_model_supports(skeleton)


@dataclass
class Prepared:
    """What the first process decided and checked before any model was built."""

    cfg: DictConfig
    resume: ResumePoint | None
    tokenizer: Any = None
    data: Any = None  # dpokit.data.PreparedData
    finished: bool = False  # resume= names the end of a run that trained on everything it asks for


def prepare(argv: list[str], world_size: int) -> Prepared:
    """Everything decided and checked before any model is built or any directory made: the
    config (and the checkpoint to resume from), the output directory being writable, the model's
    structure, `model.archive` against it, the tokenizer and every dataset (read, bad rows
    handled, tokenized). Only then is the run directory created, with its config.yaml."""
    from dpokit.data import cache_dir_for, eval_iterator, prepare_data, train_iterator
    from dpokit.models import load_tokenizer
    from dpokit.weights import check_archive

    cfg, resume = build_config(argv)
    preflight(cfg, world_size)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        round_eval_every(cfg)
    fresh = cfg.local_run_dir is None
    if fresh:
        cfg.local_run_dir = new_run_dir(cfg.exp_name, list(cfg.local_dirs))
    check_writable(cfg.local_run_dir, "local_dirs" if fresh else "local_run_dir")
    if cfg.model.archive is not None:
        check_archive(cfg.model.archive, cfg.model.name_or_path)
    if cfg.lora.enabled:  # every name in lora.target_modules is a layer of the model
        from dpokit import lora
        from dpokit.models import model_skeleton

        lora.target_modules(model_skeleton(cfg.model.name_or_path), cfg.lora.target_modules)
        if cfg.lora.quantize is not None:
            from dpokit.models import check_quantizable

            check_quantizable(cfg.model.name_or_path)
    name = cfg.model.tokenizer_name_or_path or cfg.model.name_or_path
    tokenizer = load_tokenizer(name, cache_dir_for(list(cfg.local_dirs)))
    data = prepare_data(cfg, tokenizer, progress=True)
    train_iterator(cfg, data, tokenizer, cfg.seed)  # enough examples for a batch, in both splits
    eval_iterator(cfg, data, tokenizer, cfg.seed, world_size, log=print)

    # the end of a run that has consumed every batch the config asks for: nothing to train
    finished = (
        resume is not None and resume.is_end and resume.batches >= len(train_iterator(cfg, data, tokenizer, cfg.seed))
    )
    save_config(cfg, cfg.local_run_dir)
    return Prepared(cfg, resume, tokenizer, data, finished)


def summary(cfg: DictConfig) -> str:
    """A few lines about the run (the whole resolved config is in config.yaml)."""
    from dpokit.loss_registry import display_name

    loss = display_name(cfg.loss) + (f" (beta {cfg.loss.beta})" if "beta" in cfg.loss else "")
    length = f"{cfg.n_examples} examples" if cfg.n_examples else f"{cfg.n_epochs} epoch(s)"
    lines = [
        f"model {cfg.model.name_or_path}" + (f" from {cfg.model.archive}" if cfg.model.archive else ""),
        f"loss {loss}, datasets {', '.join(cfg.datasets)}",
        f"{cfg.trainer}, batch {cfg.batch_size} (x{cfg.gradient_accumulation_steps} accumulation), "
        f"lr {cfg.lr} {cfg.optimizer}, {length}, eval every {cfg.eval_every} examples",
        f"full config: {Path(cfg.local_run_dir) / 'config.yaml'}",
    ]
    return "\n".join(lines)
