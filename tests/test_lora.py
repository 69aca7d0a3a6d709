"""LoRA through PEFT: adapters on the policy, the reference as the same model with them off,
merged policy.pt plus PEFT's adapter directory in every checkpoint, SFT -> DPO, bad input."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, metrics_log, run_cli
from dpokit import lora
from dpokit.errors import ConfigError
from dpokit.models import load_model

SHORT = ["batch_size=4", "n_examples=8", "eval_every=4", "n_eval_examples=8"]
LORA = ["lora.enabled=true", "lora.r=4"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_llama() -> torch.nn.Module:
    """A Llama built from a config: rotary positions, separate q/k/v/o and gated MLP projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def llama_dir(model_dir: Path, weights: bool = False) -> Path:
    """A tiny Llama's model directory with the bundled tokenizer: its config only (the weights
    are made from the seed), or with weights (saved from seed 0)."""
    import shutil
    from importlib import resources

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                         eos_token_id=0)  # fmt: skip
    if weights:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(model_dir)
    else:
        config.save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(str(resources.files("dpokit") / "assets/tiny" / f)), model_dir / f)
    return model_dir


def models() -> dict[str, torch.nn.Module]:
    return {"gpt2": load_model("tiny").eval(), "llama": tiny_llama()}


def with_trained_adapters(model: torch.nn.Module, targets: list[str] | None = None) -> torch.nn.Module:
    """The model with LoRA adapters whose B is not zero (as after training), so they change the output."""
    cfg = type("C", (), {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": targets, "modules_to_save": None})
    peft_model = lora.apply(model, cfg, seed=1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return peft_model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_adapter_off_reference_is_the_base_model(arch):
    base = models()[arch]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = base(ids).logits
    peft_model = with_trained_adapters(copy.deepcopy(base))
    peft_model.train()
    assert not torch.equal(peft_model(ids).logits, expected)  # the adapters do change the output
    reference = lora.AdapterOff(peft_model)
    reference.eval()  # touches nothing of the policy's
    assert peft_model.training
    assert torch.equal(reference(ids).logits, expected)
    assert peft_model.training  # restored after the reference's forward
    assert list(reference.parameters()) == []  # no weights of its own


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_state_is_what_peft_merges_under_the_models_own_names(arch):
    base = models()[arch]
    peft_model = with_trained_adapters(copy.deepcopy(base))
    merged = lora.base_state_dict(peft_model)
    assert list(merged) == list(base.state_dict())  # the model's own names, in its order
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert all(torch.equal(merged[k], reference[k]) for k in reference), "not PEFT's merge"
    assert lora.base_state_dict(peft_model, merged=False).keys() == merged.keys()
    unmerged = lora.base_state_dict(peft_model, merged=False)
    assert all(torch.equal(unmerged[k], v) for k, v in base.state_dict().items())


def test_target_modules_default_to_peft_s_choice_and_unknown_names_list_the_layers():
    gpt2, llama = load_model("tiny"), tiny_llama()
    assert lora.target_modules(gpt2, None) == ["c_attn"]  # PEFT's default for GPT-2
    assert set(lora.target_modules(llama, None)) == {"q_proj", "v_proj"}
    assert lora.target_modules(llama, ["o_proj", "down_proj"]) == ["o_proj", "down_proj"]
    with pytest.raises(ConfigError, match=r"'lora.target_modules' names 'attn_q'.*c_attn, c_fc, c_proj"):
        lora.target_modules(gpt2, ["attn_q"])


def test_lora_sft_then_lora_dpo_through_the_cli_with_peft_s_adapter_in_every_checkpoint(tmp_path):
    from peft import PeftModel

    common = [*FAST, *SHORT, *LORA, "lora.target_modules=[c_attn,c_proj]", "sample_during_eval=true",
              "n_eval_model_samples=4"]  # fmt: skip
    sft = run_cli("train", *common, "loss=sft", "exp_name=sft", f"local_run_dir={tmp_path / 'sft'}")
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert "LoRA: " in sft.stdout and "trainable parameters of" in sft.stdout
    dpo = run_cli("train", *common, "loss=dpo", "loss.beta=0.1", f"model.archive={tmp_path / 'sft'}",
                  "exp_name=dpo", f"local_run_dir={tmp_path / 'dpo'}")  # fmt: skip
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    assert "building reference model" not in dpo.stdout  # the adapter-off policy is the reference
    for run in ("sft", "dpo"):
        for ckpt in ("step-4", "LATEST"):
            d = tmp_path / run / ckpt
            assert {p.name for p in d.iterdir()} >= {"policy.pt", "optimizer.pt", "scheduler.pt", "adapter"}
            manifest = json.loads((d / "manifest.json").read_text())
            assert {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS} <= set(manifest["files"])
    verify = run_cli("ckpt", "verify", str(tmp_path / "dpo"))
    assert verify.returncode == 0 and verify.stdout.count("OK ") == 2, verify.stdout

    # policy.pt: the full merged weights, which a plain model loads (the reference's way); the
    # adapter: PEFT's own directory over the base it trained on (the SFT result)
    latest = tmp_path / "dpo" / "LATEST"
    merged = load_model("tiny", seed=5)
    merged.load_state_dict(load(latest / "policy.pt")["state"])
    base = load_model("tiny", seed=5)
    base.load_state_dict(load(tmp_path / "sft" / "LATEST" / "policy.pt")["state"])
    adapted = PeftModel.from_pretrained(base, str(latest / "adapter")).eval()
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adapted(ids).logits, merged.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    # `ckpt export` writes the merged model, or the adapter alone
    assert run_cli("ckpt", "export", str(latest), str(tmp_path / "hf")).returncode == 0
    assert run_cli("ckpt", "export", str(latest), str(tmp_path / "ad"), "--adapter").returncode == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    torch.testing.assert_close(exported(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
    base_again = load_model("tiny", seed=6)
    base_again.load_state_dict(load(tmp_path / "sft" / "LATEST" / "policy.pt")["state"])
    again = PeftModel.from_pretrained(base_again, str(tmp_path / "ad")).eval()
    assert torch.equal(again(ids).logits, adapted(ids).logits)
    # only the adapters trained: optimizer state for them alone
    optimizer = load(latest / "optimizer.pt")["state"]
    assert len(optimizer["state"]) == 2 * 3 * 4  # (A, B) x (c_attn, attn.c_proj, mlp.c_proj) x 4 blocks
    assert any("rewards_eval/accuracies" in m for m in metrics_log(tmp_path / "dpo"))


def test_lora_dpo_builds_no_second_model_and_precomputing_changes_nothing(train, monkeypatch):
    import dpokit.models

    def refuse(*args, **kwargs):
        raise AssertionError("a reference model was built")

    monkeypatch.setattr(dpokit.models, "copy_as_reference", refuse)
    args = ["loss=dpo", "loss.beta=0.1", *LORA, *SHORT, "minimum_log_interval_secs=0"]
    live = metrics_log(train(*args, exp_name="live")["run_dir"])
    pre = metrics_log(train(*args, "precompute_ref_log_probs=true", exp_name="pre")["run_dir"])
    losses = [[m["loss/train"] for m in log if "loss/train" in m] for log in (live, pre)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)


def test_the_same_seed_gives_the_same_adapters():
    cfg = type("C", (), {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None, "modules_to_save": None})
    a, b = (lora.apply(load_model("tiny"), cfg, seed=3) for _ in range(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


BAD = {
    "r": (["lora.r=0"], r"config key 'lora.r' must be > 0, got 0"),
    "target": (["lora.target_modules=[attn]"], r"'lora.target_modules' names 'attn', which matches no layer of this model LoRA can adapt"),
    "tr-dpo": (["loss=dpo", "loss.beta=0.1", "loss.sync_ref_model=true"],
               r"'loss.sync_ref_model' cannot be used with lora.enabled=true"),
    "qlora-cpu": (["lora.quantize=nf4", "lora.save_merged=false", "device=cpu"],
                  r"'lora.quantize' \(QLoRA: a 4-bit base through bitsandbytes\) needs a CUDA device, and device is cpu"),
    "qlora-kind": (["lora.quantize=int8"], r"'lora.quantize' must be nf4, fp4 or null, got 'int8'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_input_is_one_sentence_before_any_model_is_built(tmp_path, case, monkeypatch):
    import dpokit.models
    from dpokit.train import main

    monkeypatch.setattr(dpokit.models, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    args, pattern = BAD[case]
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match=pattern) as caught:
        main([*FAST, "exp_name=bad", f"local_dirs=[{runs}]", "lora.enabled=true", *args])
    assert "\n" not in str(caught.value)
    assert not runs.exists()


def test_lora_without_peft_says_how_to_install_it(tmp_path, monkeypatch):
    from dpokit.train import main

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails
    with pytest.raises(ConfigError, match=r"needs the peft package.*pip install 'dpokit\[lora\]'"):
        main([*FAST, "exp_name=bad", f"local_dirs=[{tmp_path / 'runs'}]", "lora.enabled=true"])
    assert not (tmp_path / "runs").exists()


def test_activation_checkpointing_with_lora_changes_no_number(train):
    """transformers' own checkpointing for a LoRA model (the block wrapper would rename the
    modules PEFT finds its adapters by): the same losses and the same adapter file, byte for byte."""
    args = ["loss=dpo", "loss.beta=0.1", *LORA, *SHORT, "minimum_log_interval_secs=0"]
    plain = Path(train(*args, exp_name="plain")["run_dir"])
    checkpointed = Path(train(*args, "activation_checkpointing=true", exp_name="ac")["run_dir"])
    losses = [[m["loss/train"] for m in metrics_log(d) if "loss/train" in m] for d in (plain, checkpointed)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    weights = [(d / "LATEST" / lora.ADAPTER_WEIGHTS).read_bytes() for d in (plain, checkpointed)]
    assert weights[0] == weights[1] and len(weights[0]) > 10_000  # the adapters are in it


def test_lora_sft_then_dpo_on_a_tiny_llama(train, tmp_path):
    """Rotary positions, separate q/k/v/o projections: PEFT's default targets for Llama
    (q_proj, v_proj), from a model directory holding only a config and the bundled tokenizer."""
    from peft import PeftModel

    model_dir = llama_dir(tmp_path / "llama")
    model = ["model=blank_model_fp32", f"model.name_or_path={model_dir}", *LORA, *SHORT]
    sft = Path(train(*model, "loss=sft", exp_name="sft")["run_dir"])
    dpo = Path(train(*model, "loss=dpo", "loss.beta=0.1", f"model.archive={sft}", exp_name="dpo")["run_dir"])
    config = json.loads((dpo / "LATEST" / lora.ADAPTER_CONFIG).read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["fan_in_fan_out"] is False
    base = load_model(str(model_dir), seed=9)
    base.load_state_dict(load(sft / "LATEST" / "policy.pt")["state"])
    adapted = PeftModel.from_pretrained(base, str(dpo / "LATEST" / "adapter")).eval()
    merged = load_model(str(model_dir), seed=9)
    merged.load_state_dict(load(dpo / "LATEST" / "policy.pt")["state"])
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adapted(ids).logits, merged.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_without_merged_weights_a_checkpoint_holds_the_adapter_and_every_reader_merges_it(train, tmp_path):
    """lora.save_merged=false: no policy.pt; model.archive, ckpt export and ckpt diff merge the
    adapter into the base its run started from (here itself such a checkpoint: LoRA SFT -> LoRA
    DPO), to the very numbers the merged policy.pt has; resume needs no policy.pt; a base that
    is gone is named in one sentence."""
    from dpokit.weights import read_policy

    args = [*LORA, "lora.target_modules=[c_attn,c_proj]", *SHORT]
    runs = {}
    for merged in ("true", "false"):
        save = [f"lora.save_merged={merged}"]
        sft = Path(train(*args, *save, "loss=sft", exp_name=f"sft_{merged}")["run_dir"])
        dpo = train(*args, *save, "loss=dpo", "loss.beta=0.1", f"model.archive={sft}", exp_name=f"dpo_{merged}")
        runs[merged] = (sft, Path(dpo["run_dir"]))
    for run in runs["false"]:
        for ckpt in ("step-4", "LATEST"):
            d = run / ckpt
            assert not (d / "policy.pt").exists() and (d / lora.ADAPTER_WEIGHTS).is_file()
            assert json.loads((d / "manifest.json").read_text())["layout"] == "adapter"
    for kept, adapter_only in zip(runs["true"], runs["false"], strict=True):
        expected = load(kept / "LATEST" / "policy.pt")["state"]
        got = read_policy(adapter_only)["state"]
        assert list(got) == list(expected) and all(torch.equal(got[k], v) for k, v in expected.items())
    sft, dpo = runs["false"]
    verify = run_cli("ckpt", "verify", str(dpo))
    assert verify.returncode == 0 and verify.stdout.count("OK ") == 2, verify.stdout
    diff = run_cli("ckpt", "diff", str(runs["true"][1]), str(dpo), "--tolerance", "0")
    assert diff.returncode == 0, diff.stdout + diff.stderr
    show = run_cli("ckpt", "show", str(dpo / "LATEST"))
    assert "the LoRA adapter alone (lora.save_merged=false)" in show.stdout, show.stdout + show.stderr
    bare = Path(train(*args, "lora.save_merged=false", "checkpoint.save_optimizer=false", exp_name="bare")["run_dir"])
    show = run_cli("ckpt", "show", str(bare / "LATEST"))  # the adapter and the manifest, nothing else
    assert show.returncode == 0 and "the LoRA adapter alone" in show.stdout, show.stdout + show.stderr
    assert run_cli("ckpt", "export", str(dpo), str(tmp_path / "hf")).returncode == 0
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    expected = load(runs["true"][1] / "LATEST" / "policy.pt")["state"]
    assert all(torch.equal(exported[k], expected[k]) for k in exported)

    # resuming reads the adapter and the optimizer, never a policy.pt
    resumed = train(*args, "lora.save_merged=false", "loss=dpo", "loss.beta=0.1", f"model.archive={sft}",
                    f"resume={dpo / 'step-4'}", exp_name="resumed")  # fmt: skip
    adapter = (Path(resumed["run_dir"]) / "LATEST" / lora.ADAPTER_WEIGHTS).read_bytes()
    assert adapter == (dpo / "LATEST" / lora.ADAPTER_WEIGHTS).read_bytes()

    # rewriting one file of such a checkpoint (the reference's write_state_dict) keeps its adapter and layout
    from dpokit.checkpoint import Storage, rewrite_file, verify_dir

    step = dpo / "step-4"
    rewrite_file(Storage(dpo), step, "scheduler.pt", 4, {"last_epoch": 1}, {})
    assert json.loads((step / "manifest.json").read_text())["layout"] == "adapter"
    assert verify_dir(step) is None and (step / lora.ADAPTER_WEIGHTS).is_file()

    # the base moved away: one sentence naming it, from every reader
    sft.rename(sft.with_name(sft.name + "_moved"))
    for cmd in (["export", str(dpo), str(tmp_path / "hf2")], ["verify", str(dpo / "LATEST")]):
        out = run_cli("ckpt", *cmd)
        assert out.returncode != 0 and f"the base of {dpo / 'LATEST'} is gone" in out.stdout + out.stderr, out
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "hf2").exists()


def test_save_merged_false_without_lora_or_with_sharded_checkpoints_is_refused(tmp_path):
    from dpokit.train import main

    for args, pattern in (
        (["lora.save_merged=false"], r"'lora.save_merged=false' needs lora.enabled=true"),
        (["lora.save_merged=false", *LORA, "checkpoint.format=sharded"],
         r"'lora.save_merged=false' applies to checkpoint.format=full"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=pattern):
            main([*FAST, "exp_name=bad", f"local_dirs=[{tmp_path / 'runs'}]", *args])
    assert not (tmp_path / "runs").exists()


def qlora_run(train, tmp_path: Path, device: str, *extra: str) -> tuple[Path, list[str], Path]:
    """A QLoRA DPO run on a tiny Llama with weights: its run directory, its arguments, the model."""
    model_dir = llama_dir(tmp_path / "llama", weights=True)
    args = ["model=blank_model_fp32", f"model.name_or_path={model_dir}", "model.policy_dtype=bfloat16", *LORA,
            *SHORT, "loss=dpo", "loss.beta=0.1", "lora.quantize=nf4", "lora.save_merged=false", f"device={device}",
            "minimum_log_interval_secs=0", *extra]  # fmt: skip
    return Path(train(*args, exp_name="qlora")["run_dir"]), args, model_dir


def check_qlora_run(run: Path, model_dir: Path) -> None:
    """4-bit base, adapters trained on PEFT's Llama targets, merged into the full-precision base."""
    from transformers import AutoModelForCausalLM

    from dpokit.weights import read_policy

    assert "QLoRA: the base model's linear layers in 4 bits (nf4)" in (run / "train.log").read_text()
    losses = [m["loss/train"] for m in metrics_log(run) if "loss/train" in m]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    assert not (run / "LATEST" / "policy.pt").exists()
    merged = read_policy(run)["state"]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).state_dict()
    assert merged.keys() == base.keys()
    adapted = [k for k in base if not torch.equal(merged[k], base[k])]
    assert adapted and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in adapted)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="QLoRA needs a CUDA device and bitsandbytes",
)
def test_qlora_trains_adapters_over_a_4_bit_base_and_merges_them_into_the_full_precision_one(train, tmp_path):
    run, args, model_dir = qlora_run(train, tmp_path, "cuda")
    check_qlora_run(run, model_dir)
    resumed = Path(train(*args, f"resume={run / 'step-4'}", exp_name="resumed")["run_dir"])
    assert (resumed / "LATEST" / lora.ADAPTER_WEIGHTS).is_file()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_s_code_path_on_bitsandbytes_cpu_kernels_resumes_bit_for_bit(train, tmp_path, monkeypatch):
    """Users are refused QLoRA without CUDA (far too slow to train on); bitsandbytes' CPU kernels
    still run the whole path, so wherever bitsandbytes is installed this checks it on the CPU:
    4-bit loading, PEFT's preparation, the adapter-off reference, adapter-only checkpoints,
    their merge, and resume, which is bit-exact here. (Not in the CPU suite's extras: bitsandbytes
    is a GPU package.)"""
    import dpokit.config

    monkeypatch.setattr(dpokit.config, "require_cuda_for_quantize", lambda cfg: None)
    run, args, model_dir = qlora_run(train, tmp_path, "cpu")
    check_qlora_run(run, model_dir)
    resumed = Path(train(*args, f"resume={run / 'step-4'}", exp_name="resumed")["run_dir"])
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "LATEST" / lora.ADAPTER_WEIGHTS)) for d in (run, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_modules_to_save_are_in_peft_s_file_resume_exactly_and_consolidate_to_the_full_format(train, tmp_path):
    """A module trained in full beside the adapters (lora.modules_to_save): PEFT's file holds its
    trained copy under the module's own name, resume reads it back, and a sharded checkpoint
    consolidates to the full format's policy.pt and adapter."""
    from safetensors.torch import load_file

    args = [*LORA, "lora.modules_to_save=[lm_head]", *SHORT, "loss=sft"]
    full = Path(train(*args, exp_name="full")["run_dir"])
    saved = load_file(str(full / "LATEST" / lora.ADAPTER_WEIGHTS))
    assert "base_model.model.lm_head.weight" in saved
    policy = load(full / "LATEST" / "policy.pt")["state"]
    assert torch.equal(policy["lm_head.weight"], saved["base_model.model.lm_head.weight"])
    assert not torch.equal(
        policy["lm_head.weight"], policy["transformer.wte.weight"]
    )  # trained apart from the tied input
    resumed = Path(train(*args, f"resume={full / 'step-4'}", exp_name="resumed")["run_dir"])
    again = load_file(str(resumed / "LATEST" / lora.ADAPTER_WEIGHTS))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    sharded = Path(train(*args, "checkpoint.format=sharded", exp_name="sharded")["run_dir"])
    out = tmp_path / "consolidated"
    assert run_cli("ckpt", "consolidate", str(sharded / "LATEST"), str(out)).returncode == 0
    consolidated = load(out / "policy.pt")["state"]
    assert consolidated.keys() == policy.keys() and all(torch.equal(consolidated[k], v) for k, v in policy.items())
    adapter = load_file(str(out / lora.ADAPTER_WEIGHTS))
    assert adapter.keys() == saved.keys() and all(torch.equal(adapter[k], saved[k]) for k in saved)
