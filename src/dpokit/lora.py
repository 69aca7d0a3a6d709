"""LoRA through PEFT: the policy gets adapters, the reference is the same model with them
switched off, and checkpoints hold both the merged weights (the reference's contract) and the
adapter in PEFT's own format.

Only this module imports peft (an optional dependency: `pip install dpokit[lora]`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dpokit.checkpoint.format import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS  # noqa: F401  (re-exported)
from dpokit.errors import CheckpointError, ConfigError

ADAPTER_NAME = "default"


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(
            "config key 'lora.enabled' needs the peft package, which is not installed: pip install 'dpokit[lora]' "
            "(or pip install peft)"
        ) from None


def linear_layer_names(model: Any) -> list[str]:
    """The distinct last name parts of the layers LoRA can adapt (nn.Linear and GPT-2's Conv1D),
    the output layer excluded, as `lora.target_modules` names them."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not output
    }
    return sorted(names)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)  # PEFT's rule for a list of names


def target_modules(model: nn.Module, wanted: list[str] | None) -> list[str] | str:
    """What to adapt: the names given (each must match a layer), else PEFT's default for the
    model's architecture, else every linear layer ('all-linear')."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if wanted:
        from transformers.pytorch_utils import Conv1D

        adaptable = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d)  # layer types PEFT's LoRA wraps
        layers = [name for name, m in model.named_modules() if isinstance(m, adaptable)]
        unknown = [t for t in wanted if not any(_matches(n, t) for n in layers)]
        if unknown:
            raise ConfigError(
                f"config key 'lora.target_modules' names {unknown[0]!r}, which matches no layer of this model LoRA "
                f"can adapt; its linear layers are: {', '.join(linear_layer_names(model))}"
            )
        return list(wanted)
    default = DEFAULTS.get(getattr(model.config, "model_type", ""))
    return list(default) if default else "all-linear"


def apply(model: nn.Module, cfg: Any, seed: int = 0) -> nn.Module:
    """`model` with LoRA adapters (config group `lora`), initialised from `seed` (the same seed,
    the same adapters); only the adapters (and lora.modules_to_save) are trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = target_modules(model, list(cfg.target_modules) if cfg.target_modules else None)
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2 stores weights transposed
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 asks transformers 5 a deprecated question; nothing the user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def prepare_quantized(model: nn.Module) -> nn.Module:
    """A 4-bit base readied for adapters, as PEFT prepares one for QLoRA: every weight frozen and
    the layers bitsandbytes did not quantize (norms, embeddings) in float32 for stable training.
    (activation_checkpointing=true turns on transformers' non-reentrant checkpointing, which
    needs no input that requires grad.)"""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)"


# --------------------------------------------------------------------------------------------
# the reference: the policy with its adapters off


class AdapterOff(nn.Module):
    """The reference model of a LoRA run: the policy's own weights with the adapters disabled
    (PEFT's `disable_adapter()`), in eval mode and without gradient. No second copy of the
    weights exists; the policy is held outside the module tree, so `.eval()`, `.to()` or
    `.parameters()` on the reference never reach it."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._policy: list[Any] = [policy]

    @property
    def policy(self) -> Any:
        return self._policy[0]

    @contextlib.contextmanager
    def _off(self) -> Iterator[Any]:
        policy = self.policy
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), policy.disable_adapter():
                yield policy
        finally:
            policy.train(was_training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._off() as policy:
            return policy(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._off() as policy:
            return policy.generate(*args, **kwargs)

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        """The base weights, as a reference model built as a copy would have them (what
        precomputed reference log-probs are keyed by)."""
        return base_state_dict(self.policy, merged=False)


# --------------------------------------------------------------------------------------------
# checkpoints


def _own_name(name: str) -> str | None:
    """A PEFT model's state-dict key as the wrapped model names it; None for adapter entries
    and for the frozen originals that lora.modules_to_save trains a copy of."""
    name = name.removeprefix("base_model.model.")
    if ".lora_" in name or ".original_module." in name:
        return None
    return name.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER_NAME}.", ".")


def base_state_dict(model: Any, merged: bool = True, full_state: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the wrapped model under its own parameter names: with merged, each
    adapted weight is W + (its adapter's delta), the numbers PEFT's merge_and_unload writes,
    without changing the model; without, the base weights W. full_state: the PEFT model's
    whole state dict (under FSDP, the one gathered on the main process); default: its own."""
    state = model.state_dict() if full_state is None else full_state
    return merged_state(state, config_dict(model) if merged else None)


def config_dict(model: Any) -> dict:
    """The adapter's LoraConfig as JSON-able values (what adapter_config.json holds)."""
    config = model.peft_config[ADAPTER_NAME]
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def merged_state(state: dict[str, torch.Tensor], config: dict | None) -> dict[str, torch.Tensor]:
    """From a LoRA model's whole state dict (PEFT's names) and its LoraConfig (`config_dict`;
    None: leave the adapters out): the wrapped model's state dict with each adapter merged
    into its weight as PEFT's get_delta_weight computes it, transpose(B @ A, fan_in_fan_out)
    * scaling, in float32 on the CPU for half-precision weights as PEFT does. Needs no model:
    `ckpt consolidate` merges a sharded checkpoint's state with it."""
    deltas: dict[str, torch.Tensor] = {}
    suffix = f".lora_A.{ADAPTER_NAME}.weight"
    for key in [k for k in state if k.endswith(suffix)] if config is not None else []:
        layer = key[: -len(suffix)]
        own = _own_name(f"{layer}.base_layer.weight")
        assert own is not None and config is not None
        deltas[own] = _delta(state[key], state[f"{layer}.lora_B.{ADAPTER_NAME}.weight"], config)
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        own = _own_name(name)
        if own is None:
            continue
        tensor = tensor.detach()
        merged[own] = (tensor + deltas[own].to(tensor.dtype)) if own in deltas else tensor
    return merged


def _delta(a: torch.Tensor, b: torch.Tensor, config: dict) -> torch.Tensor:
    """One adapter's change to its weight, as PEFT's get_delta_weight computes it."""
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    delta = b @ a
    return (delta.T if config.get("fan_in_fan_out") else delta) * scale


def merge_saved(base: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The merged weights from the base state dict (the model's own names) and an adapter file's
    tensors (PEFT's file names, `adapter_weights`): the numbers `merged_state` gives for the
    training model, so a checkpoint without policy.pt (lora.save_merged=false) merges to the
    policy.pt it would have had. A lora.modules_to_save module's trained copy replaces the base's."""
    prefix = "base_model.model."
    merged = dict(base)
    for key, tensor in saved.items():
        name = key.removeprefix(prefix)
        if ".lora_A." in name:
            weight = name.split(".lora_A.")[0] + ".weight"
            if weight not in base:
                raise CheckpointError(f"the adapter adapts {weight}, which its base model does not have")
            b = saved[key.replace(".lora_A.", ".lora_B.")]
            merged[weight] = base[weight] + _delta(tensor, b, config).to(base[weight].dtype)
        elif ".lora_" not in name:
            if name not in base:
                raise CheckpointError(f"the adapter holds {name}, which its base model does not have")
            merged[name] = tensor
    return merged


def adapter_files(model: Any, full_state: dict | None = None) -> dict[str, Any]:
    """PEFT's own adapter directory, as checkpoint files: adapter_config.json (text) and
    adapter_model.safetensors (its tensors), as `save_pretrained` writes them."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, state_dict=full_state, adapter_name=ADAPTER_NAME)
    return adapter_file_contents(config_dict(model), {k: v.detach() for k, v in state.items()})


def adapter_file_contents(config: dict, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """adapter_config.json's text and adapter_model.safetensors' tensors, as checkpoint files."""
    text = json.dumps({**config, "inference_mode": True}, indent=2, sort_keys=True, default=str)
    return {ADAPTER_CONFIG: text, ADAPTER_WEIGHTS: weights}


def adapter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters' entries of a LoRA model's whole state dict under the names PEFT's file
    gives them (the adapter name dropped; a lora.modules_to_save copy under its module's own
    name): for a state read back from shards."""
    named = ((_file_name(k), v) for k, v in state.items())
    return {name: v for name, v in named if name is not None}


def _file_name(key: str) -> str | None:
    """A LoRA model's state-dict key as PEFT's adapter file names it; None: not in the file."""
    if ".lora_" in key:
        return key.replace(f".{ADAPTER_NAME}.", ".")
    if f".modules_to_save.{ADAPTER_NAME}." in key:
        return key.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")
    return None


def read_adapter(model: Any, ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's adapter weights under the model's own state-dict names (PEFT's file drops
    the adapter name from them), as they were saved: safetensors keeps the bits."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(
            f"cannot resume a LoRA run from {ckpt_dir}: it has no {ADAPTER_WEIGHTS} (saved without lora.enabled); "
            f"start a new run from its weights with model.archive={ckpt_dir} instead"
        )
    saved = load_file(str(path))
    named = ((_file_name(k), k) for k in model.state_dict())
    names = {name: k for name, k in named if name is not None}
    unknown = [k for k in saved if k not in names]
    if unknown:
        raise CheckpointError(f"{path} holds adapter weights this model does not have (e.g. {unknown[0]})")
    return {names[k]: v for k, v in saved.items()}
