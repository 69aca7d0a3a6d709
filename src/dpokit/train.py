"""`dpokit train` (also `python -m dpokit.train`): config -> models -> trainer -> checkpoints.

Accepts the DPO reference's command line, e.g.
    python -m dpokit.train model=tiny datasets=[hh_sample] loss=sft exp_name=sft
    python -m dpokit.train loss=dpo loss.beta=0.1 model.archive=.cache/root/sft_.../LATEST/policy.pt exp_name=dpo
Under torchrun every process runs `main`; the first one decides the config, the run directory
and the checkpoint to resume from, and every other process receives its decision.
`trainer=FSDPTrainer` started without torchrun launches torchrun's processes itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from dpokit import distributed, lora, loss_registry, tracking
from dpokit.checkpoint import ResumePoint, newest_complete
from dpokit.config import CONFIG_FILE
from dpokit.errors import ConfigError, Interrupted, run_guarded
from dpokit.launch import launch
from dpokit.startup import Prepared, launch_config, prepare, summary


def train_or_launch(argv: list[str]) -> int:
    """The `dpokit train` command: train here, or start torchrun's processes for FSDPTrainer."""
    if not distributed.launched_by_torchrun():
        cfg = launch_config(argv)
        if cfg.trainer == "FSDPTrainer":
            return launch(argv, cfg)
    main(argv)
    return 0


def main(argv: list[str] | None = None) -> dict:
    """Run one training job (one process, or one of torchrun's); returns a summary (run directory,
    checkpoints, final metrics)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world_size = distributed.init_process_group() if distributed.launched_by_torchrun() else (0, 1)
    try:
        prepared: list[Prepared] = []  # the first process keeps what it loaded while deciding

        def decide() -> tuple:
            prepared.append(prepare(argv, world_size))
            written = hashlib.sha256((Path(prepared[0].cfg.local_run_dir) / CONFIG_FILE).read_bytes()).hexdigest()
            return prepared[0].cfg, prepared[0].resume, prepared[0].finished, written

        # one decision (config, resume point, whether the run is over), made by the first process
        cfg, resume, finished, written = distributed.decided_by_main(decide)
        run_dir = Path(cfg.local_run_dir)
        try:  # one run directory, not one per machine
            distributed.check_shared(run_dir / CONFIG_FILE, written)
        except ConfigError:
            if rank == 0 and [p.name for p in run_dir.iterdir()] == [CONFIG_FILE]:  # made just now, for nothing
                shutil.rmtree(run_dir)
            raise
        with tracking.console_copied_to(run_dir / tracking.TRAIN_LOG, enabled=rank == 0):
            say = print if rank == 0 else (lambda *a, **k: None)
            say(summary(cfg))
            if (note := distributed.replacement_note()) is not None:
                say(note)
            say("=" * 80 + f"\nWriting to {socket.gethostname()}:{run_dir}\n" + "=" * 80, flush=True)
            if finished:
                say(f"{resume.checkpoint} is the end of this run: it has trained on every example; nothing to do "
                    f"(pass a larger n_examples or n_epochs to train on)")  # fmt: skip
                return run_summary(run_dir, {}, [])
            trainer = _run(cfg, resume, prepared[0] if prepared else None, rank, world_size, say)
        distributed.shutdown(finished=True)
    finally:
        distributed.shutdown()
    return run_summary(run_dir, trainer.final_metrics, trainer.failed_saves, say)


def _run(cfg, resume: ResumePoint | None, prepared: Prepared | None, rank: int, world_size: int, say) -> Any:
    """Models, trainer, training, the final save; the run's status kept in run.json."""
    from dpokit.data import cache_dir_for, prepare_data
    from dpokit.models import copy_as_reference, fuse_gelu, load_model, load_tokenizer
    from dpokit.trainers import TRAINERS, StopTraining
    from dpokit.weights import load_archive

    run_dir = Path(cfg.local_run_dir)
    status = (lambda state, **kw: tracking.write_status(run_dir, state, **kw)) if rank == 0 else (lambda *a, **k: None)
    cache_dir = cache_dir_for(list(cfg.local_dirs))
    if prepared is not None:
        tokenizer, data = prepared.tokenizer, prepared.data
    else:  # the other processes: the same data, from the tokenized cache the first one wrote
        tokenizer = load_tokenizer(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path, cache_dir)
        data = prepare_data(cfg, tokenizer, log=say)
    status("running", examples=0)
    try:
        say("building policy", flush=True)
        policy = load_model(cfg.model.name_or_path, cfg.model.policy_dtype, cache_dir, seed=cfg.seed,
                            attn_implementation=cfg.model.attn_implementation, quantize=cfg.lora.quantize,
                            device=distributed.resolve_device(cfg.device))  # fmt: skip
        if cfg.model.fused_gelu:
            fuse_gelu(policy)  # the reference, a copy of the policy, gets them too
        reference: Any = None
        needs_reference = loss_registry.objective(cfg).needs_reference  # reference-free losses never build one
        if cfg.lora.enabled:
            if cfg.model.archive is not None:  # full weights (an SFT run's policy.pt is merged): the adapters' base
                load_archive(cfg.model.archive, [policy], log=say)
            if cfg.lora.quantize is not None:  # QLoRA: the 4-bit base, frozen, made ready for adapters
                policy = lora.prepare_quantized(policy)
                say(f"QLoRA: the base model's linear layers in 4 bits ({cfg.lora.quantize})")
            policy = lora.apply(policy, cfg.lora, seed=cfg.seed)
            say(lora.trainable_summary(policy))
            if needs_reference:  # the same weights with the adapters off: no second copy
                reference = lora.AdapterOff(policy)
        else:
            if needs_reference:
                say("building reference model", flush=True)
                reference = copy_as_reference(policy, cfg.model.reference_dtype)
            if cfg.model.archive is not None:
                load_archive(cfg.model.archive, [m for m in (policy, reference) if m is not None], log=say)
        trainer = TRAINERS[cfg.trainer](
            policy, cfg, cfg.seed, str(run_dir), reference_model=reference, rank=rank, world_size=world_size,
            tokenizer=tokenizer, data=data,
        )  # fmt: skip
        del reference  # the trainer's now: with precomputed log-probs it frees it, which needs the only reference
        if resume is not None:
            trainer.restore(resume)
        try:
            trainer.train()
        except StopTraining as stop:
            saved = trainer.save_on_interrupt()
            trainer.checkpointer.wait()  # a save in flight finishes before the process ends
            last = newest_complete(run_dir, checksums=False, log=lambda _m: None)
            status("interrupted", examples=stop.examples)
            raise Interrupted(
                f"stopped after {stop.examples} examples"
                + (f"; saved {saved}" if saved else "")
                + (f"; last complete checkpoint: {last}" if last else "; no checkpoint was complete yet")
                + f"; resume with: dpokit train resume={run_dir if last else '...'}"
            ) from None
        trainer.save(None, trainer.final_metrics)
        trainer.checkpointer.wait()
        trainer.tracker.close()
    except Interrupted:
        raise
    except BaseException as err:
        status("interrupted" if isinstance(err, KeyboardInterrupt) else "failed", error=str(err)[:500])
        raise
    status("finished", examples=trainer.example_counter)
    return trainer


def run_summary(run_dir: Path, final_metrics: dict, failed_saves: list[str], say=print) -> dict:
    checkpoints = sorted(p.name for p in run_dir.iterdir() if p.name == "LATEST" or p.name.startswith("step-"))
    summary = {
        "run_dir": os.path.abspath(run_dir),
        "checkpoints": checkpoints,
        "latest_policy": os.path.abspath(run_dir / "LATEST" / "policy.pt"),
        "final_metrics": final_metrics,
        "failed_saves": failed_saves,
    }
    final = json.dumps({k: round(v, 4) for k, v in final_metrics.items()})
    say(
        f"done: run directory {summary['run_dir']}\n      checkpoints: {', '.join(checkpoints)}\n"
        f"      final eval: {final}",
        flush=True,
    )
    if failed_saves:
        say(f"WARNING: {len(failed_saves)} checkpoint save(s) failed; see the warnings above", flush=True)
    return summary


def exit_worker(status: int) -> None:
    """End a torchrun worker without the interpreter's teardown. Everything the job owes is done
    by now (checkpoints published and fsynced, logs closed, the process group left together).

    Why: destroy_process_group does not free gloo's process group after an FSDP2 run (DTensor's
    sharding-propagation cache keeps a DeviceMesh, which keeps the group), so its worker threads
    outlive main. One of them can still be releasing the last barrier's work, whose tensors were
    made in Python: dropping them needs the GIL, and a thread that asks for the GIL while the
    interpreter finalizes is ended by pthread_exit, which unwinds through a noexcept destructor:
    `terminate called without an active exception`, SIGABRT, and a finished job fails for the
    launcher. Seen in about 1 of 10 two-process runs beside a busy loop on 2 cores, and in full
    test runs without one; the stack (core dump: ProcessGroupGloo::runLoop, ~AsyncBarrierWork,
    decref_pyobject, take_gil, PyThread_exit_thread) is the one torch's own unmerged fix
    (an atexit destroy_process_group) describes. Skipping finalization avoids the race."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    args = sys.argv[1:]
    status = run_guarded(lambda: train_or_launch([a for a in args if a != "--traceback"]), "--traceback" in args)
    if distributed.launched_by_torchrun():
        exit_worker(status)
    sys.exit(status)
