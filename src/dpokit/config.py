"""Training configuration: a typed schema with a one-line doc per key, the reference's
command-line syntax on top of it, and validation that explains each rejection in one sentence.

The command line is the DPO reference's (Hydra style), e.g.::

    model=blank_model model.name_or_path=gpt2 datasets=[hh,shp] loss=dpo loss.beta=0.1 \
        model.archive=/runs/sft/LATEST/policy.pt exp_name=e gradient_accumulation_steps=2

`model=NAME` and `loss=NAME` select a config group (a YAML file in `dpokit/conf/`); every other
`key=value` (nested keys with dots, lists in brackets) overrides one field of the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import getpass
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Optional, cast

import omegaconf
from omegaconf import MISSING, DictConfig, OmegaConf

from dpokit import loss_registry
from dpokit.errors import ConfigError, DpokitError

GROUPS = ("model", "loss")
DEFAULT_GROUPS = {"model": "tiny", "loss": "sft"}
TRAINERS = ("BasicTrainer", "FSDPTrainer")
CHECKPOINT_FORMATS = ("full", "sharded")
LIST_KEYS = ("datasets", "local_dirs")
KEY_ALIASES = {"checkpoint.async": "checkpoint.async_save"}  # `async` is a Python keyword, not a field name


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its one-line description (shown by `dpokit train --help`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name_or_path: str = _doc("hub name or local directory of the model ('tiny' is the bundled one)", MISSING)
    tokenizer_name_or_path: Optional[str] = _doc("tokenizer to load; null means name_or_path", None)
    archive: Optional[str] = _doc(
        "checkpoint to start from: a policy.pt, a checkpoint directory or a run directory", None
    )
    block_name: Optional[str] = _doc(
        "class name of the transformer block FSDP shards (GPT2Block, GPTNeoXLayer, LlamaDecoderLayer); null: inferred",
        None,
    )
    policy_dtype: str = _doc("torch dtype of the trained policy", "float32")
    fsdp_policy_mp: Optional[str] = _doc(
        "FSDPTrainer: compute dtype of the policy (bfloat16 or float16; fp32 master weights and reduction); null: policy_dtype",
        None,
    )
    reference_dtype: str = _doc("torch dtype of the frozen reference model", "float16")
    attn_implementation: Optional[str] = _doc(
        "attention kernel: sdpa, eager, flex_attention or flash_attention_2 (needs CUDA and flash-attn; with "
        "packing it runs varlen kernels); null: transformers' default for the model (sdpa where it has one)",
        None,
    )
    fused_gelu: bool = _doc(
        "run gelu_new (GPT-2, GPT-J, GPT-Neo) as PyTorch's fused tanh GELU: the same function, equal up to "
        "float rounding, faster; false: the model's own elementwise implementation",
        True,
    )


# The `loss` group's schemas come from the loss registry (one per loss, and per combination).
LOSS_SCHEMAS = {name: loss_registry.schema([name]) for name in loss_registry.LOSSES}
SFTLossConfig, DPOLossConfig, IPOLossConfig = LOSS_SCHEMAS["sft"], LOSS_SCHEMAS["dpo"], LOSS_SCHEMAS["ipo"]


@dataclass
class WandbConfig:
    enabled: bool = _doc("log to Weights & Biases (needs the wandb package)", False)
    entity: Optional[str] = _doc("wandb entity", None)
    project: str = _doc("wandb project", "direct-preference-optimization")


@dataclass
class TensorboardConfig:
    enabled: bool = _doc(
        "also log metrics to TensorBoard event files in {run_dir}/tensorboard (needs tensorboard)", False
    )


@dataclass
class DataConfig:
    on_bad_row: str = _doc(
        "rows with an empty response, chosen equal to rejected, a prompt that differs between chosen and rejected, "
        "a missing field or a prompt longer than max_length: 'error' refuses the dataset naming them, 'skip' trains "
        "without them (both report how many); 'auto' refuses them in your own files and skips them in the named "
        "datasets (hh, shp, se, hh_sample), whose rows you cannot fix",
        "auto",
    )
    cache: bool = _doc("keep tokenized datasets on disk, keyed by content, tokenizer and lengths", True)


@dataclass
class CheckpointConfig:
    fsync: bool = _doc("fsync files and directories when saving (durability against power loss)", True)
    save_optimizer: bool = _doc("also write optimizer.pt and scheduler.pt (needed to resume)", True)
    keep_last: Optional[int] = _doc("keep only the newest N step-* directories (null: keep all)", None)
    keep_best: Optional[int] = _doc("also keep the best K step-* directories by checkpoint.best_metric", None)
    best_metric: str = _doc("eval metric that ranks checkpoints for keep_best and the 'best' pointer", "loss/eval")
    best_mode: str = _doc("whether the best checkpoint has the min or the max of best_metric", "min")
    on_error: str = _doc("when a save fails (disk full, permissions): 'raise' stops training, 'warn' goes on", "raise")
    format: str = _doc(
        "'full': the reference's policy.pt/optimizer.pt/scheduler.pt; 'sharded': every process writes its part (FSDP)",
        "full",
    )
    async_save: bool = _doc(
        "the loop waits only for a copy of the state in memory; a background thread writes it with the same "
        "guarantees (also spelled checkpoint.async)",
        False,
    )
    on_interrupt: str = _doc(
        "on Ctrl-C or SIGTERM: 'stop' after the current step, 'save' a checkpoint first (both name the resume command)",
        "stop",
    )


@dataclass
class LoraConfig:
    enabled: bool = _doc(
        "train LoRA adapters (PEFT) instead of every weight; the reference is the policy with its adapters off "
        "(no second copy of the model)",
        False,
    )
    r: int = _doc("the adapters' rank", 16)
    alpha: float = _doc("LoRA's alpha: the adapters' output is scaled by alpha / r", 32.0)
    dropout: float = _doc("dropout on the adapters' input", 0.0)
    target_modules: Optional[list[str]] = _doc(
        "names of the layers to adapt (e.g. [c_attn,c_proj] for GPT-2, [q_proj,v_proj] for Llama); null: PEFT's "
        "default for the architecture, else every linear layer but the output layer",
        None,
    )
    modules_to_save: Optional[list[str]] = _doc(
        "modules trained in full beside the adapters (e.g. [lm_head]); null: none", None
    )
    quantize: Optional[str] = _doc(
        "QLoRA: the base model's linear layers in 4 bits through bitsandbytes, nf4 or fp4 (null: not quantized); "
        "needs a CUDA device, trainer=BasicTrainer and lora.save_merged=false",
        None,
    )
    save_merged: bool = _doc(
        "write the merged weights (policy.pt) in every checkpoint; false: the adapter alone, merged into the base "
        "(model.name_or_path + model.archive, which must then stay where they are) when read",
        True,
    )


@dataclass
class Config:
    seed: int = _doc("random seed for initialisation and data order", 0)
    exp_name: str = _doc(
        "name of the experiment; the run directory is {local_dirs[i]}/{user}/{exp_name}_{timestamp}", MISSING
    )
    batch_size: int = _doc(
        "training examples per optimizer step (split into gradient_accumulation_steps micro-batches)", 4
    )
    eval_batch_size: int = _doc("examples per batch during evaluation and sampling", 16)
    debug: bool = _doc("debug mode: no checkpoints and no wandb", False)
    fsdp_port: Optional[int] = _doc("FSDPTrainer started without torchrun: rendezvous port (null: a free one)", None)
    nproc: Optional[int] = _doc(
        "FSDPTrainer started without torchrun: processes to launch (null: one per visible GPU, or 2 on CPU)", None
    )
    datasets: list[str] = _doc(
        "datasets to train on: hh, shp, se, hh_sample, or hh:PATH for a local HH-format file or directory",
        factory=lambda: ["hh_sample"],
    )
    wandb: WandbConfig = _doc("Weights & Biases logging", factory=WandbConfig)
    tensorboard: TensorboardConfig = _doc("TensorBoard logging", factory=TensorboardConfig)
    data: DataConfig = _doc("dataset checks and caching", factory=DataConfig)
    local_dirs: list[str] = _doc(
        "the first of these that exists holds run directories and caches (the last is created if none does)",
        factory=lambda: ["/scr-ssd", "/scr", ".cache"],
    )
    sample_during_eval: bool = _doc("generate samples from the policy (and reference) at each evaluation", True)
    n_eval_model_samples: int = _doc("number of prompts to sample from at each evaluation", 16)
    do_first_eval: bool = _doc("evaluate before the first training step", True)
    local_run_dir: Optional[str] = _doc("run directory; null means a new one under local_dirs", None)
    lr: float = _doc("peak learning rate", 5e-7)
    gradient_accumulation_steps: int = _doc("micro-batches per optimizer step", 1)
    max_grad_norm: float = _doc("gradient norm clipping threshold", 10.0)
    max_length: int = _doc("maximum tokens in prompt + response", 512)
    max_prompt_length: int = _doc("maximum prompt tokens when prompt + response is too long", 256)
    n_epochs: Optional[int] = _doc("epochs to train for (null: n_examples decides)", 1)
    n_examples: Optional[int] = _doc("training examples to train for (null: n_epochs decides)", None)
    n_eval_examples: int = _doc("examples in each evaluation", 256)
    trainer: str = _doc("BasicTrainer (one process) or FSDPTrainer (torchrun processes, FSDP2)", "BasicTrainer")
    device: str = _doc("auto (a CUDA device when there is one, else the CPU), cuda or cpu", "auto")
    optimizer: str = _doc("name of a torch.optim optimizer class", "RMSprop")
    warmup_steps: int = _doc("optimizer steps of linear learning-rate warmup", 150)
    activation_checkpointing: bool = _doc("recompute activations in backward to save memory", False)
    tf32: bool = _doc("CUDA: TF32 matrix multiplies for float32 (the reference's setting); false for full fp32", True)
    mixed_precision: Optional[str] = _doc(
        "BasicTrainer: 'bf16' runs forward passes under bfloat16 autocast (weights and optimizer stay in policy_dtype)",
        None,
    )
    precompute_ref_log_probs: bool = _doc(
        "losses with a reference model: compute its log-probs of every pair once (cached on disk), then free it", False
    )
    length_groups: int = _doc(
        "split each micro-batch into this many groups of similar length: less padding, the same loss and gradient", 1
    )
    packing: bool = _doc(
        "padding-free forward passes: each micro-batch's sequences packed into rows, attention confined to each "
        "sequence; the same log-probs, loss and gradient up to float rounding",
        False,
    )
    packing_max_tokens: Optional[int] = _doc(
        "packing: at most this many tokens per packed row (memory bound; null: max_length)", None
    )
    sampler: str = _doc(
        "'random' (the reference's order) or 'length_grouped' (batches of similar lengths: faster, another order)",
        "random",
    )
    final_eval: bool = _doc("evaluate after the last step (its metrics go into LATEST); false: LATEST gets {}", True)
    eval_every: int = _doc("evaluate and save a checkpoint every this many training examples", 20_000)
    minimum_log_interval_secs: float = _doc("do not log training metrics more often than this", 1.0)
    resume: Optional[str] = _doc(
        "continue a run: a run directory (its newest complete checkpoint), a checkpoint directory, or 'auto' "
        "(the newest complete checkpoint of this run's directory if there is one, else start fresh)",
        None,
    )
    resume_force: bool = _doc("resume even if model, loss or batch size differ from the saved run's config", False)
    checkpoint: CheckpointConfig = _doc("checkpoint durability and retention", factory=CheckpointConfig)
    lora: LoraConfig = _doc("LoRA adapters through PEFT", factory=LoraConfig)
    model: Any = _doc("model config group: tiny, blank_model, gpt2-large, pythia28, ... (model=NAME)", None)
    loss: Any = _doc("loss config group (loss=NAME or loss=[A,B,...]; the losses are listed below)", None)


# --------------------------------------------------------------------------------------------
# groups


def _conf_dir() -> Path:
    return Path(str(resources.files("dpokit") / "conf"))


def group_options(group: str) -> list[str]:
    if group == "loss":
        return list(loss_registry.LOSSES)
    return sorted(p.stem for p in (_conf_dir() / group).glob("*.yaml"))


def _load_group(group: str, name: str) -> DictConfig:
    if group == "loss":
        return loss_registry.group(name)
    options = group_options(group)
    if name not in options:
        raise ConfigError(
            f"unknown {group} config '{name}' for key '{group}'{did_you_mean(name, options)} "
            f"(choose one of: {', '.join(options)})"
        )
    raw = OmegaConf.load(_conf_dir() / group / f"{name}.yaml")
    assert isinstance(raw, DictConfig), f"{group}/{name}.yaml is not a mapping"
    return cast(DictConfig, OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


# --------------------------------------------------------------------------------------------
# parsing


def all_keys() -> list[str]:
    """Every settable key, dotted (model.* and loss.* of every group)."""
    keys = [row[0] for row in _schema_lines(Config) if row[0] not in GROUPS]
    keys += [row[0] for row in _schema_lines(ModelConfig, "model.")]
    keys += ["loss.name"] + [f"loss.{k}" for k in loss_registry.KEYS]
    return keys + list(GROUPS)


def did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _explain(err: omegaconf.errors.OmegaConfBaseException, groups: dict[str, str]) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, (omegaconf.errors.ConfigAttributeError, omegaconf.errors.ConfigKeyError)):
        group = key.split(".")[0]
        where = f" for {group}={groups[group]}" if group in groups and "." in key else ""
        owners = loss_registry.key_owners(key.split(".", 1)[1]) if group == "loss" and "." in key else []
        if owners:
            return f"config key '{key}'{where} belongs to loss={owners[0]}" + (
                f" (and {', '.join(owners[1:4])}{', ...' if len(owners) > 4 else ''})" if len(owners) > 1 else ""
            )
        hint = did_you_mean(key, all_keys()) or " (run 'dpokit train --help' for the list of keys)"
        return f"unknown config key '{key}'{where}{hint}"
    if isinstance(err, omegaconf.errors.ValidationError):
        value = getattr(err, "value", None)
        msg = getattr(err, "msg", str(err)).split("\n")[0]
        return f"bad value {value!r} for config key '{key}': {msg}"
    if isinstance(err, omegaconf.errors.MissingMandatoryValue):
        return f"config key '{key}' is required but has no value"
    return f"bad config at key '{key}': {str(err).splitlines()[0]}"


def parse_args(args: list[str], base: Optional[dict] = None) -> DictConfig:
    """Build the config from `key=value` arguments in the reference's syntax.

    Group choices (`model=...`, `loss=...`) are applied before the field overrides whatever
    their order, as Hydra does, so `loss.beta=0.1 loss=dpo` works too. `base` (a saved run's
    config, when resuming) replaces the defaults; a group named on the command line replaces
    that group of the base.
    """
    groups = dict(DEFAULT_GROUPS)
    named_groups: set[str] = set()
    dotlist: list[str] = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument '{arg}' is not of the form key=value")
        key, value = arg.split("=", 1)
        key = key.lstrip("+")  # Hydra's '+key=' / '++key=' append syntax: same meaning here
        key = KEY_ALIASES.get(key, key)
        if not key:
            raise ConfigError(f"argument '{arg}' has an empty key")
        if key in GROUPS:
            groups[key] = value
            named_groups.add(key)
        elif key in LIST_KEYS and not value.startswith("["):
            dotlist.append(f"{key}=[{value}]")  # datasets=hh means datasets=[hh]
        else:
            dotlist.append(f"{key}={value}")

    cfg = OmegaConf.structured(Config)
    with omegaconf.open_dict(cfg):
        for group in GROUPS:
            if base is not None and group not in named_groups:
                saved = base.get(group) or {}
                if group == "model":
                    cfg[group] = OmegaConf.merge(OmegaConf.structured(ModelConfig), saved)
                else:
                    cfg[group] = OmegaConf.merge(loss_registry.group(saved.get("name", "sft")), saved)
            else:
                cfg[group] = _load_group(group, groups[group])
    OmegaConf.set_struct(cfg, True)
    if base is not None:
        try:
            cfg = OmegaConf.merge(cfg, {k: v for k, v in base.items() if k not in GROUPS})
        except omegaconf.errors.OmegaConfBaseException as err:
            raise ConfigError(f"the saved run config does not fit this version: {_explain(err, groups)}") from None
    try:
        overrides = OmegaConf.from_dotlist(dotlist)
    except omegaconf.errors.OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse the command line: {str(err).splitlines()[0]}") from None
    try:
        cfg = OmegaConf.merge(cfg, overrides)
    except omegaconf.errors.OmegaConfBaseException as err:
        raise ConfigError(_explain(err, groups)) from None
    return cast(DictConfig, cfg)


ATTENTION_KERNELS = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Refuse, in one sentence naming the key, any value that would fail later."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    for key in missing:
        if key == "loss.beta":
            loss_registry.validate(cfg)  # names the loss and an example value
        if key == "model.name_or_path":
            raise ConfigError(
                "config key 'model.name_or_path' is required for this model config (a hub name or a local directory)"
            )
        raise ConfigError(f"config key '{key}' is required but has no value")

    def positive(key: str, allow_zero: bool = False) -> None:
        value = OmegaConf.select(cfg, key)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    for key in (
        "batch_size",
        "eval_batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "max_prompt_length",
        "eval_every",
        "n_eval_examples",
        "n_epochs",
        "n_examples",
        "lr",
        "max_grad_norm",
        "checkpoint.keep_last",
        "checkpoint.keep_best",
        "nproc",
        "length_groups",
        "packing_max_tokens",
    ):
        positive(key)
    for key in ("warmup_steps", "n_eval_model_samples", "minimum_log_interval_secs"):
        positive(key, allow_zero=True)

    if cfg.batch_size % (cfg.gradient_accumulation_steps * world_size) != 0:
        # each process takes batch_size / (gradient_accumulation_steps * processes) examples per micro-batch
        what = f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
        if world_size > 1:
            what += f" * processes ({world_size}) = {cfg.gradient_accumulation_steps * world_size}"
        raise ConfigError(f"config key 'batch_size' ({cfg.batch_size}) must be divisible by {what}")
    if cfg.eval_batch_size % world_size != 0:
        raise ConfigError(
            f"config key 'eval_batch_size' ({cfg.eval_batch_size}) must be divisible by the number of processes ({world_size})"
        )
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(
            f"config key 'max_prompt_length' ({cfg.max_prompt_length}) must be smaller than max_length ({cfg.max_length})"
        )
    if cfg.n_epochs is None and cfg.n_examples is None:
        raise ConfigError("config keys 'n_epochs' and 'n_examples' are both null; set at least one")
    if not cfg.datasets:
        raise ConfigError("config key 'datasets' is empty; name at least one dataset")
    if cfg.trainer not in TRAINERS:
        raise ConfigError(
            f"config key 'trainer' is '{cfg.trainer}', which this version does not provide; use one of: {', '.join(TRAINERS)}"
        )
    if cfg.mixed_precision not in (None, "bf16"):
        raise ConfigError(f"config key 'mixed_precision' must be bf16 or null, got '{cfg.mixed_precision}'")
    if cfg.mixed_precision is not None and cfg.trainer == "FSDPTrainer":
        raise ConfigError(
            "config key 'mixed_precision' is for BasicTrainer; FSDPTrainer's is model.fsdp_policy_mp=bfloat16"
        )
    attention = OmegaConf.select(cfg, "model.attn_implementation")
    if attention not in (None, *ATTENTION_KERNELS):
        raise ConfigError(
            f"config key 'model.attn_implementation' must be one of {', '.join(ATTENTION_KERNELS)} or null, got '{attention}'"
        )
    if attention == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "config key 'model.attn_implementation' is flash_attention_2, which needs the flash-attn package "
                "(and CUDA): install it, or use sdpa"
            )
    if cfg.packing_max_tokens is not None and cfg.packing_max_tokens < cfg.max_length:
        raise ConfigError(
            f"config key 'packing_max_tokens' ({cfg.packing_max_tokens}) must be at least max_length "
            f"({cfg.max_length}), so that every sequence fits a packed row"
        )
    if cfg.sampler not in ("random", "length_grouped"):
        raise ConfigError(f"config key 'sampler' must be random or length_grouped, got '{cfg.sampler}'")
    loss_registry.validate(cfg)
    validate_lora(cfg)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config key 'device' must be auto, cpu or cuda, got '{cfg.device}'")
    for key, allowed in (("data.on_bad_row", ("auto", "error", "skip")), ("checkpoint.on_interrupt", ("stop", "save"))):
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}' must be {' or '.join(allowed)}, got '{OmegaConf.select(cfg, key)}'")
    if cfg.checkpoint.format not in CHECKPOINT_FORMATS:
        raise ConfigError(
            f"config key 'checkpoint.format' must be one of {', '.join(CHECKPOINT_FORMATS)}, got '{cfg.checkpoint.format}'"
        )

    import torch  # late: keep `--help` and config errors fast

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is cuda but PyTorch sees no CUDA device on this machine")

    if not isinstance(getattr(torch.optim, cfg.optimizer, None), type):
        raise ConfigError(
            f"config key 'optimizer' is '{cfg.optimizer}', which is not a torch.optim optimizer (e.g. RMSprop, AdamW, SGD)"
        )
    for key in ("model.policy_dtype", "model.reference_dtype", "model.fsdp_policy_mp"):
        name = OmegaConf.select(cfg, key)
        if name is not None and not isinstance(getattr(torch, name, None), torch.dtype):
            raise ConfigError(
                f"config key '{key}' is '{name}', which is not a torch dtype (e.g. float32, bfloat16, float16)"
            )

    if cfg.checkpoint.best_mode not in ("min", "max"):
        raise ConfigError(f"config key 'checkpoint.best_mode' must be 'min' or 'max', got '{cfg.checkpoint.best_mode}'")
    if cfg.checkpoint.on_error not in ("raise", "warn"):
        raise ConfigError(
            f"config key 'checkpoint.on_error' must be 'raise' or 'warn', got '{cfg.checkpoint.on_error}'"
        )
    if cfg.wandb.enabled:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "config key 'wandb.enabled' is true but the wandb package is not installed (pip install wandb)"
            ) from None
    if cfg.tensorboard.enabled:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "config key 'tensorboard.enabled' is true but the tensorboard package is not installed "
                "(pip install tensorboard)"
            ) from None


def round_eval_every(cfg: DictConfig) -> None:
    """The reference's rule: eval_every counts examples and is rounded down to whole batches."""
    if cfg.eval_every % cfg.batch_size != 0:
        rounded = max(cfg.batch_size, cfg.eval_every - cfg.eval_every % cfg.batch_size)
        warnings.warn(
            f"eval_every ({cfg.eval_every}) is not a multiple of batch_size ({cfg.batch_size}); using {rounded}",
            stacklevel=2,
        )
        cfg.eval_every = rounded


# --------------------------------------------------------------------------------------------
# run directory


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def get_local_dir(local_dirs: list[str]) -> str:
    """`{first existing of local_dirs}/{user}` (the last one if none exists; it is created with
    the first run directory)."""
    for prefix in local_dirs:
        if os.path.exists(prefix):
            return os.path.join(prefix, _user())
    return os.path.join(local_dirs[-1], _user())


def check_writable(path: str, key: str) -> None:
    """Refuse, in one sentence naming the key, a directory that cannot be created or written
    (a file in the way, a read-only or special filesystem). Leaves nothing behind."""
    import tempfile

    target = Path(path).absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"config key '{key}': {probe} is a file, so the directory {target} cannot be made")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dpokit-probe-", dir=probe))
    except OSError as err:
        raise ConfigError(
            f"config key '{key}': cannot write in {probe} (for {target}): {err.strerror or err}"
        ) from None


def new_run_dir(exp_name: str, local_dirs: list[str]) -> str:
    timestamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return os.path.join(get_local_dir(local_dirs), f"{exp_name}_{timestamp}")


CONFIG_FILE = "config.yaml"  # the run's resolved config, in its run directory


def save_config(cfg: DictConfig, run_dir: str) -> None:
    from dpokit.checkpoint import atomic_write_bytes, make_dirs

    try:
        make_dirs(run_dir)
        atomic_write_bytes(os.path.join(run_dir, CONFIG_FILE), OmegaConf.to_yaml(cfg).encode())
    except (OSError, DpokitError) as err:
        key = "local_run_dir" if cfg.local_run_dir else "local_dirs"
        reason = err.strerror if isinstance(err, OSError) else str(err)
        raise ConfigError(f"config key '{key}': cannot write the run directory {run_dir}: {reason or err}") from None


# --------------------------------------------------------------------------------------------
# help


def _schema_lines(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(f.type) or (
            f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())
        ):
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.type
            rows.extend(_schema_lines(type(sub), key + "."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is MISSING:
            shown = "required"
        elif f.name in GROUPS and not prefix:
            shown = DEFAULT_GROUPS[f.name]
            help_text += f"; one of: {', '.join(group_options(f.name))}"
        else:
            shown = _show(default)
        rows.append((key, shown, help_text))
    return rows


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def help_text() -> str:
    rows = _schema_lines(Config)
    rows += _schema_lines(ModelConfig, "model.")
    rows.append(("loss.name", "sft", "the loss, or list of losses, that loss=... chose"))
    for key, spec in loss_registry.KEYS.items():
        rows.append((f"loss.{key}", "required" if spec.default is MISSING else _show(spec.default), spec.help))
    width = max(len(r[0]) for r in rows)
    lines = [
        "usage: dpokit train [KEY=VALUE ...]",
        "",
        "Train a policy with SFT or a preference loss. Arguments use the DPO reference's syntax:",
        "  model=NAME and loss=NAME pick a config group; key=value sets a key; nested keys",
        "  use dots (loss.beta=0.1); lists use brackets (datasets=[hh,shp]).",
        "  model.* defaults below are the schema's; each model group (default: tiny) sets its own.",
        "",
        "keys (default) description:",
    ]
    for key, default, text in rows:
        lines.append(f"  {key.ljust(width)}  ({default}) {text}")
    return "\n".join([*lines, "", *loss_registry.help_lines()])


def require_cuda_for_quantize(cfg: DictConfig) -> None:
    """QLoRA is a GPU recipe: bitsandbytes' CPU kernels run it, far too slowly to train on."""
    import torch  # late, as in validate

    if cfg.device == "cpu" or not torch.cuda.is_available():
        where = "device is cpu" if cfg.device == "cpu" else "PyTorch sees no CUDA device on this machine"
        raise ConfigError(
            f"config key 'lora.quantize' (QLoRA: a 4-bit base through bitsandbytes) needs a CUDA device, and {where}"
        )


def validate_quantize(cfg: DictConfig) -> None:
    """QLoRA (lora.quantize): what a 4-bit base needs, each in one sentence."""
    lo = cfg.lora
    if lo.quantize not in ("nf4", "fp4"):
        raise ConfigError(f"config key 'lora.quantize' must be nf4, fp4 or null, got {lo.quantize!r}")
    require_cuda_for_quantize(cfg)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "config key 'lora.quantize' needs the bitsandbytes package, which is not installed: "
            "pip install 'dpokit[qlora]' (or pip install bitsandbytes)"
        ) from None
    if cfg.trainer != "BasicTrainer":
        raise ConfigError(
            "config key 'lora.quantize' runs on one GPU (trainer=BasicTrainer): FSDP does not shard bitsandbytes' "
            "4-bit weights"
        )
    if lo.save_merged:
        raise ConfigError(
            "config key 'lora.quantize' needs lora.save_merged=false: a 4-bit base has no full-precision weights to "
            "merge the adapters into at every save (model.archive and ckpt export merge them into the full-precision "
            "base)"
        )
    if cfg.model.archive is not None:
        raise ConfigError(
            "config key 'lora.quantize' cannot load model.archive into a 4-bit base: write the archive as a model "
            "directory with 'dpokit ckpt export ARCHIVE DIR' and pass model.name_or_path=DIR"
        )


def validate_lora(cfg: DictConfig) -> None:
    """LoRA's keys, and what it cannot serve yet; each in one sentence before any model is built."""
    lo = cfg.lora
    if not lo.enabled and not lo.save_merged:
        raise ConfigError(
            "config key 'lora.save_merged=false' needs lora.enabled=true: without adapters, policy.pt is what trained"
        )
    if not lo.enabled:
        return
    from dpokit import lora

    lora.require_peft()
    if lo.r <= 0:
        raise ConfigError(f"config key 'lora.r' must be > 0, got {lo.r}")
    if lo.alpha <= 0:
        raise ConfigError(f"config key 'lora.alpha' must be > 0, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {lo.dropout}")
    if cfg.loss.get("sync_ref_model"):
        raise ConfigError(
            "config key 'loss.sync_ref_model' cannot be used with lora.enabled=true: TR-DPO moves the reference, "
            "and a LoRA run's reference is the frozen base model"
        )
    if lo.quantize is not None:
        validate_quantize(cfg)
    if cfg.checkpoint.format == "sharded" and not lo.save_merged:
        raise ConfigError(
            "config key 'lora.save_merged=false' applies to checkpoint.format=full: a sharded checkpoint holds no "
            "policy.pt already (dpokit ckpt consolidate writes it)"
        )
