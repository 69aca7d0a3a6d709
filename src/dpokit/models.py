"""Models and tokenizers: Hugging Face loading (hub names and local directories), the bundled
tiny model, and a clear error when weights do not fit a model (`model.archive` is read by
`dpokit.weights`)."""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path

import torch
import transformers

from dpokit.errors import CheckpointError, DpokitError

BUNDLED_MODELS = {"tiny": "assets/tiny"}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def resolve_model_path(name_or_path: str) -> str:
    """A bundled model's name ('tiny') maps to its directory in the package; anything else is
    passed to Hugging Face as is (a local directory or a hub name)."""
    if name_or_path in BUNDLED_MODELS and not os.path.exists(name_or_path):
        return str(resources.files("dpokit") / BUNDLED_MODELS[name_or_path])
    return name_or_path


def _has_weights(path: str) -> bool:
    return any((Path(path) / f).exists() for f in WEIGHT_FILES)


def load_tokenizer(name_or_path: str, cache_dir: str | None = None):
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise DpokitError(
            f"cannot load tokenizer '{name_or_path}' (model.tokenizer_name_or_path / model.name_or_path): "
            f"{str(err).splitlines()[0]}"
        ) from None
    if tokenizer.eos_token_id is None:
        raise DpokitError(f"tokenizer '{name_or_path}' has no EOS token, which responses need")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    cache_dir: str | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
    quantize: str | None = None,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """A causal LM from a hub name or a local directory, with transformers' attention kernel
    `attn_implementation` (None: its default); quantize (nf4, fp4): its linear layers in 4 bits
    through bitsandbytes (QLoRA's base), computing in `dtype`, loaded onto `device` (default:
    the current CUDA device).

    A directory with a config but no weights (the bundled tiny model) is built from its config
    with the given seed, so the same seed always gives the same initial weights.
    """
    path = resolve_model_path(name_or_path)
    torch_dtype = getattr(torch, dtype)
    options: dict = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if quantize is not None:
        check_quantizable(name_or_path)
        options.update(quantization_config=four_bit_config(quantize, torch_dtype),
                         device_map={"": device or torch.device("cuda", torch.cuda.current_device())})  # fmt: skip
    try:
        if os.path.isdir(path) and not _has_weights(path) and os.path.exists(os.path.join(path, "config.json")):
            config = transformers.AutoConfig.from_pretrained(path)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = transformers.AutoModelForCausalLM.from_config(config, **options)
            model = cast_parameters(model, torch_dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, cache_dir=cache_dir, dtype=torch_dtype, **options
            )
    except (OSError, ValueError) as err:
        raise DpokitError(
            f"cannot load model '{name_or_path}' (model.name_or_path): {str(err).splitlines()[0]}"
        ) from None
    disable_dropout(model)
    return model


def four_bit_config(quant_type: str, compute_dtype: torch.dtype):
    """QLoRA's quantization (Dettmers et al., 2023): 4-bit weights (nf4 or fp4) with their
    scales quantized too (double quantization), matmuls in the model's dtype."""
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)  # fmt: skip


def check_quantizable(name_or_path: str) -> None:
    """bitsandbytes quantizes weights as they are loaded: a model built from its config alone has none."""
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) and not _has_weights(path):
        raise DpokitError(
            f"config key 'lora.quantize' needs a model with weights, and model '{name_or_path}' has only a config "
            f"(its weights are made from the seed); save it with save_pretrained and pass that directory"
        )


def model_skeleton(name_or_path: str, attn_implementation: str | None = None) -> torch.nn.Module:
    """The model's modules without weights (on the meta device): its structure, cheaply (and
    whether it has the attention kernel asked for)."""
    path = resolve_model_path(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise DpokitError(
            f"cannot load model '{name_or_path}' (model.name_or_path): {str(err).splitlines()[0]}"
        ) from None
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(
                config, **({"attn_implementation": attn_implementation} if attn_implementation else {})
            )
        except (ImportError, ValueError) as err:
            raise DpokitError(
                f"config key 'model.attn_implementation': {str(err).splitlines()[0]} (model '{name_or_path}')"
            ) from None


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO's log-ratios must be deterministic functions of the weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def fuse_gelu(model: torch.nn.Module) -> int:
    """Replace transformers' NewGELUActivation (`gelu_new`: GPT-2, GPT-J, GPT-Neo; seven
    elementwise kernels forward, more backward) with its GELUTanh, the same tanh approximation in
    PyTorch's one fused kernel: equal up to float rounding, about 15% of a DPO step on the CPU
    workload. The model's config is not changed (an export still says gelu_new). Returns how
    many activations were replaced."""
    from transformers.activations import GELUTanh, NewGELUActivation

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                replaced += 1
    return replaced


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model's floating-point parameters in `dtype`, its buffers as they are, which is what
    from_pretrained(dtype=...) gives. Module.to(dtype) also casts float buffers, such as the
    rotary embeddings' inv_freq (Llama, GPT-NeoX/Pythia): in float16 their rounding moves the
    angles at long positions (0.1 rad at position 511). A tied weight is one parameter, so it
    stays one tensor."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    return model


def copy_as_reference(policy: torch.nn.Module, dtype: str) -> torch.nn.Module:
    reference = cast_parameters(copy.deepcopy(policy), getattr(torch, dtype))
    reference.requires_grad_(False)
    reference.eval()
    return reference


def check_state_dict_fits(model: torch.nn.Module, state: dict, source: str) -> None:
    """Raise one sentence saying which keys are missing/unexpected/mis-shaped, and how many."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        k
        for k in expected
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("with a different shape", shapes)):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    raise CheckpointError(
        f"{source} does not fit model {type(model).__name__}: {len(expected)} keys expected, " + "; ".join(parts)
    )
