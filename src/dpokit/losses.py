"""Losses and log-probabilities: pure functions of tensors, no trainer state.

Notation follows the DPO paper: y_w is the chosen (preferred) response, y_l the rejected one,
pi the policy, ref the frozen reference model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    ipo: bool = False,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO, conservative DPO or IPO loss for a batch of sequence log-probabilities.

    All four inputs have shape (batch,). Returns (losses, chosen_rewards, rejected_rewards), each
    of shape (batch,); rewards are beta * (log pi - log ref), detached.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0.0 if reference_free else reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios  # h in the IPO paper

    losses = ipo_loss(logits, beta) if ipo else sigmoid_loss(logits, beta, label_smoothing)

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the SFT target, per example (batch,)."""
    return -policy_logps


# --------------------------------------------------------------------------------------------
# The DPO family. Every function maps (batch,) tensors to (batch,) per-example losses; the batch
# loss is their mean. Notation: `delta` is the chosen-minus-rejected score h (for reverse KL the
# log-ratio difference above; `f_divergence_scores` gives the other regularisers' scores),
# `chosen_logratios` = log pi(y_w) - log ref(y_w) and `rejected_logratios` likewise for y_l.


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO, eq. 7 of Rafailov et al. (arXiv:2305.18290); label_smoothing > 0: conservative DPO
    (Mitchell, 2023), which assumes that fraction of the labels is flipped."""
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC's hinge on the log-ratio margin (Zhao et al., arXiv:2305.10425, eq. 2; RSO,
    arXiv:2309.06657): relu(1 - beta * h)."""
    return torch.relu(1 - beta * delta)


def ipo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO, eq. 17 of Azar et al. (arXiv:2310.12036): regress h onto 1/(2*beta) (beta is tau)."""
    return (delta - 1 / (2 * beta)) ** 2


def exo_pair_loss(delta: torch.Tensor, beta: float, epsilon: float) -> torch.Tensor:
    """EXO-pref, eq. 16 of Ji et al. (arXiv:2402.00856): KL(p_f || p_rh) over {y_w, y_l}, with
    p_f = softmax of beta * log-ratios and the label distribution p_rh = (1 - eps, eps)."""
    q_w, log_q_w = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
    q_l, log_q_l = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
    return q_w * (log_q_w - math.log1p(-epsilon)) + q_l * (log_q_l - math.log(epsilon))


def nca_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA for pairs, eq. 10 of Chen et al. (arXiv:2402.05369): rewards are pushed up for y_w
    in absolute terms, not only relative to y_l."""
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO, eq. 8 of Chowdhury et al. (arXiv:2403.00409): an unbiased loss when a
    fraction label_smoothing (in [0, 0.5)) of the preferences is flipped."""
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def bco_pair_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, reward_shift: float = 0.0
) -> torch.Tensor:
    """BCO on pairs, eq. 6 of Jung et al. (arXiv:2404.04656): a binary classifier of y_w as
    desirable and y_l as undesirable on the rewards beta * log-ratio, shifted by delta (the
    paper's running mean of the rewards)."""
    r_w, r_l = beta * chosen_logratios - reward_shift, beta * rejected_logratios - reward_shift
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)


def sppo_hard_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities, eq. 4.7 of Wu et al. (arXiv:2405.00675) with P(y_w
    beats the policy) = 1 and P(y_l) = 0: each log-ratio regressed onto +-1/(2*beta)."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def aot_loss(
    policy_logratios: torch.Tensor, reference_logratios: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """AOT for paired data, eq. 10 of Melnyk et al. (arXiv:2406.05882): the sorted policy
    log-ratios (log pi(y_w) - log pi(y_l)) dominate the sorted reference ones, a distributional
    constraint over the batch. The per-example losses are of the sorted order, not of the pairs:
    the batch is one unit."""
    delta = torch.sort(policy_logratios).values - torch.sort(reference_logratios).values
    return sigmoid_loss(delta, beta, label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """AOT for unpaired data, eq. 9 of Melnyk et al. (arXiv:2406.05882): the sorted chosen
    log-ratios dominate the sorted rejected ones."""
    delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
    return sigmoid_loss(delta, beta, label_smoothing)


def apo_zero_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero, eq. 7 of D'Oosterlinck et al. (arXiv:2408.06266): when y_w is better than the
    model's own outputs, raise its likelihood and lower y_l's."""
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down, eq. 8 of D'Oosterlinck et al. (arXiv:2408.06266): when y_w is worse than the
    model's outputs, lower both, y_l more."""
    return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))


def discopop_loss(delta: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss), eq. 5 of Lu et al. (arXiv:2406.08414): logistic and
    exponential losses blended by sigmoid(beta * h / tau)."""
    logits = beta * delta
    blend = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - blend) + torch.exp(-logits) * blend


def dpop_loss(delta: torch.Tensor, chosen_logratios: torch.Tensor, beta: float, lambda_: float) -> torch.Tensor:
    """DPO-Positive, eq. 3 of Pal et al. (arXiv:2402.13228): DPO with a penalty
    lambda * max(0, log ref(y_w) - log pi(y_w)) inside the sigmoid, so the chosen response's
    likelihood cannot fall below the reference's while the margin grows."""
    return -F.logsigmoid(beta * (delta - lambda_ * torch.relu(-chosen_logratios)))


def f_divergence_scores(logratios: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(pi/ref) for f-DPO (Wang et al., arXiv:2309.16240, Table 1), from log(pi/ref): the score
    whose chosen-minus-rejected difference replaces h. reverse_kl is DPO's own (log t)."""
    if divergence == "reverse_kl":
        return logratios
    if divergence == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if divergence == "js_divergence":  # f'(t) = log(2t / (1 + t)) = log 2 + logsigmoid(log t)
        return math.log(2) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence":  # f'(t) = (t^(alpha-1) - 1) / (alpha - 1); alpha -> 1: log t
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        # the exponent is clamped where exp would overflow the dtype (TRL clamps at the same points)
        limit = {torch.float16: 11.0}.get(logratios.dtype, 80.0)
        wide = torch.promote_types(logratios.dtype, torch.float32)
        t = torch.clamp(((alpha - 1.0) * logratios).to(wide), max=limit)
        return ((torch.exp(t) - 1.0) / (alpha - 1.0)).to(logratios.dtype)
    raise ValueError(f"unknown f-divergence {divergence!r}")


def ld_token_weights(chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights (Liu et al., arXiv:2409.06411, eq. 9), for the concatenated
    (chosen; rejected) rows of `concatenated_inputs` padded to one width: 1 on the first
    min(|y_w|, |y_l|) response tokens of each pair, alpha on the longer response's excess
    ("verbose") tokens, 0 elsewhere. Aligned with `token_logps`' (rows, seq - 1) positions."""
    width = max(chosen_labels.shape[1], rejected_labels.shape[1])
    masks = [pad_to_length(lab, width, -100)[:, 1:] != -100 for lab in (chosen_labels, rejected_labels)]
    positions = [m.cumsum(-1) * m for m in masks]  # k-th response token is k (1-based), elsewhere 0
    shared = torch.minimum(masks[0].sum(-1), masks[1].sum(-1)).unsqueeze(1)
    weights = [m * torch.where(p <= shared, 1.0, alpha) for m, p in zip(masks, positions, strict=True)]
    return torch.cat(weights)


def wpo_weights(chosen_aligned: torch.Tensor, rejected_aligned: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight, eq. 2 of Zhou et al. (arXiv:2406.11827) with the paper's alignment:
    exp of each response's mean over its tokens of log p(token) - log sum_v p(v)^2, for y_w
    times y_l; no gradient flows through it."""
    return torch.exp(chosen_aligned.detach()) * torch.exp(rejected_aligned.detach())


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO, eq. 6 of Meng et al. (arXiv:2405.14734): no reference; the rewards are beta times
    the length-averaged log-probs and must differ by a margin gamma."""
    return sigmoid_loss(chosen_avg_logps - rejected_avg_logps - gamma / beta, beta, label_smoothing)


def cpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """CPO's preference term, eq. 3 of Xu et al. (arXiv:2401.08417): DPO with a uniform
    reference (the NLL term on y_w is added by the caller)."""
    return sigmoid_loss(chosen_logps - rejected_logps, beta, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler's two branches at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """log odds(y_w) - log odds(y_l), odds(y) = p / (1 - p) with p the length-averaged
    likelihood: eqs. 4-6 of Hong et al. (arXiv:2403.07691), in log space."""
    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    return (c - r) - (log1mexp(c) - log1mexp(r))


def orpo_odds_ratio_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, lambda_: float
) -> torch.Tensor:
    """ORPO's odds-ratio term, eq. 7 of Hong et al. (arXiv:2403.07691): -lambda * log
    sigmoid(log odds ratio) (the NLL term on y_w is added by the caller)."""
    return -lambda_ * F.logsigmoid(orpo_log_odds(chosen_avg_logps, rejected_avg_logps))


def kto_loss(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO, eqs. 7-8 of Ethayarajh et al. (arXiv:2402.01306), for unpaired completions:
    desirable ones lose 1 - sigmoid(beta * (log-ratio - z0)), undesirable ones
    1 - sigmoid(beta * (z0 - log-ratio)), weighted by lambda_D and lambda_U. z0 is the batch's KL
    estimate (`kl`, detached, clamped at 0 by the caller)."""
    gain = torch.where(desirable, logratios - kl, kl - logratios)
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    return weight * (1 - torch.sigmoid(beta * gain))


def apo_zero_unpaired_loss(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """APO-zero for unpaired completions (D'Oosterlinck et al., arXiv:2408.06266, eq. 7 split by
    label): raise desirable likelihoods, lower undesirable ones; no KL estimate."""
    per = torch.where(desirable, 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios))
    return torch.where(desirable, desirable_weight, undesirable_weight) * per


LOGSUMEXP_ROWS = 4  # sequences per chunk when half-precision logits are reduced in fp32
LOGSUMEXP_POSITIONS = 1024  # positions per chunk, the same for logits of labelled positions only


def _logsumexp_fp32(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1)


def _logsumexp_wide(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """logsumexp over the vocabulary in float32 or wider; half-precision logits are reduced a
    chunk of `rows` at a time (recomputed in backward), so no full fp32 copy of them exists."""
    if logits.dtype == torch.promote_types(logits.dtype, torch.float32):
        return torch.logsumexp(logits, dim=-1)
    if torch.is_grad_enabled() and logits.requires_grad:
        return torch.cat([
            torch.utils.checkpoint.checkpoint(_logsumexp_fp32, chunk, use_reentrant=False)
            for chunk in logits.split(rows)
        ])  # fmt: skip
    return torch.cat([_logsumexp_fp32(chunk) for chunk in logits.split(rows)])


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: the positions whose logits predict a label (position t predicts t+1)."""
    return F.pad(labels[:, 1:] != -100, (0, 1), value=False)


def predicted_indices(labels: torch.Tensor) -> torch.Tensor:
    """The predicting positions as indices into the flattened (batch * seq) positions, row-major.
    Their count depends on the data, so on CUDA this waits for the device once (nonzero)."""
    return predicting_positions(labels).flatten().nonzero().squeeze(1)


@contextlib.contextmanager
def logits_where_predicted(
    model: torch.nn.Module, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> Iterator[torch.Tensor | None]:
    """Inside, the model's output layer sees only the hidden states of the positions that predict
    a label, so its logits are (n, vocab) for those n positions instead of (batch, seq, vocab).
    The prompt and the padding, most of a DPO batch, never go through the vocabulary projection:
    the same numbers per position, less compute and memory (most for large vocabularies).
    positions: `predicted_indices(labels)`, best found from the labels on the CPU (on CUDA,
    finding them on the device waits for it); computed here when not given. Yields them for
    batch_logps, or None for a model without an output layer to hook. A model whose output
    layer gets other shapes is left alone (batch_logps takes either form)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        yield None
        return
    if positions is None:
        positions = predicted_indices(labels)

    def select(_module: torch.nn.Module, args: tuple) -> tuple | None:
        hidden = args[0]
        if hidden.dim() == 3 and hidden.shape[:2] == labels.shape:
            return (hidden.flatten(0, 1).index_select(0, positions), *args[1:])
        return None

    handle = head.register_forward_pre_hook(select)
    try:
        yield positions
    finally:
        handle.remove()


def token_logps(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """log p(label) at every position of each sequence, (batch, seq - 1), in float32 (or wider),
    0 where nothing is predicted: position t's logits predict token t+1, hence the shift.

    labels: (batch, seq) with -100 where nothing is predicted (prompt and padding). logits:
    (batch, seq, vocab), or (n, vocab) for just the n predicting positions in row-major order
    (`logits_where_predicted`, whose `positions` can be passed to spare computing them again).
    log p(y) = logit[y] - logsumexp(logits): no (batch, seq, vocab) log-softmax is kept for
    backward. The numbers are those of log_softmax in fp32, up to rounding.
    """
    wide = torch.promote_types(logits.dtype, torch.float32)
    if logits.dim() == 2:
        if positions is None:
            positions = predicted_indices(labels)
        if logits.shape[0] != positions.numel():
            raise ValueError(
                f"logits {tuple(logits.shape)} are not one row per labelled position of {positions.numel()}"
            )
        # position p of the flattened batch predicts the next flattened token (never across rows:
        # a row's last position predicts nothing)
        targets = labels.flatten().index_select(0, positions + 1)
        picked = torch.gather(logits, 1, targets.unsqueeze(1)).squeeze(1).to(wide)
        per_token = picked - _logsumexp_wide(logits, LOGSUMEXP_POSITIONS)
        flat = per_token.new_zeros(labels.numel()).index_copy(0, positions, per_token)
        return flat.view(labels.shape)[:, :-1]
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    mask = labels[:, 1:] != -100
    logits = logits[:, :-1, :]
    index = labels[:, 1:].masked_fill(~mask, 0).unsqueeze(2)  # any valid index; masked out below
    picked = torch.gather(logits, dim=2, index=index).squeeze(2).to(wide)
    return (picked - _logsumexp_wide(logits, LOGSUMEXP_ROWS)) * mask


def batch_logps(
    logits: torch.Tensor, labels: torch.Tensor, average: bool = False, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum (or mean) of log p(label) over the labelled positions of each sequence (`token_logps`)."""
    return sequence_logps(token_logps(logits, labels, positions), labels, average)


def sequence_logps(per_token: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Each sequence's log-prob from `token_logps`: the sum over its labelled positions, or
    their mean (the length-averaged log-probs of SimPO, ORPO, sigmoid_norm-style losses)."""
    total = per_token.sum(-1)
    return total / (labels[:, 1:] != -100).sum(-1) if average else total


@torch.no_grad()
def token_log_sum_sq_probs(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """log sum_v p(v)^2 of each position's next-token distribution, (batch, seq - 1), 0 where
    nothing is predicted: WPO's alignment term (logsumexp(2 z) - 2 logsumexp(z)). No gradient."""
    rows = LOGSUMEXP_POSITIONS if logits.dim() == 2 else LOGSUMEXP_ROWS
    if logits.dim() == 3:
        logits = logits[:, :-1, :]
    value = torch.cat([_logsumexp_fp32(2 * chunk.float()) - 2 * _logsumexp_fp32(chunk) for chunk in logits.split(rows)])
    if value.dim() == 2:  # (batch, seq - 1)
        return value * (labels[:, 1:] != -100)
    if positions is None:
        positions = predicted_indices(labels)
    flat = value.new_zeros(labels.numel()).index_copy(0, positions, value)
    return flat.view(labels.shape)[:, :-1]


def pad_to_length(tensor: torch.Tensor, length: int, pad_value: int | float, dim: int = -1) -> torch.Tensor:
    if tensor.size(dim) >= length:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = length - tensor.size(dim)
    padding = torch.full(pad_shape, pad_value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, padding], dim=dim)


def concatenated_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """Stack chosen and rejected sequences into one batch (chosen first) so the model runs once.

    Returns `concatenated_{input_ids,attention_mask,labels}` of shape (2*batch, max_len).
    """
    max_len = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = {}
    for field in ("input_ids", "attention_mask", "labels"):
        pad = -100 if field == "labels" else 0
        out[f"concatenated_{field}"] = torch.cat(
            [
                pad_to_length(batch[f"chosen_{field}"], max_len, pad),
                pad_to_length(batch[f"rejected_{field}"], max_len, pad),
            ],
            dim=0,
        )
    return out
