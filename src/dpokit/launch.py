"""`dpokit train trainer=FSDPTrainer ...` started without torchrun: dpokit starts the processes
itself with PyTorch's elastic launcher (what torchrun runs), one per visible GPU, or
`nproc` (default 2) on CPU, as the reference starts one worker per GPU. Under torchrun (or any
launcher that sets its environment) nothing is launched: the process trains.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

from omegaconf import DictConfig


def default_nproc(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 2


def launch(argv: list[str], cfg: DictConfig) -> int:
    """Start torchrun's workers on this machine, each running `python -m dpokit.train argv`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from dpokit.config import new_run_dir
    from dpokit.startup import preflight

    nproc = cfg.nproc or default_nproc(cfg.device)
    # e.g. batch sizes must divide by the number of processes, one GPU each: say so before starting them
    preflight(cfg, nproc)
    extra = []
    if cfg.local_run_dir is None:  # every process must write into the same run directory
        extra.append(f"local_run_dir={new_run_dir(cfg.exp_name, list(cfg.local_dirs))}")
    # fsdp_port keeps the reference's meaning (the rendezvous port); without it torchrun's
    # standalone rendezvous picks a free one
    backend, endpoint = ("static", f"127.0.0.1:{cfg.fsdp_port}") if cfg.fsdp_port else ("c10d", "127.0.0.1:0")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        max_restarts=0,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": 0} if backend == "static" else {},
    )
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        # as torchrun does: one intra-op thread per process unless told otherwise, so processes do
        # not oversubscribe the cores, and a job gives the same bits whichever of the two started it
        os.environ["OMP_NUM_THREADS"] = "1"
    print(f"dpokit: starting {nproc} processes (torchrun) for trainer=FSDPTrainer", flush=True)
    # The processes say why they stop (one sentence for a user error, a traceback for a bug);
    # the launcher's own log of which process ended how would only repeat it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "dpokit.train", *argv, *extra)
    except ChildFailedError as err:
        # the status of a process that stopped by itself (the others were stopped by the launcher)
        own = [f.exitcode for f in err.failures.values() if f.exitcode > 0]
        return min(own) if own else 1
    return 0
