"""Losses and log-probabilities: pure functions of tensors, no trainer state.

Notation follows the DPO paper: y_w is the chosen (preferred) response, y_l the rejected one,
pi the policy, ref the frozen reference model.
"""

from __future__ import annotations

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


def _logsumexp_fp32(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1)


def batch_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of log p(label) over the labelled positions of each sequence, in float32
    (or wider).

    logits: (batch, seq, vocab); labels: (batch, seq) with -100 where nothing is predicted
    (prompt and padding). Position t's logits predict token t+1, hence the shift.
    log p(y) = logit[y] - logsumexp(logits): no (batch, seq, vocab) log-softmax is kept for
    backward, and half-precision logits are reduced in fp32 a few sequences at a time
    (recomputed in backward), so no full fp32 copy of them exists either. The numbers are
    those of log_softmax in fp32, up to rounding.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    labels = labels[:, 1:]
    logits = logits[:, :-1, :]
    mask = labels != -100
    index = labels.masked_fill(~mask, 0).unsqueeze(2)  # any valid index; masked out below
    wide = torch.promote_types(logits.dtype, torch.float32)
    picked = torch.gather(logits, dim=2, index=index).squeeze(2).to(wide)
    if logits.dtype == wide:
        lse = torch.logsumexp(logits, dim=-1)
    elif torch.is_grad_enabled() and logits.requires_grad:
        lse = torch.cat([
            torch.utils.checkpoint.checkpoint(_logsumexp_fp32, chunk, use_reentrant=False)
            for chunk in logits.split(LOGSUMEXP_ROWS)
        ])  # fmt: skip
    else:
        lse = torch.cat([_logsumexp_fp32(chunk) for chunk in logits.split(LOGSUMEXP_ROWS)])
    total = ((picked - lse) * mask).sum(-1)
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
