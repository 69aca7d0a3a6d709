"""The DPO family's equations against numbers computed by hand (math on Python floats), the sign
of their gradients, and the objective that combines them (weights, RPO, LD-DPO, WPO, f-DPO,
the per-token NLL, KTO, bco_pair's state)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from dpokit import losses as L
from dpokit.loss_registry import LOSSES, Objective, group

PI_W, PI_L, REF_W, REF_L = [-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.0], [-2.5, -2.5]
CL = [p - r for p, r in zip(PI_W, REF_W, strict=True)]  # chosen log-ratios [1, -1]
RL = [p - r for p, r in zip(PI_L, REF_L, strict=True)]  # rejected log-ratios [-0.5, 0.5]
H = [c - r for c, r in zip(CL, RL, strict=True)]  # [1.5, -1.5]
BETA = 0.5


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def leaves():
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (PI_W, PI_L, REF_W, REF_L)]


def close(t: torch.Tensor, expected: list[float], tol: float = 1e-10) -> None:
    assert t.shape == (len(expected),), (t.shape, expected)
    for got, want in zip(t.tolist(), expected, strict=True):
        assert got == pytest.approx(want, abs=tol, rel=tol), (t.tolist(), expected)


# name: (the loss from (pi_w, pi_l, ref_w, ref_l), the hand-computed values, whether raising
# pi(y_w) lowers each example's loss, whether raising pi(y_l) raises it)
CASES = {
    "dpo": (lambda w, lo, rw, rl: L.sigmoid_loss((w - rw) - (lo - rl), BETA),
            [-logsig(BETA * h) for h in H], True, True),
    "conservative_dpo": (lambda w, lo, rw, rl: L.sigmoid_loss((w - rw) - (lo - rl), BETA, 0.2),
                         [-0.8 * logsig(BETA * h) - 0.2 * logsig(-BETA * h) for h in H], True, True),
    "hinge": (lambda w, lo, rw, rl: L.hinge_loss((w - rw) - (lo - rl), BETA),
              [max(0.0, 1 - BETA * h) for h in H], True, True),
    "ipo": (lambda w, lo, rw, rl: L.ipo_loss((w - rw) - (lo - rl), BETA),
            [(h - 1 / (2 * BETA)) ** 2 for h in H], False, False),  # a regression: see the test below
    "exo_pair": (lambda w, lo, rw, rl: L.exo_pair_loss((w - rw) - (lo - rl), BETA, 1e-3),
                 [sig(BETA * h) * (logsig(BETA * h) - math.log(1 - 1e-3))
                  + sig(-BETA * h) * (logsig(-BETA * h) - math.log(1e-3)) for h in H], True, True),
    "nca_pair": (lambda w, lo, rw, rl: L.nca_pair_loss(w - rw, lo - rl, BETA),
                 [-logsig(BETA * c) - 0.5 * logsig(-BETA * c) - 0.5 * logsig(-BETA * r) for c, r in zip(CL, RL, strict=True)],
                 True, True),
    "robust": (lambda w, lo, rw, rl: L.robust_loss((w - rw) - (lo - rl), BETA, 0.1),
               [(-0.9 * logsig(BETA * h) + 0.1 * logsig(-BETA * h)) / 0.8 for h in H], True, True),
    "bco_pair": (lambda w, lo, rw, rl: L.bco_pair_loss(w - rw, lo - rl, BETA, 0.25),
                 [-logsig(BETA * c - 0.25) - logsig(-(BETA * r - 0.25)) for c, r in zip(CL, RL, strict=True)], True, True),
    "sppo_hard": (lambda w, lo, rw, rl: L.sppo_hard_loss(w - rw, lo - rl, BETA),
                  [(c - 1 / BETA / 2) ** 2 + (r + 1 / BETA / 2) ** 2 for c, r in zip(CL, RL, strict=True)], True, True),
    "apo_zero": (lambda w, lo, rw, rl: L.apo_zero_loss(w - rw, lo - rl, BETA),
                 [1 - sig(BETA * c) + sig(BETA * r) for c, r in zip(CL, RL, strict=True)], True, True),
    "discopop": (lambda w, lo, rw, rl: L.discopop_loss((w - rw) - (lo - rl), BETA, 0.05),
                 [-logsig(BETA * h) * (1 - sig(BETA * h / 0.05)) + math.exp(-BETA * h) * sig(BETA * h / 0.05)
                  for h in H], True, True),
    "dpop": (lambda w, lo, rw, rl: L.dpop_loss((w - rw) - (lo - rl), w - rw, BETA, 5.0),
             [-logsig(BETA * (h - 5.0 * max(0.0, -c))) for h, c in zip(H, CL, strict=True)], True, True),
    "cpo": (lambda w, lo, rw, rl: L.cpo_loss(w, lo, BETA),
            [-logsig(BETA * (w - lo)) for w, lo in zip(PI_W, PI_L, strict=True)], True, True),
    "simpo": (lambda w, lo, rw, rl: L.simpo_loss(w, lo, BETA, 0.3),
              [-logsig(BETA * (w - lo) - 0.3) for w, lo in zip(PI_W, PI_L, strict=True)], True, True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_each_loss_equals_its_equation_computed_by_hand_and_its_gradient_points_the_right_way(name):
    fn, expected, chosen_down, rejected_up = CASES[name]
    w, lo, rw, rl = leaves()
    out = fn(w, lo, rw, rl)
    close(out, expected)
    out.sum().backward()
    if chosen_down:  # a likelier chosen response lowers the loss, a likelier rejected one raises it
        assert (w.grad <= 0).all() and (w.grad < 0).any(), w.grad
    if rejected_up:
        assert (lo.grad >= 0).all() and (lo.grad > 0).any(), lo.grad


def test_ipo_pulls_the_margin_towards_its_target_from_either_side():
    w, lo, rw, rl = leaves()
    L.ipo_loss((w - rw) - (lo - rl), BETA).sum().backward()
    close(w.grad, [2 * (h - 1 / (2 * BETA)) for h in H])  # h = 1.5 overshoots 1/(2 beta) = 1: pushed back
    close(lo.grad, [-2 * (h - 1 / (2 * BETA)) for h in H])


def test_apo_down_lowers_both_likelihoods_and_the_rejected_one_more():
    w, lo, rw, rl = leaves()
    out = L.apo_down_loss(w - rw, lo - rl, BETA)
    close(out, [sig(BETA * c) + 1 - sig(BETA * (c - r)) for c, r in zip(CL, RL, strict=True)])
    out.sum().backward()
    # d/dc = beta sig'(beta c) - beta sig'(beta (c - r)); d/dr = beta sig'(beta (c - r)) > 0
    dsig = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    close(w.grad, [BETA * dsig(BETA * c) - BETA * dsig(BETA * (c - r)) for c, r in zip(CL, RL, strict=True)])
    assert (lo.grad > 0).all()


def test_aot_sorts_the_batch_before_comparing():
    # policy log-ratio differences [2, -2, 0.5] sort to [-2, 0.5, 2]; reference's [0, 1, -1] to [-1, 0, 1]
    pol, ref = torch.tensor([2.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    close(L.aot_loss(pol, ref, BETA), [-logsig(BETA * d) for d in (-1.0, 0.5, 1.0)])
    close(
        L.aot_unpaired_loss(pol, ref, BETA, 0.1),
        [-0.9 * logsig(BETA * d) - 0.1 * logsig(-BETA * d) for d in (-1.0, 0.5, 1.0)],
    )


def test_orpo_odds_ratio_term_and_log1mexp():
    c, r = torch.tensor([-0.2, -1.5], dtype=torch.float64), torch.tensor([-0.9, -0.1], dtype=torch.float64)
    log_odds = [
        (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        for a, b in zip(c.tolist(), r.tolist(), strict=True)
    ]
    close(L.orpo_log_odds(c, r).double(), log_odds, tol=1e-6)  # ORPO computes in float32
    close(L.orpo_odds_ratio_loss(c, r, 0.1).double(), [-0.1 * logsig(x) for x in log_odds], tol=1e-6)
    tiny = torch.tensor([-1e-12, -50.0], dtype=torch.float64)
    close(L.log1mexp(tiny), [math.log(1e-12), math.log1p(-math.exp(-50.0))], tol=1e-6)


def test_f_divergence_scores_match_their_derivatives():
    x = torch.tensor([0.7, -1.2], dtype=torch.float64)
    close(L.f_divergence_scores(x, "reverse_kl"), x.tolist())
    close(L.f_divergence_scores(x, "forward_kl"), [1 - math.exp(-v) for v in x.tolist()])
    close(
        L.f_divergence_scores(x, "js_divergence"), [math.log(2 * math.exp(v) / (1 + math.exp(v))) for v in x.tolist()]
    )
    close(L.f_divergence_scores(x, "alpha_divergence", 0.5), [(math.exp(-0.5 * v) - 1) / -0.5 for v in x.tolist()])
    close(L.f_divergence_scores(x, "alpha_divergence", 1.0), x.tolist())


def test_kto_losses_by_label_and_weight():
    logratios = torch.tensor([0.8, -0.4, 0.3], dtype=torch.float64, requires_grad=True)
    desirable = torch.tensor([True, False, False])
    kl = torch.tensor(0.2, dtype=torch.float64)
    out = L.kto_loss(logratios, desirable, kl, BETA, 1.0, 1.5)
    close(out, [1 - sig(BETA * 0.6), 1.5 * (1 - sig(BETA * 0.6)), 1.5 * (1 - sig(BETA * -0.1))])
    out.sum().backward()
    assert logratios.grad[0] < 0 and (logratios.grad[1:] > 0).all()  # desirable up, undesirable down
    close(L.apo_zero_unpaired_loss(logratios.detach(), desirable, BETA),
          [1 - sig(BETA * 0.8), sig(BETA * -0.4), sig(BETA * 0.3)])  # fmt: skip


def test_ld_token_weights_keep_the_shared_length_and_scale_the_excess():
    # chosen: 2 prompt tokens then 3 response tokens; rejected: 1 prompt token then 5 response tokens
    chosen = torch.tensor([[-100, -100, 7, 7, 7]])
    rejected = torch.tensor([[-100, 8, 8, 8, 8, 8]])
    w = L.ld_token_weights(chosen, rejected, 0.25)
    assert w.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 0.25, 0.25]]  # (rows, seq - 1): position t predicts t+1


# --------------------------------------------------------------------------------------------
# the objective


def objective(name: str, **keys) -> Objective:
    cfg = group(name)
    for k, v in {"beta": BETA, **keys}.items():
        cfg[k] = v
    return Objective(cfg)


def pair_batch(n_chosen: list[int], n_rejected: list[int], seed: int = 0):
    """Per-token log-probs of concatenated (chosen; rejected) rows with the given response
    lengths (after a 2-token prompt), and their labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = n_chosen + n_rejected
    width = 2 + max(lengths) + 1
    labels = torch.full((len(lengths), width), -100)
    for i, n in enumerate(lengths):
        labels[i, 2 : 2 + n] = 5
    mask = labels[:, 1:] != -100
    per_token = (-torch.rand(len(lengths), width - 1, generator=g, dtype=torch.float64) * 3) * mask
    return per_token.requires_grad_(), {"labels": labels}


def test_a_weighted_combination_is_the_weighted_sum_of_its_losses():
    per_token, inputs = pair_batch([3, 4], [2, 5])
    ref = (torch.tensor([-4.0, -5.0], dtype=torch.float64), torch.tensor([-3.0, -6.0], dtype=torch.float64))
    scale = 2 / 7  # 2 examples, 7 chosen tokens
    parts = {n: objective(n).paired(per_token, inputs, ref, scale, None, "train")[0] for n in ("dpo", "bco_pair")}
    parts["sft"] = -per_token[:2].sum(-1) * scale
    combo = objective("[dpo,bco_pair,sft]", weights=[0.8, 0.2, 1.0], bco_running_mean=False)
    total, metrics = combo.paired(per_token, inputs, ref, scale, None, "train")
    torch.testing.assert_close(total, 0.8 * parts["dpo"] + 0.2 * parts["bco_pair"] + parts["sft"])
    # the NLL term's mean over the batch is the per-token mean NLL of the chosen responses
    assert metrics["nll/train"].mean().item() == pytest.approx(-per_token[:2].sum().item() / 7)
    rpo = objective("dpo", rpo_alpha=0.5).paired(per_token, inputs, ref, scale, None, "train")[0]
    torch.testing.assert_close(rpo, parts["dpo"] + 0.5 * parts["sft"])


def test_nll_shares_add_up_to_the_batch_per_token_mean_however_the_batch_is_split():
    """The NLL of the chosen responses is a per-token mean over the whole (global) batch, as TRL
    computes it on one batch; dpokit gives each example its share, so the micro-batches, length
    groups and processes that the loop splits a batch into add up to the same loss."""
    per_token, inputs = pair_batch([3, 1, 6, 2], [2, 2, 2, 2])
    n_chosen_tokens = 3 + 1 + 6 + 2
    whole = -per_token[:4].sum() / n_chosen_tokens
    obj = objective("cpo", cpo_alpha=1.0)
    scale = 4 / n_chosen_tokens
    shares = []
    for rows in ([0, 1], [2, 3]):  # two halves, each its own forward
        idx = torch.tensor(rows + [r + 4 for r in rows])
        _, metrics = obj.paired(per_token[idx], {"labels": inputs["labels"][idx]}, None, scale, None, "train")
        shares.append(metrics["nll/train"])
    assert torch.cat(shares).mean().item() == pytest.approx(whole.item())


def test_ld_alpha_weights_the_verbose_tokens_of_policy_and_reference_sums():
    per_token, inputs = pair_batch([2], [4])
    chosen_labels, rejected_labels = inputs["labels"][:1], inputs["labels"][1:]
    inputs["token_weights"] = L.ld_token_weights(chosen_labels, rejected_labels, 0.5).double()
    obj = objective("dpo", ld_alpha=0.5)
    sums = obj.reduce(per_token, inputs["labels"], inputs["token_weights"])
    rejected = per_token[1]
    assert sums[1].item() == pytest.approx((rejected[1:3].sum() + 0.5 * rejected[3:5].sum()).item())
    assert sums[0].item() == pytest.approx(per_token[0].sum().item())
    assert obj.reference_key() == [0.5]  # the precomputed reference log-probs are keyed by it


def test_wpo_multiplies_each_pair_by_its_detached_weight():
    per_token, inputs = pair_batch([3, 2], [2, 4])
    aligned = (per_token.detach() * 0.1).clone()
    ref = (torch.zeros(2, dtype=torch.float64),) * 2
    plain = objective("dpo").paired(per_token, inputs, ref, 1.0, None, "train")[0]
    weighted, metrics = objective("dpo", use_weighting=True).paired(per_token, inputs, ref, 1.0, aligned, "train")
    tokens = (inputs["labels"][:, 1:] != -100).sum(-1)
    mean = aligned.sum(-1) / tokens
    weight = torch.exp(mean[:2]) * torch.exp(mean[2:])
    torch.testing.assert_close(weighted, plain * weight)
    weighted.sum().backward()  # no gradient reaches the weights: they are data
    torch.testing.assert_close(metrics["wpo_weight/train"], weight)


def test_token_log_sum_sq_probs_is_log_of_the_sum_of_squared_probabilities():
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(2), 0.0], [5.0, 5.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 0]])
    got = L.token_log_sum_sq_probs(logits, labels)
    # position 0: p = (1/4, 3/4); position 1: p = (2/3, 1/3)
    close(got[0], [math.log(1 / 16 + 9 / 16), math.log(4 / 9 + 1 / 9)], tol=1e-6)


def test_ipo_length_normalized_divides_each_log_ratio_by_its_length():
    per_token, inputs = pair_batch([2], [4])
    ref = (torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64))
    obj = objective("ipo", length_normalized=True)
    total, _ = obj.paired(per_token, inputs, ref, 1.0, None, "train")
    c, r = per_token[0].sum().item() + 1.0, per_token[1].sum().item() + 2.0
    assert total.item() == pytest.approx((c / 2 - r / 4 - 1 / (2 * BETA)) ** 2)


def test_sigmoid_norm_is_dpo_on_log_ratios_divided_by_their_lengths():
    per_token, inputs = pair_batch([2, 5], [4, 1], seed=1)
    ref = (torch.tensor([-1.0, -3.0], dtype=torch.float64), torch.tensor([-2.0, -0.5], dtype=torch.float64))
    total, _ = objective("sigmoid_norm").paired(per_token, inputs, ref, 1.0, None, "train")
    sums = per_token.sum(-1).tolist()
    expected = [
        -logsig(BETA * ((sums[0] + 1.0) / 2 - (sums[2] + 2.0) / 4)),
        -logsig(BETA * ((sums[1] + 3.0) / 5 - (sums[3] + 0.5) / 1)),
    ]
    close(total, expected)
    total.sum().backward()
    grad = per_token.grad
    assert (grad[:2][inputs["labels"][:2, 1:] != -100] < 0).all()  # likelier chosen tokens: lower loss
    assert (grad[2:][inputs["labels"][2:, 1:] != -100] > 0).all()


def test_reference_free_losses_read_length_averaged_or_summed_log_probs_and_no_reference():
    per_token, inputs = pair_batch([2, 3], [4, 1])
    sums = per_token.sum(-1)
    tokens = torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64)
    simpo, metrics = objective("simpo", simpo_gamma=0.3).paired(per_token, inputs, None, 1.0, None, "eval")
    avg = sums / tokens
    torch.testing.assert_close(simpo, L.simpo_loss(avg[:2], avg[2:], BETA, 0.3))
    torch.testing.assert_close(metrics["rewards_eval/chosen"], BETA * avg[:2].detach())
    orpo, metrics = objective("orpo").paired(per_token, inputs, None, 2 / 5, None, "eval")
    nll = -sums[:2] * 2 / 5
    torch.testing.assert_close(orpo, nll + L.orpo_odds_ratio_loss(avg[:2], avg[2:], BETA).double())
    assert {"log_odds_ratio/eval", "log_odds_chosen/eval", "nll/eval"} <= set(metrics)
    for name in ("simpo", "cpo", "orpo"):
        assert not Objective(group(name)).needs_reference
    dpo = group("dpo")
    dpo.reference_free = True
    assert not Objective(dpo).needs_reference


def test_kto_metrics_are_per_label_and_margin_is_the_difference_of_their_means():
    obj = objective("kto")
    per_token, inputs = pair_batch([2, 3, 1], [])
    desirable = torch.tensor([True, False, True])
    _, metrics = obj.unpaired(per_token, inputs["labels"], torch.zeros(3, dtype=torch.float64), desirable,
                              torch.tensor(0.0, dtype=torch.float64), "train")  # fmt: skip
    gathered = {k: v.tolist() for k, v in metrics.items()}
    means = obj.means(gathered, "train")
    sums = per_token.sum(-1).detach()
    assert means["rewards_train/chosen"] == pytest.approx(BETA * (sums[0] + sums[2]).item() / 2)
    assert means["rewards_train/rejected"] == pytest.approx(BETA * sums[1].item())
    assert means["rewards_train/margins"] == pytest.approx(
        means["rewards_train/chosen"] - means["rewards_train/rejected"]
    )
    assert means["kl/train"] == 0.0


def test_bco_running_mean_is_the_mean_of_past_step_rewards_and_round_trips():
    obj = objective("bco_pair")
    assert obj.bco_mean == 0.0  # the first step is unshifted
    obj.after_step({"rewards_train/chosen": [1.0, 3.0], "rewards_train/rejected": [0.0, 0.0]})  # step mean 1
    logged = obj.after_step({"rewards_train/chosen": [2.0, 2.0], "rewards_train/rejected": [4.0, 4.0]})  # 3
    assert obj.bco_mean == 2.0 and logged == {"bco/reward_shift": 2.0}
    again = objective("bco_pair")
    again.load_state_dict(obj.state_dict())
    assert (again.bco_steps, again.bco_mean) == (2, 2.0)
    assert objective("bco_pair", bco_running_mean=False).state_dict() == {}


def test_every_registered_loss_has_a_schema_and_a_computation():
    from dpokit.loss_registry import PAIRED

    for name, loss in LOSSES.items():
        cfg = OmegaConf.structured(group(name))
        assert cfg.name == name
        assert set(loss.keys) <= set(cfg)
        if loss.data == "paired":
            assert name in PAIRED
