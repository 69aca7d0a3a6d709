"""Every loss of the registry trained end to end on the bundled data, KTO's unpaired data in each
format, TR-DPO's moving reference, and the bad input each loss refuses before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import FAST, metrics_log, run_cli, write_dataset
from dpokit.errors import ConfigError, DataError
from dpokit.loss_registry import LOSSES
from dpokit.models import load_model

# two steps of 4 pairs and one eval: each run takes a few seconds on 2 cores
SHORT = ["batch_size=4", "n_examples=8", "eval_every=8", "n_eval_examples=8"]
BETA = {name: ["loss.beta=0.1"] for name, spec in LOSSES.items() if "beta" in spec.keys}
BETA["exo_pair"] = [*BETA["exo_pair"], "loss.label_smoothing=1e-3"]  # its epsilon has no default: the paper's 1e-3
REFERENCE_FREE = [name for name, spec in LOSSES.items() if not spec.reference and name != "sft"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def no_reference_model(monkeypatch):
    """Fails a run that builds a reference model."""
    import dpokit.models

    def refuse(*args, **kwargs):
        raise AssertionError("a reference model was built")

    monkeypatch.setattr(dpokit.models, "copy_as_reference", refuse)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "sft"])
def test_every_loss_trains_on_the_bundled_data_and_writes_the_contract(train, name, request):
    if name in REFERENCE_FREE:  # their memory and speed advantage: no reference model at all
        request.getfixturevalue("no_reference_model")
    out = train(f"loss={name}", *BETA.get(name, []), *SHORT)
    run_dir = Path(out["run_dir"])
    assert out["checkpoints"] == ["LATEST"]
    assert {p.name for p in (run_dir / "LATEST").iterdir()} >= {"policy.pt", "optimizer.pt", "scheduler.pt"}
    assert load(run_dir / "LATEST" / "policy.pt")["step_idx"] == 8
    losses = [m["loss/train"] for m in metrics_log(run_dir) if "loss/train" in m]
    evals = [m for m in metrics_log(run_dir) if "loss/eval" in m]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert evals and torch.isfinite(torch.tensor(evals[-1]["loss/eval"]))
    if LOSSES[name].data == "unpaired":  # rewards of desirable and undesirable completions; KTO's KL estimate
        assert {"rewards_eval/chosen", "rewards_eval/rejected"} <= set(evals[-1])
        assert ("kl/eval" in evals[-1]) == (name == "kto")
    else:
        assert {"rewards_eval/accuracies", "rewards_eval/margins"} <= set(evals[-1])


def test_reference_free_dpo_builds_no_reference_model(train, no_reference_model):
    out = train("loss=dpo", "loss.beta=0.1", "loss.reference_free=true", *SHORT)
    first = next(m for m in metrics_log(out["run_dir"]) if "rewards_eval/chosen" in m)
    # against a uniform reference the rewards are beta * log pi: far from the 0 of a copy of the policy
    assert first["rewards_eval/chosen"] == pytest.approx(0.1 * first["logps_eval/chosen"])


def test_a_weighted_combination_with_rpo_runs_through_the_command_line(tmp_path):
    """MPO's syntax on the real command line: a list of losses and their weights."""
    done = run_cli(
        "train", *FAST, *SHORT, "exp_name=mpo", f"local_dirs=[{tmp_path}]",
        "loss=[dpo,bco_pair,sft]", "loss.weights=[0.8,0.2,1.0]", "loss.beta=0.1", "loss.rpo_alpha=0.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (p for p in Path(tmp_path).rglob("mpo_*") if p.is_dir())
    log = metrics_log(run_dir)
    assert any("nll/train" in m for m in log) and any("bco/reward_shift" in m for m in log)
    assert "loss: dpo+bco_pair+sft" in done.stdout or "dpo+bco_pair+sft" in done.stdout


def test_train_help_lists_every_loss_with_its_paper():
    done = run_cli("train", "--help")
    assert done.returncode == 0, done.stderr
    for name, spec in LOSSES.items():
        assert name in done.stdout, name
        if spec.paper:
            assert spec.paper in done.stdout, (name, spec.paper)


# --------------------------------------------------------------------------------------------
# KTO's unpaired data


def kto_rows(n: int, conversational: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        prompt, completion = f"What is {i} plus {i}?", f" It is {2 * i + (i % 2)}."
        if conversational:
            prompt, completion = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
        rows.append({"prompt": prompt, "completion": completion, "label": i % 2 == 0})
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "disk"])
@pytest.mark.parametrize("conversational", [False, True], ids=["strings", "messages"])
def test_unpaired_rows_are_read_in_every_format(tmp_path, fmt, conversational):
    from dpokit.sources import get_dataset

    spec = write_dataset(tmp_path / f"kto.{fmt}", kto_rows(40, conversational), fmt)
    table = {**get_dataset(spec, "train"), **get_dataset(spec, "test")}
    assert len(table) == 40
    entry = next(e for p, e in table.items() if "What is 3 plus 3?" in p)
    assert entry["pairs"] == [] and entry["unpaired"] == [(0, False)]
    assert entry["responses"][0].strip() == "It is 7."


def test_kto_trains_on_unpaired_conversational_rows(train, tmp_path):
    spec = write_dataset(tmp_path / "kto.jsonl", kto_rows(60, conversational=True), "jsonl")
    out = train("loss=kto", "loss.beta=0.1", f"datasets=[{spec}]", *SHORT)
    evals = [m for m in metrics_log(out["run_dir"]) if "kl/eval" in m]
    assert evals and evals[-1]["kl/eval"] >= 0  # the KL estimate is clamped at 0, as in the paper


def test_paired_data_is_split_into_desirable_and_undesirable_completions_for_kto():
    from dpokit.data import Example, _items

    example = Example("Q", [" good", " bad", " also good", " extra"], [(0, 1), (2, 1)], " good", "keep_end", "d",
                      unpaired=[(3, False)])  # fmt: skip
    assert _items(example, sft_mode=False, unpaired=True) == [
        (" good", "", True), (" bad", "", False), (" also good", "", True), (" bad", "", False), (" extra", "", False),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# TR-DPO


def test_tr_dpo_mixes_the_policy_into_the_reference_and_checkpoints_it(train):
    """Every step (ref_model_sync_steps=1) reference <- alpha * policy + (1 - alpha) * reference,
    so after the first step the reference is alpha * policy_1 + (1 - alpha) * policy_0."""
    alpha = 0.25
    out = train("loss=dpo", "loss.beta=0.1", "loss.sync_ref_model=true", "loss.ref_model_sync_steps=1",
                f"loss.ref_model_mixup_alpha={alpha}", "batch_size=4", "n_examples=8", "eval_every=4")  # fmt: skip
    step = Path(out["run_dir"]) / "step-4"
    reference, policy = load(step / "reference.pt"), load(step / "policy.pt")
    assert set(reference) == {"step_idx", "state", "metrics"} and reference["step_idx"] == 4
    start = load_model("tiny", seed=0).state_dict()  # FAST's seed: the policy before the first step
    for key, ref in reference["state"].items():
        mixed, kept = alpha * policy["state"][key].double(), (1 - alpha) * start[key].double()
        expected = mixed + kept
        # in float32: a rounding of each product and of the sum, each at most eps/2 of the terms
        tol = 2 * torch.finfo(torch.float32).eps * (mixed.abs() + kept.abs())
        assert ((ref.double() - expected).abs() <= tol).all(), key
    assert not torch.equal(reference["state"]["transformer.wte.weight"], start["transformer.wte.weight"])
    latest = load(Path(out["run_dir"]) / "LATEST" / "reference.pt")
    assert not torch.equal(latest["state"]["transformer.wte.weight"], reference["state"]["transformer.wte.weight"])


# --------------------------------------------------------------------------------------------
# bad input: one sentence, before any work, nothing on disk


BAD = {
    "unknown loss": (["loss=dpoo"], ConfigError, r"unknown loss 'dpoo'.*choose one of: sft, dpo, ipo, .*simpo.*kto"),
    "key of another loss": (["loss=dpo", "loss.beta=0.1", "loss.simpo_gamma=1.0"], ConfigError,
                            r"'loss.simpo_gamma' for loss=dpo belongs to loss=simpo"),
    "weights count": (["loss=[dpo,sft]", "loss.beta=0.1", "loss.weights=[1.0]"], ConfigError,
                      r"'loss.weights' has 1 weight\(s\) for 2 loss\(es\) \(dpo, sft\)"),
    "missing beta": (["loss=simpo"], ConfigError, r"'loss.beta' is required for loss=simpo \(for example"),
    "kto batch of one": (["loss=kto", "loss.beta=0.1", "batch_size=1"], ConfigError, r"'batch_size' must be at least 2"),
    "TR-DPO with precompute": (["loss=dpo", "loss.beta=0.1", "loss.sync_ref_model=true", "precompute_ref_log_probs=true"],
                               ConfigError, r"cannot be used with loss.sync_ref_model=true"),
    "precompute without a reference": (["loss=simpo", "loss.beta=2.0", "precompute_ref_log_probs=true"], ConfigError,
                                       r"needs a reference model, which loss=simpo does not use"),
    "kto rows without labels": (["loss=kto", "loss.beta=0.1", "DATA:nolabel"], DataError, r"line 1: field 'label' is missing"),
    "kto rows of one label": (["loss=kto", "loss.beta=0.1", "DATA:onelabel"], DataError,
                              r"only desirable \(label true\) completions in the train split; loss=kto needs both"),
    "paired loss on unpaired rows": (["loss=dpo", "loss.beta=0.1", "DATA:kto"], DataError,
                                     r"unpaired row\(s\) .* which loss=dpo cannot train on"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_loss_input_is_one_sentence_before_any_work(tmp_path, case):
    from dpokit.train import main

    args, error, pattern = BAD[case]
    data = {
        "nolabel": [{"prompt": f"Q{i}?", "completion": f" A{i}"} for i in range(40)],
        "onelabel": [{"prompt": f"Q{i}?", "completion": f" A{i}", "label": True} for i in range(40)],
        "kto": kto_rows(40),
    }
    args = [write_dataset(tmp_path / "d.jsonl", data[a[5:]], "jsonl").join(["datasets=[", "]"]) if a.startswith("DATA:") else a
            for a in args]  # fmt: skip
    runs = tmp_path / "runs"
    with pytest.raises(error, match=pattern) as caught:
        main([*FAST, "exp_name=bad", f"local_dirs=[{runs}]", *args])
    assert "\n" not in str(caught.value)
    assert not runs.exists()  # nothing written
