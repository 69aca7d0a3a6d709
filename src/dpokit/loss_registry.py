"""Every loss dpokit offers, in one table: its config keys (defaults, docs, checks), whether it
needs a reference model, the data it trains on, how its log-probabilities are reduced, and what
it logs. The trainers, the data layer and the config ask this module; none of them compares loss
names. The equations themselves are pure functions in `dpokit.losses`.

`loss=NAME` picks one loss; `loss=[A,B,...]` with `loss.weights=[...]` a weighted sum of DPO-family
losses (and `sft`, the NLL of the chosen response), as TRL's `loss_type` list does (e.g. MPO's
`loss=[dpo,bco_pair,sft] loss.weights=[0.8,0.2,1.0]`).

Adding a loss is one entry in LOSSES (and, when it brings keys, their entries in KEYS) plus its
pure function in `dpokit.losses` and its tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from copy import copy
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from dpokit.errors import ConfigError

if TYPE_CHECKING:
    import torch


class _Losses:
    """`dpokit.losses`, imported on first use: the config (and `--help`) reads this table
    without importing torch."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("dpokit.losses"), name)


L: Any = _Losses()

# --------------------------------------------------------------------------------------------
# keys


def _at_least(low: float, strict: bool = False) -> Callable[[Any], str | None]:
    return lambda v: (
        None if v is None or (v > low if strict else v >= low) else f"must be {'>' if strict else '>='} {low}"
    )


def _within(low: float, high: float, high_open: bool = True) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v is None or (low <= v < high if high_open else low <= v <= high):
            return None
        return f"must be in [{low}, {high}{')' if high_open else ']'}"

    return check


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class Key:
    """One `loss.*` key. `check` returns what is wrong with a value (None: fine)."""

    type: Any
    default: Any
    help: str
    check: Callable[[Any], str | None] = lambda v: None


KEYS: dict[str, Key] = {
    "beta": Key(float, MISSING, "temperature beta (ipo: tau; orpo: lambda, the odds-ratio weight); required", _at_least(0, True)),
    "label_smoothing": Key(float, 0.0, "dpo: conservative DPO's assumed flip rate, robust: the flip rate, both in [0, 0.5); "
                           "exo_pair: epsilon > 0 (the paper: 1e-3); aot, aot_unpaired, simpo, cpo: label smoothing"),
    "reference_free": Key(bool, False, "dpo: a uniform reference (no reference model is built; rewards are beta * log pi)"),
    "length_normalized": Key(bool, False, "ipo: divide each response's log-ratio by its length (TRL's IPO); false: the "
                             "reference's summed log-probs"),
    "discopop_tau": Key(float, 0.05, "discopop: temperature of the log-ratio modulation", _at_least(0, True)),
    "dpop_lambda": Key(float, 50.0, "dpop: weight of the penalty on a chosen log-prob below the reference's", _at_least(0)),
    "bco_running_mean": Key(bool, True, "bco_pair: shift the rewards by the running mean of past steps' mean reward "
                            "(the BCO paper; training state, saved and restored); false: no shift (TRL 1.16)"),
    "simpo_gamma": Key(float, 0.5, "simpo: the target reward margin gamma"),
    "cpo_alpha": Key(float, 1.0, "cpo: weight of the NLL term on the chosen response", _at_least(0)),
    "desirable_weight": Key(float, 1.0, "kto, apo_zero_unpaired: weight lambda_D of desirable completions' losses", _at_least(0, True)),
    "undesirable_weight": Key(float, 1.0, "kto, apo_zero_unpaired: weight lambda_U of undesirable completions' losses", _at_least(0, True)),
    # modifiers of the DPO family
    "weights": Key(Optional[list[float]], None, "loss=[A,B,...]: the weight of each loss in the sum (null: 1 each)"),  # noqa: UP045 (OmegaConf reads Optional)
    "rpo_alpha": Key(Optional[float], None, "RPO: add rpo_alpha * the NLL of the chosen response (per token; null: off)", _at_least(0)),  # noqa: UP045 (OmegaConf reads Optional)
    "ld_alpha": Key(Optional[float], None, "LD-DPO: weight of the tokens of the longer response past the shorter one's "  # noqa: UP045 (OmegaConf reads Optional)
                    "length, in [0, 1] (null: 1, plain sums)", _within(0.0, 1.0, high_open=False)),
    "f_divergence_type": Key(str, "reverse_kl", f"f-DPO's regulariser: {', '.join(F_DIVERGENCES)} (reverse_kl: DPO's)"),
    "f_alpha_divergence_coef": Key(float, 0.5, "alpha of f_divergence_type=alpha_divergence"),
    "use_weighting": Key(bool, False, "WPO: weight each pair by its responses' length-normalised probability under the policy"),
    "sync_ref_model": Key(bool, False, "TR-DPO: every ref_model_sync_steps steps the reference becomes "
                          "alpha * policy + (1 - alpha) * reference (its weights are then saved in checkpoints)"),
    "ref_model_sync_steps": Key(int, 512, "TR-DPO: optimizer steps between reference updates", _at_least(1)),
    "ref_model_mixup_alpha": Key(float, 0.6, "TR-DPO: the mixup alpha", _within(0.0, 1.0, high_open=False)),
}  # fmt: skip
FAMILY_KEYS = ("weights", "rpo_alpha", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef", "use_weighting",
               "sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha")  # fmt: skip


# --------------------------------------------------------------------------------------------
# what a loss computes from


@dataclass
class Pair:
    """A paired batch's reduced log-probs, (batch,) each: the policy's (summed, LD-weighted when
    ld_alpha is set, or length-averaged for losses that average), the reference's (0 without
    one), the response lengths, f-DPO's scores (the log-ratios for reverse KL), and each
    example's share of the NLL of the chosen responses (mean over examples = per-token mean)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    nll: torch.Tensor | None
    reward_shift: float = 0.0  # bco_pair's running mean

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores

    @property
    def delta_per_token(self) -> torch.Tensor:
        """The scores divided by the response lengths (TRL's sigmoid_norm and length-normalised IPO)."""
        return self.chosen_scores / self.chosen_tokens.clamp(min=1) - self.rejected_scores / self.rejected_tokens.clamp(
            min=1
        )


def _nll(p: Pair, c: DictConfig) -> torch.Tensor:
    assert p.nll is not None
    return p.nll


PAIRED: dict[str, Callable[[Pair, DictConfig], torch.Tensor]] = {
    "dpo": lambda p, c: L.sigmoid_loss(p.delta, c.beta, c.label_smoothing),
    "ipo": lambda p, c: L.ipo_loss(p.delta_per_token if c.length_normalized else p.delta, c.beta),
    "hinge": lambda p, c: L.hinge_loss(p.delta, c.beta),
    "exo_pair": lambda p, c: L.exo_pair_loss(p.delta, c.beta, c.label_smoothing),
    "nca_pair": lambda p, c: L.nca_pair_loss(p.chosen_logratios, p.rejected_logratios, c.beta),
    "robust": lambda p, c: L.robust_loss(p.delta, c.beta, c.label_smoothing),
    "bco_pair": lambda p, c: L.bco_pair_loss(p.chosen_logratios, p.rejected_logratios, c.beta, p.reward_shift),
    "sppo_hard": lambda p, c: L.sppo_hard_loss(p.chosen_logratios, p.rejected_logratios, c.beta),
    "aot": lambda p, c: L.aot_loss(p.chosen - p.rejected, p.ref_chosen - p.ref_rejected, c.beta, c.label_smoothing),
    "aot_unpaired": lambda p, c: L.aot_unpaired_loss(p.chosen_logratios, p.rejected_logratios, c.beta, c.label_smoothing),
    "apo_zero": lambda p, c: L.apo_zero_loss(p.chosen_logratios, p.rejected_logratios, c.beta),
    "apo_down": lambda p, c: L.apo_down_loss(p.chosen_logratios, p.rejected_logratios, c.beta),
    "discopop": lambda p, c: L.discopop_loss(p.delta, c.beta, c.discopop_tau),
    "sigmoid_norm": lambda p, c: L.sigmoid_loss(p.delta_per_token, c.beta),
    "dpop": lambda p, c: L.dpop_loss(p.delta, p.chosen_logratios, c.beta, c.dpop_lambda),
    "sft": _nll,  # as a term of a combination: TRL's per-token NLL of the chosen responses
    "simpo": lambda p, c: L.simpo_loss(p.chosen, p.rejected, c.beta, c.simpo_gamma, c.label_smoothing),
    "cpo": lambda p, c: L.cpo_loss(p.chosen, p.rejected, c.beta, c.label_smoothing) + c.cpo_alpha * _nll(p, c),
    "orpo": lambda p, c: _nll(p, c) + L.orpo_odds_ratio_loss(p.chosen, p.rejected, c.beta),
}  # fmt: skip


@dataclass(frozen=True)
class Loss:
    name: str
    summary: str
    paper: str
    keys: tuple[str, ...] = ("beta",)
    beta_example: str = "0.1"
    reference: bool = True  # needs the reference model's log-probs
    data: str = "paired"  # sft (one response per prompt), paired, or unpaired (completions with a label)
    family: bool = True  # a DPO-family loss: combinable, and the modifiers apply
    average: bool = False  # the policy's log-probs are length-averaged (SimPO, ORPO)
    nll: bool = False  # reads the chosen responses' NLL
    f_divergence: bool = False  # its score difference generalises to f-DPO
    batch_coupled: bool = False  # the examples' losses depend on each other (AOT sorts the batch)


LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    Loss("sft", "supervised fine-tuning on each prompt's sft_target (the reference's first stage)",
         "Rafailov et al. 2023, the DPO reference", keys=(), reference=False, data="sft", family=False),
    Loss("dpo", "DPO (label_smoothing > 0: conservative DPO); TRL's sigmoid", "Rafailov et al. 2023, arXiv:2305.18290",
         keys=("beta", "label_smoothing", "reference_free"), f_divergence=True),
    Loss("ipo", "IPO: squared distance of h from 1/(2 beta)", "Azar et al. 2023, arXiv:2310.12036",
         keys=("beta", "length_normalized"), f_divergence=True),
    Loss("hinge", "SLiC's hinge loss on the log-ratio margin", "Zhao et al. 2023, arXiv:2305.10425",
         f_divergence=True),
    Loss("exo_pair", "EXO: reverse KL to the smoothed label distribution", "Ji et al. 2024, arXiv:2402.00856",
         keys=("beta", "label_smoothing"), f_divergence=True),
    Loss("nca_pair", "NCA for pairs: absolute rewards, not only their difference", "Chen et al. 2024, arXiv:2402.05369"),
    Loss("robust", "Robust DPO: unbiased under a known rate of flipped labels", "Chowdhury et al. 2024, arXiv:2403.00409",
         keys=("beta", "label_smoothing"), f_divergence=True),
    Loss("bco_pair", "BCO on pairs: a binary classifier of chosen vs rejected rewards", "Jung et al. 2024, arXiv:2404.04656",
         keys=("beta", "bco_running_mean")),
    Loss("sppo_hard", "SPPO with hard win probabilities", "Wu et al. 2024, arXiv:2405.00675", beta_example="0.001"),
    Loss("aot", "AOT, paired: sorted policy log-ratios dominate sorted reference ones", "Melnyk et al. 2024, arXiv:2406.05882",
         keys=("beta", "label_smoothing"), batch_coupled=True),
    Loss("aot_unpaired", "AOT, unpaired: sorted chosen log-ratios dominate sorted rejected ones",
         "Melnyk et al. 2024, arXiv:2406.05882", keys=("beta", "label_smoothing"), batch_coupled=True),
    Loss("apo_zero", "APO-zero: raise chosen, lower rejected likelihood", "D'Oosterlinck et al. 2024, arXiv:2408.06266"),
    Loss("apo_down", "APO-down: lower both, rejected more", "D'Oosterlinck et al. 2024, arXiv:2408.06266"),
    Loss("discopop", "DiscoPOP: log-ratio modulated logistic/exponential loss", "Lu et al. 2024, arXiv:2406.08414",
         keys=("beta", "discopop_tau"), f_divergence=True),
    Loss("sigmoid_norm", "DPO on length-normalised log-ratios (TRL's sigmoid_norm)", "Ahrabian et al. 2024, arXiv:2407.15229",
         f_divergence=True),
    Loss("dpop", "DPO-Positive: DPO that penalises a chosen log-prob below the reference's",
         "Pal et al. 2024, arXiv:2402.13228", keys=("beta", "dpop_lambda")),
    Loss("simpo", "SimPO: length-averaged log-probs, a reward margin, no reference", "Meng et al. 2024, arXiv:2405.14734",
         keys=("beta", "simpo_gamma", "label_smoothing"), beta_example="2.0", reference=False, family=False, average=True),
    Loss("cpo", "CPO: DPO with a uniform reference plus the chosen responses' NLL", "Xu et al. 2024, arXiv:2401.08417",
         keys=("beta", "cpo_alpha", "label_smoothing"), reference=False, family=False, nll=True),
    Loss("orpo", "ORPO: NLL plus beta (lambda) times the odds-ratio term, no reference", "Hong et al. 2024, arXiv:2403.07691",
         reference=False, family=False, average=True, nll=True),
    Loss("kto", "KTO: unpaired desirable/undesirable completions against a KL baseline", "Ethayarajh et al. 2024, arXiv:2402.01306",
         keys=("beta", "desirable_weight", "undesirable_weight"), data="unpaired", family=False),
    Loss("apo_zero_unpaired", "APO-zero on unpaired completions", "D'Oosterlinck et al. 2024, arXiv:2408.06266",
         keys=("beta", "desirable_weight", "undesirable_weight"), data="unpaired", family=False),
)}  # fmt: skip


def key_owners(key: str) -> list[str]:
    """The losses that have config key `loss.{key}`."""
    return [n for n, loss in LOSSES.items() if key in loss.keys or (loss.family and key in FAMILY_KEYS)]


# --------------------------------------------------------------------------------------------
# config schemas


def components(name: Any) -> list[str]:
    """The loss names of config key `loss` (a name, or a list of names, as a string or a list)."""
    if isinstance(name, (list, tuple, ListConfig)):
        return [str(n) for n in name]
    text = str(name).strip()
    if text.startswith("[") and text.endswith("]"):
        return [n.strip() for n in text[1:-1].split(",") if n.strip()]
    return [text]


def check_names(names: list[str]) -> None:
    from dpokit.config import did_you_mean

    for name in names:
        if name not in LOSSES:
            raise ConfigError(
                f"unknown loss '{name}' for key 'loss'{did_you_mean(name, list(LOSSES))} (choose one of: {', '.join(LOSSES)})"
            )
    if len(names) > 1:
        if len(set(names)) != len(names):
            raise ConfigError(f"config key 'loss' names a loss twice: {', '.join(names)}")
        alone = [n for n in names if not LOSSES[n].family and n != "sft"]
        if alone or all(n == "sft" for n in names):
            what = alone[0] if alone else "sft"
            raise ConfigError(
                f"config key 'loss' combines {', '.join(names)}, but loss={what} cannot be combined: only the DPO family "
                f"({', '.join(n for n, loss in LOSSES.items() if loss.family)}) and sft combine"
            )


def keys_of(names: list[str]) -> list[str]:
    keys: list[str] = []
    for name in names:
        for key in (*LOSSES[name].keys, *(FAMILY_KEYS if LOSSES[name].family else ())):
            if key not in keys:
                keys.append(key)
    return keys


_SCHEMAS: dict[tuple[str, ...], type] = {}


def schema(names: list[str]) -> type:
    """The dataclass of the `loss` group for these losses: `name` and the union of their keys,
    each with its one-line doc (OmegaConf validates types against it)."""
    key = tuple(names)
    if key not in _SCHEMAS:
        shown = names[0] if len(names) == 1 else names
        fields: list[tuple[str, Any, Any]] = [
            ("name", Any, field(default_factory=partial(copy, shown), metadata={"help": f"loss: {'+'.join(names)}"}))
        ]
        for k in keys_of(names):
            spec = KEYS[k]
            default: Any = (
                field(default_factory=partial(list, spec.default), metadata={"help": spec.help})
                if isinstance(spec.default, list)
                else field(default=spec.default, metadata={"help": spec.help})
            )
            fields.append((k, spec.type, default))
        # a name this module resolves (__getattr__), so that a config pickled to another process
        # (torchrun's processes receive the first one's) finds its schema there
        cls = dataclasses.make_dataclass(_SCHEMA_PREFIX + "__".join(names), fields)
        cls.__module__ = __name__
        _SCHEMAS[key] = cls
    return _SCHEMAS[key]


_SCHEMA_PREFIX = "LossConfig__"


def __getattr__(name: str) -> Any:
    if name.startswith(_SCHEMA_PREFIX):
        return schema(name[len(_SCHEMA_PREFIX) :].split("__"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def group(name: Any) -> DictConfig:
    """The `loss` config group for `loss=NAME` or `loss=[A,B]`."""
    names = components(name)
    check_names(names)
    return OmegaConf.structured(schema(names))


def display_name(loss_cfg: Any) -> str:
    return "+".join(components(loss_cfg.name))


# --------------------------------------------------------------------------------------------
# validation


def validate(cfg: DictConfig) -> None:
    """Refuse, in one sentence naming the key, a loss configuration that cannot train (called
    after the schema has checked the types)."""
    c = cfg.loss
    names = components(c.name)
    check_names(names)
    if OmegaConf.is_missing(c, "beta"):
        example = LOSSES[names[0]].beta_example
        raise ConfigError(
            f"config key 'loss.beta' is required for loss={display_name(c)} (for example loss.beta={example})"
        )
    for k in keys_of(names):
        problem = KEYS[k].check(c[k])
        if problem:
            raise ConfigError(f"config key 'loss.{k}' {problem}, got {c[k]}")
    ls = c.get("label_smoothing")
    for name in names:
        if name in ("dpo", "robust", "aot", "aot_unpaired", "simpo", "cpo") and ls is not None and not 0 <= ls < 0.5:
            raise ConfigError(f"config key 'loss.label_smoothing' must be in [0, 0.5) for loss={name}, got {ls}")
        if name == "exo_pair" and not 0 < ls < 1:
            raise ConfigError(
                f"config key 'loss.label_smoothing' is exo_pair's epsilon and must be in (0, 1), got {ls} (the EXO paper uses 1e-3)"
            )
    weights = c.get("weights")  # a key of the DPO family only
    if weights is not None and len(weights) != len(names):
        raise ConfigError(
            f"config key 'loss.weights' has {len(weights)} weight(s) for {len(names)} loss(es) ({', '.join(names)})"
        )
    objective = Objective(c)
    if objective.family:
        divergence = c.f_divergence_type
        if divergence not in F_DIVERGENCES:
            raise ConfigError(
                f"config key 'loss.f_divergence_type' must be one of {', '.join(F_DIVERGENCES)}, got '{divergence}'"
            )
        unfit = [n for n in names if not LOSSES[n].f_divergence and n != "sft"]
        if divergence != "reverse_kl" and unfit:
            raise ConfigError(
                f"config key 'loss.f_divergence_type' is {divergence}, which loss={unfit[0]} does not support (only "
                f"{', '.join(n for n, loss in LOSSES.items() if loss.f_divergence)}: their loss is a function of the "
                f"chosen-minus-rejected score)"
            )
        coupled = [n for n in names if LOSSES[n].batch_coupled]
        if c.use_weighting and coupled:
            raise ConfigError(
                f"config key 'loss.use_weighting' (WPO) cannot weight loss={coupled[0]}, whose losses are of the sorted "
                f"batch, not of the pairs"
            )
        if coupled and cfg.length_groups > 1:
            raise ConfigError(
                f"config key 'length_groups' ({cfg.length_groups}) would split the micro-batches that loss={coupled[0]} "
                f"sorts as one unit: use length_groups=1"
            )
        if c.sync_ref_model and cfg.precompute_ref_log_probs:
            raise ConfigError(
                "config key 'precompute_ref_log_probs' cannot be used with loss.sync_ref_model=true (TR-DPO updates the "
                "reference during training, so its log-probs cannot be computed in advance)"
            )
        if c.sync_ref_model and not objective.needs_reference:
            raise ConfigError(
                "config key 'loss.sync_ref_model' needs a reference model, which loss.reference_free=true drops"
            )
    if cfg.precompute_ref_log_probs and not objective.needs_reference:
        raise ConfigError(
            f"config key 'precompute_ref_log_probs' needs a reference model, which loss={display_name(c)} does not use"
        )
    if objective.data == "unpaired":
        if cfg.precompute_ref_log_probs:
            raise ConfigError(
                f"config key 'precompute_ref_log_probs' is not available for loss={display_name(c)}: its KL estimate pairs "
                f"each prompt with another example's completion, which depends on the batch"
            )
        if names[0] == "kto" and cfg.batch_size < 2:
            raise ConfigError(
                "config key 'batch_size' must be at least 2 for loss=kto: its KL estimate pairs each prompt with another "
                "example's completion in the batch"
            )


# --------------------------------------------------------------------------------------------
# the resolved objective


def _mean_without_nan(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


class Objective:
    """The loss a run trains with, resolved from its `loss` config: what the trainer must provide
    (`needs_reference`, `data`, `ld_alpha`, `wpo`, `nll`), the per-example losses and metrics
    from log-probs, and the loss's own training state (bco_pair's running mean)."""

    def __init__(self, loss_cfg: DictConfig) -> None:
        self.cfg = loss_cfg
        self.names = components(loss_cfg.name)
        self.losses = [LOSSES[n] for n in self.names]
        self.name = "+".join(self.names)
        first = self.losses[0]
        combined = len(self.names) > 1  # a weighted sum of the DPO family (and sft's NLL)
        self.family = first.family or combined
        self.data = "paired" if combined else first.data
        # reference_free=true makes the reference uniform for the whole loss: none is built
        self.needs_reference = not loss_cfg.get("reference_free") and any(loss.reference for loss in self.losses)
        self.average = first.average and not combined
        weights = loss_cfg.get("weights") if self.family else None
        self.terms: list[tuple[str, float]] = list(
            zip(
                self.names, [float(w) for w in weights] if weights is not None else [1.0] * len(self.names), strict=True
            )
        )
        rpo = loss_cfg.get("rpo_alpha") if self.family else None
        if rpo is not None:
            self.terms.append(("sft", float(rpo)))
        self.kl = self.names[0] == "kto"  # KTO's KL estimate z0 from mismatched pairs
        self.nll = any(LOSSES[n].nll or n == "sft" for n, _ in self.terms) and self.data == "paired"
        self.ld_alpha: float | None = loss_cfg.get("ld_alpha") if self.family else None
        self.wpo = bool(loss_cfg.get("use_weighting")) if self.family else False
        self.divergence = (
            (loss_cfg.f_divergence_type, loss_cfg.f_alpha_divergence_coef) if self.family else ("reverse_kl", 0.5)
        )
        self.sync = (
            (int(loss_cfg.ref_model_sync_steps), float(loss_cfg.ref_model_mixup_alpha))
            if self.family and loss_cfg.get("sync_ref_model")
            else None
        )
        self.bco_steps, self.bco_mean = 0, 0.0
        self.running_mean = "bco_pair" in self.names and bool(loss_cfg.get("bco_running_mean"))
        self.beta = float(loss_cfg.beta) if "beta" in loss_cfg and not OmegaConf.is_missing(loss_cfg, "beta") else 1.0

    # -- what the loss computes from ----------------------------------------------------------

    def reduce(self, per_token: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
        """A sequence's log-prob as this loss reads it, from `losses.token_logps`: the sum
        (LD-DPO: weighted), or the mean over the response for length-averaging losses."""
        if self.ld_alpha is not None and token_weights is not None:
            return (per_token * token_weights).sum(-1)
        return L.sequence_logps(per_token, labels, self.average)

    def reference_key(self) -> list:
        """What the reference's reduced log-probs depend on besides weights and data (the
        precomputed table's cache key)."""
        return [self.ld_alpha]

    # -- losses -------------------------------------------------------------------------------

    def sft(self, per_token: torch.Tensor, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reference's SFT: the negative summed log-prob of each sft_target."""
        logps = per_token.sum(-1)
        losses = L.sft_loss(logps)
        return losses, {f"logps_{split}/chosen": logps.detach(), f"loss/{split}": losses.detach()}

    def paired(
        self,
        per_token: torch.Tensor,
        inputs: dict,
        reference: tuple[torch.Tensor, torch.Tensor] | None,
        nll_scale: float,
        aligned: torch.Tensor | None,
        split: str,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example losses and metrics of a paired batch. per_token: the policy's
        `token_logps` of the concatenated (chosen; rejected) rows; reference: its reduced
        log-probs (None: no reference, a uniform one); nll_scale: examples / chosen response
        tokens of the whole (global) batch, so that each example's share of the NLL averages to
        its per-token mean; aligned: WPO's per-token log p - log sum p^2 (use_weighting)."""
        import torch

        labels = inputs["labels"]
        n = labels.shape[0] // 2
        logps = self.reduce(per_token, labels, inputs.get("token_weights"))
        tokens = (labels[:, 1:] != -100).sum(-1)
        chosen, rejected = logps[:n], logps[n:]
        ref_chosen, ref_rejected = reference if reference is not None else (torch.zeros_like(chosen),) * 2
        nll = -per_token[:n].sum(-1) * nll_scale if self.nll else None
        divergence, alpha = self.divergence
        pair = Pair(
            chosen, rejected, ref_chosen, ref_rejected, tokens[:n], tokens[n:],
            L.f_divergence_scores(chosen - ref_chosen, divergence, alpha),
            L.f_divergence_scores(rejected - ref_rejected, divergence, alpha),
            nll, reward_shift=self.bco_mean,
        )  # fmt: skip
        pair_weight = None
        if self.wpo:
            assert aligned is not None
            mean_aligned = aligned.sum(-1) / tokens.clamp(min=1)
            pair_weight = L.wpo_weights(mean_aligned[:n], mean_aligned[n:])
        total = torch.zeros_like(chosen)
        for name, weight in self.terms:
            term = PAIRED[name](pair, self.cfg)
            total = total + weight * (term * pair_weight if pair_weight is not None else term)

        rewards_c = self.beta * pair.chosen_logratios.detach()
        rewards_r = self.beta * pair.rejected_logratios.detach()
        metrics = {
            f"rewards_{split}/chosen": rewards_c,
            f"rewards_{split}/rejected": rewards_r,
            f"rewards_{split}/accuracies": (rewards_c > rewards_r).float(),
            f"rewards_{split}/margins": rewards_c - rewards_r,
            f"logps_{split}/rejected": rejected.detach(),
            f"logps_{split}/chosen": chosen.detach(),
            f"loss/{split}": total.detach(),
        }
        if nll is not None:
            metrics[f"nll/{split}"] = nll.detach()
        if "orpo" in self.names:
            log_odds = L.orpo_log_odds(chosen, rejected).detach()
            metrics[f"log_odds_ratio/{split}"] = torch.nn.functional.logsigmoid(log_odds)
            metrics[f"log_odds_chosen/{split}"] = log_odds
        if pair_weight is not None:
            metrics[f"wpo_weight/{split}"] = pair_weight.detach()
        return total, metrics

    def unpaired(
        self,
        per_token: torch.Tensor,
        labels: torch.Tensor,
        reference: torch.Tensor | None,
        desirable: torch.Tensor,
        kl: torch.Tensor,
        split: str,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example losses and metrics of a batch of labelled completions (KTO); kl: the
        batch's KL estimate z0, detached and clamped at 0."""
        import torch

        c = self.cfg
        logps = self.reduce(per_token, labels, None)
        logratios = logps - (reference if reference is not None else torch.zeros_like(logps))
        if self.names[0] == "kto":
            losses = L.kto_loss(logratios, desirable, kl, c.beta, c.desirable_weight, c.undesirable_weight)
        else:
            losses = L.apo_zero_unpaired_loss(logratios, desirable, c.beta, c.desirable_weight, c.undesirable_weight)
        rewards = self.beta * logratios.detach()
        nan = torch.full_like(rewards, float("nan"))
        metrics = {
            f"rewards_{split}/chosen": torch.where(desirable, rewards, nan),
            f"rewards_{split}/rejected": torch.where(desirable, nan, rewards),
            f"logps_{split}/chosen": torch.where(desirable, logps.detach(), nan),
            f"logps_{split}/rejected": torch.where(desirable, nan, logps.detach()),
            f"loss/{split}": losses.detach(),
        }
        if self.names[0] == "kto":
            metrics[f"kl/{split}"] = kl.detach().expand_as(rewards)
        return losses, metrics

    def means(self, gathered: dict[str, list[float]], split: str) -> dict[str, float]:
        """Mean of each gathered per-example metric. Unpaired batches' per-label metrics are NaN
        for the other label and skipped; their reward margin is the difference of the means."""
        if self.data != "unpaired":
            return {k: sum(v) / len(v) for k, v in gathered.items()}
        partial = {f"{kind}_{split}/{label}" for kind in ("rewards", "logps") for label in ("chosen", "rejected")}
        out = {k: _mean_without_nan(v) if k in partial else sum(v) / len(v) for k, v in gathered.items()}
        chosen, rejected = out.get(f"rewards_{split}/chosen"), out.get(f"rewards_{split}/rejected")
        if chosen is not None and rejected is not None:
            out[f"rewards_{split}/margins"] = chosen - rejected
        return out

    def balance_note(self, desirable: torch.Tensor) -> str | None:
        """KTO's advice on imbalanced data (eq. 8 of the paper, TRL's bounds): lambda_D * n_D over
        lambda_U * n_U should lie in [1, 4/3]; a line saying so when it does not."""
        n_d = int(desirable.sum())
        n_u = len(desirable) - n_d
        c = self.cfg
        low, high = (round(max(n_u, 1) * c.undesirable_weight / max(n_d, 1) * f, 2) for f in (1.0, 1.33))
        if low <= c.desirable_weight <= high:
            return None
        return (
            f"note: {n_d} desirable and {n_u} undesirable completions; the KTO paper advises loss.desirable_weight in "
            f"[{low}, {high}] for this balance (it is {c.desirable_weight})"
        )

    # -- training state -----------------------------------------------------------------------

    def after_step(self, step_metrics: dict[str, list[float]]) -> dict[str, float]:
        """Update the loss's own state from a finished step's gathered metrics; returns what to
        log about it. bco_pair: the running mean of each step's mean reward (chosen and
        rejected together), the shift of the next step's rewards."""
        if not self.running_mean:
            return {}
        chosen, rejected = step_metrics["rewards_train/chosen"], step_metrics["rewards_train/rejected"]
        step_mean = (sum(chosen) + sum(rejected)) / (len(chosen) + len(rejected))
        self.bco_steps += 1
        self.bco_mean += (step_mean - self.bco_mean) / self.bco_steps
        return {"bco/reward_shift": self.bco_mean}

    def state_dict(self) -> dict:
        return {"bco_pair": {"steps": self.bco_steps, "mean": self.bco_mean}} if self.running_mean else {}

    def load_state_dict(self, state: dict) -> None:
        bco = state.get("bco_pair")
        if self.running_mean and bco is not None:
            self.bco_steps, self.bco_mean = int(bco["steps"]), float(bco["mean"])


def objective(cfg: DictConfig) -> Objective:
    return Objective(cfg.loss)


# --------------------------------------------------------------------------------------------
# help


def help_lines() -> list[str]:
    """`dpokit train --help`'s list of losses: name, what it is, its paper, its keys."""
    lines = ["losses (loss=NAME, or loss=[A,B,...] with loss.weights for a weighted sum of the DPO family and sft):"]
    width = max(len(n) for n in LOSSES)
    for name, loss in LOSSES.items():
        keys = ", ".join(f"loss.{k}" for k in loss.keys) or "no keys"
        tags = []
        if not loss.reference and loss.data != "sft":
            tags.append("no reference model")
        if loss.data == "unpaired":
            tags.append("unpaired data")
        tag = f" [{'; '.join(tags)}]" if tags else ""
        lines.append(f"  {name.ljust(width)}  {loss.summary} ({loss.paper}){tag}; keys: {keys}")
    lines.append(
        "  DPO-family losses also take: "
        + ", ".join(f"loss.{k}" for k in FAMILY_KEYS)
        + " (RPO, LD-DPO, f-DPO, WPO, TR-DPO)"
    )
    return lines
