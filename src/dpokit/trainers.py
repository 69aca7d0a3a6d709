"""BasicTrainer: the DPO reference's training loop (SFT, DPO, IPO) on CPU or one CUDA device.

The loop evaluates every `eval_every` examples (and saves `step-{examples}` after each evaluation
past the first example), takes one optimizer step per batch with gradient accumulation and
clipping, and logs no more often than `minimum_log_interval_secs`. All disk writes go through
`dpokit.checkpoint.CheckpointStore`.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import tqdm
from omegaconf import DictConfig, OmegaConf

from dpokit import losses
from dpokit.checkpoint import LATEST, TRAINER_STATE, CheckpointStore, load_payload
from dpokit.config import PREFERENCE_LOSSES
from dpokit.data import BatchIterator, cache_dir_for, load_examples
from dpokit.errors import CheckpointError
from dpokit.models import load_tokenizer


def rank0_print(*args, rank: int = 0, **kwargs) -> None:
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
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
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


class BasicTrainer:
    def __init__(
        self,
        policy: nn.Module,
        config: DictConfig,
        seed: int,
        run_dir: str,
        reference_model: nn.Module | None = None,
        rank: int = 0,
        world_size: int = 1,
        tokenizer=None,
    ) -> None:
        self.config, self.seed, self.run_dir = config, seed, run_dir
        self.rank, self.world_size = rank, world_size
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.is_preference = config.loss.name in PREFERENCE_LOSSES
        cache_dir = cache_dir_for(config.local_dirs)

        self.tokenizer = tokenizer or load_tokenizer(
            config.model.tokenizer_name_or_path or config.model.name_or_path, cache_dir
        )
        self.policy = policy.to(self.device)
        self.reference_model = reference_model.to(self.device) if reference_model is not None else None
        if config.activation_checkpointing:
            self.policy.gradient_checkpointing_enable()

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
        rank0_print(
            f"Loaded {len(self.train_examples)} train prompts and {len(self.eval_batches)} eval batches "
            f"of size {config.eval_batch_size}",
            rank=rank,
        )

        self.optimizer = getattr(torch.optim, config.optimizer)(self.policy.parameters(), lr=config.lr)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1))
        )

        ck = config.checkpoint
        self.checkpoints = CheckpointStore(
            Path(run_dir),
            fsync=ck.fsync,
            keep_last=ck.keep_last,
            keep_best=ck.keep_best,
            best_metric=ck.best_metric,
            best_mode=ck.best_mode,
            config=OmegaConf.to_container(config, resolve=True),
            log=lambda msg: rank0_print(msg, rank=rank),
        )
        if rank == 0:
            swept = self.checkpoints.sweep()
            if swept:
                rank0_print(f"removed leftovers of an interrupted save: {', '.join(sorted(swept))}")
        self.example_counter = 0
        self.batch_counter = 0
        self.resumed_rng: dict | None = None
        self.final_metrics: dict = {}
        self.failed_saves: list[str] = []
        self._wandb = None

    # ---------------------------------------------------------------------------------------
    # forward passes and losses

    def concatenated_forward(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected through the model as one batch (one forward instead of two)."""
        cat = losses.concatenated_inputs(batch)
        logits = model(cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"]).logits.to(
            torch.float32
        )
        logps = losses.batch_logps(logits, cat["concatenated_labels"])
        n = batch["chosen_input_ids"].shape[0]
        return logps[:n], logps[n:]

    def get_batch_metrics(self, batch: dict, loss_config: DictConfig, train: bool = True) -> tuple[torch.Tensor, dict]:
        split = "train" if train else "eval"
        metrics = {}
        if self.is_preference:
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
            logits = self.policy(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits.to(
                torch.float32
            )
            chosen_logps = losses.batch_logps(logits, batch["chosen_labels"])
            per_example = losses.sft_loss(chosen_logps)
        metrics[f"logps_{split}/chosen"] = chosen_logps.detach()
        metrics[f"loss/{split}"] = per_example.detach()
        return per_example.mean(), {k: self.gather(v).cpu().tolist() for k, v in metrics.items()}

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """All processes' values, concatenated (a no-op with one process)."""
        return values

    def clip_gradient(self) -> float:
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm).item()

    # ---------------------------------------------------------------------------------------
    # evaluation

    def get_batch_samples(self, batch: dict) -> tuple[list[str], list[str]]:
        def sample(model: nn.Module) -> list[str]:
            out = model.generate(
                batch["prompt_input_ids"],
                attention_mask=batch["prompt_attention_mask"],
                max_length=self.config.max_length,
                do_sample=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            return self.tokenizer.batch_decode(out, skip_special_tokens=True)

        return sample(self.policy), (sample(self.reference_model) if self.is_preference else [])

    def evaluate(self) -> dict:
        rank0_print(f"Running evaluation after {self.example_counter} train examples", rank=self.rank)
        self.policy.eval()
        all_metrics = defaultdict(list)
        for eval_batch in tqdm.tqdm(self.eval_batches, desc="Computing eval metrics", disable=self.rank != 0):
            local = slice_batch(eval_batch, self.rank, self.world_size, self.device)
            with torch.no_grad():
                _, metrics = self.get_batch_metrics(local, self.config.loss, train=False)
            for k, v in metrics.items():
                all_metrics[k].extend(v)
        mean_metrics = {k: sum(v) / len(v) for k, v in all_metrics.items()}

        if self.config.sample_during_eval:
            n_batches = self.config.n_eval_model_samples // self.config.eval_batch_size
            policy_samples, reference_samples = [], []
            for eval_batch in tqdm.tqdm(
                self.eval_batches[:n_batches], desc="Generating samples", disable=self.rank != 0
            ):
                local = slice_batch(eval_batch, self.rank, self.world_size, self.device)
                with torch.no_grad():
                    p, r = self.get_batch_samples(local)
                policy_samples += p
                reference_samples += r
            if policy_samples:
                rank0_print("policy samples:", json.dumps(policy_samples[:2], indent=2)[:2000], rank=self.rank)
                self._log_samples(policy_samples, reference_samples)

        rank0_print(f"eval after {self.example_counter}: {formatted(mean_metrics)}", rank=self.rank)
        self.log(mean_metrics)
        return mean_metrics

    # ---------------------------------------------------------------------------------------
    # the loop

    def train(self) -> None:
        """SFT, DPO or IPO training with periodic evaluation and checkpoints; ends with an eval."""
        rank0_print(f"Using {self.config.optimizer} optimizer", rank=self.rank)
        if self.resumed_rng is None:
            torch.manual_seed(self.seed)
            np.random.seed(self.seed)
            random.seed(self.seed)
        else:
            set_rng_state(self.resumed_rng)
        if self.is_preference:
            self.reference_model.eval()

        cfg = self.config
        train_batches = BatchIterator(
            self.train_examples,
            **self.data_kwargs,
            batch_size=cfg.batch_size,
            n_epochs=cfg.n_epochs,
            n_examples=cfg.n_examples,
            skip_batches=self.batch_counter,
        )
        resumed_at = self.example_counter if self.resumed_rng is not None else None
        last_log = None
        for batch in train_batches:
            # evaluation (and checkpoint) every eval_every examples; a resumed run has already
            # evaluated and saved at the step it resumed from
            if (
                self.example_counter % cfg.eval_every == 0
                and (self.example_counter > 0 or cfg.do_first_eval)
                and self.example_counter != resumed_at
            ):
                metrics = self.evaluate()
                if self.example_counter > 0:
                    if cfg.debug:
                        rank0_print("skipping save in debug mode", rank=self.rank)
                    else:
                        self.save_or_warn(os.path.join(self.run_dir, f"step-{self.example_counter}"), metrics)

            # one optimizer step over gradient_accumulation_steps micro-batches
            self.policy.train()
            start = time.time()
            batch_metrics = defaultdict(list)
            n_micro = cfg.gradient_accumulation_steps
            for micro in range(n_micro):
                global_micro = slice_batch(batch, micro, n_micro, "cpu")
                local_micro = slice_batch(global_micro, self.rank, self.world_size, self.device)
                loss, metrics = self.get_batch_metrics(local_micro, cfg.loss, train=True)
                (loss / n_micro).backward()
                for k, v in metrics.items():
                    batch_metrics[k].extend(v)
            grad_norm = self.clip_gradient()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()

            self.batch_counter += 1
            self.example_counter += cfg.batch_size
            batch_metrics["examples_per_second"].append(cfg.batch_size / (time.time() - start))
            batch_metrics["grad_norm"].append(grad_norm)

            if last_log is None or time.time() - last_log > cfg.minimum_log_interval_secs:
                mean_metrics = {k: sum(v) / len(v) for k, v in batch_metrics.items()}
                mean_metrics["counters/examples"] = self.example_counter
                mean_metrics["counters/updates"] = self.batch_counter
                rank0_print(
                    f"train stats after {self.example_counter} examples: {formatted(mean_metrics)}", rank=self.rank
                )
                self.log(mean_metrics)
                last_log = time.time()

        self.final_metrics = self.evaluate()

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
            f.write(
                json.dumps({"step": self.example_counter, "policy": policy_samples, "reference": reference_samples})
                + "\n"
            )

    def wandb(self):
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
    # checkpoints (the reference's two methods, written through the checkpoint store)

    def write_state_dict(
        self, step: int, state: dict, metrics: dict | None, filename: str, dir_name: str | None = None
    ) -> None:
        """Write `{'step_idx': step, 'state': state, 'metrics': metrics or {}}` to dir_name/filename
        (dir_name None: {run_dir}/LATEST), atomically; a published directory is republished whole."""
        if dir_name is None:
            dir_name = os.path.join(self.run_dir, LATEST)
        self.checkpoints.write(Path(dir_name), filename, step, state, metrics)

    def trainer_state(self) -> dict:
        """What exact resume needs beyond the three contract files."""
        return {
            "example_counter": self.example_counter,
            "batch_counter": self.batch_counter,
            "rng": rng_state(),
            "data": {"train_batches_consumed": self.batch_counter, "seed": self.seed},
        }

    def save(self, output_dir: str | None = None, metrics: dict | None = None) -> None:
        """policy.pt, optimizer.pt and scheduler.pt (step_idx = example_counter) into output_dir
        (None: {run_dir}/LATEST), published as one directory: all of it or none of it."""
        target = Path(output_dir) if output_dir is not None else Path(self.run_dir) / LATEST
        if self.rank != 0:
            return
        rank0_print(f"saving checkpoint to {target}...", rank=self.rank)
        staging = self.checkpoints.begin(parent=target.parent)
        try:
            step = self.example_counter
            self.write_state_dict(step, self.policy.state_dict(), metrics, "policy.pt", str(staging))
            if self.config.checkpoint.save_optimizer:
                self.write_state_dict(step, self.optimizer.state_dict(), metrics, "optimizer.pt", str(staging))
                self.write_state_dict(step, self.scheduler.state_dict(), metrics, "scheduler.pt", str(staging))
                self.checkpoints.write(staging, TRAINER_STATE, step, self.trainer_state(), metrics)
            self.checkpoints.publish(staging, target.name, step, metrics, parent=target.parent)
        except CheckpointError as err:
            self.checkpoints.abort(staging)
            raise CheckpointError(
                f"saving checkpoint {target} failed, earlier checkpoints are untouched ({err})"
            ) from None
        except BaseException:
            self.checkpoints.abort(staging)
            raise
        if target.parent == Path(self.run_dir):
            self.checkpoints.after_publish()

    def save_or_warn(self, output_dir: str | None, metrics: dict | None) -> None:
        """save(), but with checkpoint.on_error=warn a failed save is reported and training goes on."""
        try:
            self.save(output_dir, metrics)
        except CheckpointError as err:
            if self.config.checkpoint.on_error != "warn":
                raise
            self.failed_saves.append(str(err))
            rank0_print(
                f"WARNING: checkpoint not saved ({err}); training goes on (checkpoint.on_error=warn)", rank=self.rank
            )

    def load_resume_state(self, ckpt_dir: Path) -> None:
        """Restore optimizer, scheduler, counters and RNG from a checkpoint (policy weights are
        loaded by the caller, like model.archive)."""
        for name in ("optimizer.pt", "scheduler.pt", TRAINER_STATE):
            if not (ckpt_dir / name).is_file():
                raise CheckpointError(
                    f"cannot resume from {ckpt_dir}: it has no {name} (saved with checkpoint.save_optimizer=false or by "
                    f"another tool); start a new run from its weights with model.archive={ckpt_dir} instead"
                )
        self.optimizer.load_state_dict(load_payload(ckpt_dir / "optimizer.pt")["state"])
        self.scheduler.load_state_dict(load_payload(ckpt_dir / "scheduler.pt")["state"])
        state = load_payload(ckpt_dir / TRAINER_STATE)["state"]
        self.example_counter = int(state["example_counter"])
        self.batch_counter = int(state["batch_counter"])
        self.resumed_rng = state["rng"]
        rank0_print(
            f"resumed from {ckpt_dir} at {self.example_counter} examples ({self.batch_counter} updates)", rank=self.rank
        )
