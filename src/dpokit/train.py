"""`dpokit train` (also `python -m dpokit.train`): config -> models -> trainer -> checkpoints.

Accepts the DPO reference's command line, e.g.
    python -m dpokit.train model=tiny datasets=[hh_sample] loss=sft exp_name=sft
    python -m dpokit.train loss=dpo loss.beta=0.1 model.archive=.cache/root/sft_.../LATEST/policy.pt exp_name=dpo
Under torchrun every process runs `main`; the first one decides the config, the run directory
and the checkpoint to resume from, and every other process receives its decision.
`trainer=FSDPTrainer` started without torchrun launches torchrun's processes itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dpokit import distributed
from dpokit.config import PREFERENCE_LOSSES
from dpokit.errors import run_guarded
from dpokit.launch import launch
from dpokit.startup import build_config, prepare


def train_or_launch(argv: list[str]) -> int:
    """The `dpokit train` command: train here, or start torchrun's processes for FSDPTrainer."""
    if not distributed.launched_by_torchrun():
        cfg, _ = build_config(argv)
        if cfg.trainer == "FSDPTrainer":
            return launch(argv, cfg)
    main(argv)
    return 0


def main(argv: list[str] | None = None) -> dict:
    """Run one training job (one process, or one of torchrun's); returns a summary (run directory,
    checkpoints, final metrics)."""
    from dpokit.data import cache_dir_for
    from dpokit.models import copy_as_reference, load_archive, load_model, load_tokenizer
    from dpokit.trainers import TRAINERS

    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world_size = distributed.init_process_group() if distributed.launched_by_torchrun() else (0, 1)
    try:
        cfg, resume_dir = distributed.decided_by_main(lambda: prepare(argv, world_size))
        run_dir = cfg.local_run_dir
        say = print if rank == 0 else (lambda *a, **k: None)

        cache_dir = cache_dir_for(list(cfg.local_dirs))
        tokenizer = load_tokenizer(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path, cache_dir)
        say("building policy", flush=True)
        policy = load_model(cfg.model.name_or_path, cfg.model.policy_dtype, cache_dir, seed=cfg.seed)
        reference = None
        if cfg.loss.name in PREFERENCE_LOSSES:
            say("building reference model", flush=True)
            reference = copy_as_reference(policy, cfg.model.reference_dtype)
        if cfg.model.archive is not None:
            load_archive(cfg.model.archive, [m for m in (policy, reference) if m is not None], log=say)

        trainer = TRAINERS[cfg.trainer](
            policy,
            cfg,
            cfg.seed,
            run_dir,
            reference_model=reference,
            rank=rank,
            world_size=world_size,
            tokenizer=tokenizer,
        )
        if resume_dir is not None:
            trainer.restore(resume_dir)
        trainer.train()
        trainer.save(None, trainer.final_metrics)
        distributed.shutdown(finished=True)
    finally:
        distributed.shutdown()

    checkpoints = sorted(p.name for p in Path(run_dir).iterdir() if p.name == "LATEST" or p.name.startswith("step-"))
    summary = {
        "run_dir": os.path.abspath(run_dir),
        "checkpoints": checkpoints,
        "latest_policy": os.path.abspath(os.path.join(run_dir, "LATEST", "policy.pt")),
        "final_metrics": trainer.final_metrics,
        "failed_saves": trainer.failed_saves,
    }
    final = json.dumps({k: round(v, 4) for k, v in trainer.final_metrics.items()})
    say(
        f"done: run directory {summary['run_dir']}\n      checkpoints: {', '.join(checkpoints)}\n"
        f"      final eval: {final}",
        flush=True,
    )
    if trainer.failed_saves:
        say(f"WARNING: {len(trainer.failed_saves)} checkpoint save(s) failed; see the warnings above", flush=True)
    return summary


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(run_guarded(lambda: train_or_launch([a for a in args if a != "--traceback"]), "--traceback" in args))
