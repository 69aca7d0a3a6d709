"""How the one training loop runs on one process or many: the distribution seam.

A `Distribution` decides how models are wrapped, how gradients are clipped, how per-example
metrics are gathered and how state is collected for a checkpoint and put back. `SingleProcess`
is the plain case (CPU or one CUDA device); the training loop does not change with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
import torch.nn as nn

from dpokit.errors import DpokitError

# ============================================================================================
# optimizer state: by parameter index (torch.optim's own form) or by parameter name (FSDP's)


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters in the order an optimizer built from
    `model.parameters()` holds them, without wrapper prefixes."""
    return [clean_name(name) for name, _ in model.named_parameters()]


def clean_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


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
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float: ...
    def gather(self, values: torch.Tensor) -> torch.Tensor: ...
    def barrier(self) -> None: ...
    def broadcast_object(self, obj: Any) -> Any: ...
    def all_gather_object(self, obj: Any) -> list: ...
    def generate_kwargs(self) -> dict: ...
    def full_state_dict(self, model: nn.Module) -> dict: ...
    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict: ...
    def load_full_state_dict(self, model: nn.Module, state: dict | None) -> None: ...
    def load_full_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None
    ) -> None: ...


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SingleProcess:
    """One process: CPU or one CUDA device. Checkpoint state is the models' and optimizer's
    own `state_dict()`, exactly what the reference's BasicTrainer writes."""

    rank, world_size = 0, 1

    def __init__(self, activation_checkpointing: bool = False) -> None:
        self.device = default_device()
        self.activation_checkpointing = activation_checkpointing

    @property
    def is_main(self) -> bool:
        return True

    def wrap_policy(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.activation_checkpointing:
            cast(Any, model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def wrap_reference(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list:
        return [obj]

    def generate_kwargs(self) -> dict:
        return {}

    def full_state_dict(self, model: nn.Module) -> dict:
        return model.state_dict()

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_full_state_dict(self, model: nn.Module, state: dict | None) -> None:
        assert state is not None
        model.load_state_dict(state)

    def load_full_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None
    ) -> None:
        assert state is not None
        optimizer.load_state_dict(optimizer_state_by_index(state, parameter_names(model)))
