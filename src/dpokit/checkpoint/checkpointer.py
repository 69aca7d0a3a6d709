"""The Checkpointer: the one owner of training state on disk.

It holds references to what a checkpoint is made of (policy, optimizer, scheduler and the
trainer's own state) and alone decides how a save happens: which processes collect and write
what, in which layout (`full`: the reference's three files; `sharded`: every process writes its
part with Distributed Checkpoint), what a failed save does, and what is kept afterwards. The
training loop calls `save(step, metrics)` and `restore(path)` and knows nothing of files.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.distributed.tensor import DTensor

from dpokit import lora
from dpokit.checkpoint import sharded
from dpokit.checkpoint.discovery import ResumePoint, step_dir_name
from dpokit.checkpoint.format import (
    ADAPTER_LAYOUT,
    MANIFEST,
    OPTIMIZER,
    POLICY,
    REFERENCE,
    SCHEDULER,
    TRAINER_STATE,
    CheckpointWriter,
    is_sharded,
    load_payload,
    manifest_extra,
    read_manifest,
)
from dpokit.checkpoint.retention import RetentionPolicy, apply_retention
from dpokit.checkpoint.storage import LATEST, STAGING_PREFIX, FileRecord, Storage
from dpokit.distributed import tied_parameters
from dpokit.errors import CheckpointError

if TYPE_CHECKING:
    from dpokit.distributed import Distribution

FORMATS = ("full", "sharded")


@dataclass(frozen=True)
class CheckpointSettings:
    fsync: bool = True
    save_optimizer: bool = True
    on_error: str = "raise"
    format: str = "full"
    async_save: bool = False
    retention: RetentionPolicy = RetentionPolicy()
    merged_policy: bool = True  # a LoRA run's merged policy.pt (lora.save_merged); without: the adapter alone

    @classmethod
    def from_config(cls, ck: Any, save_merged: bool = True) -> CheckpointSettings:
        return cls(
            fsync=ck.fsync,
            save_optimizer=ck.save_optimizer,
            on_error=ck.on_error,
            format=ck.format,
            async_save=ck.async_save,
            retention=RetentionPolicy(ck.keep_last, ck.keep_best, ck.best_metric, ck.best_mode),
            merged_policy=save_merged,
        )


class Checkpointer:
    def __init__(
        self,
        run_dir: str | Path,
        settings: CheckpointSettings,
        *,
        policy: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_state: Callable[[], dict],
        dist: Distribution,
        run_config: dict | None = None,
        log: Callable[[str], None] = print,
        record: Callable[[dict], None] = lambda stats: None,
        reference: torch.nn.Module | None = None,
    ) -> None:
        self.run_dir, self.settings = Path(run_dir), settings
        self.policy, self.optimizer, self.scheduler = policy, optimizer, scheduler
        self.reference = reference  # a reference model that training changes (TR-DPO), saved beside the policy
        self.trainer_state, self.dist, self.run_config = trainer_state, dist, run_config
        self.log = log if dist.is_main else (lambda _msg: None)
        self.record = record
        self.storage = Storage(self.run_dir, settings.fsync)
        self.failed: list[str] = []
        self._writer: threading.Thread | None = None  # the save in flight (async_save)
        self._outcome: dict = {}  # what the writer left: error, stats
        self._buffers: dict[str, torch.Tensor] = {}  # reused snapshot memory
        self._copied = threading.Event()  # clear while a background save still copies state
        self._copied.set()
        self._fence_seconds = 0.0  # how long before_update() held the loop for the save in flight
        self._full_layout: dict | None = None  # the manifest's layout of a full save; None: the reference's
        if lora.is_lora(policy) and not settings.merged_policy and self.dist.is_main:
            from dpokit.weights import base_record  # what the adapter is merged into when its weights are read

            self._full_layout = {"layout": ADAPTER_LAYOUT, "base": base_record(run_config or {})}

    @property
    def latest_dir(self) -> Path:
        return self.run_dir / LATEST

    # -- start-up --------------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Remove leftovers of killed saves. One process decides and acts; the others wait for
        it, so no process can see (or trip over) a directory another is removing."""
        removed = self.storage.sweep() if self.dist.is_main else []
        self.dist.barrier()
        if removed:
            self.log(f"removed leftovers of an interrupted save: {', '.join(sorted(removed))}")
        return removed

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, metrics: dict | None = None, *, final: bool = False, where: str | Path | None = None):
        """Save the training state as `step-{step}` (final: `LATEST`; `where`: that directory).

        Every process must call it. With checkpoint.on_error=warn a failed save is reported and
        None returned; otherwise it raises, naming the checkpoint. Earlier checkpoints are never
        touched by a failed save.
        """
        target = Path(where) if where is not None else self.run_dir / (LATEST if final else step_dir_name(step))
        start = time.perf_counter()
        try:
            if self.settings.async_save:  # what fails before the background part is handled here
                return self._save_async(target, step, metrics)
            self.log(f"saving checkpoint to {target}...")
            if self.settings.format == "sharded":
                self._save_sharded(target, step, metrics)
            else:
                self._save_full(target, step, metrics)
        except CheckpointError as err:
            if self.settings.on_error != "warn":
                raise
            self.failed.append(str(err))
            self.log(f"WARNING: checkpoint not saved ({err}); training goes on (checkpoint.on_error=warn)")
            return None
        seconds = time.perf_counter() - start
        self.log(f"saved checkpoint to {target}")  # published and, with checkpoint.fsync, durable
        if target.parent == self.run_dir and self.dist.is_main:
            self._retain()
        self.dist.barrier()
        if self.dist.is_main:
            size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
            # a synchronous save stalls training for as long as it writes
            self.record({"checkpoint/stall_seconds": seconds, "checkpoint/write_seconds": seconds,
                         "checkpoint/bytes": size, "checkpoint/step": step})  # fmt: skip
        return target

    def _collect(self) -> dict[str, Any]:
        """The state to save, one entry per file. Collecting is collective (FSDP gathers shards);
        only the main process holds the result."""
        files = {POLICY: self.dist.full_state_dict(self.policy)}
        if lora.is_lora(self.policy) and self.dist.is_main:
            # the merged weights under the model's own names, and PEFT's adapter files
            full = files.pop(POLICY)
            if self.settings.merged_policy:
                files[POLICY] = lora.base_state_dict(self.policy, full_state=full)
            files.update(lora.adapter_files(self.policy, full))
        if self.settings.save_optimizer:
            files[OPTIMIZER] = self.dist.full_optimizer_state_dict(self.policy, self.optimizer)
            files[SCHEDULER] = self.scheduler.state_dict()
            files[TRAINER_STATE] = self.trainer_state()
            if self.reference is not None:
                files[REFERENCE] = self.dist.full_state_dict(self.reference)
        return files

    def _save_full(self, target: Path, step: int, metrics: dict | None) -> None:
        files = self._collect()
        error = None
        if self.dist.is_main:
            error = self._publish(target, step, metrics, files, extra=self._full_layout)
        self._raise_if(self.dist.broadcast_object(error))

    def _publish(
        self,
        target: Path,
        step: int,
        metrics: dict | None,
        files: dict,
        records: dict | None = None,
        staging: Path | None = None,
        extra: dict | None = None,
    ) -> str | None:
        """Write `files` into a staging directory, seal it with the manifest and publish it;
        returns the failure as one sentence, or None."""
        try:
            staging = staging or self.storage.stage(target.parent)
        except CheckpointError as err:
            return _failed(target, err)
        try:
            writer = CheckpointWriter(staging, self.settings.fsync)
            for filename, state in files.items():
                writer.write(filename, step, state, metrics)
            for filename, record in (records or {}).items():
                writer.record(filename, record)
            writer.seal(step, metrics, self.run_config, extra)
            self.storage.commit(staging, target.name, target.parent)
        except CheckpointError as err:
            self.storage.discard(staging)
            return _failed(target, err)
        except BaseException:
            self.storage.discard(staging)
            raise
        return None

    def _save_sharded(self, target: Path, step: int, metrics: dict | None) -> None:
        # Every process writes its own part into one staging directory whose name the main
        # process chooses; the manifest (with every process's file records) is written last.
        staging = self._stage_shared(target)
        state = self._sharded_state()
        mine, error = self._write_shards(target, staging, state)
        layout = self._sharded_layout(state)
        error = self._seal_shards(target, step, metrics, staging, mine, error, self._small_files(), layout)
        self._raise_if(self.dist.broadcast_object(error))

    def _stage_shared(self, target: Path) -> Path:
        """One staging directory for every process (collective): the main process names and
        creates it."""
        name = self.dist.broadcast_object(f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}" if self.dist.is_main else None)
        error = None
        if self.dist.is_main:
            try:
                self.storage.stage(target.parent, name)
            except CheckpointError as err:
                error = _failed(target, err)
        self._raise_if(self.dist.broadcast_object(error))
        return target.parent / name

    def _small_files(self) -> dict[str, Any]:
        """The files a sharded checkpoint keeps whole: scheduler and trainer state (collective)."""
        if not self.settings.save_optimizer:
            return {}
        return {SCHEDULER: self.scheduler.state_dict(), TRAINER_STATE: self.trainer_state()}

    def _sharded_layout(self, state: dict) -> dict:
        layout = {"layout": "sharded", "sharded_state": sorted(state), "tied": tied_parameters(self.policy)}
        if lora.is_lora(self.policy):  # the adapters are in the shards; consolidate merges them with this
            layout["lora"] = lora.config_dict(self.policy)
        return layout

    def _write_shards(
        self, target: Path, staging: Path, state: dict, group: Any = None
    ) -> tuple[dict[str, FileRecord], str | None]:
        """This process's part, written (collective over `group`); its file records, or the failure."""
        try:
            return sharded.write(staging, state, self.dist.rank, self.settings.fsync, group), None
        except CheckpointError as err:
            return {}, _failed(target, err)

    def _seal_shards(
        self,
        target: Path,
        step: int,
        metrics: dict | None,
        staging: Path,
        mine: dict[str, FileRecord],
        error: str | None,
        files: dict,
        layout: dict,
        group: Any = None,
    ) -> str | None:
        """Once every process's part is written (collective over `group`): the main process
        writes the small files and the manifest and publishes, or discards the staging directory
        if any process failed. Returns the failure (every process learns a write failure; only
        the main process a publishing one)."""
        outcomes = self.dist.all_gather_object((mine, error), group)
        error = next((e for _, e in outcomes if e), None)
        if not self.dist.is_main:
            return error
        if error is not None:
            self.storage.discard(staging)
            return error
        records = {k: v for recs, _ in outcomes for k, v in recs.items()}
        return self._publish(target, step, metrics, files, records, staging, layout)

    # -- asynchronous saves ----------------------------------------------------------------

    def _save_async(self, target: Path, step: int, metrics: dict | None) -> Path | None:
        """The loop waits only for what it could change before its next optimizer step (module
        buffers and small values, copied at once); parameters and optimizer state, which only
        the step changes, are copied into reused buffers by a background thread while the next
        batch's forward and backward run, and `before_update()` holds that step until the copy
        is done. The same thread then writes with the synchronous protocol (staging, fsync,
        manifest last, atomic publish, retention after publish). One save in flight at most:
        the previous one is waited for first, and its failure is reported here."""
        self.wait()
        if self.settings.format == "sharded":
            return self._save_sharded_async(target, step, metrics)
        start = time.perf_counter()
        files = self._collect()  # collective: every process takes part
        if self.dist.is_main:
            pending: list[tuple[torch.Tensor, torch.Tensor]] = []
            written = self._training_storages()
            # a CPU tensor no training state shares (FSDP's gathered full state, RNG states) is the save's own
            snapshot = self._snapshot(files, pending, copy_now=self._changed_by_forward(),
                                      keep=lambda t: t.device.type == "cpu" and _storage(t) not in written)  # fmt: skip
            del files

            def write() -> str | None:
                return self._publish(target, step, metrics, snapshot, extra=self._full_layout)

            self._start_background(target, step, pending, start, write)
        return target

    def _save_sharded_async(self, target: Path, step: int, metrics: dict | None) -> Path:
        """The sharded layout in the background: every process snapshots its own shards as
        _save_async does and its own thread writes them with Distributed Checkpoint, whose
        collectives go through a process group of their own (`checkpoint_group`) so that they
        never interleave with the loop's; once every part is written, the main process's thread
        seals and publishes."""
        start = time.perf_counter()
        group = self.dist.checkpoint_group()  # collective on first use
        staging = self._stage_shared(target)  # collective
        state = self._sharded_state()
        layout = self._sharded_layout(state)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        snapshot = self._snapshot(state, pending, copy_now=self._changed_by_forward(), path="/sharded")
        files = self._snapshot(self._small_files(), pending, copy_now=lambda t: True, path="/files")
        del state

        def write() -> str | None:
            mine, error = self._write_shards(target, staging, snapshot, group)
            return self._seal_shards(target, step, metrics, staging, mine, error, files, layout, group)

        self._start_background(target, step, pending, start, write)
        return target

    def _start_background(
        self,
        target: Path,
        step: int,
        pending: list[tuple[torch.Tensor, torch.Tensor]],
        start: float,
        write: Callable[[], str | None],
    ) -> None:
        """The thread that finishes a snapshot's copies, then writes (`write`, returning the
        failure or None) and applies retention; the loop was held since `start`."""
        self._copied.clear()
        self._outcome, self._fence_seconds = {}, 0.0
        self.log(f"saving checkpoint to {target} in the background...")
        stall = time.perf_counter() - start
        self._writer = threading.Thread(
            target=self._background, args=(target, step, pending, write, stall), name=f"dpokit-save-{step}"
        )
        self._writer.start()

    def before_update(self) -> None:
        """Call before every optimizer step: with a save in flight, it waits until the state the
        step would change has been copied (on CPU, usually long done by then)."""
        if not self._copied.is_set():
            start = time.perf_counter()
            self._copied.wait()
            self._fence_seconds += time.perf_counter() - start

    def _sharded_state(self) -> dict:
        keep = self.settings.save_optimizer
        return self.dist.sharded_state_dict(
            self.policy, self.optimizer if keep else None, self.reference if keep else None
        )

    def _changed_by_forward(self) -> Callable[[torch.Tensor], bool]:
        """Whether a tensor is a module buffer, which the next forward may change (e.g. BatchNorm's
        statistics), so a snapshot must copy it at once rather than in the background."""
        live = {b.data_ptr() for b in self.policy.buffers()}
        return lambda t: t.data_ptr() in live

    def _training_storages(self) -> set[tuple]:
        """Where training writes in place: parameters, module buffers, optimizer state."""
        training = [*self.policy.parameters(), *self.policy.buffers()]
        if self.reference is not None:  # TR-DPO mixes the policy into it after optimizer steps
            training += list(self.reference.parameters())
        for values in [*self.optimizer.state.values(), *self.optimizer.param_groups]:
            training += [v for v in values.values() if isinstance(v, torch.Tensor)]
        return {_storage(t) for t in training}

    def _snapshot(
        self,
        state: Any,
        pending: list[tuple[torch.Tensor, torch.Tensor]],
        copy_now: Callable[[torch.Tensor], bool],
        path: str = "",
        seen: dict[tuple, torch.Tensor] | None = None,
        keep: Callable[[torch.Tensor], bool] = lambda t: False,
    ) -> Any:
        """`state` with every tensor replaced by a buffer kept from one save to the next (pinned
        on CUDA, so the copy does not wait for the GPU) and every other value copied. Tensors for
        which copy_now is true are copied here; the others are appended to `pending` as (buffer,
        source) for the background thread. Entries that are one tensor (tied weights) get one
        buffer, so the file keeps them one tensor, as a synchronous save does. Tensors for which
        keep is true are the save's own already and stay as they are: with FSDP, the full state
        gathered on rank 0, which a snapshot would copy a second time."""
        seen = {} if seen is None else seen
        if isinstance(state, DTensor):
            return self._snapshot_dtensor(state, pending, copy_now, path)
        if isinstance(state, torch.Tensor):
            if keep(state):
                return state
            same = (state.data_ptr(), state.device, state.dtype, tuple(state.shape), state.stride())
            if same in seen:
                return seen[same]
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != state.shape or buffer.dtype != state.dtype:
                pinned = state.device.type == "cuda"
                buffer = self._buffers[path] = torch.empty(state.shape, dtype=state.dtype, pin_memory=pinned)
            if copy_now(state):
                buffer.copy_(state.detach())
            else:
                pending.append((buffer, state.detach()))
            seen[same] = buffer
            return buffer
        if isinstance(state, dict):
            return type(state)(
                (k, self._snapshot(v, pending, copy_now, f"{path}/{k}", seen, keep)) for k, v in state.items()
            )
        if isinstance(state, (list, tuple)):
            return type(state)(
                self._snapshot(v, pending, copy_now, f"{path}/{i}", seen, keep) for i, v in enumerate(state)
            )
        return copy.deepcopy(state)

    def _snapshot_dtensor(
        self,
        state: DTensor,
        pending: list[tuple[torch.Tensor, torch.Tensor]],
        copy_now: Callable[[torch.Tensor], bool],
        path: str,
    ) -> DTensor:
        """A DTensor with `state`'s mesh and placements whose local shard is a reused host buffer
        (built as Distributed Checkpoint's own staging builds them: the local tensor replaced)."""
        detached = cast(DTensor, state.detach())
        local = detached.to_local()
        buffer = self._buffers.get(path)
        if (
            not isinstance(buffer, DTensor)
            or buffer.placements != state.placements
            or buffer._local_tensor.shape != local.shape
            or buffer._local_tensor.dtype != local.dtype
        ):
            on_cuda = local.device.type == "cuda"
            buffer = cast(DTensor, detached.to("cpu") if on_cuda else copy.deepcopy(detached))
            buffer._local_tensor = torch.empty(local.shape, dtype=local.dtype, pin_memory=on_cuda)
            self._buffers[path] = buffer
        if copy_now(local):
            buffer._local_tensor.copy_(local)
        else:
            pending.append((buffer._local_tensor, local))
        return buffer

    def _background(
        self,
        target: Path,
        step: int,
        pending: list[tuple[torch.Tensor, torch.Tensor]],
        write: Callable[[], str | None],
        stall: float,
    ) -> None:
        start = time.perf_counter()
        try:
            if self.dist.device.type == "cuda":  # a new thread starts on device 0, whatever this process's is
                torch.cuda.set_device(self.dist.device)
            self._copy_pending(pending)
            error = write()
            if error is None:
                self.log(f"saved checkpoint to {target} (in the background)")
            if error is None and self.dist.is_main and target.parent == self.run_dir:
                self._retain()
        except BaseException as err:  # a bug: surfaced, with its traceback, at the next wait()
            self._outcome = {"exception": err}
            return
        self._outcome = {"error": error, "stats": self._stats(target, step, stall, start, error)}

    def _copy_pending(self, pending: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The snapshot's deferred copies; releases before_update() once they are queued."""
        copied = None
        try:
            for buffer, source in pending:
                buffer.copy_(source, non_blocking=source.device.type == "cuda")
            on_gpu = any(source.device.type == "cuda" for _, source in pending)
            copied = torch.cuda.Event(blocking=True) if on_gpu else None  # blocking: waited on asleep
            if copied is not None:
                # copies from this thread are queued on the device's default stream like the step
                # that before_update() releases, so that step cannot overtake them
                copied.record()
        finally:
            self._copied.set()
        if copied is not None:
            copied.synchronize()  # the non-blocking copies into pinned buffers have landed

    def _stats(self, target: Path, step: int, stall: float, start: float, error: str | None) -> dict:
        seconds = time.perf_counter() - start
        size = (
            sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
            if error is None and self.dist.is_main
            else 0
        )
        return {"checkpoint/stall_seconds": stall, "checkpoint/write_seconds": seconds, "checkpoint/bytes": size,
                "checkpoint/step": step}  # fmt: skip

    def wait(self) -> None:
        """Let the save in flight finish; report its numbers and its failure (on every process:
        raised, or with checkpoint.on_error=warn recorded and warned about)."""
        outcome: dict = {}
        if self._writer is not None:
            self._writer.join()
            self._writer, outcome = None, self._outcome
            if "exception" in outcome:
                raise outcome["exception"]
            if outcome.get("error") is None and self.dist.is_main:
                stats = outcome["stats"]
                # the loop was held twice: in save() and, if the copy was not done by then, before its next step
                stats["checkpoint/stall_seconds"] += self._fence_seconds
                self.record(stats)
        error = self.dist.broadcast_object(outcome.get("error")) if self.settings.async_save else None
        if error is not None:
            if self.settings.on_error != "warn":
                raise CheckpointError(error)
            self.failed.append(error)
            self.log(f"WARNING: checkpoint not saved ({error}); training goes on (checkpoint.on_error=warn)")

    @staticmethod
    def _raise_if(error: str | None) -> None:
        if error is not None:
            raise CheckpointError(error)

    def write_file(self, directory: str | Path, filename: str, step: int, state: Any, metrics: dict | None) -> None:
        """One contract file into a checkpoint directory (the reference's `write_state_dict`)."""
        if self.dist.is_main:
            rewrite_file(self.storage, Path(directory), filename, step, state, metrics, self.run_config)

    # -- retention -------------------------------------------------------------------------

    def _retain(self) -> None:
        apply_retention(self.storage, self.settings.retention, self.log)

    # -- restoring -------------------------------------------------------------------------

    def restore(self, point: ResumePoint) -> dict:
        """Load policy, optimizer and scheduler state from the checkpoint of a resume point
        (either layout, any number of processes; `resume_point` has checked it holds them);
        returns the trainer state (counters, RNG, data position)."""
        from dpokit.models import check_state_dict_fits

        ckpt_dir = point.checkpoint
        manifest = read_manifest(ckpt_dir)
        reference = self.reference
        if reference is not None and not self._holds_reference(ckpt_dir, manifest):
            self.log(f"note: {ckpt_dir} holds no reference weights (saved without loss.sync_ref_model); the reference "
                     f"starts again from the initial weights")  # fmt: skip
            reference = None
        if is_sharded(manifest):
            self.dist.load_sharded_state_dict(self.policy, self.optimizer, sharded.reader_path(ckpt_dir), reference)
        else:
            policy = optimizer = reference_state = None
            adapted = lora.is_lora(self.policy)  # the base is the run's start; the adapter is what trained
            if self.dist.is_main:
                if not adapted:
                    policy = load_payload(ckpt_dir / POLICY)["state"]
                    check_state_dict_fits(self.policy, policy, str(ckpt_dir / POLICY))
                optimizer = load_payload(ckpt_dir / OPTIMIZER)["state"]
                if reference is not None:
                    reference_state = load_payload(ckpt_dir / REFERENCE)["state"]
            if adapted:  # into the adapters alone (under FSDP, sent from the main process to every shard)
                adapter = lora.read_adapter(self.policy, ckpt_dir) if self.dist.is_main else None
                self.dist.load_full_state_dict(self.policy, adapter, strict=False)
            else:
                self.dist.load_full_state_dict(self.policy, policy)
            self.dist.load_full_optimizer_state_dict(self.policy, self.optimizer, optimizer)
            if reference is not None:
                self.dist.load_full_state_dict(reference, reference_state)
        self.scheduler.load_state_dict(load_payload(ckpt_dir / SCHEDULER)["state"])
        return load_payload(ckpt_dir / TRAINER_STATE)["state"]

    @staticmethod
    def _holds_reference(ckpt_dir: Path, manifest: dict | None) -> bool:
        if is_sharded(manifest):
            return "reference" in (manifest or {}).get("sharded_state", [])
        return REFERENCE in (manifest or {}).get("files", {}) or (ckpt_dir / REFERENCE).is_file()


def rewrite_file(
    storage: Storage,
    directory: Path,
    filename: str,
    step: int,
    state: Any,
    metrics: dict | None,
    config: dict | None = None,
) -> Path:
    """Write one contract file into a checkpoint directory. A directory that is already published
    is republished whole (copy-on-write: its other files are hard-linked into a staging copy), so
    a checkpoint and its manifest never disagree."""
    staging = storage.stage(directory.parent)
    try:
        writer = CheckpointWriter(staging, storage.fsync)
        extra = None
        if directory.is_dir():
            try:
                manifest = read_manifest(directory) or {}
            except CheckpointError:  # unreadable: every file is hashed, and the layout is the reference's
                manifest = {}
            for old in sorted(directory.rglob("*")):
                name = old.relative_to(directory).as_posix()
                if name not in (MANIFEST, filename) and not name.startswith(".") and old.is_file():
                    writer.adopt(old, name, manifest.get("files", {}))  # with the adapter/ and sharded/ files
            extra = manifest_extra(manifest)  # its layout (sharded, adapter) stays
        writer.write(filename, step, state, metrics)
        writer.seal(step, metrics, config, extra)
        return storage.commit(staging, directory.name, directory.parent)
    except BaseException:
        storage.discard(staging)
        raise


def _storage(tensor: torch.Tensor) -> tuple:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.device, local.untyped_storage().data_ptr()


def _failed(target: Path, err: CheckpointError) -> str:
    return f"saving checkpoint {target} failed, earlier checkpoints are untouched ({err})"
