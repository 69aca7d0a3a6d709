"""Padding-free DPO (packing=true): the packed rows give each sequence the log-probs, loss and
gradient of the padded computation, up to float rounding (another attention mask, so other
kernels and summation orders: checked against float64, not bit for bit), on the bundled GPT-2
(learned positions) and a Llama built from a config (rotary positions, where position_ids must
restart at every sequence); the token budget bounds the rows; models whose attention cannot be
confined are refused before any work."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
import transformers

from conftest import assert_no_further_from_exact, metrics_log
from dpokit import losses, packing
from dpokit.errors import ConfigError
from dpokit.models import cast_parameters, load_model


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


def models() -> dict[str, torch.nn.Module]:
    return {"gpt2": load_model("tiny").eval(), "gpt2-eager": load_model("tiny", attn_implementation="eager").eval(),
            "llama": tiny_llama()}  # fmt: skip


def padded_batch(lengths: list[int], vocab: int, prompt: int = 4) -> tuple[torch.Tensor, ...]:
    """Right-padded rows of these lengths; the first `prompt` tokens of each are unlabelled."""
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return ids, mask, labels


def padded_logps(model: torch.nn.Module, ids, mask, labels) -> torch.Tensor:
    return losses.token_logps(model(ids, attention_mask=mask, use_cache=False).logits, labels)


def packed_logps(model: torch.nn.Module, ids, mask, labels, max_tokens: int) -> torch.Tensor:
    p = packing.pack(ids, mask, labels, max_tokens)
    out = model(p.input_ids, attention_mask=None, position_ids=p.position_ids, use_cache=False)
    return packing.unpack(losses.token_logps(out.logits, p.labels), p.source, p.target, p.padded_shape)


def test_layout_packs_the_rows_that_compute_the_fewest_tokens_within_the_budget():
    """Rows are as wide as the fullest: rows x width is what is computed, never more than the
    padded batch (rows x longest)."""
    lengths = [40, 13, 27, 5, 33, 18]
    rows = packing.layout(lengths, 64)
    assert rows == [[0], [4, 3], [2, 1], [5]]  # 40 | 33+5 | 27+13 | 18: 4 rows of 40 beat 3 of 63
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert packing.token_counts(lengths, 64) == (136, 160)  # padded: 6 x 40 = 240
    assert packing.layout([30, 20, 20, 20], 64) == [[0, 1], [2, 3]]  # 2 rows of 50 beat 3 of 40
    # within 40 tokens, 3 rows of 40 cost what 4 of 30 do: the narrower rows, cheaper attention
    assert packing.layout([30, 20, 20, 20], 40) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="41 tokens"):
        packing.layout([41], 40)


def test_packed_rows_restart_positions_and_never_predict_across_sequences():
    ids, mask, labels = padded_batch([6, 3, 2], vocab=50, prompt=1)
    p = packing.pack(ids, mask, labels, 16)
    assert p.input_ids.shape == (1, 11)
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1]]
    assert [p.labels[0, s].item() for s in (0, 6, 9)] == [-100] * 3  # nothing predicts a sequence's start
    assert p.input_ids[0, 6:9].tolist() == ids[1, :3].tolist()
    # a per-token value at each packed position comes back to its padded position
    values = torch.arange(10, dtype=torch.float32).unsqueeze(0)
    back = packing.unpack(values, p.source, p.target, p.padded_shape)
    assert back[0].tolist() == [0, 1, 2, 3, 4]
    assert back[1].tolist() == [6, 7, 0, 0, 0] and back[2].tolist() == [9, 0, 0, 0, 0]
    # a row's padding stays at position 0: rows may be wider than the model's position table
    ids, mask, labels = padded_batch([40, 30, 20], vocab=50)
    p = packing.pack(ids, mask, labels, 60)  # rows [40 + 10 padding], [30, 20]
    assert p.input_ids.shape == (2, 50) and p.position_ids[0, 40:].tolist() == [0] * 10


@pytest.mark.parametrize("arch", ["gpt2", "gpt2-eager", "llama"])
def test_packed_log_probs_and_gradients_equal_the_padded_ones(arch):
    """Per-token log-probs and the DPO loss's gradient: the packed float32 computation is no
    further from a padded float64 run than the padded float32 one is (within 4x, the bound of
    summing the same terms in another order); with the sdpa and the eager attention kernels."""
    model = models()[arch]
    exact_model = cast_parameters(load_model("tiny").eval() if arch.startswith("gpt2") else tiny_llama(), torch.float64)
    exact_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    vocab = model.config.vocab_size
    ids, mask, labels = padded_batch([40, 13, 27, 5, 33, 18, 22, 9], vocab)

    def grads(logps: torch.Tensor, m: torch.nn.Module) -> dict[str, torch.Tensor]:
        seq = losses.sequence_logps(logps, labels)
        loss = losses.sigmoid_loss(seq[:4] - seq[4:], beta=0.1).mean()
        m.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    padded = padded_logps(model, ids, mask, labels)
    exact = padded_logps(exact_model, ids, mask, labels)
    padded_grads, exact_grads = grads(padded, model), grads(exact, exact_model)
    for budget in (64, 256):  # several rows, one row
        packed = packed_logps(model, ids, mask, labels, budget)
        assert_no_further_from_exact({"logps": packed.detach()}, {"logps": padded.detach()}, {"logps": exact.detach()})
        assert torch.equal(packed != 0, padded != 0)  # the same positions are predicted
        assert_no_further_from_exact(grads(packed, model), padded_grads, exact_grads)


def llama_dir(tmp_path: Path) -> Path:
    """A Llama model directory holding only a config and the bundled tokenizer."""
    model_dir = tmp_path / "llama"
    transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                             eos_token_id=0).save_pretrained(model_dir)  # fmt: skip
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(str(resources.files("dpokit") / "assets/tiny" / f)), model_dir / f)
    return model_dir


def policy(summary: dict) -> dict:
    return torch.load(Path(summary["run_dir"]) / "LATEST" / "policy.pt", weights_only=True)["state"]


def steps(summary: dict, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics_log(summary["run_dir"]) if key in r}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_dpo_training_gives_the_padded_update_with_less_padding(train, tmp_path, arch):
    """Two DPO steps with SGD (linear in the gradient, no clipping): the packed run's weights are
    no further from a float64 padded run than the float32 padded run's; the same real tokens,
    fewer computed; metrics equal within float32 rounding: the log-prob sums (~-300) differ in
    their last bits (~1e-5 absolute), rewards are beta times their differences, so metrics agree
    to 1e-4 relative or 1e-5 absolute (tf32=false: a float32 claim on CUDA too)."""
    model = (
        ["model=tiny"] if arch == "gpt2" else ["model=blank_model_fp32", f"model.name_or_path={llama_dir(tmp_path)}"]
    )
    args = [*model, "loss=dpo", "loss.beta=0.1", "batch_size=8", "n_examples=16", "eval_every=16",
            "do_first_eval=false", "optimizer=SGD", "lr=1e-2", "max_grad_norm=1e9", "max_length=128",
            "max_prompt_length=64", "tf32=false"]  # fmt: skip
    padded = train(*args, exp_name="padded")
    packed = train(*args, "packing=true", exp_name="packed")
    exact = train(*args, "model.policy_dtype=float64", "model.reference_dtype=float64", exp_name="exact")
    assert_no_further_from_exact(policy(packed), policy(padded), policy(exact))
    assert steps(packed, "tokens/real") == steps(padded, "tokens/real")
    assert all(steps(packed, "tokens/padded")[s] < steps(padded, "tokens/padded")[s] for s in (8, 16))
    for key in ("loss/train", "rewards_train/margins", "logps_train/chosen"):
        for step, value in steps(padded, key).items():
            assert steps(packed, key)[step] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, step)
    for key in ("loss/eval", "rewards_eval/accuracies"):
        assert steps(packed, key)[16] == pytest.approx(steps(padded, key)[16], rel=1e-4, abs=1e-5)


def test_packing_works_with_every_speed_lever(train):
    """Precomputed reference log-probs (computed packed too), length groups (each group packed),
    the length-grouped sampler and bf16 autocast, all at once; SFT; LoRA (the reference is the
    policy with its adapters off) with activation checkpointing: each step's loss is the padded
    run's with the same settings, within float rounding (bf16: its rounding, 1e-2)."""
    dpo = ["loss=dpo", "loss.beta=0.1", "batch_size=8", "n_examples=16", "eval_every=16", "do_first_eval=false",
           "max_length=128", "max_prompt_length=64"]  # fmt: skip
    levers = ["precompute_ref_log_probs=true", "length_groups=2", "sampler=length_grouped", "mixed_precision=bf16"]
    lora = ["lora.enabled=true", "lora.r=4", "lora.target_modules=[c_attn,c_fc]", "activation_checkpointing=true"]
    cases = (("dpo", [*dpo, *levers]), ("sft", ["loss=sft", *dpo[2:], "packing_max_tokens=256"]),
             ("lora", [*dpo, *lora]))  # fmt: skip
    for name, args in cases:
        padded = train(*args, exp_name=f"{name}-padded")
        packed = train(*args, "packing=true", exp_name=f"{name}-packed")
        tolerance = 1e-2 if "mixed_precision=bf16" in args else 1e-4
        for step, loss in steps(padded, "loss/train").items():
            assert steps(packed, "loss/train")[step] == pytest.approx(loss, rel=tolerance), (name, step)
        assert steps(packed, "tokens/real") == steps(padded, "tokens/real")
        assert steps(packed, "tokens/padded")[16] <= steps(padded, "tokens/padded")[16]


def test_packing_is_refused_for_a_model_whose_attention_cannot_be_confined(train, tmp_path, capsys):
    """Mamba has no attention mask to confine: its state would carry from one packed sequence
    into the next. Refused in one sentence from the model's config, before anything is built."""
    model_dir = tmp_path / "mamba"
    transformers.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(model_dir)
    runs = tmp_path / "runs"
    with pytest.raises(
        ConfigError, match="model type 'mamba' cannot confine attention to each packed sequence"
    ) as caught:
        train("model=blank_model_fp32", f"model.name_or_path={model_dir}", "packing=true")
    assert "\n" not in str(caught.value) and not runs.exists()
    packing.check_model_supports(load_model("tiny"))  # GPT-2 and Llama build their masks in transformers
    packing.check_model_supports(tiny_llama())


def test_a_packed_row_budget_below_max_length_is_refused(train, tmp_path):
    with pytest.raises(ConfigError, match=r"'packing_max_tokens' \(32\) must be at least max_length \(64\)"):
        train("packing=true", "packing_max_tokens=32")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("value", "pattern"),
    [("flash", r"'model.attn_implementation' must be one of sdpa, eager, flex_attention, flash_attention_2 or null"),
     ("flash_attention_2", r"flash_attention_2, which needs the flash-attn package")],
)  # fmt: skip
def test_an_attention_kernel_that_cannot_run_is_refused_before_any_work(train, tmp_path, value, pattern):
    import importlib.util

    if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=pattern):
        train(f"model.attn_implementation={value}", "packing=true")
    assert not (tmp_path / "runs").exists()
