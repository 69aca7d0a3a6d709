"""Losses and log-probabilities: pure functions of tensors, no trainer state.

Notation follows the DPO paper: y_w is the chosen (preferred) response, y_l the rejected one,
pi the policy, ref the frozen reference model.
"""

from __future__ import annotations

import contextlib
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

    if ipo:
        # IPO, eq. 17 of Azar et al. (arXiv:2310.12036): regress h onto 1/(2*beta)
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        # DPO, eq. 7 of Rafailov et al. (arXiv:2305.18290); label_smoothing > 0 is conservative
        # DPO, which assumes a fraction label_smoothing of the preferences are flipped.
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the SFT target, per example (batch,)."""
    return -policy_logps


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


def batch_logps(
    logits: torch.Tensor, labels: torch.Tensor, average: bool = False, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum (or mean) of log p(label) over the labelled positions of each sequence, in float32
    (or wider).

    labels: (batch, seq) with -100 where nothing is predicted (prompt and padding); position t's
    logits predict token t+1, hence the shift. logits: (batch, seq, vocab), or (n, vocab) for
    just the n predicting positions in row-major order (`logits_where_predicted`, whose
    `positions` can be passed to spare computing them again).
    log p(y) = logit[y] - logsumexp(logits): no (batch, seq, vocab) log-softmax is kept for
    backward. The numbers are those of log_softmax in fp32, up to rounding.
    """
    mask = labels[:, 1:] != -100
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
        total = flat.view(labels.shape)[:, :-1].sum(-1)
    else:
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
        logits = logits[:, :-1, :]
        index = labels[:, 1:].masked_fill(~mask, 0).unsqueeze(2)  # any valid index; masked out below
        picked = torch.gather(logits, dim=2, index=index).squeeze(2).to(wide)
        total = ((picked - _logsumexp_wide(logits, LOGSUMEXP_ROWS)) * mask).sum(-1)
    return total / mask.sum(-1) if average else total


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
