"""Losses and log-probabilities against numbers computed by hand (math.log / math.exp)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dpokit.losses import (
    batch_logps,
    concatenated_inputs,
    logits_where_predicted,
    predicted_indices,
    predicting_positions,
    preference_loss,
    sft_loss,
)

# Two examples. policy/ref log-probabilities of the chosen (w) and rejected (l) responses.
PI_W = [-1.0, -4.0]
PI_L = [-3.0, -2.0]
REF_W = [-2.0, -3.0]
REF_L = [-2.5, -2.5]
# h = (pi_w - pi_l) - (ref_w - ref_l)
H = [(2.0) - (0.5), (-2.0) - (-0.5)]  # [1.5, -1.5]
H_REF_FREE = [2.0, -2.0]


def softplus(x: float) -> float:
    """-log(sigmoid(-x)) = log(1 + e^x)."""
    return math.log(1.0 + math.exp(x))


def inputs(requires_grad: bool = False):
    ts = [torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for v in (PI_W, PI_L, REF_W, REF_L)]
    return ts


def close(t: torch.Tensor, expected: list[float], tol: float = 1e-9) -> None:
    assert t.shape == (len(expected),)
    for got, want in zip(t.tolist(), expected, strict=False):
        assert got == pytest.approx(want, abs=tol, rel=tol), (t.tolist(), expected)


# --------------------------------------------------------------------------------------------
# preference_loss


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_hand_computation(beta):
    losses, _, _ = preference_loss(*inputs(), beta=beta)
    # -log sigmoid(beta * h) = log(1 + exp(-beta * h))
    close(losses, [softplus(-beta * h) for h in H])


def test_dpo_loss_hand_numbers_explicit():
    # h = 1.5, beta = 0.1: -log(1 / (1 + e^-0.15))
    losses, _, _ = preference_loss(*inputs(), beta=0.1)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.15)), abs=1e-12)
    assert losses[1].item() == pytest.approx(math.log(1 + math.exp(0.15)), abs=1e-12)
    # the preferred ordering (h > 0) must give the smaller loss
    assert losses[0] < losses[1]


def test_conservative_dpo_label_smoothing():
    beta, eps = 0.1, 0.2
    losses, _, _ = preference_loss(*inputs(), beta=beta, label_smoothing=eps)
    expected = [(1 - eps) * softplus(-beta * h) + eps * softplus(beta * h) for h in H]
    close(losses, expected)
    plain, _, _ = preference_loss(*inputs(), beta=beta)
    assert not torch.allclose(losses, plain)


def test_reference_free_ignores_reference_in_loss():
    beta = 0.1
    losses, chosen_r, rejected_r = preference_loss(*inputs(), beta=beta, reference_free=True)
    close(losses, [softplus(-beta * h) for h in H_REF_FREE])
    # changing the reference does not change the reference-free loss
    pi_w, pi_l, ref_w, ref_l = inputs()
    other, _, _ = preference_loss(pi_w, pi_l, ref_w + 7.0, ref_l - 3.0, beta=beta, reference_free=True)
    close(other, [softplus(-beta * h) for h in H_REF_FREE])


def test_ipo_loss():
    beta = 0.1
    losses, _, _ = preference_loss(*inputs(), beta=beta, ipo=True)
    # (h - 1/(2 beta))^2 = (1.5 - 5)^2 = 12.25 and (-1.5 - 5)^2 = 42.25
    close(losses, [12.25, 42.25])
    beta = 0.5
    losses, _, _ = preference_loss(*inputs(), beta=beta, ipo=True)
    close(losses, [(1.5 - 1.0) ** 2, (-1.5 - 1.0) ** 2])


def test_sft_loss_is_negative_logp():
    logps = torch.tensor([-1.25, -3.5, 0.0])
    assert sft_loss(logps).tolist() == [1.25, 3.5, -0.0]


def test_rewards_are_beta_times_logratio_and_detached():
    beta = 0.1
    pi_w, pi_l, ref_w, ref_l = inputs(requires_grad=True)
    losses, chosen_r, rejected_r = preference_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)
    close(chosen_r, [beta * (p - r) for p, r in zip(PI_W, REF_W, strict=False)])  # [0.1, -0.1]
    close(rejected_r, [beta * (p - r) for p, r in zip(PI_L, REF_L, strict=False)])  # [-0.05, 0.05]
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    assert chosen_r.grad_fn is None and rejected_r.grad_fn is None
    assert losses.requires_grad


def test_rewards_same_with_reference_free():
    beta = 0.2
    _, chosen_r, rejected_r = preference_loss(*inputs(), beta=beta, reference_free=True)
    close(chosen_r, [beta * (p - r) for p, r in zip(PI_W, REF_W, strict=False)])
    close(rejected_r, [beta * (p - r) for p, r in zip(PI_L, REF_L, strict=False)])


def test_dpo_gradient_matches_hand_derivative():
    beta = 0.1
    pi_w, pi_l, ref_w, ref_l = inputs(requires_grad=True)
    losses, _, _ = preference_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)
    losses.sum().backward()
    # d/d pi_w of log(1 + exp(-beta h)) = -beta / (1 + exp(beta h)); opposite sign for pi_l
    expected = [-beta / (1 + math.exp(beta * h)) for h in H]
    close(pi_w.grad, expected)
    close(pi_l.grad, [-g for g in expected])


# --------------------------------------------------------------------------------------------
# batch_logps

LN = math.log
# vocab of 3; row A has softmax [1/6, 2/6, 3/6], row B has softmax [4/6, 1/6, 1/6]
A = [0.0, LN(2), LN(3)]
B = [LN(4), 0.0, 0.0]
BIG = [100.0, -100.0, 50.0]  # the last position's logits predict nothing; must be ignored


def logits_and_labels():
    logits = torch.tensor([[A, B, A, BIG], [B, A, B, BIG]], dtype=torch.float64)
    labels = torch.tensor([[2, 0, 2, 1], [-100, 1, -100, 0]])
    return logits, labels


# seq 0: pos0 (A) -> 0: 1/6; pos1 (B) -> 2: 1/6; pos2 (A) -> 1: 2/6  (label[0] is never predicted)
SEQ0 = [LN(1 / 6), LN(1 / 6), LN(2 / 6)]
# seq 1: pos0 (B) -> 1: 1/6; pos1 -> masked; pos2 (B) -> 0: 4/6
SEQ1 = [LN(1 / 6), LN(4 / 6)]


def test_batch_logps_sum_shifted_and_masked():
    logits, labels = logits_and_labels()
    out = batch_logps(logits, labels, average=False)
    close(out, [sum(SEQ0), sum(SEQ1)], tol=1e-12)


def test_batch_logps_average():
    logits, labels = logits_and_labels()
    out = batch_logps(logits, labels, average=True)
    close(out, [sum(SEQ0) / 3, sum(SEQ1) / 2], tol=1e-12)


def test_batch_logps_does_not_modify_labels():
    logits, labels = logits_and_labels()
    before = labels.clone()
    batch_logps(logits, labels)
    assert torch.equal(labels, before)


def test_batch_logps_all_masked_sum_is_zero():
    logits, _ = logits_and_labels()
    labels = torch.tensor([[1, -100, -100, -100], [-100, -100, -100, -100]])
    assert batch_logps(logits, labels).tolist() == [0.0, 0.0]


def test_batch_logps_gradient_flows():
    logits, labels = logits_and_labels()
    logits.requires_grad_(True)
    batch_logps(logits, labels).sum().backward()
    # the last position never contributes
    assert torch.count_nonzero(logits.grad[:, -1]) == 0
    # seq 1's masked position (pos 1) does not contribute either
    assert torch.count_nonzero(logits.grad[1, 1]) == 0
    assert torch.count_nonzero(logits.grad[0, 0]) > 0


@pytest.mark.parametrize("labels_shape", [(2, 3), (1, 4), (2, 5)])
def test_batch_logps_shape_mismatch_raises(labels_shape):
    logits, _ = logits_and_labels()
    labels = torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ValueError, match="do not match"):
        batch_logps(logits, labels)


# --------------------------------------------------------------------------------------------
# concatenated_inputs


def _batch(chosen_len: int, rejected_len: int) -> dict:
    def ids(n, base):
        return torch.arange(base, base + 2 * n).reshape(2, n)

    return {
        "chosen_input_ids": ids(chosen_len, 10),
        "chosen_attention_mask": torch.ones(2, chosen_len, dtype=torch.long),
        "chosen_labels": ids(chosen_len, 10),
        "rejected_input_ids": ids(rejected_len, 100),
        "rejected_attention_mask": torch.ones(2, rejected_len, dtype=torch.long),
        "rejected_labels": ids(rejected_len, 100),
    }


@pytest.mark.parametrize("chosen_len,rejected_len", [(3, 5), (5, 3), (4, 4)])
def test_concatenated_inputs_pads_and_orders_chosen_first(chosen_len, rejected_len):
    batch = _batch(chosen_len, rejected_len)
    out = concatenated_inputs(batch)
    assert set(out) == {"concatenated_input_ids", "concatenated_attention_mask", "concatenated_labels"}
    n = max(chosen_len, rejected_len)
    for field, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        t = out[f"concatenated_{field}"]
        assert t.shape == (4, n)
        # chosen rows first, then rejected
        assert torch.equal(t[:2, :chosen_len], batch[f"chosen_{field}"])
        assert torch.equal(t[2:, :rejected_len], batch[f"rejected_{field}"])
        # padding on the right with the field's pad value
        assert (t[:2, chosen_len:] == pad).all()
        assert (t[2:, rejected_len:] == pad).all()


def test_concatenated_inputs_explicit_values():
    batch = {
        "chosen_input_ids": torch.tensor([[5, 6]]),
        "chosen_attention_mask": torch.tensor([[1, 1]]),
        "chosen_labels": torch.tensor([[-100, 6]]),
        "rejected_input_ids": torch.tensor([[7, 8, 9]]),
        "rejected_attention_mask": torch.tensor([[1, 1, 1]]),
        "rejected_labels": torch.tensor([[-100, 8, 9]]),
    }
    out = concatenated_inputs(batch)
    assert out["concatenated_input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert out["concatenated_attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert out["concatenated_labels"].tolist() == [[-100, 6, -100], [-100, 8, 9]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_logps_equals_log_softmax_in_float64_with_its_gradient(dtype):
    """The memory-lean form (gather minus logsumexp, half precision reduced in fp32 chunks and
    recomputed in backward) computes the reference's log_softmax-and-gather. Against float64:
    float32 agrees to ~1e-6 relative; bfloat16 inputs are exactly representable in float64, so
    only the fp32 reduction rounds (tolerance 1e-5 relative on these magnitudes). A bfloat16
    gradient is itself rounded to bfloat16: 2**-8 relative, hence 1e-2."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 9, 50) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (6, 9))
    labels[:, :3] = -100
    labels[2, 5:] = -100
    got = batch_logps(logits, labels)
    assert got.dtype == torch.float32
    exact_in = logits.detach().double().requires_grad_()
    shifted = labels[:, 1:]
    mask = shifted != -100
    logp = exact_in[:, :-1].log_softmax(-1).gather(2, shifted.clamp(min=0).unsqueeze(2)).squeeze(2)
    exact = (logp * mask).sum(-1)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    weights = torch.randn(6)
    (got * weights).sum().backward()
    (exact * weights.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), exact_in.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_logps_of_predicting_positions_only_equal_the_full_form(dtype):
    """Logits of just the positions that predict a label, row-major, give the same sums as the
    (batch, seq, vocab) form: the same per-position values summed in the same order."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 9, 50) * 3).to(dtype)
    labels = torch.randint(0, 50, (6, 9))
    labels[:, :3] = -100
    labels[2, 5:] = -100
    where = predicting_positions(labels)
    assert where.sum() == (labels[:, 1:] != -100).sum() and not where[:, -1].any()
    full, picked = logits.clone().requires_grad_(), logits[where].clone().requires_grad_()
    a, b = batch_logps(full, labels), batch_logps(picked, labels)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    (a.sum() + b.sum()).backward()
    torch.testing.assert_close(picked.grad, full.grad[where])
    assert not full.grad[~where].any()  # nothing flows to positions that predict nothing
    with pytest.raises(ValueError, match="one row per labelled position"):
        batch_logps(picked[1:], labels)


def test_model_logits_only_where_predicted_give_the_same_log_probs_and_gradients():
    """The output layer applied to the predicting positions only: (n, vocab) logits, and log-probs
    and parameter gradients no further from a float64 run than the full-logits float32 ones."""
    from conftest import assert_no_further_from_exact
    from dpokit.models import load_model

    torch.manual_seed(0)
    ids = torch.randint(1, 4000, (4, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :12] = -100  # the prompt

    def run(model, lean: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with logits_where_predicted(model, labels) if lean else contextlib.nullcontext() as positions:
            logits = model(ids, attention_mask=mask, use_cache=False).logits
        assert logits.dim() == (2 if lean else 3)
        logps = batch_logps(logits, labels, positions=positions)
        if lean:  # the positions it yields are those batch_logps finds itself
            assert torch.equal(positions, predicted_indices(labels))
            assert torch.equal(batch_logps(logits.detach(), labels), logps.detach())
        logps.sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if name.endswith("mlp.c_fc.weight")}
        return {"logps": logps.detach(), **grads}

    model = load_model("tiny")
    lean, full = run(model, True), run(model, False)
    exact = run(load_model("tiny", dtype="float64"), False)
    assert_no_further_from_exact(lean, full, exact)
    assert model.lm_head._forward_pre_hooks == {}  # the hook is gone after the forward
