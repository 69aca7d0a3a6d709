"""The DPO reference's training loop (SFT, DPO, IPO): `BasicTrainer` and `FSDPTrainer`.

One loop for both: evaluate every `eval_every` examples (and save `step-{examples}` after each
evaluation past the first example), one optimizer step per batch with gradient accumulation and
clipping, logs no more often than `minimum_log_interval_secs`. How the models are placed,
gradients clipped, metrics gathered and checkpoint state collected is the `Distribution`'s
business (`dpokit.distributed`); what goes to disk and how is the `Checkpointer`'s.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import tqdm
from omegaconf import DictConfig, OmegaConf

from dpokit import losses
from dpokit.checkpoint import Checkpointer, CheckpointSettings
from dpokit.config import PREFERENCE_LOSSES
from dpokit.data import BatchIterator, cache_dir_for, load_examples
from dpokit.distributed import FSDP2, Distribution, SingleProcess


def rank0_print(*args: Any, rank: int = 0, **kwargs: Any) -> None:
    if rank == 0:
        print(*args, **kwargs, flush=True)


def formatted(metrics: dict) -> dict:
    return {k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in metrics.items()}


def slice_batch(batch: dict, index: int, n_slices: int, device: torch.device | str) -> dict:
    """The index-th of n_slices equal parts of a batch, tensors moved to the device."""
    size = len(next(iter(batch.values()))) // n_slices
    part = {k: v[index * size : (index + 1) * size] for k, v in batch.items()}
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in part.items()}


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def float32_or_wider(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities are computed in at least fp32 (the reference upcasts half-precision logits)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class BasicTrainer:
    """The reference's trainer on one process (CPU or one CUDA device)."""

    @staticmethod
    def make_distribution(config: DictConfig, rank: int, world_size: int) -> Distribution:
        return SingleProcess(config.activation_checkpointing, config.model.block_name, config.device)

    def __init__(
        self,
        policy: nn.Module,
        config: DictConfig,
        seed: int,
        run_dir: str,
        reference_model: nn.Module | None = None,
        rank: int = 0,
        world_size: int = 1,
        tokenizer: Any = None,
    ) -> None:
        self.config, self.seed, self.run_dir = config, seed, run_dir
        self.dist = self.make_distribution(config, rank, world_size)
        self.rank, self.world_size, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self.is_preference = config.loss.name in PREFERENCE_LOSSES
        cache_dir = cache_dir_for(list(config.local_dirs))
        if tokenizer is None:
            from dpokit.models import load_tokenizer

            tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or config.model.name_or_path, cache_dir)
        self.tokenizer = tokenizer

        self.policy = self.dist.wrap_policy(policy)
        self.reference_model = self.dist.wrap_reference(reference_model) if reference_model is not None else None

        self.data_kwargs = dict(
            tokenizer=self.tokenizer,
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            sft_mode=config.loss.name == "sft",
            seed=seed,
            shuffle=True,
        )
        self.train_examples = load_examples(list(config.datasets), "train", cache_dir)
        eval_examples = load_examples(list(config.datasets), "test", cache_dir)
        self.eval_batches = list(
            BatchIterator(
                eval_examples,
                **self.data_kwargs,
                batch_size=config.eval_batch_size,
                n_examples=config.n_eval_examples,
                split="test",
            )
        )
        self.print(
            f"Loaded {len(self.train_examples)} train prompts and {len(self.eval_batches)} eval batches "
            f"of size {config.eval_batch_size}"
        )

        # built after the policy is wrapped: under FSDP it must see the sharded parameters
        self.optimizer = getattr(torch.optim, config.optimizer)(self.policy.parameters(), lr=config.lr)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1))
        )
        self.checkpointer = Checkpointer(
            run_dir,
            CheckpointSettings.from_config(config.checkpoint),
            policy=self.policy,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.trainer_state,
            dist=self.dist,
            run_config=OmegaConf.to_container(config, resolve=True),  # type: ignore[arg-type]
            log=self.print,
        )
        self.checkpointer.sweep()
        self.example_counter = 0
        self.batch_counter = 0
        self.resumed_rng: dict | None = None
        self.final_metrics: dict = {}
        self._wandb: Any = None

    @property
    def failed_saves(self) -> list[str]:
        return self.checkpointer.failed

    def print(self, *args: Any) -> None:
        rank0_print(*args, rank=self.rank)

    # ---------------------------------------------------------------------------------------
    # forward passes and losses

    def concatenated_forward(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected through the model as one batch (one forward instead of two)."""
        cat = losses.concatenated_inputs(batch)
        # no KV cache: nothing is generated, and a cache filled in forward breaks recomputation
        # under activation checkpointing
        out = model(cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"], use_cache=False)
        logps = losses.batch_logps(float32_or_wider(out.logits), cat["concatenated_labels"])
        n = batch["chosen_input_ids"].shape[0]
        return logps[:n], logps[n:]

    def get_batch_metrics(self, batch: dict, loss_config: DictConfig, train: bool = True) -> tuple[torch.Tensor, dict]:
        split = "train" if train else "eval"
        metrics = {}
        if self.is_preference:
            assert self.reference_model is not None
            chosen_logps, rejected_logps = self.concatenated_forward(self.policy, batch)
            with torch.no_grad():
                ref_chosen, ref_rejected = self.concatenated_forward(self.reference_model, batch)
            loss_kwargs = {"beta": loss_config.beta, "ipo": loss_config.name == "ipo"}
            if loss_config.name == "dpo":
                loss_kwargs.update(
                    label_smoothing=loss_config.label_smoothing, reference_free=loss_config.reference_free
                )
            per_example, chosen_rewards, rejected_rewards = losses.preference_loss(
                chosen_logps, rejected_logps, ref_chosen, ref_rejected, **loss_kwargs
            )
            metrics[f"rewards_{split}/chosen"] = chosen_rewards
            metrics[f"rewards_{split}/rejected"] = rejected_rewards
            metrics[f"rewards_{split}/accuracies"] = (chosen_rewards > rejected_rewards).float()
            metrics[f"rewards_{split}/margins"] = chosen_rewards - rejected_rewards
            metrics[f"logps_{split}/rejected"] = rejected_logps.detach()
        else:
            out = self.policy(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"], use_cache=False)
            chosen_logps = losses.batch_logps(float32_or_wider(out.logits), batch["chosen_labels"])
            per_example = losses.sft_loss(chosen_logps)
        metrics[f"logps_{split}/chosen"] = chosen_logps.detach()
        metrics[f"loss/{split}"] = per_example.detach()
        return per_example.mean(), {k: self.dist.gather(v).cpu().tolist() for k, v in metrics.items()}

    def clip_gradient(self) -> float:
        return self.dist.clip_grad_norm(self.policy, self.config.max_grad_norm)

    # ---------------------------------------------------------------------------------------
    # evaluation

    def get_batch_samples(self, batch: dict) -> tuple[list[str], list[str]]:
        """Sampled completions of this process's prompts, from the policy and (DPO/IPO) the reference."""

        def sample(model: Any) -> list[str]:
            out = model.generate(
                batch["prompt_input_ids"],
                attention_mask=batch["prompt_attention_mask"],
                max_length=self.config.max_length,
                do_sample=True,
                pad_token_id=self.tokenizer.pad_token_id,
                **self.dist.generate_kwargs(),
            )
            return self.tokenizer.batch_decode(out, skip_special_tokens=True)

        reference = sample(self.reference_model) if self.reference_model is not None else []
        return sample(self.policy), reference

    def evaluate(self) -> dict:
        self.print(f"Running evaluation after {self.example_counter} train examples")
        self.policy.eval()
        all_metrics = defaultdict(list)
        for eval_batch in tqdm.tqdm(self.eval_batches, desc="Computing eval metrics", disable=self.rank != 0):
            local = slice_batch(eval_batch, self.rank, self.world_size, self.device)
            with torch.no_grad():
                _, metrics = self.get_batch_metrics(local, self.config.loss, train=False)
            for k, v in metrics.items():
                all_metrics[k].extend(v)
        mean_metrics = {k: sum(v) / len(v) for k, v in all_metrics.items()}
        if self.config.sample_during_eval and self.config.n_eval_model_samples > 0:
            self.sample()
        self.print(f"eval after {self.example_counter}: {formatted(mean_metrics)}")
        self.log(mean_metrics)
        return mean_metrics

    def sample(self) -> None:
        """n_eval_model_samples completions from the first eval batches (gathered from every process)."""
        wanted = self.config.n_eval_model_samples
        n_batches = math.ceil(wanted / self.config.eval_batch_size)
        policy_samples: list[str] = []
        reference_samples: list[str] = []
        for eval_batch in tqdm.tqdm(self.eval_batches[:n_batches], desc="Generating samples", disable=self.rank != 0):
            local = slice_batch(eval_batch, self.rank, self.world_size, self.device)
            with torch.no_grad():
                p, r = self.get_batch_samples(local)
            for mine, into in ((p, policy_samples), (r, reference_samples)):
                into.extend(s for part in self.dist.all_gather_object(mine) for s in part)
        policy_samples, reference_samples = policy_samples[:wanted], reference_samples[:wanted]
        if policy_samples:
            self.print("policy samples:", json.dumps(policy_samples[:2], indent=2)[:2000])
            self._log_samples(policy_samples, reference_samples)

    # ---------------------------------------------------------------------------------------
    # the loop

    def train(self) -> None:
        """SFT, DPO or IPO training with periodic evaluation and checkpoints; ends with an eval."""
        cfg = self.config
        self.print(f"Using {cfg.optimizer} optimizer")
        if self.resumed_rng is None:
            torch.manual_seed(self.seed)
            np.random.seed(self.seed)
            random.seed(self.seed)
        else:
            set_rng_state(self.resumed_rng)
        if self.reference_model is not None:
            self.reference_model.eval()

        train_batches = BatchIterator(
            self.train_examples,
            **self.data_kwargs,
            batch_size=cfg.batch_size,
            n_epochs=cfg.n_epochs,
            n_examples=cfg.n_examples,
            skip_batches=self.batch_counter,
        )
        # a resumed run has already evaluated and saved at the step it resumed from
        resumed_at = self.example_counter if self.resumed_rng is not None else None
        last_log: float | None = None
        for batch in train_batches:
            if (
                self.example_counter % cfg.eval_every == 0
                and (self.example_counter > 0 or cfg.do_first_eval)
                and self.example_counter != resumed_at
            ):
                metrics = self.evaluate()
                if self.example_counter > 0:
                    if cfg.debug:
                        self.print("skipping save in debug mode")
                    else:
                        self.checkpointer.save(self.example_counter, metrics)

            start = time.time()
            batch_metrics = self.train_step(batch)
            self.batch_counter += 1
            self.example_counter += cfg.batch_size
            batch_metrics["examples_per_second"].append(cfg.batch_size / (time.time() - start))

            if last_log is None or time.time() - last_log > cfg.minimum_log_interval_secs:
                mean_metrics = {k: sum(v) / len(v) for k, v in batch_metrics.items()}
                mean_metrics["counters/examples"] = self.example_counter
                mean_metrics["counters/updates"] = self.batch_counter
                self.print(f"train stats after {self.example_counter} examples: {formatted(mean_metrics)}")
                self.log(mean_metrics)
                last_log = time.time()

        self.final_metrics = self.evaluate()

    def train_step(self, batch: dict) -> dict[str, list]:
        """One optimizer step on a global batch: its gradient_accumulation_steps micro-batches,
        each split across processes, then clipping, the step and the LR schedule."""
        self.policy.train()
        metrics: dict[str, list] = defaultdict(list)
        n_micro = self.config.gradient_accumulation_steps
        for micro in range(n_micro):
            global_micro = slice_batch(batch, micro, n_micro, "cpu")
            local_micro = slice_batch(global_micro, self.rank, self.world_size, self.device)
            loss, micro_metrics = self.get_batch_metrics(local_micro, self.config.loss, train=True)
            (loss / n_micro).backward()
            for k, v in micro_metrics.items():
                metrics[k].extend(v)
        metrics["grad_norm"].append(self.clip_gradient())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return metrics

    # ---------------------------------------------------------------------------------------
    # logging

    def log(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        record = {"step": self.example_counter, **metrics}
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.config.wandb.enabled and not self.config.debug:
            self.wandb().log(metrics, step=self.example_counter)

    def _log_samples(self, policy_samples: list[str], reference_samples: list[str]) -> None:
        if self.rank != 0:
            return
        with open(os.path.join(self.run_dir, "samples.jsonl"), "a") as f:
            record = {"step": self.example_counter, "policy": policy_samples, "reference": reference_samples}
            f.write(json.dumps(record) + "\n")

    def wandb(self) -> Any:
        if self._wandb is None:
            import wandb

            wandb.init(
                entity=self.config.wandb.entity,
                project=self.config.wandb.project,
                name=self.config.exp_name,
                config=OmegaConf.to_container(self.config, resolve=True),
                dir=self.run_dir,
            )
            self._wandb = wandb
        return self._wandb

    # ---------------------------------------------------------------------------------------
    # checkpoints: the reference's two methods, and resume

    def write_state_dict(
        self, step: int, state: dict, metrics: dict | None, filename: str, dir_name: str | None = None
    ) -> None:
        """Write `{'step_idx': step, 'state': state, 'metrics': metrics or {}}` to dir_name/filename
        (dir_name None: {run_dir}/LATEST), atomically; a published directory is republished whole."""
        directory = Path(dir_name) if dir_name is not None else self.checkpointer.latest_dir
        self.checkpointer.write_file(directory, filename, step, state, metrics)

    def save(self, output_dir: str | None = None, metrics: dict | None = None) -> None:
        """policy.pt, optimizer.pt and scheduler.pt (step_idx = example_counter) into output_dir
        (None: {run_dir}/LATEST), published as one directory: all of it or none of it."""
        self.checkpointer.save(self.example_counter, metrics, final=output_dir is None, where=output_dir)

    def trainer_state(self) -> dict:
        """What exact resume needs beyond the three contract files: counters (the data position
        is the number of global batches consumed) and every process's RNG states."""
        rngs = self.dist.all_gather_object(rng_state())
        return {
            "example_counter": self.example_counter,
            "batch_counter": self.batch_counter,
            "rng": rngs[0],
            "rng_per_process": rngs,
            "data": {"seed": self.seed},
        }

    def restore(self, ckpt_dir: str | Path) -> None:
        """Continue from a checkpoint: policy, optimizer, scheduler, counters, RNG, data position."""
        state = self.checkpointer.restore(ckpt_dir)
        self.example_counter = int(state["example_counter"])
        self.batch_counter = int(state["batch_counter"])
        per_process = state.get("rng_per_process") or []
        # the same number of processes continue each its own random stream; otherwise all take the first's
        self.resumed_rng = per_process[self.rank] if len(per_process) == self.world_size else state["rng"]
        self.print(f"resumed from {ckpt_dir} at {self.example_counter} examples ({self.batch_counter} updates)")


class FSDPTrainer(BasicTrainer):
    """The reference's FSDPTrainer: the same loop with the policy and the reference model sharded
    per transformer block by FSDP2 across the processes torchrun started."""

    @staticmethod
    def make_distribution(config: DictConfig, rank: int, world_size: int) -> Distribution:
        return FSDP2(
            config.model.block_name,
            mixed_precision=config.model.fsdp_policy_mp,
            activation_checkpointing=config.activation_checkpointing,
            device=config.device,
        )


TRAINERS: dict[str, type[BasicTrainer]] = {"BasicTrainer": BasicTrainer, "FSDPTrainer": FSDPTrainer}
