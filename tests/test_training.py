"""End-to-end training: the reference's checkpoint contract, DPO from an SFT archive, learning."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_no_further_from_exact, bundled_pairs, metrics_log, run_cli
from dpokit.models import load_model

CONTRACT = {"policy.pt", "optimizer.pt", "scheduler.pt"}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from dpokit.train import main

    root = tmp_path_factory.mktemp("sft")
    return main(
        [*FAST, "exp_name=sft", f"local_dirs=[{root}]", "loss=sft", "batch_size=4", "n_examples=24", "eval_every=8"]
    )


def test_sft_run_writes_reference_checkpoint_layout(sft_run):
    run_dir = Path(sft_run["run_dir"])
    assert run_dir.name.startswith("sft_") and run_dir.parent.name  # {local_dir}/{user}/{exp_name}_{timestamp}
    assert (run_dir / "config.yaml").is_file()
    # eval every 8 examples; step-0 is never written; the final state goes to LATEST
    assert sorted(sft_run["checkpoints"]) == ["LATEST", "step-16", "step-8"]
    expected_keys = set(load_model("tiny").state_dict())
    for name, step in (("step-8", 8), ("step-16", 16), ("LATEST", 24)):
        ckpt = run_dir / name
        assert {p.name for p in ckpt.iterdir()} >= CONTRACT
        for filename in CONTRACT:
            payload = load(ckpt / filename)
            assert set(payload) == {"step_idx", "state", "metrics"}
            assert payload["step_idx"] == step
        policy = load(ckpt / "policy.pt")
        assert set(policy["state"]) == expected_keys  # the model's own names, no wrapper prefix
        if name != "LATEST":
            assert policy["metrics"]["loss/eval"] > 0 and "logps_eval/chosen" in policy["metrics"]
        assert load(ckpt / "optimizer.pt")["state"]["param_groups"][0]["lr"] > 0
        assert load(ckpt / "scheduler.pt")["state"]["last_epoch"] == step // 4


def test_sft_policy_loads_into_plain_hf_model(sft_run):
    """What the reference's users do: from_pretrained(base).load_state_dict(torch.load(p)['state'])."""
    model = load_model("tiny", seed=123)
    state = torch.load(Path(sft_run["run_dir"]) / "LATEST" / "policy.pt", map_location="cpu")["state"]
    model.load_state_dict(state)
    assert torch.equal(model.state_dict()["transformer.wte.weight"], state["transformer.wte.weight"])


def test_sft_lowers_eval_loss(sft_run):
    evals = [m for m in metrics_log(sft_run["run_dir"]) if "loss/eval" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 24
    assert evals[-1]["loss/eval"] < evals[0]["loss/eval"]


def test_dpo_from_sft_archive_starts_at_log2(sft_run, train):
    summary = train(
        "loss=dpo",
        "loss.beta=0.1",
        f"model.archive={sft_run['run_dir']}/LATEST/policy.pt",
        "n_examples=8",
        "eval_every=8",
        "batch_size=4",
    )
    first_eval = next(m for m in metrics_log(summary["run_dir"]) if "loss/eval" in m)
    # policy == reference == SFT weights: every reward is 0 and the loss is log 2
    assert first_eval["rewards_eval/chosen"] == 0 and first_eval["rewards_eval/margins"] == 0
    assert first_eval["loss/eval"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards_eval/accuracies", "logps_eval/rejected", "loss/eval"):
        assert key in first_eval
    train_log = [m for m in metrics_log(summary["run_dir"]) if "loss/train" in m]
    assert {
        "grad_norm",
        "examples_per_second",
        "counters/examples",
        "counters/updates",
        "rewards_train/margins",
    } <= set(train_log[0])


def test_archive_may_be_a_run_or_checkpoint_directory(sft_run, train):
    for archive in (sft_run["run_dir"], f"{sft_run['run_dir']}/step-16"):
        summary = train(
            "loss=ipo",
            "loss.beta=0.5",
            f"model.archive={archive}",
            "n_examples=4",
            "eval_every=4",
            "batch_size=4",
            "do_first_eval=false",
        )
        assert summary["final_metrics"]["loss/eval"] > 0


def test_a_half_precision_reference_is_the_model_from_pretrained_would_load(tmp_path):
    """copy_as_reference casts the parameters and leaves the buffers, as from_pretrained(dtype=)
    does: a Llama's rotary inv_freq stays float32 (in float16 its rounding moves the angles at
    long positions), the tied embedding stays one tensor, and the logits are the loaded model's."""
    import transformers

    from dpokit.models import copy_as_reference

    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128, vocab_size=256, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    policy = transformers.AutoModelForCausalLM.from_config(config)
    policy.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)
    reference = copy_as_reference(policy, "float16")
    buffers = {name: b.dtype for name, b in reference.named_buffers()}
    assert buffers == {name: b.dtype for name, b in loaded.named_buffers()} and set(buffers.values()) == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.float16}
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    ids = torch.randint(0, 256, (2, 200))
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, loaded(ids).logits)


def test_reference_written_archive_loads_unchanged(tmp_path, train):
    """A policy.pt exactly as the DPO reference writes it (OrderedDict state, no manifest)."""
    model = load_model("tiny", seed=7)
    ref_dir = tmp_path / "reference_run" / "LATEST"
    ref_dir.mkdir(parents=True)
    torch.save(
        {"step_idx": 160, "state": collections.OrderedDict(model.state_dict()), "metrics": {"loss/eval": 1.5}},
        ref_dir / "policy.pt",
    )
    summary = train(
        "loss=dpo",
        "loss.beta=0.1",
        f"model.archive={ref_dir / 'policy.pt'}",
        "n_examples=4",
        "eval_every=4",
        "batch_size=4",
    )
    first_eval = next(m for m in metrics_log(summary["run_dir"]) if "loss/eval" in m)
    assert first_eval["loss/eval"] == pytest.approx(math.log(2), abs=1e-6)
    # the run really started from those weights: a fresh seed-0 model scores differently
    fresh = train("loss=sft", "n_examples=4", "eval_every=4", "batch_size=4", exp_name="fresh")
    started = train(
        "loss=sft",
        f"model.archive={ref_dir / 'policy.pt'}",
        "n_examples=4",
        "eval_every=4",
        "batch_size=4",
        exp_name="from_ref",
    )

    def first(s):
        return next(m for m in metrics_log(s["run_dir"]) if "loss/eval" in m)["loss/eval"]

    assert first(fresh) != pytest.approx(first(started), rel=1e-4)


def test_debug_mode_writes_no_step_checkpoints(train):
    summary = train("debug=true", "n_examples=8", "eval_every=4", "batch_size=4")
    assert summary["checkpoints"] == ["LATEST"]


def test_gradient_accumulation_matches_full_batch(train):
    """Micro-batches with accumulated gradients give the full batch's update.

    In real arithmetic they are equal; in float32 the gradient is the same sum in another order.
    With SGD (an update linear in the gradient, no clipping) the accumulated weights must be no
    further from a float64 run than the float32 full-batch weights are. A missing 1/n or a dropped
    micro-batch moves them by orders of magnitude more. (tf32=false: on CUDA too, a float32 claim.)
    """
    args = ["batch_size=4", "n_examples=8", "eval_every=8", "do_first_eval=false", "optimizer=SGD", "lr=1e-2",
            "max_grad_norm=1e9", "tf32=false"]  # fmt: skip
    full = train(*args, exp_name="full")
    accum = train(*args, "gradient_accumulation_steps=2", exp_name="accum")
    exact = train(*args, "model.policy_dtype=float64", exp_name="exact")
    state = {name: load(Path(run["run_dir"]) / "LATEST" / "policy.pt")["state"] for name, run in
             (("full", full), ("accum", accum), ("exact", exact))}  # fmt: skip
    assert_no_further_from_exact(state["accum"], state["full"], state["exact"])
    initial = load_model("tiny").state_dict()
    key = "transformer.h.0.mlp.c_fc.weight"
    assert (state["full"][key] - initial[key]).abs().max() > 1000 * (
        state["full"][key] - state["accum"][key]
    ).abs().max()


def test_dpo_learns_on_a_fixed_set_of_bundled_pairs(tmp_path, train):
    """On 16 real HH pairs used as both train and eval set, a short DPO run separates chosen from
    rejected: reward accuracy well above chance and a DPO loss well below log 2."""
    pairs = bundled_pairs(16)
    data_dir = tmp_path / "fixed16"
    data_dir.mkdir()
    for split in ("train", "test"):
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    summary = train(
        f"datasets=[hh:{data_dir}]",
        "loss=dpo",
        "loss.beta=0.1",
        "batch_size=4",
        "n_epochs=6",
        "eval_every=1000",
        "n_eval_examples=16",
        "lr=1e-3",
        "optimizer=AdamW",
        "seed=0",
    )
    log = metrics_log(summary["run_dir"])
    evals = [m for m in log if "loss/eval" in m]
    assert evals[0]["loss/eval"] == pytest.approx(math.log(2), abs=1e-6)
    final = summary["final_metrics"]
    assert final["rewards_eval/accuracies"] >= 0.9
    assert final["loss/eval"] < 0.4
    assert final["rewards_eval/margins"] > 0


# --------------------------------------------------------------------------------------------
# bad input: one sentence naming the file or key, non-zero exit, no traceback, nothing damaged


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dpokit: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def _cli_train(tmp_path, *args):
    return run_cli("train", *FAST, "exp_name=bad", f"local_dirs=[{tmp_path / 'runs'}]", *args)


def test_archive_missing_file(tmp_path):
    _assert_one_line_error(_cli_train(tmp_path, f"model.archive={tmp_path}/nope/policy.pt"), "does not exist", "nope")


def test_archive_truncated_file_is_reported_and_left_alone(sft_run, tmp_path):
    src = Path(sft_run["run_dir"]) / "step-8" / "policy.pt"
    truncated = tmp_path / "policy.pt"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    before = truncated.read_bytes()
    _assert_one_line_error(_cli_train(tmp_path, f"model.archive={truncated}"), str(truncated), "truncated")
    assert truncated.read_bytes() == before


def test_archive_not_a_torch_file(tmp_path):
    bogus = tmp_path / "policy.pt"
    bogus.write_text("definitely not a checkpoint\n")
    _assert_one_line_error(_cli_train(tmp_path, f"model.archive={bogus}"), str(bogus))


def test_archive_of_another_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=512, n_embd=64, n_layer=2, n_head=2))
    path = tmp_path / "policy.pt"
    torch.save({"step_idx": 1, "state": other.state_dict(), "metrics": {}}, path)
    result = _cli_train(tmp_path, f"model.archive={path}")
    _assert_one_line_error(result, str(path), "missing", "different shape")


def test_unknown_dataset(tmp_path):
    _assert_one_line_error(_cli_train(tmp_path, "datasets=[nosuch]"), "nosuch")


def test_dataset_file_with_a_bad_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    good = json.dumps(bundled_pairs(1)[0])
    bad.write_text(good + "\n" + good + "\n" + '{"chosen": "oops"\n')
    _assert_one_line_error(_cli_train(tmp_path, f"datasets=[hh:{bad}]"), str(bad), "line 3")


def test_dpo_without_beta_and_bad_batch_split(tmp_path):
    _assert_one_line_error(_cli_train(tmp_path, "loss=dpo"), "loss.beta")
    _assert_one_line_error(
        _cli_train(tmp_path, "batch_size=5", "gradient_accumulation_steps=2"),
        "batch_size",
        "gradient_accumulation_steps",
    )
    assert not (tmp_path / "runs").exists()  # refused before any work started


def test_traceback_only_on_request(tmp_path):
    result = run_cli("train", "loss=dpo", "exp_name=x", env={"DPOKIT_TRACEBACK": "1"})
    assert "Traceback" in result.stderr and "loss.beta" in result.stderr


def test_a_small_file_is_evaluated_on_the_test_examples_it_has(train, tmp_path, capsys):
    """40 conversational rows: dpokit's one-in-ten split leaves fewer test examples than
    eval_batch_size; they are evaluated as one shorter batch, said once, not refused."""
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
             "rejected": [{"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(40)]  # fmt: skip
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = train("loss=dpo", "loss.beta=0.1", f"datasets=[jsonl:{path}]", "batch_size=4", "n_examples=8",
                "eval_every=8", "eval_batch_size=8", "n_eval_examples=8")  # fmt: skip
    note = [line for line in capsys.readouterr().out.splitlines() if "fewer than eval_batch_size=8" in line]
    assert len(note) == 1 and "each evaluation uses" in note[0], note
    n_test = int(note[0].split(" has ")[1].split(" examples")[0])
    assert 1 <= n_test < 8
    evals = [m for m in metrics_log(out["run_dir"]) if "loss/eval" in m]
    assert len(evals) == 2 and all(math.isfinite(m["loss/eval"]) for m in evals)  # before the first step, and at 8


def test_a_train_split_smaller_than_a_batch_names_the_keys_that_fix_it(train, tmp_path):
    from dpokit.errors import DataError

    path = tmp_path / "tiny.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Q{i}?", "chosen": " a", "rejected": " b"}) + "\n" for i in range(5))
    )
    with pytest.raises(DataError, match=r"fewer than one batch of 8; lower batch_size or give more rows"):
        train("loss=sft", f"datasets=[jsonl:{path}]", "batch_size=8", "eval_batch_size=1")
