"""Padding-free forward passes (`packing=true`): a micro-batch's sequences packed into a few
rows, each sequence attending only to itself, and the per-token log-probs put back where the
padded computation has them, so every loss reads the same (rows, seq - 1) tensor as without.

Attention is confined per sequence by transformers itself: with no 2-D attention mask, no cache
and `position_ids` that restart at 0, its mask builders (`masking_utils.create_causal_mask` and
its sliding-window and chunked siblings; `find_packed_sequence_indices`) make the causal mask
block-diagonal for eager, sdpa and flex attention, and the flash-attention path runs varlen
kernels from the same positions. A model that does not build its mask there, or whose forward
takes no `position_ids`, would let sequences see each other or take wrong positions: refused.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from dpokit.errors import ConfigError

# the transformers mask builders that detect packed sequences from position_ids
PACKING_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")


def row_tokens(cfg: Any) -> int | None:
    """The packed rows' token budget, or None when packing is off."""
    return (cfg.packing_max_tokens or cfg.max_length) if cfg.packing else None


def check_model_supports(model: torch.nn.Module) -> None:
    """Refuse, in one sentence naming the model type, a model whose attention transformers
    cannot confine to each packed sequence (read from its class, so the weightless skeleton
    will do)."""
    base = getattr(model, "base_model", model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    module = sys.modules.get(type(base).__module__)
    builds_mask = module is not None and any(hasattr(module, name) for name in PACKING_MASK_BUILDERS)
    takes_positions = "position_ids" in inspect.signature(type(model).forward).parameters
    if not (builds_mask and takes_positions):
        why = "its forward takes no position_ids" if not takes_positions else "it builds its attention mask itself"
        raise ConfigError(
            f"config key 'packing' is true, but model type '{model_type}' cannot confine attention to each packed "
            f"sequence ({why}, not through transformers' masking_utils); use packing=false"
        )


def layout(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Which sequences share each packed row, no row over max_tokens tokens. Every row is as
    wide as the fullest one, so the cost is rows x width: first-fit decreasing (longest first,
    each into the first row with room, ties in input order) is tried with row capacities from
    the longest sequence up to max_tokens (a factor sqrt(2) apart), and the cheapest is kept,
    the narrowest of equals (attention costs width^2 per row where a kernel computes the masked
    blocks). The first capacity alone never computes more than the padded batch does.
    Deterministic."""
    longest = max(lengths)
    if longest > max_tokens:
        raise ValueError(f"a sequence of {longest} tokens does not fit a packed row of {max_tokens}")
    best: list[list[int]] = []
    best_cost = math.inf
    capacity = longest
    while True:
        rows = _first_fit_decreasing(lengths, capacity)
        cost = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if cost < best_cost:
            best, best_cost = rows, cost
        if capacity >= max_tokens:
            return best
        capacity = min(max_tokens, math.ceil(capacity * math.sqrt(2)))


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def token_counts(lengths: list[int], max_tokens: int) -> tuple[int, int]:
    """(real, computed) tokens of the packed rows of sequences of these lengths."""
    rows = layout(lengths, max_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    return sum(lengths), len(rows) * width


@dataclass
class Packed:
    """A padded batch's sequences packed into rows. `source` and `target` map per-token
    log-probs from the packed rows' (rows, width - 1) positions, flattened, to the padded
    batch's (batch, seq - 1) positions, flattened (`unpack`)."""

    input_ids: torch.Tensor  # (rows, width)
    position_ids: torch.Tensor  # (rows, width), 0 at each sequence's first token
    labels: torch.Tensor  # (rows, width), -100 at each sequence's first token: nothing predicts across
    source: torch.Tensor  # (n,) long
    target: torch.Tensor  # (n,) long
    padded_shape: tuple[int, int]  # (batch, seq - 1)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, max_tokens: int) -> Packed:
    """Pack right-padded rows (batch, seq) into rows of at most max_tokens tokens. The tail of a
    row that is not full is padding at position 0 that predicts nothing."""
    lengths = attention_mask.sum(-1).tolist()
    if not bool(
        (attention_mask == (torch.arange(attention_mask.shape[1]) < attention_mask.sum(-1, keepdim=True))).all()
    ):
        raise ValueError("packing needs right-padded rows (real tokens first, then padding)")
    rows = layout(lengths, max_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    n_rows, seq = input_ids.shape
    packed_ids = torch.zeros(len(rows), width, dtype=input_ids.dtype)
    packed_labels = torch.full((len(rows), width), -100, dtype=labels.dtype)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    source, target = [], []
    for p, row in enumerate(rows):
        offset = 0
        for i in row:
            n = lengths[i]
            packed_ids[p, offset : offset + n] = input_ids[i, :n]
            packed_labels[p, offset + 1 : offset + n] = labels[i, 1:n]
            positions[p, offset : offset + n] = torch.arange(n)
            # per-token position t (predicting token t + 1) of the sequence, t < n - 1
            source.append(p * (width - 1) + offset + torch.arange(n - 1))
            target.append(i * (seq - 1) + torch.arange(n - 1))
            offset += n
        # padding at 0, each token a sequence of its own: positions never pass the longest
        # sequence's (the model's position table ends at max_length, not at the row's width)
        positions[p, offset:] = 0
    return Packed(packed_ids, positions, packed_labels, torch.cat(source), torch.cat(target), (n_rows, seq - 1))


def unpack(per_token: torch.Tensor, source: torch.Tensor, target: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Packed rows' per-token values (rows, width - 1) at the padded batch's positions
    (batch, seq - 1), 0 where a padded row has no token; differentiable."""
    flat = per_token.flatten().index_select(0, source)
    return per_token.new_zeros(shape[0] * shape[1]).index_copy(0, target, flat).view(shape)
