"""How the one training loop runs on one process or many: the distribution seam.

A `Distribution` decides how models are wrapped, how gradients are clipped, how per-example
metrics are gathered and how state is collected for a checkpoint and put back. `SingleProcess`
is the plain case (CPU or one CUDA device); `FSDP2` shards the policy and the reference model
per transformer block with PyTorch's `fully_shard` across the processes that torchrun started.
The training loop is the same for both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from dpokit.errors import ConfigError, DpokitError

# ============================================================================================
# optimizer state: by parameter index (torch.optim's own form) or by parameter name (FSDP's)


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters in the order an optimizer built from
    `model.parameters()` holds them, without wrapper prefixes."""
    return [clean_name(name) for name, _ in model.named_parameters()]


def clean_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """{alias: name} for parameters that are one tensor under two names (e.g. GPT-2's lm_head.weight
    is transformer.wte.weight)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[clean_name(name)] = first[id(param)]
        else:
            first[id(param)] = clean_name(name)
    return aliases


def share_tied(state: dict, aliases: dict[str, str]) -> dict:
    """Make tied entries of a state dict one tensor again, as `model.state_dict()` has them
    (torch.save then stores it once): after a gather, which copies each, or after a load of a
    sharded checkpoint, which stores only the first name (`without_tied`)."""
    for alias, name in aliases.items():
        if name in state:
            state[alias] = state[name]
    return state


def without_tied(state: dict, aliases: dict[str, str]) -> dict:
    """A state dict with each tied tensor under its first name only. Distributed Checkpoint writes
    every key's tensor, so a tied one would be stored twice (GPT-2's embedding: 148 MiB at 124M)."""
    return {k: v for k, v in state.items() if k not in aliases}


def optimizer_state_by_name(state: dict, names: Sequence[str]) -> dict:
    """torch.optim state dict (integer parameter ids) -> the same keyed by parameter name."""
    if _keyed_by_name(state):
        return state
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state_by_index(state: dict, names: Sequence[str]) -> dict:
    """The inverse: parameter names -> the integer ids of an optimizer over `names`."""
    if not _keyed_by_name(state):
        return state
    index = {name: i for i, name in enumerate(names)}
    unknown = [n for g in state["param_groups"] for n in g["params"] if n not in index]
    if unknown:
        raise DpokitError(f"optimizer state names parameters this model does not have (e.g. {', '.join(unknown[:3])})")
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def _keyed_by_name(state: dict) -> bool:
    params = [p for g in state.get("param_groups", []) for p in g["params"]]
    return bool(params) and isinstance(params[0], str)


# ============================================================================================
# the seam


class Distribution(Protocol):
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool: ...

    def wrap_policy(self, model: nn.Module) -> nn.Module: ...
    def wrap_reference(self, model: nn.Module) -> nn.Module: ...
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor: ...
    def gather(self, values: torch.Tensor) -> torch.Tensor: ...
    def barrier(self) -> None: ...
    def any(self, flag: bool) -> bool: ...
    def broadcast_object(self, obj: Any) -> Any: ...
    def all_gather_object(self, obj: Any, group: Any = None) -> list: ...
    def checkpoint_group(self) -> Any: ...
    def generate_kwargs(self) -> dict: ...
    def full_state_dict(self, model: nn.Module) -> dict: ...
    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict: ...
    def load_full_state_dict(self, model: nn.Module, state: dict | None, strict: bool = True) -> None: ...
    def load_full_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None
    ) -> None: ...
    def sharded_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, reference: nn.Module | None = None
    ) -> dict: ...
    def load_sharded_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, path: str, reference: nn.Module | None = None
    ) -> None: ...


def configure_tf32(enabled: bool) -> None:
    """CUDA float32 matrix multiplies and convolutions in TF32 (the reference enables it at
    import) or full fp32. Through the `allow_tf32` flags, as the reference does, not torch
    2.9's `fp32_precision`: once that is set, `torch.get_float32_matmul_precision()` and
    reading `allow_tf32` raise RuntimeError ("mix of the legacy and new APIs") for the rest of
    the process (torch 2.13), and torch's own inductor and other libraries still read them. The
    `allow_tf32` setters keep both spellings readable and in agreement."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def resolve_device(name: str = "auto") -> torch.device:
    """config key `device`: auto is this process's CUDA device when there is one, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class ShardedLayout:
    """The sharded checkpoint's state, the same for one process and many: Distributed
    Checkpoint's, keyed by parameter name (`_dcp_state`)."""

    def sharded_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, reference: nn.Module | None = None
    ) -> dict:
        return _dcp_state(model, optimizer, reference)

    def load_sharded_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, path: str, reference: nn.Module | None = None
    ) -> None:
        _dcp_load(model, optimizer, path, reference)


class SingleProcess(ShardedLayout):
    """One process: CPU or one CUDA device. Checkpoint state is the models' and optimizer's
    own `state_dict()`, exactly what the reference's BasicTrainer writes."""

    rank, world_size = 0, 1

    def __init__(
        self, activation_checkpointing: bool = False, block_name: str | None = None, device: str = "auto"
    ) -> None:
        self.device = resolve_device(device)
        self.activation_checkpointing, self.block_name = activation_checkpointing, block_name

    @property
    def is_main(self) -> bool:
        return True

    def wrap_policy(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.activation_checkpointing and hasattr(model, "peft_config"):
            # a LoRA model: transformers' own checkpointing, which keeps the module names PEFT's
            # adapter state dict is found by (a wrapper around each block would rename them)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
        elif self.activation_checkpointing:
            _wrap_blocks_for_checkpointing(model, find_block_class(model, self.block_name))
        return model

    def wrap_reference(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def barrier(self) -> None:
        pass

    def any(self, flag: bool) -> bool:
        return flag

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def all_gather_object(self, obj: Any, group: Any = None) -> list:
        return [obj]

    def checkpoint_group(self) -> Any:
        return None

    def generate_kwargs(self) -> dict:
        return {}

    def full_state_dict(self, model: nn.Module) -> dict:
        return model.state_dict()

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_full_state_dict(self, model: nn.Module, state: dict | None, strict: bool = True) -> None:
        assert state is not None
        model.load_state_dict(state, strict=strict)

    def load_full_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None
    ) -> None:
        assert state is not None
        optimizer.load_state_dict(optimizer_state_by_index(state, parameter_names(model)))


# ============================================================================================
# many processes: FSDP2


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, reference: nn.Module | None = None) -> dict:
    """The state Distributed Checkpoint saves: each process's shards, keyed by parameter name
    (so any number of processes can load it), a tied tensor once; with TR-DPO the reference
    model's too."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": without_tied(get_model_state_dict(model), tied_parameters(model))}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    if reference is not None:
        state["reference"] = without_tied(get_model_state_dict(reference), tied_parameters(reference))
    return state


def _dcp_load(
    model: nn.Module, optimizer: torch.optim.Optimizer, path: str, reference: nn.Module | None = None
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _dcp_state(model, optimizer, reference)
    with single_process_dcp_is_intended():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, share_tied(state["model"], tied_parameters(model)))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    if reference is not None:
        set_model_state_dict(reference, share_tied(state["reference"], tied_parameters(reference)))


@torch.no_grad()
def mix_weights(target: nn.Module, source: nn.Module, alpha: float) -> None:
    """target <- alpha * source + (1 - alpha) * target, parameter by parameter (TR-DPO's reference
    update), computed in float32 and stored in target's dtype. Under FSDP2 each process mixes
    its own shards: the two models are sharded alike, so their local shards correspond."""
    pairs = zip(target.named_parameters(), source.named_parameters(), strict=True)
    for (t_name, t), (s_name, s) in pairs:
        if clean_name(t_name) != clean_name(s_name):
            raise ValueError(f"cannot mix {s_name} into {t_name}: the models differ")
        t_local = t.to_local() if isinstance(t, DTensor) else t
        s_local = s.to_local() if isinstance(s, DTensor) else s
        t_local.copy_(t_local.float().mul_(1 - alpha).add_(s_local.float(), alpha=alpha))


@contextlib.contextmanager
def single_process_dcp_is_intended() -> Iterator[None]:
    """Distributed Checkpoint warns whenever it runs without a process group; one process is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def replacement_note() -> str | None:
    """A line for a job of several machines that torchrun restarts through its shared rendezvous
    store: in torch 2.13 an agent that replaces a lost machine never receives that store's master
    address for the next round and times out, so the job cannot get the machine back."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    machines = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if shared and machines > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        return (
            f"note: {machines} machines restart through torchrun's shared rendezvous store, which a machine that "
            f"replaces a lost one cannot join; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for every agent to allow it"
        )
    return None


def init_process_group() -> tuple[int, int]:
    """Join the process group torchrun set up; returns (rank, world size). Collectives on CUDA
    tensors go through NCCL, on CPU tensors through gloo (device=cpu on a GPU machine works too)."""
    if torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    try:
        store, rank, world_size = next(torch_dist.rendezvous("env://"))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
            # torchrun's shared agent store lives for all restarts of a job, and the process
            # group's keys in it are not per attempt: a restarted process could read the address
            # a dead one published. A prefix per attempt keeps each restart to its own keys.
            # (Without the shared store, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, every round has a
            # new store, and no prefix: the restart count is each agent's own, so an agent that
            # replaced a lost machine counts from 0 while the others do not.)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = torch_dist.PrefixStore(f"dpokit/attempt_{attempt}", store)
        torch_dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    except (RuntimeError, ValueError) as err:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DpokitError(
            f"cannot start the {backend} process group at {where} "
            f"(rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}): {str(err).splitlines()[0]}"
        ) from None
    return torch_dist.get_rank(), torch_dist.get_world_size()


def block_classes(model: nn.Module) -> dict[str, type]:
    """Classes that look like transformer blocks: the model's `_no_split_modules` and the
    element classes of its ModuleLists of identical modules."""
    found: dict[str, type] = {}
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    for name in getattr(model, "_no_split_modules", None) or []:
        if name in by_name:
            found[name] = by_name[name]
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            found.setdefault(type(module[0]).__name__, type(module[0]))
    return found


def find_block_class(model: nn.Module, block_name: str | None) -> type:
    """model.block_name's class (a name that matches no module of the model is refused, listing
    the candidates); None: the class of the model's repeated decoder layers."""
    candidates = block_classes(model)
    if block_name is not None:
        for module in model.modules():
            if type(module).__name__ == block_name:
                return type(module)
        listed = ", ".join(candidates) or "none found"
        raise ConfigError(
            f"config key 'model.block_name' is '{block_name}', which is no module class of {type(model).__name__}; "
            f"its transformer block classes: {listed}"
        )
    if not candidates:
        raise ConfigError(
            f"cannot tell the transformer block class of {type(model).__name__}; set model.block_name "
            f"(e.g. GPT2Block, GPTNeoXLayer, LlamaDecoderLayer)"
        )
    # the repeated layers hold most of the parameters: prefer the class with most of them
    sizes = {
        name: sum(p.numel() for m in model.modules() if type(m) is cls for p in m.parameters())
        for name, cls in candidates.items()
    }
    return candidates[max(sizes, key=lambda n: sizes[n])]


class FSDP2(ShardedLayout):
    """Every process holds a shard of each transformer block (and of the rest of the model):
    PyTorch's FSDP2 `fully_shard`, per block, then the root."""

    def __init__(
        self,
        block_name: str | None,
        mixed_precision: str | None = None,
        activation_checkpointing: bool = False,
        device: str = "auto",
        log: Any = print,
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world_size = torch_dist.get_rank(), torch_dist.get_world_size()
        self.device = resolve_device(device)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.block_name, self.activation_checkpointing = block_name, activation_checkpointing
        self.mixed_precision = getattr(torch, mixed_precision) if mixed_precision else None
        self.log = log
        self.block_class: type | None = None
        self._checkpoint_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _shard(
        self, model: nn.Module, mp_policy: Any = None, checkpointing: bool = False, root_reshards: bool | None = None
    ) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.block_class is None:
            self.block_class = find_block_class(model, self.block_name)
            if self.block_name is None and self.is_main:
                self.log(f"FSDP: sharding per {self.block_class.__name__} (set model.block_name to choose)")
        block_class = self.block_class
        model = model.to(self.device)
        if checkpointing:
            _wrap_blocks_for_checkpointing(model, block_class)
        kwargs: dict[str, Any] = {"mesh": self.mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
        # one FSDP unit per block (the checkpoint wrapper around it, when there is one), then the root
        is_unit = (lambda m: _wraps(m, block_class)) if checkpointing else (lambda m: isinstance(m, block_class))
        for module in [m for m in model.modules() if is_unit(m)]:
            fully_shard(module, **kwargs)
        if root_reshards is not None:
            kwargs["reshard_after_forward"] = root_reshards
        fully_shard(model, **kwargs)
        return model

    def wrap_policy(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = None
        if self.mixed_precision is not None:
            # compute in the low precision; gradients reduced and master weights kept in fp32
            mp = MixedPrecisionPolicy(param_dtype=self.mixed_precision, reduce_dtype=torch.float32)
        return self._shard(model, mp, self.activation_checkpointing)

    def wrap_reference(self, model: nn.Module) -> nn.Module:
        if not list(model.parameters()):  # LoRA's adapter-off reference: the policy's own (sharded) weights
            return model
        # FSDP2 keeps the root's parameters (embeddings, output layer) gathered after a forward,
        # for the backward that follows; the reference has no backward, so they would stay whole
        # until the next forward, and TR-DPO's update and a checkpoint would see them gathered
        return self._shard(model, root_reshards=True)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, values.contiguous())
        return torch.cat(parts) if values.dim() else torch.stack(parts)

    def barrier(self) -> None:
        torch_dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether any process says yes (e.g. was asked to stop): all of them then agree."""
        box = torch.tensor([int(flag)], device=self.device)
        torch_dist.all_reduce(box, op=torch_dist.ReduceOp.MAX)
        return bool(box.item())

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any, group: Any = None) -> list:
        out: list = [None] * self.world_size
        torch_dist.all_gather_object(out, obj, group=group)
        return out

    def checkpoint_group(self) -> Any:
        """A gloo process group for the collectives of background saves, so that they never
        interleave with the loop's on the default group. Created on first use: every process
        must ask at the same point (a save)."""
        if self._checkpoint_group is None:
            self._checkpoint_group = torch_dist.new_group(backend="gloo")
        return self._checkpoint_group

    def generate_kwargs(self) -> dict:
        # every process must run the same number of forward passes (each one all-gathers shards)
        return {"synced_gpus": True}

    @staticmethod
    def _full_options(cpu_offload: bool = False, broadcast_from_rank0: bool = False, strict: bool = True) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(
            full_state_dict=True, cpu_offload=cpu_offload, broadcast_from_rank0=broadcast_from_rank0, strict=strict
        )

    def full_state_dict(self, model: nn.Module) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=self._full_options(cpu_offload=True))
        return share_tied(state, tied_parameters(model))

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=self._full_options(cpu_offload=True))

    def load_full_state_dict(self, model: nn.Module, state: dict | None, strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        options = self._full_options(broadcast_from_rank0=True, strict=strict)
        set_model_state_dict(model, state or {}, options=options)

    def load_full_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None
    ) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = optimizer_state_by_name(state, parameter_names(model)) if state else {}
        set_optimizer_state_dict(model, optimizer, state, options=self._full_options(broadcast_from_rank0=True))


def _wraps(module: nn.Module, cls: type) -> bool:
    inner = getattr(module, "_checkpoint_wrapped_module", None)
    return inner is not None and isinstance(inner, cls)


def _wrap_blocks_for_checkpointing(model: nn.Module, block_class: type) -> None:
    """Recompute each block's activations in backward (PyTorch's non-reentrant checkpoint wrapper)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, block_class))


def decided_by_main(decide: Any) -> Any:
    """`decide()` on the main process; its result, or the user error it raised, on every process
    (so all of them go on with the same decision, or all stop with the same sentence)."""
    if not torch_dist.is_initialized():
        return decide()
    outcome: tuple[Any, DpokitError | None] = (None, None)
    if torch_dist.get_rank() == 0:
        try:
            outcome = (decide(), None)
        except DpokitError as err:
            outcome = (None, err)
    box = [outcome]
    torch_dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def check_shared(path: Path, digest: str) -> None:
    """Every process reads the file the first one wrote at `path` (sha256 `digest`), so the
    directory holding it is one directory for the whole job, not a same-named one on each
    machine. Collective; refused on every process, naming those that do not see it."""
    if not torch_dist.is_initialized():
        return
    try:
        mine: str | None = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        mine = None
    seen: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(seen, (mine == digest, socket.gethostname()))
    blind = [f"{rank} (on {host})" for rank, (same, host) in enumerate(seen) if not same]
    if blind:
        raise ConfigError(
            f"the run directory {path.parent} is not shared: process(es) {', '.join(blind)} do not see the "
            f"{path.name} the first process wrote there; every machine of a job must reach the run directory on "
            f"a shared file system (set local_run_dir or local_dirs to a path they share), because checkpoints, "
            f"their shards and resume=auto live there"
        )


def shutdown(finished: bool = False) -> None:
    """Leave the process group; after a finished job, all together (a process that leaves while
    another is still in a collective can abort at exit)."""
    if torch_dist.is_initialized():
        if finished:
            torch_dist.barrier()
        torch_dist.destroy_process_group()
