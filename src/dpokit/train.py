"""`dpokit train` (also `python -m dpokit.train`): config -> models -> trainer -> checkpoints.

Accepts the DPO reference's command line, e.g.
    python -m dpokit.train model=tiny datasets=[hh_sample] loss=sft exp_name=sft
    python -m dpokit.train loss=dpo loss.beta=0.1 model.archive=.cache/root/sft_.../LATEST/policy.pt exp_name=dpo
"""

from __future__ import annotations

import json
import os
import socket
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dpokit.checkpoint import is_run_dir, load_payload, newest_complete, read_manifest, verify_dir
from dpokit.config import PREFERENCE_LOSSES, new_run_dir, parse_args, round_eval_every, save_config, validate
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


def find_resume_checkpoint(path: str) -> Path:
    """A run directory means its newest complete checkpoint; a checkpoint directory itself."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"resume path {p} does not exist")
    if p.is_file():
        p = p.parent
    if (p / "policy.pt").is_file() and not is_run_dir(p):
        problem = verify_dir(p)
        if problem is not None:
            raise CheckpointError(f"cannot resume from {p}: {problem}")
        return p
    found = newest_complete(p)
    if found is None:
        raise CheckpointError(f"resume path {p} holds no complete checkpoint")
    return found


def saved_run_config(ckpt_dir: Path) -> dict:
    manifest = read_manifest(ckpt_dir)
    if manifest is not None and manifest.get("config"):
        return manifest["config"]
    config_yaml = ckpt_dir.parent / "config.yaml"
    if config_yaml.is_file():
        return OmegaConf.to_container(OmegaConf.load(config_yaml))
    raise CheckpointError(f"cannot resume from {ckpt_dir}: no manifest config and no {config_yaml}")


def build_config(argv: list[str]) -> tuple[DictConfig, Path | None]:
    """Parse and validate; with resume=..., the saved run's config is the base."""
    cfg = parse_args(argv)
    if cfg.resume is None:
        return cfg, None
    ckpt_dir = find_resume_checkpoint(cfg.resume)
    saved = saved_run_config(ckpt_dir)
    cfg = parse_args(argv, base=saved)
    if not cfg.resume_force:
        differing = [
            key
            for key in RESUME_MUST_MATCH
            if _plain(OmegaConf.select(cfg, key)) != _plain(OmegaConf.select(OmegaConf.create(saved), key))
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


def main(argv: list[str] | None = None) -> dict:
    """Run one training job; returns a summary (run directory, checkpoints, final metrics)."""
    from dpokit.data import cache_dir_for
    from dpokit.models import copy_as_reference, load_archive, load_model, load_tokenizer
    from dpokit.trainers import BasicTrainer

    cfg, resume_dir = build_config(list(sys.argv[1:] if argv is None else argv))
    validate(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        round_eval_every(cfg)
    if cfg.local_run_dir is None:
        cfg.local_run_dir = new_run_dir(cfg.exp_name, list(cfg.local_dirs))
    run_dir = cfg.local_run_dir
    print(OmegaConf.to_yaml(cfg))
    save_config(cfg, run_dir)
    print("=" * 80 + f"\nWriting to {socket.gethostname()}:{run_dir}\n" + "=" * 80, flush=True)

    cache_dir = cache_dir_for(list(cfg.local_dirs))
    tokenizer = load_tokenizer(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path, cache_dir)
    print("building policy", flush=True)
    policy = load_model(cfg.model.name_or_path, cfg.model.policy_dtype, cache_dir, seed=cfg.seed)
    reference = None
    if cfg.loss.name in PREFERENCE_LOSSES:
        print("building reference model", flush=True)
        reference = copy_as_reference(policy, cfg.model.reference_dtype)
    if cfg.model.archive is not None:
        load_archive(cfg.model.archive, [m for m in (policy, reference) if m is not None])
    if resume_dir is not None:
        policy.load_state_dict(load_payload(resume_dir / "policy.pt")["state"])

    trainer = BasicTrainer(policy, cfg, cfg.seed, run_dir, reference_model=reference, tokenizer=tokenizer)
    if resume_dir is not None:
        trainer.load_resume_state(resume_dir)
    trainer.train()
    trainer.save_or_warn(None, trainer.final_metrics)

    checkpoints = sorted(p.name for p in Path(run_dir).iterdir() if p.name == "LATEST" or p.name.startswith("step-"))
    summary = {
        "run_dir": os.path.abspath(run_dir),
        "checkpoints": checkpoints,
        "latest_policy": os.path.abspath(os.path.join(run_dir, "LATEST", "policy.pt")),
        "final_metrics": trainer.final_metrics,
        "failed_saves": trainer.failed_saves,
    }
    print(
        f"done: run directory {summary['run_dir']}\n      checkpoints: {', '.join(checkpoints)}\n"
        f"      final eval: {json.dumps({k: round(v, 4) for k, v in trainer.final_metrics.items()})}",
        flush=True,
    )
    if trainer.failed_saves:
        print(f"WARNING: {len(trainer.failed_saves)} checkpoint save(s) failed; see the warnings above", flush=True)
    return summary


if __name__ == "__main__":
    from dpokit.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
