"""TRL's own loss code on given log-probs, for benchmarks/peers_losses.py (runs in the peer virtualenv).

    .venv-peers/bin/python benchmarks/trl_losses.py MODEL_DIR INPUTS.pt CASES.json OUT.pt

For every case it builds (once per trainer kind) TRL's DPOTrainer, KTOTrainer, CPOTrainer or
ORPOTrainer on the given model, sets the case's loss settings on it, and calls the trainer's own
loss method (`_compute_loss`, or `get_batch_loss_metrics` for CPO and ORPO) with a stand-in model
whose forward returns the given tensors: per-token log-probs (and the extra per-token outputs
TRL's fused LM head returns) for DPO and KTO, logits for CPO and ORPO, which compute their
log-probs from logits. Writes each case's loss and its gradient with respect to those tensors.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer


class Given(torch.nn.Module):
    """A model that answers a forward with given outputs: `per_token` log-probs for the rows
    asked (the main rows, or KTO's KL rows, told apart by their first token id), or `logits`."""

    def __init__(self, outputs: dict[str, torch.Tensor], kl_outputs: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.outputs, self.kl_outputs = outputs, kl_outputs

    def forward(self, input_ids=None, **kwargs):
        out = self.kl_outputs if self.kl_outputs is not None and int(input_ids[0, 0]) >= KL_TOKEN else self.outputs
        if "logits" in out:
            return SimpleNamespace(logits=out["logits"], aux_loss=None)
        zeros = torch.zeros_like(out["log_probs"])
        return SimpleNamespace(
            log_probs=out["log_probs"], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
            log_sum_sq_probs=out.get("log_sum_sq_probs", zeros), aux_loss=None,
        )  # fmt: skip


KL_TOKEN = 1000  # KL rows' token ids start here


def common_args(output_dir: str) -> dict:
    return {"output_dir": output_dir, "per_device_train_batch_size": 2, "report_to": [], "use_cpu": True,
            "disable_dropout": True, "max_length": 64}  # fmt: skip


def dpo_trainer(model, tokenizer, output_dir: str):
    from trl import DPOConfig, DPOTrainer

    rows = Dataset.from_list([{"prompt": " a", "chosen": " b", "rejected": " c"}] * 2)
    return DPOTrainer(
        model=model, args=DPOConfig(**common_args(output_dir)), train_dataset=rows, processing_class=tokenizer
    )


def kto_trainer(model, tokenizer, output_dir: str):
    from trl import KTOConfig, KTOTrainer

    rows = Dataset.from_list([{"prompt": " a", "completion": " b", "label": True},
                              {"prompt": " a", "completion": " c", "label": False}])  # fmt: skip
    return KTOTrainer(
        model=model, args=KTOConfig(**common_args(output_dir)), train_dataset=rows, processing_class=tokenizer
    )


def cpo_trainer(model, tokenizer, output_dir: str, kind: str):
    if kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    rows = Dataset.from_list([{"prompt": " a", "chosen": " b", "rejected": " c"}] * 2)
    args = Config(**common_args(output_dir))
    return Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)


def run_dpo(trainer, case: dict, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    t = case["trl"]
    trainer.loss_types = t["loss_type"]
    trainer.loss_weights = t.get("loss_weights") or [1.0] * len(t["loss_type"])
    trainer.beta = t.get("beta", 0.1)
    trainer.label_smoothing = t.get("label_smoothing", 0.0)
    trainer.ld_alpha = t.get("ld_alpha")
    trainer.f_divergence_type = t.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = t.get("f_alpha_divergence_coef", 0.5)
    trainer.use_weighting = t.get("use_weighting", False)
    trainer.args.discopop_tau = t.get("discopop_tau", 0.05)
    log_probs = inputs["policy"].clone().requires_grad_()
    policy = Given({"log_probs": log_probs, "log_sum_sq_probs": inputs["log_sum_sq"]})
    trainer.ref_model = Given({"log_probs": inputs["reference"]})
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
             "completion_mask": inputs["completion_mask"]}  # fmt: skip
    loss = trainer._compute_loss(policy, batch, return_outputs=False)
    loss.backward()
    return loss.detach(), log_probs.grad


def run_kto(trainer, case: dict, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    t = case["trl"]
    trainer.loss_type = t["loss_type"]
    trainer.calculate_KL = t["loss_type"] == "kto"
    trainer.beta = t.get("beta", 0.1)
    trainer.desirable_weight = t.get("desirable_weight", 1.0)
    trainer.undesirable_weight = t.get("undesirable_weight", 1.0)
    log_probs = inputs["kto_policy"].clone().requires_grad_()
    policy = Given({"log_probs": log_probs}, {"log_probs": inputs["kto_kl_policy"]})
    trainer.ref_model = Given({"log_probs": inputs["kto_reference"]}, {"log_probs": inputs["kto_kl_reference"]})
    batch = {k: inputs[f"kto_{k}"] for k in ("input_ids", "attention_mask", "completion_mask", "KL_input_ids",
                                             "KL_attention_mask", "KL_completion_mask")}  # fmt: skip
    batch["label"] = inputs["kto_label"]
    loss = trainer._compute_loss(policy, batch, return_outputs=False)
    loss.backward()
    return loss.detach(), log_probs.grad


def run_cpo(trainer, case: dict, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    t = case["trl"]
    for key, value in t.items():
        if key not in ("trainer", "labels"):
            setattr(trainer, key, value)
    logits = inputs["logits"].clone().requires_grad_()
    n = inputs["chosen_input_ids"].shape[0]
    suffix = "_full" if t.get("labels") == "full" else ""  # every token labelled: no prompt
    batch = {f"{side}_{field}": inputs[f"{side}_{field}{suffix if field == 'labels' else ''}"]
             for side in ("chosen", "rejected") for field in ("input_ids", "attention_mask", "labels")}  # fmt: skip
    batch.update(
        prompt_input_ids=inputs["chosen_input_ids"][:, :1], prompt_attention_mask=torch.ones(n, 1, dtype=torch.long)
    )
    loss, _ = trainer.get_batch_loss_metrics(Given({"logits": logits}), batch, "train")
    loss.backward()
    return loss.detach(), logits.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("inputs")
    parser.add_argument("cases")
    parser.add_argument("out")
    args = parser.parse_args()
    inputs = torch.load(args.inputs, weights_only=True)
    cases = json.loads(Path(args.cases).read_text())
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    results: dict[str, dict[str, torch.Tensor]] = {}
    trainers: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for case in cases:
            kind = case["trl"].get("trainer", "dpo")
            if kind not in trainers:
                build = {"dpo": dpo_trainer, "kto": kto_trainer}.get(kind)
                trainers[kind] = (
                    build(model, tokenizer, output_dir) if build else cpo_trainer(model, tokenizer, output_dir, kind)
                )
            run = {"dpo": run_dpo, "kto": run_kto}.get(kind, run_cpo)
            loss, grad = run(trainers[kind], case, inputs)
            results[case["name"]] = {"loss": loss, "grad": grad}
    torch.save(results, args.out)


if __name__ == "__main__":
    main()
