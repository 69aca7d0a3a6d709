"""What a checkpoint directory holds, and how to tell a complete one from a damaged one.

The DPO reference's contract: `policy.pt`, `optimizer.pt` and `scheduler.pt`, each
`torch.save({'step_idx': int, 'state': state_dict, 'metrics': dict})`. Around it, without changing
it: `trainer_state.pt` (counters, RNG states, data position, for exact resume) and
`manifest.json`, written last, with every file's size and xxh3-64 checksum, the step, metrics,
the run's config and library versions. A directory is a complete checkpoint when its manifest
is there and matches; directories written by the reference have none and are checked by loading.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import platform
import time
from pathlib import Path
from typing import Any

import torch

from dpokit.checkpoint.storage import FileRecord, atomic_write, atomic_write_bytes, fsync_dir, make_dirs, os_failure
from dpokit.errors import CheckpointError

POLICY, OPTIMIZER, SCHEDULER = "policy.pt", "optimizer.pt", "scheduler.pt"
CONTRACT_FILES = (POLICY, OPTIMIZER, SCHEDULER)
TRAINER_STATE = "trainer_state.pt"
REFERENCE = "reference.pt"  # TR-DPO (loss.sync_ref_model): the reference model's weights, which training changes
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dpokit-checkpoint"
MANIFEST_VERSION = 1
ADAPTER_LAYOUT = "adapter"  # the manifest's "layout" of a LoRA checkpoint without merged weights
ADAPTER_DIR = "adapter"  # a LoRA checkpoint's PEFT directory: PeftModel.from_pretrained(base, CKPT/adapter)
ADAPTER_CONFIG = f"{ADAPTER_DIR}/adapter_config.json"  # PEFT's file names
ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/adapter_model.safetensors"
_CHUNK = 1 << 22


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def checksum_file(path: str | os.PathLike) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import transformers

    from dpokit import __version__

    return {
        "dpokit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# ============================================================================================
# contract files


def write_payload(
    path: str | os.PathLike, step: int, state: Any, metrics: dict | None, fsync: bool = True
) -> FileRecord:
    """One contract file: torch.save({'step_idx', 'state', 'metrics'}), atomically, its tensors
    on the CPU (`on_cpu`)."""
    payload = {"step_idx": step, "state": on_cpu(state), "metrics": metrics if metrics is not None else {}}
    record = atomic_write(path, lambda f: torch.save(payload, f), fsync)
    record.step_idx = step
    return record


def on_cpu(state: Any, copies: dict[int, torch.UntypedStorage] | None = None) -> Any:
    """`state` with its CUDA tensors on the CPU, each storage copied once and the tensors rebuilt
    as the same views of it (tied weights stay one tensor in the file). torch.save records where
    a tensor lived: a file of CUDA tensors fails to load on a machine without CUDA unless the
    reader passes map_location, and would differ from what a background save (CPU snapshots)
    writes. Costs host memory for one file's tensors at a time; CPU tensors are not copied."""
    copies = {} if copies is None else copies
    if isinstance(state, torch.Tensor):
        if state.device.type != "cuda" or hasattr(state, "placements"):  # a DTensor saves itself (DCP)
            return state
        storage = state.untyped_storage()
        if storage.data_ptr() not in copies:
            copies[storage.data_ptr()] = storage.cpu()
        view = torch.empty(0, dtype=state.dtype)
        return view.set_(copies[storage.data_ptr()], state.storage_offset(), state.shape, state.stride())
    if isinstance(state, dict):
        items = {k: on_cpu(v, copies) for k, v in state.items()}
        if all(items[k] is v for k, v in state.items()):
            return state  # nothing on CUDA: the very same object
        moved = copy.copy(state)  # the same kind of mapping (an OrderedDict stays one)
        moved.update(items)
        return moved
    if isinstance(state, (list, tuple)):
        values = [on_cpu(v, copies) for v in state]
        if all(a is b for a, b in zip(values, state, strict=True)):
            return state
        return type(state)(*values) if hasattr(state, "_fields") else type(state)(values)
    return state


def _numpy_scalar_globals() -> list:
    """What pickle needs to rebuild numpy scalars (e.g. metrics the reference logged as np.float64):
    plain numbers, no code. Allowed on top of torch's weights-only set."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)  # fmt: skip
    return [scalar, np.dtype, *{type(np.dtype(k)) for k in kinds}]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, torch.Tensor) else value


def load_payload(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read a contract file with weights_only=True, turning every failure into one sentence.
    mmap=True maps the tensors instead of reading them (cheap to look at keys and shapes)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint file {path} is a directory")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise os_failure("read", path, err) from None
    # torch.save writes a zip archive (PK..); files of torch < 1.6 start with a pickle opcode
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        what = "it is empty" if not magic else f"it starts with {magic!r}"
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({what})")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and magic[:2] == b"PK")
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            convert = (
                f"import torch; p=torch.load('{path}', weights_only=False); "
                f"p['metrics']={{k: float(v) for k, v in (p.get('metrics') or {{}}).items()}}; "
                f"torch.save(p, '{path}.converted')"
            )
            raise CheckpointError(
                f"{path} needs arbitrary pickle to load (it stores Python objects, not only tensors), which dpokit "
                f'refuses for safety; if you trust the file, convert it with: python -c "{convert}"'
            ) from None
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({first_line(err)})") from None
    except Exception as err:  # torch reports damaged archives with many exception types
        raise CheckpointError(
            f"{path} is truncated or not a torch checkpoint ({type(err).__name__}: {first_line(err)})"
        ) from None
    if isinstance(payload, dict) and isinstance(payload.get("metrics"), dict):
        payload["metrics"] = {k: _plain(v) for k, v in payload["metrics"].items()}
    if isinstance(payload, dict) and "step_idx" in payload:
        payload["step_idx"] = _plain(payload["step_idx"])
    if not isinstance(payload, dict) or "state" not in payload or "step_idx" not in payload:
        kind = f"dict with keys {sorted(payload)[:5]}" if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a dpokit/DPO-reference checkpoint: expected a dict with 'step_idx', "
            f"'state' and 'metrics', found a {kind}"
        )
    return payload


def contract_step(path: Path) -> int | None:
    """step_idx of a contract file (None for other files or unreadable ones)."""
    if path.name not in CONTRACT_FILES:
        return None
    try:
        return int(load_payload(path)["step_idx"])
    except CheckpointError:
        return None


# ============================================================================================
# one checkpoint directory being written


class CheckpointWriter:
    """Writes the files of one (staging) directory and, last, the manifest that lists them."""

    def __init__(self, directory: Path, fsync: bool = True) -> None:
        self.directory, self.fsync = Path(directory), fsync
        self.records: dict[str, FileRecord] = {}

    def write(self, filename: str, step: int, state: Any, metrics: dict | None) -> None:
        """A contract-style torch file; or, by its suffix, a `.json` text or a `.safetensors`
        file of a dict of tensors (PEFT's adapter directory), possibly in a subdirectory."""
        path = self.directory / filename
        if path.suffix not in (".json", ".safetensors"):
            self.records[filename] = write_payload(path, step, state, metrics, self.fsync)
            return
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
            if self.fsync:
                fsync_dir(path.parent.parent)
        if path.suffix == ".json":
            data = state.encode()
        else:
            from safetensors.torch import save

            data = save({k: v.contiguous() for k, v in on_cpu(state).items()}, metadata={"format": "pt"})
        self.records[filename] = atomic_write_bytes(path, data, self.fsync)

    def record(self, filename: str, record: FileRecord) -> None:
        """A file that someone else wrote into the directory (a shard, a hard link)."""
        self.records[filename] = record

    def adopt(self, old: Path, name: str, known: dict[str, dict]) -> None:
        """Hard-link a file of a published directory into this one as `name` (relative). A file
        the old manifest lists keeps its recorded checksum (damage since then stays detectable);
        others are hashed."""
        path = self.directory / name
        make_dirs(path.parent, self.fsync)
        os.link(old, path)
        if self.fsync and path.parent != self.directory:  # the staging directory itself is fsynced at commit
            fsync_dir(path.parent)
        rec = known.get(name)
        self.records[name] = (
            FileRecord(**rec) if rec else FileRecord(old.stat().st_size, checksum_file(old), contract_step(old))
        )

    def seal(self, step: int, metrics: dict | None, config: dict | None, extra: dict | None = None) -> None:
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "step": step,
            "files": {k: vars(v) for k, v in sorted(self.records.items())},
            "metrics": metrics or {},
            "config": config,
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        atomic_write_bytes(self.directory / MANIFEST, json.dumps(manifest, indent=1, default=str).encode(), self.fsync)


# ============================================================================================
# reading and verifying


def read_manifest(ckpt_dir: str | os.PathLike) -> dict | None:
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({first_line(err)})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointError(f"{path} is not a dpokit manifest")
    return manifest


_MANIFEST_KEYS = ("format", "version", "step", "files", "metrics", "config", "versions", "created")


def manifest_extra(manifest: dict | None) -> dict:
    """A manifest's keys beyond every checkpoint's (its layout: sharded, adapter-only), which a
    rewrite of the directory keeps."""
    return {k: v for k, v in (manifest or {}).items() if k not in _MANIFEST_KEYS}


def manifest_files(ckpt_dir: Path) -> dict[str, dict]:
    """The file records of a directory's manifest ({} without a readable one)."""
    try:
        return (read_manifest(ckpt_dir) or {}).get("files", {})
    except CheckpointError:
        return {}


def is_sharded(manifest: dict | None) -> bool:
    return bool(manifest) and manifest.get("layout") == "sharded"  # type: ignore[union-attr]


def is_adapter_only(manifest: dict | None) -> bool:
    """A LoRA checkpoint saved with lora.save_merged=false: PEFT's adapter and no policy.pt; its
    weights are its base (the manifest's `base`) with the adapter merged."""
    return bool(manifest) and manifest.get("layout") == ADAPTER_LAYOUT  # type: ignore[union-attr]


def verify_dir(ckpt_dir: str | os.PathLike, checksums: bool = True) -> str | None:
    """None if the directory is a complete checkpoint, else a one-line reason.

    With a manifest: every listed file exists with its size (and checksum). Without one (written by
    the reference): policy.pt and any optimizer.pt/scheduler.pt load and agree on step_idx.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return f"{ckpt_dir} is not a directory"
    try:
        manifest = read_manifest(ckpt_dir)
    except CheckpointError as err:
        return str(err)
    if manifest is not None:
        return _verify_against_manifest(ckpt_dir, manifest, checksums)
    if not (ckpt_dir / POLICY).is_file():
        return f"{ckpt_dir} has no policy.pt and no manifest"
    steps = {}
    for name in CONTRACT_FILES:
        if (ckpt_dir / name).is_file():
            try:
                steps[name] = load_payload(ckpt_dir / name)["step_idx"]
            except CheckpointError as err:
                return str(err)
    if len(set(steps.values())) > 1:
        return f"{ckpt_dir} mixes steps: " + ", ".join(f"{k} has step {v}" for k, v in steps.items())
    return None


def _verify_against_manifest(ckpt_dir: Path, manifest: dict, checksums: bool) -> str | None:
    files = manifest["files"]
    if is_adapter_only(manifest) and ADAPTER_WEIGHTS not in files:
        return f"{ckpt_dir / MANIFEST} lists no {ADAPTER_WEIGHTS}"
    if not is_sharded(manifest) and not is_adapter_only(manifest) and POLICY not in files:
        return f"{ckpt_dir / MANIFEST} lists no policy.pt"
    steps = {name: rec.get("step_idx") for name, rec in files.items() if name in CONTRACT_FILES}
    if len(set(steps.values())) > 1:
        return f"{ckpt_dir} mixes steps: " + ", ".join(f"{k} has step {v}" for k, v in sorted(steps.items()))
    for name, rec in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != rec["size"]:
            return f"{path} has {size} bytes, the manifest says {rec['size']}"
        if checksums and checksum_file(path) != rec["xxh3_64"]:
            return f"{path} does not match its checksum in the manifest"
    return None


def manifest_step(ckpt_dir: Path) -> int | None:
    """The step a checkpoint directory holds (from its manifest, else its policy.pt)."""
    try:
        manifest = read_manifest(ckpt_dir)
        if manifest is not None:
            return int(manifest["step"])
        return int(load_payload(ckpt_dir / POLICY)["step_idx"])
    except CheckpointError:
        return None
