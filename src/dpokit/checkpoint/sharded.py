"""The sharded layout (checkpoint.format=sharded): every process writes its own part of the
policy and optimizer with PyTorch Distributed Checkpoint, so no process gathers the whole state.

    step-N/sharded/.metadata, __0_0.distcp, __1_0.distcp, ...   (DCP's files, one per process)
    step-N/scheduler.pt, trainer_state.pt, manifest.json         (as in the full layout)

The manifest lists every shard with its size and checksum, so `verify` checks them all.
`consolidate` turns such a directory into the reference's three-file contract on one process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dpokit.checkpoint.format import (
    CONTRACT_FILES,
    POLICY,
    REFERENCE,
    TRAINER_STATE,
    CheckpointWriter,
    checksum_file,
    is_sharded,
    load_payload,
    manifest_step,
    read_manifest,
)
from dpokit.checkpoint.storage import FileRecord, Storage, fsync_dir
from dpokit.distributed import share_tied, single_process_dcp_is_intended
from dpokit.errors import CheckpointError

SHARD_DIR = "sharded"
METADATA = ".metadata"


def write(staging: Path, state: dict, rank: int, fsync: bool = True, group: Any = None) -> dict[str, FileRecord]:
    """Write this process's part of `state` (every process calls it; DCP's collectives go
    through `group`, the default process group when None); returns the records of the files this
    process wrote, for the manifest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    out = staging / SHARD_DIR
    out.mkdir(exist_ok=True)
    with single_process_dcp_is_intended():
        writer = dcp.FileSystemWriter(str(out), sync_files=fsync, single_file_per_rank=True)
        try:
            dcp.save(state, storage_writer=writer, process_group=group)
        except CheckpointException as err:  # with a process group: every process's failures
            raise CheckpointError(write_failure(next(iter(err.failures.values()))[0], err)) from None
        except (OSError, RuntimeError) as err:
            raise CheckpointError(write_failure(err, err)) from None
    if fsync:  # DCP fsyncs its files, not the directory that names them: without this a power cut loses them
        fsync_dir(out)
    mine = {}
    for p in sorted(out.iterdir()):
        if p.name.startswith(f"__{rank}_") or (rank == 0 and p.name == METADATA):
            # read back from the page cache right after writing: cheap, and spread over processes
            mine[f"{SHARD_DIR}/{p.name}"] = FileRecord(p.stat().st_size, checksum_file(p))
    return mine


def write_failure(cause: BaseException, raised: BaseException) -> str:
    """The reason a shard write failed, as a sentence; anything but a failed write is raised
    again as it came. torch.save reports a write the disk refused (full, or past a file size
    limit) only as a file shorter than it wrote: 'unexpected pos'."""
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    first = str(cause).splitlines()[0] if str(cause) else ""
    if isinstance(cause, RuntimeError) and "unexpected pos" in first:
        return f"a shard file came out short: the disk refused a write (full, or past a file size limit) ({first})"
    raise raised


def reader_path(ckpt_dir: Path) -> str:
    return str(ckpt_dir / SHARD_DIR)


def has_optimizer(ckpt_dir: Path) -> bool:
    manifest = read_manifest(ckpt_dir) or {}
    return "optim" in manifest.get("sharded_state", [])


def load_full(ckpt_dir: Path) -> dict[str, Any]:
    """The whole state of a sharded checkpoint in this process's memory: {'model': ..., 'optim': ...}
    (and 'reference' for TR-DPO)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix=".consolidate-", dir=ckpt_dir.parent) as tmp:
        path = Path(tmp) / "full.pt"
        try:
            dcp_to_torch_save(reader_path(ckpt_dir), path)
        except Exception as err:  # DCP reports missing or damaged shards with many types
            raise CheckpointError(f"cannot read the shards of {ckpt_dir}: {type(err).__name__}: {err}") from None
        return torch.load(path, map_location="cpu", weights_only=True)


def consolidate(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, fsync: bool = True) -> Path:
    """Write the reference's three-file checkpoint (plus trainer_state.pt and a manifest) from a
    sharded one, on one process, without a process group; out_dir appears complete or not at all."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    manifest = read_manifest(ckpt_dir)
    if not is_sharded(manifest):
        raise CheckpointError(f"{ckpt_dir} is not a sharded checkpoint (it has no sharded manifest)")
    assert manifest is not None
    if out_dir.exists():
        raise CheckpointError(f"output directory {out_dir} already exists")
    step = manifest_step(ckpt_dir)
    assert step is not None
    full = load_full(ckpt_dir)
    storage = Storage(out_dir.parent, fsync)
    staging = storage.stage(out_dir.parent)
    try:
        writer = CheckpointWriter(staging, fsync)
        metrics = manifest.get("metrics") or {}
        model = share_tied(full["model"], manifest.get("tied") or {})
        lora_config = manifest.get("lora")
        if lora_config is not None:  # a LoRA run: the merged weights, and PEFT's adapter files
            from dpokit import lora

            for name, content in lora.adapter_file_contents(lora_config, lora.adapter_weights(model)).items():
                writer.write(name, step, content, metrics)
            model = lora.merged_state(model, lora_config)
        writer.write(POLICY, step, model, metrics)
        if "optim" in full:
            writer.write(CONTRACT_FILES[1], step, full["optim"], metrics)
        if "reference" in full:
            writer.write(REFERENCE, step, share_tied(full["reference"], manifest.get("tied") or {}), metrics)
        for name in (CONTRACT_FILES[2], TRAINER_STATE):
            if (ckpt_dir / name).is_file():
                writer.write(name, step, load_payload(ckpt_dir / name)["state"], metrics)
        writer.seal(step, metrics, manifest.get("config"), {"consolidated_from": str(ckpt_dir)})
        return storage.commit(staging, out_dir.name, out_dir.parent)
    except BaseException:
        storage.discard(staging)
        raise
