"""Checkpoints: the DPO reference's three-file contract, crash-safe, verifiable and resumable.

- `storage`: where checkpoint directories live and how they appear atomically (staging,
  publish, the LATEST link, sweeping leftovers of killed saves)
- `format`: what a checkpoint holds (contract files, trainer state, manifest) and verification;
  `sharded`: the Distributed Checkpoint layout and its consolidation
- `discovery`: what a path given by a user is and which checkpoint it means
- `retention`: which step directories to keep (plain logic)
- `checkpointer`: the `Checkpointer`, the one owner of training state on disk
"""

from dpokit.checkpoint.checkpointer import Checkpointer, CheckpointSettings, rewrite_file
from dpokit.checkpoint.discovery import (
    PathKind,
    ResumePoint,
    checkpoint_dir_of,
    checkpoint_dirs,
    kind_of,
    locate,
    newest_complete,
    resume_point,
    run_config_of,
    step_dir_name,
    step_of,
)
from dpokit.checkpoint.format import (
    CONTRACT_FILES,
    MANIFEST,
    POLICY,
    REFERENCE,
    TRAINER_STATE,
    CheckpointWriter,
    checksum_file,
    is_adapter_only,
    is_sharded,
    load_payload,
    read_manifest,
    verify_dir,
)
from dpokit.checkpoint.retention import RetentionPolicy, apply_retention, best_of, select_retained
from dpokit.checkpoint.storage import LATEST, Storage, atomic_write, atomic_write_bytes, fsync_dir, make_dirs

__all__ = [
    "CONTRACT_FILES",
    "LATEST",
    "MANIFEST",
    "POLICY",
    "REFERENCE",
    "TRAINER_STATE",
    "CheckpointSettings",
    "CheckpointWriter",
    "Checkpointer",
    "PathKind",
    "ResumePoint",
    "RetentionPolicy",
    "Storage",
    "apply_retention",
    "atomic_write",
    "atomic_write_bytes",
    "best_of",
    "checkpoint_dir_of",
    "checkpoint_dirs",
    "checksum_file",
    "fsync_dir",
    "make_dirs",
    "is_adapter_only",
    "is_sharded",
    "kind_of",
    "load_payload",
    "locate",
    "newest_complete",
    "read_manifest",
    "resume_point",
    "rewrite_file",
    "run_config_of",
    "select_retained",
    "step_dir_name",
    "step_of",
    "verify_dir",
]
