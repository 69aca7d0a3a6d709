"""The speed levers keep the reference's results where they claim to: length groups (the same
loss and gradient, less padding), precomputed reference log-probs (the same numbers as computing
them on the fly), a length-grouped sampler (every item once an epoch, another order), bf16
autocast with fp32 master weights, and the final evaluation made optional; and a step's
metrics reach the host in one gather."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_no_further_from_exact, bundled_pairs, metrics_log


def policy(summary: dict) -> dict:
    return torch.load(Path(summary["run_dir"]) / "LATEST" / "policy.pt", weights_only=True)["state"]


def steps(summary: dict, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics_log(summary["run_dir"]) if key in r}


def test_length_groups_give_the_same_update_with_less_padding(train):
    """Each micro-batch split into 4 groups of similar length, each group's loss weighted by its
    share of rows: the same mean loss and gradient in real arithmetic. With SGD (linear in the
    gradient, no clipping) the grouped weights are no further from a float64 run than the
    one-batch float32 weights (tf32=false: on CUDA too, a float32 claim); the policy computed
    fewer padded tokens for the same real ones."""
    args = ["batch_size=8", "n_examples=16", "eval_every=16", "do_first_eval=false", "optimizer=SGD", "lr=1e-2",
            "max_grad_norm=1e9", "max_length=128", "max_prompt_length=64", "tf32=false"]  # fmt: skip
    one = train(*args, exp_name="one")
    grouped = train(*args, "length_groups=4", exp_name="grouped")
    exact = train(*args, "model.policy_dtype=float64", exp_name="exact")
    assert_no_further_from_exact(policy(grouped), policy(one), policy(exact))
    assert steps(grouped, "tokens/real") == steps(one, "tokens/real")
    assert all(steps(grouped, "tokens/padded")[s] < steps(one, "tokens/padded")[s] for s in (8, 16))
    for step, loss in steps(one, "loss/train").items():
        assert steps(grouped, "loss/train")[step] == pytest.approx(loss, rel=1e-5)


def test_precomputed_reference_log_probs_match_computing_them(train, tmp_path):
    """Precomputed in batches of eval_batch_size instead of with each training batch: the same
    model on the same tokens, padded differently, so equal up to float32 rounding of the
    log-probs (~1e-6 relative of sums in the hundreds); losses and rewards agree to 1e-4. On the
    CPU everywhere: on CUDA the float16 reference model's kernels differ with the padded shape,
    beyond that bound (the CUDA path is the cache test's below)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in bundled_pairs(60)))
    args = ["loss=dpo", "loss.beta=0.1", "batch_size=4", "n_examples=12", "eval_every=8", "lr=1e-3",
            f"datasets=[hh:{data}]", "n_eval_examples=4", "eval_batch_size=4", "device=cpu"]  # fmt: skip
    live = train(*args, exp_name="live")
    pre = train(*args, "precompute_ref_log_probs=true", exp_name="pre")
    for key in ("loss/train", "rewards_train/margins", "loss/eval", "rewards_eval/chosen"):
        a, b = steps(live, key), steps(pre, key)
        assert a.keys() == b.keys() and a
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (key, step)
    cached = list((tmp_path / "runs").glob("*/datasets/reference_logps/*.pt"))
    assert len(cached) == 1
    tables = torch.load(cached[0], weights_only=True)
    assert set(tables) == {"train", "eval"} and tables["train"].shape[1] == 2
    computed = ~tables["train"].isnan().any(1)
    assert computed.sum() == 12 and (tables["train"][computed] < 0).all()  # the 12 pairs trained on, no more


def test_precomputed_cache_is_extended_by_a_longer_run_and_reused_as_is(train, tmp_path):
    """A run computes the reference log-probs of the pairs it visits only; a longer run with the
    same data and reference reads those from the cache (the same bits) and computes the rest."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in bundled_pairs(60)))
    args = ["loss=dpo", "loss.beta=0.1", "batch_size=4", "eval_every=100", "do_first_eval=false",
            f"datasets=[hh:{data}]", "n_eval_examples=4", "eval_batch_size=4", "precompute_ref_log_probs=true"]  # fmt: skip

    def table() -> torch.Tensor:
        (path,) = (tmp_path / "runs").glob("*/datasets/reference_logps/*.pt")
        return torch.load(path, weights_only=True)["train"]

    train(*args, "n_examples=8", exp_name="short")
    short = table()
    train(*args, "n_examples=16", exp_name="long")
    long = table()
    first, both = ~short.isnan().any(1), ~long.isnan().any(1)
    assert first.sum() == 8 and both.sum() == 16 and both[first].all()
    assert torch.equal(long[first], short[first])


def test_length_grouped_sampler_visits_every_item_once_per_epoch_with_similar_lengths():
    from dpokit.data import BatchIterator, Example
    from dpokit.models import load_tokenizer

    tok = load_tokenizer("tiny")
    examples = [Example(f"prompt {i} " + "word " * (i % 37), [" a", " b" * (i % 5 + 1)], [(0, 1)], " a",
                        "keep_start", "x") for i in range(240)]  # fmt: skip
    kwargs = {"batch_size": 8, "max_length": 128, "max_prompt_length": 64, "sft_mode": False, "n_epochs": 2}
    grouped = BatchIterator(examples, tok, sampler="length_grouped", **kwargs)
    plain = BatchIterator(examples, tok, **kwargs)
    epochs = [b for _, b in zip(range(30), grouped._raw_batches(), strict=False)], list(grouped._raw_batches())[30:]
    for epoch in epochs:
        assert sorted(item for batch in epoch for _, item in batch) == list(range(240))
    assert list(grouped._raw_batches()) == list(grouped._raw_batches())  # seeded: resume skips exactly
    padded = lambda it: sum(b["chosen_input_ids"].numel() for b in it)  # noqa: E731
    assert padded(grouped) < 0.8 * padded(plain)


def test_bf16_autocast_keeps_fp32_master_weights(train):
    summary = train("loss=dpo", "loss.beta=0.1", "batch_size=4", "n_examples=8", "eval_every=8",
                    "mixed_precision=bf16")  # fmt: skip
    assert all(t.dtype == torch.float32 for t in policy(summary).values())
    assert all(math.isfinite(v) for v in steps(summary, "loss/train").values())
    first_eval = steps(summary, "loss/eval")[0]
    assert first_eval == pytest.approx(math.log(2), abs=1e-6)  # policy and reference computed alike


def test_final_eval_can_be_turned_off(train):
    summary = train("batch_size=4", "n_examples=8", "eval_every=4", "final_eval=false")
    assert summary["final_metrics"] == {}
    assert 8 not in steps(summary, "loss/eval")
    assert torch.load(Path(summary["run_dir"]) / "LATEST" / "policy.pt", weights_only=True)["metrics"] == {}


def test_fused_gelu_is_the_same_function_and_leaves_the_config(tmp_path):
    """GELUTanh in place of gelu_new: the same tanh approximation, rounded differently, so the
    fused model's logits are no further from a float64 run than the unfused float32 logits are."""
    from transformers.activations import GELUTanh, NewGELUActivation

    from dpokit.models import fuse_gelu, load_model, load_tokenizer

    plain, fused, exact = load_model("tiny"), load_model("tiny"), load_model("tiny", dtype="float64")
    n_layers = plain.config.n_layer
    assert fuse_gelu(fused) == n_layers and not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, GELUTanh) for m in fused.modules()) == n_layers
    tokens = torch.tensor([load_tokenizer("tiny")(bundled_pairs(1)[0]["chosen"])["input_ids"][:64]])
    with torch.no_grad():
        logits = {
            name: {"logits": m(tokens).logits[0]} for name, m in (("plain", plain), ("fused", fused), ("exact", exact))
        }
    assert_no_further_from_exact(logits["fused"], logits["plain"], logits["exact"])
    fused.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_new"


def test_fused_gelu_can_be_turned_off(train, monkeypatch):
    from transformers.activations import NewGELUActivation

    from dpokit.trainers import BasicTrainer

    unfused: list[int] = []  # NewGELUActivation modules in the policy that trains
    original = BasicTrainer.train

    def counting(self):
        unfused.append(sum(isinstance(m, NewGELUActivation) for m in self.policy.modules()))
        return original(self)

    monkeypatch.setattr(BasicTrainer, "train", counting)
    args = ["n_examples=8", "batch_size=4", "do_first_eval=false", "final_eval=false"]
    train(*args, "model.fused_gelu=false", exp_name="off")
    train(*args, exp_name="on")
    assert unfused[0] > 0 and unfused[1] == 0


@pytest.mark.parametrize("precompute", [True, False])
def test_precomputing_frees_the_reference_model_before_training(train, monkeypatch, precompute):
    """With its log-probs precomputed the reference model has done its work: nothing holds it
    while the policy trains (on a GPU its memory goes to the policy). Without, it is kept."""
    import gc
    import weakref

    import dpokit.models
    from dpokit.trainers import BasicTrainer

    made: list[weakref.ref] = []
    copy_as_reference, original_train = dpokit.models.copy_as_reference, BasicTrainer.train

    def recorded_copy(*args):
        reference = copy_as_reference(*args)
        made.append(weakref.ref(reference))
        return reference

    def train_and_look(self):
        gc.collect()
        made.append(made[0]() is not None)
        original_train(self)

    monkeypatch.setattr(dpokit.models, "copy_as_reference", recorded_copy)
    monkeypatch.setattr(BasicTrainer, "train", train_and_look)
    train("loss=dpo", "loss.beta=0.1", "batch_size=4", "n_examples=4", f"precompute_ref_log_probs={precompute}")
    assert made[1] is (not precompute)


def test_right_padded_batches_run_without_a_mask_and_give_the_same_log_probs(monkeypatch):
    """A causal model's real tokens see only real tokens before them when the padding is on the
    right: the forward gets no mask (no 4-D mask, causal attention kernels, and no look at the
    mask on the device) and the log-probs are those with the mask, up to float32 rounding of sums
    in the hundreds. A mask with padding anywhere else is passed on."""
    from omegaconf import OmegaConf

    from dpokit import losses
    from dpokit.models import load_model
    from dpokit.trainers import BasicTrainer, only_right_padding

    torch.manual_seed(0)
    ids = torch.randint(0, 4000, (4, 64))
    mask = torch.ones(4, 64, dtype=torch.long)
    mask[1, 40:], mask[2, 10:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    assert only_right_padding(mask) and not only_right_padding(mask.flip(1))
    model = load_model("tiny").eval()
    given: list = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: given.append(k["attention_mask"]) or forward(*a, **k))
    trainer = BasicTrainer.__new__(BasicTrainer)  # just what model_inputs and sequence_logps use
    trainer.device, trainer.config = torch.device("cpu"), OmegaConf.create({"mixed_precision": None, "packing": False})
    with torch.no_grad():
        without = trainer.sequence_logps(model, trainer.model_inputs(ids, mask, labels))
        left = trainer.sequence_logps(model, trainer.model_inputs(ids.flip(1), mask.flip(1), labels.flip(1)))
        expected = losses.batch_logps(forward(ids, attention_mask=mask).logits, labels)
    assert given[0] is None and torch.equal(given[1], mask.flip(1))
    assert torch.allclose(without, expected, rtol=1e-5) and left.isfinite().all()


def test_the_tf32_setting_leaves_both_spellings_of_the_precision_readable_and_in_agreement():
    """torch 2.9+ has two spellings of the float32 matmul precision; once the newer one is set,
    reading the older one (torch.get_float32_matmul_precision, matmul.allow_tf32: inductor and
    other libraries do) raises for the rest of the process. After either setting both read,
    and agree. (The flags exist without CUDA too, so this runs everywhere.)"""
    from dpokit.distributed import configure_tf32

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        for enabled, legacy, new in ((True, "high", "tf32"), (False, "highest", "ieee")):
            configure_tf32(enabled)
            assert torch.get_float32_matmul_precision() == legacy
            assert matmul.allow_tf32 is enabled and cudnn.allow_tf32 is enabled
            if hasattr(matmul, "fp32_precision"):
                assert matmul.fp32_precision == new
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned, non-blocking copy is the CUDA path")
def test_batches_reach_cuda_through_pinned_non_blocking_copies_intact():
    """The copy does not wait for the GPU, and what arrives is the batch (the pinned source stays
    alive until the copy is done: torch's caching host allocator records the copy's stream)."""
    from dpokit.trainers import slice_batch, to_device

    batch = {"ids": torch.randint(0, 4000, (8, 512)), "labels": torch.randint(-100, 4000, (8, 512))}
    for part in range(2):
        local = slice_batch(batch, part, 2)
        ids, labels = to_device(local["ids"], "cuda"), to_device(local["labels"], "cuda")
        assert ids.is_cuda and labels.is_cuda
        torch.cuda.synchronize()
        assert torch.equal(ids.cpu(), batch["ids"][part * 4 : (part + 1) * 4])
        assert torch.equal(labels.cpu(), batch["labels"][part * 4 : (part + 1) * 4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak CUDA memory is logged on CUDA")
def test_each_step_logs_the_peak_cuda_memory_it_has_needed(train):
    """The allocator's peaks since the start: at least the policy's float32 weights, gradients and
    RMSprop state (3 copies), never more allocated than reserved, and never falling."""
    from dpokit.models import load_model

    weights = sum(p.numel() * 4 for p in load_model("tiny").parameters()) / 2**30
    summary = train("loss=sft", "batch_size=4", "n_examples=12", "eval_every=100", "device=cuda")
    allocated = [v for _, v in sorted(steps(summary, "memory/cuda_peak_allocated_gib").items())]
    reserved = [v for _, v in sorted(steps(summary, "memory/cuda_peak_reserved_gib").items())]
    assert len(allocated) == len(reserved) == 3
    assert allocated == sorted(allocated) and allocated[0] >= 3 * weights
    assert all(a <= r for a, r in zip(allocated, reserved, strict=True))


def test_a_step_and_an_evaluation_each_bring_their_metrics_to_the_host_in_one_gather(train, monkeypatch):
    """On CUDA a gather ends in a copy to the host, which waits for the device: one per length
    group would stop the host before each backward is queued. Two steps of 2 micro-batches x 2
    length groups, DPO (7 metrics per example): each step gathers once (4 examples x 7 + 2 token
    counts + the gradient norm), each evaluation once (8 examples x 7); both steps and both
    evaluations are logged."""
    from dpokit.distributed import SingleProcess

    sizes: list[int] = []
    gather = SingleProcess.gather
    monkeypatch.setattr(
        SingleProcess, "gather", lambda self, values: sizes.append(values.numel()) or gather(self, values)
    )
    summary = train("loss=dpo", "loss.beta=0.1", "batch_size=4", "gradient_accumulation_steps=2", "length_groups=2",
                    "n_examples=8", "eval_every=8")  # fmt: skip
    own = 3 + (2 if torch.cuda.is_available() else 0)  # 2 token counts, the norm (and 2 memory peaks on CUDA)
    assert sizes == [8 * 7, 4 * 7 + own, 4 * 7 + own, 8 * 7]
    assert sorted(steps(summary, "tokens/real")) == [4, 8] and len(steps(summary, "loss/eval")) == 2


def test_the_next_batch_is_collated_before_the_host_waits_for_the_step(train, monkeypatch):
    """On CUDA the host waits for the device at a step's gather; the next batch is collated
    before that, while the device computes, not after it while the device idles. Three steps
    of 4 examples: C1 C2 G1 C3 G2 G3 (collations of training batches, the steps' gathers)."""
    import dpokit.data
    from dpokit.distributed import SingleProcess

    events: list[str] = []
    step_values = 4 * 2 + 3 + (2 if torch.cuda.is_available() else 0)  # SFT: 2 metrics per example, as above
    collate, gather = dpokit.data.collate, SingleProcess.gather
    monkeypatch.setattr(dpokit.data, "collate", lambda elements, pad: (
        events.append("C") if len(elements) == 4 else None) or collate(elements, pad))  # fmt: skip
    monkeypatch.setattr(SingleProcess, "gather", lambda self, values: (
        events.append("G") if values.numel() == step_values else None) or gather(self, values))  # fmt: skip
    summary = train("loss=sft", "batch_size=4", "n_examples=12", "eval_every=100", "do_first_eval=false")
    assert events == ["C", "C", "G", "C", "G", "G"]
    assert len(steps(summary, "loss/train")) == 3


def test_gathered_metrics_come_back_process_by_process():
    """gather_metrics unpacks one flat gather: per-example values of process 0 then process 1, in
    the order they were computed; per-process values as a (processes, values) table."""
    from dpokit.trainers import gather_metrics

    class TwoProcesses:
        device = torch.device("cpu")

        def gather(self, values: torch.Tensor) -> torch.Tensor:
            return torch.cat([values, values + 100])  # the other process: the same values + 100

    per_example = {"a": [torch.tensor([1.0, 2.0]), torch.tensor([3.0])], "b": [torch.tensor([4.0, 5.0, 6.0])]}
    per_process = {"tokens": torch.tensor([7, 9]), "norm": torch.tensor(0.5)}
    rows, by_process = gather_metrics(TwoProcesses(), per_example, per_process)  # type: ignore[arg-type]
    assert rows == {"a": [1.0, 2.0, 3.0, 101.0, 102.0, 103.0], "b": [4.0, 5.0, 6.0, 104.0, 105.0, 106.0]}
    assert by_process["tokens"].tolist() == [[7.0, 9.0], [107.0, 109.0]]
    assert by_process["norm"].tolist() == [[0.5], [100.5]]
