"""The DPO reference's training loop (SFT, DPO, IPO): `BasicTrainer` and `FSDPTrainer`.

One loop for both: evaluate every `eval_every` examples (and save `step-{examples}` after each
evaluation past the first example), one optimizer step per batch with gradient accumulation and
clipping, logs no more often than `minimum_log_interval_secs`. How the models are placed,
gradients clipped, metrics gathered and checkpoint state collected is the `Distribution`'s
business (`dpokit.distributed`); what goes to disk and how is the `Checkpointer`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from dpokit import loss_registry, losses, packing, progress
from dpokit.checkpoint import Checkpointer, CheckpointSettings, ResumePoint
from dpokit.data import (
    Prefetched,
    PreparedData,
    cache_dir_for,
    eval_iterator,
    length_groups,
    prepare_data,
    token_counts,
    train_iterator,
)
from dpokit.distributed import FSDP2, Distribution, SingleProcess, configure_tf32, mix_weights
from dpokit.tracking import Tracker, drop_metrics_after

# in the precomputed reference log-probs' cache key; 2: a half-precision reference keeps its float
# buffers (rotary inv_freq) in float32, which its weights' fingerprint does not show, and
# right-padded batches run without an attention mask (other attention kernels: other rounding)
REFERENCE_LOGPS_FORMAT = 2


def state_fingerprint(state: Any) -> str:
    """xxh3 of every tensor's bytes (a model, or a dict of tensors): what identifies weights or data."""
    import xxhash

    h = xxhash.xxh3_128()
    items = state.state_dict().items() if isinstance(state, nn.Module) else state.items()
    for name, tensor in sorted(items):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rank0_print(*args: Any, rank: int = 0, **kwargs: Any) -> None:
    if rank == 0:
        print(*args, **kwargs, flush=True)


def formatted(metrics: dict) -> dict:
    return {k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in metrics.items()}


def slice_batch(batch: dict, index: int, n_slices: int) -> dict:
    """The index-th of n_slices equal parts of a batch. Batches stay on the CPU until a forward
    needs them (`to_device`): what is computed from them on the way (the predicting positions,
    the lookup of precomputed log-probs) then never waits for the device."""
    size = len(next(iter(batch.values()))) // n_slices
    return {k: v[index * size : (index + 1) * size] for k, v in batch.items()}


def nll_scale_of(batch: dict) -> float:
    """Examples per chosen response token of a (whole) batch: an example's summed NLL times this
    averages, over the batch, to the per-token mean NLL, whatever the micro-batches, length
    groups and processes the batch is split into."""
    labels = batch["chosen_labels"]
    return labels.shape[0] / max(int((labels[:, 1:] != -100).sum()), 1)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A tensor from the CPU on the device. To CUDA through page-locked memory and without
    blocking: a copy from pageable memory ends with a stream synchronize, so the host would wait
    for all the work queued before it instead of preparing the next batch meanwhile."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def only_right_padding(attention_mask: torch.Tensor) -> bool:
    """Whether a (CPU) attention mask marks nothing but padding after each row's tokens. Then a
    causal model needs no mask: each real token attends only to the tokens before it, all real,
    so its logits are the same (up to the attention kernel's rounding), and the model runs
    causal attention (flash kernels) without building a 4-D mask. transformers also inspects a
    mask it is given on the device (`bool(mask.sum() == mask.numel())`), which on CUDA makes the
    host wait for the GPU at the start of every forward."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def gather_metrics(
    dist: Distribution, per_example: dict[str, list[torch.Tensor]], per_process: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Metrics of every process on the host, through one collective and one copy from the device.

    per_example: 1-D tensors, one value per example (the same number of examples on every
    process), in pieces (micro-batches, length groups, eval batches; on the device or the CPU)
    that are concatenated; they come back as lists of floats, process by process. per_process:
    one process's values (token counts, the gradient norm) that come back as a (processes,
    values) tensor. Gathering each piece as it is computed would make the host wait for the
    device once per forward, and before the backward is queued; this way it waits once, at the
    end.
    """
    per_process = per_process or {}
    device = dist.device
    names = list(per_example)
    columns = [torch.cat([to_device(piece, device) for piece in per_example[k]]).double() for k in names]
    n_rows = len(columns[0]) if columns else 0
    local = torch.cat([
        torch.stack(columns, 1).flatten() if columns else torch.zeros(0, dtype=torch.float64, device=device),
        *(to_device(v, device).double().flatten() for v in per_process.values()),
    ])  # fmt: skip
    every = dist.gather(local).view(-1, len(local)).cpu()  # (processes, values); exact: float64 holds them all
    rows = every[:, : n_rows * len(names)].reshape(-1, len(names))
    gathered = {k: rows[:, i].tolist() for i, k in enumerate(names)}
    offset, by_process = n_rows * len(names), {}
    for k, v in per_process.items():
        by_process[k] = every[:, offset : offset + v.numel()]
        offset += v.numel()
    return gathered, by_process


def cuda_memory(device: torch.device) -> dict[str, torch.Tensor]:
    """On CUDA, the most memory this process's tensors have taken since the trainer started, and
    the most the caching allocator has held (GiB): how close the run has come to running out.
    Read from the allocator's counters on the host: no wait for the device."""
    if device.type != "cuda":
        return {}
    gib = 2.0**30
    return {
        "memory/cuda_peak_allocated_gib": torch.tensor([torch.cuda.max_memory_allocated(device) / gib]),
        "memory/cuda_peak_reserved_gib": torch.tensor([torch.cuda.max_memory_reserved(device) / gib]),
    }


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
        # one state per GPU the saving process saw; a machine with fewer takes the first ones
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


class StopTraining(Exception):
    """Raised out of the loop after the step during which Ctrl-C or SIGTERM arrived."""

    def __init__(self, examples: int) -> None:
        super().__init__(f"stopped after {examples} examples")
        self.examples = examples


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
        data: PreparedData | None = None,
    ) -> None:
        self.config, self.seed, self.run_dir = config, seed, run_dir
        self.dist = self.make_distribution(config, rank, world_size)
        self.rank, self.world_size, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        if self.device.type == "cuda":  # the peaks logged are this run's (another may have run in this process)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.objective = loss_registry.objective(config)
        cache_dir = cache_dir_for(list(config.local_dirs))
        if tokenizer is None:
            from dpokit.models import load_tokenizer

            tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or config.model.name_or_path, cache_dir)
        self.tokenizer = tokenizer

        configure_tf32(config.tf32)
        reference_weights = None
        if config.precompute_ref_log_probs and reference_model is not None:
            reference_weights = state_fingerprint(reference_model)  # before it is sharded
        self.policy = self.dist.wrap_policy(policy)
        self.reference_model = self.dist.wrap_reference(reference_model) if reference_model is not None else None

        if data is None:
            data = prepare_data(config, self.tokenizer, log=self.print, progress=self.rank == 0)
        self.data = data
        self.eval_batches = list(eval_iterator(config, data, self.tokenizer, seed, self.world_size))
        self.precomputed: dict[str, torch.Tensor] | None = None
        if reference_weights is not None:
            self.precomputed = self.precompute_reference_logps(reference_weights)
            self.reference_model = None  # its work is done: free its memory
        self.print(
            f"Loaded {len(data.train)} train prompts and {len(self.eval_batches)} eval batches "
            f"of size {config.eval_batch_size}"
        )
        if self.objective.data == "unpaired":
            note = self.objective.balance_note(data.train_tokens.desirable)
            if note:
                self.print(note)

        # built after the policy is wrapped: under FSDP it must see the sharded parameters
        self.optimizer = getattr(torch.optim, config.optimizer)(self.policy.parameters(), lr=config.lr)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1))
        )
        self.checkpointer = Checkpointer(
            run_dir,
            CheckpointSettings.from_config(config.checkpoint, save_merged=config.lora.save_merged),
            policy=self.policy,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.trainer_state,
            dist=self.dist,
            run_config=OmegaConf.to_container(config, resolve=True),  # type: ignore[arg-type]
            log=self.print,
            record=lambda stats: self.log(stats),
            reference=self.reference_model if self.objective.sync is not None else None,
        )
        self.checkpointer.sweep()
        self.tracker = Tracker(run_dir, config, enabled=self.rank == 0)
        self.example_counter = 0
        self.batch_counter = 0
        self.resumed_rng: dict | None = None
        self.resumed_at: int | None = None  # examples at the resume point; None: a fresh run
        self.final_metrics: dict = {}
        self.stop_requested = False

    @property
    def failed_saves(self) -> list[str]:
        return self.checkpointer.failed

    def print(self, *args: Any) -> None:
        rank0_print(*args, rank=self.rank)

    # ---------------------------------------------------------------------------------------
    # forward passes and losses

    def autocast(self) -> Any:
        """mixed_precision=bf16: forward passes in bfloat16 where it is safe (torch.autocast)."""
        if self.config.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict:
        """A batch's forward inputs on the device, prepared on the CPU once for every model that
        reads them (policy and reference). The positions whose logits are needed are found on
        the CPU, so the host does not wait for the device to know how many there are and can
        queue a forward while the previous backward still runs; a mask that marks only right
        padding is left out (`only_right_padding`)."""
        device = self.device
        row_tokens = packing.row_tokens(self.config)
        if row_tokens is not None:  # the model reads packed rows; the losses read `labels` as without
            packed = packing.pack(input_ids, attention_mask, labels, row_tokens)
            return {
                "input_ids": to_device(packed.input_ids, device),
                "attention_mask": None,  # position_ids restarting at 0 confine attention (`packing`)
                "position_ids": to_device(packed.position_ids, device),
                "labels": to_device(labels, device),
                "model_labels": to_device(packed.labels, device),
                "positions": to_device(losses.predicted_indices(packed.labels), device),
                "unpack": (to_device(packed.source, device), to_device(packed.target, device), packed.padded_shape),
            }
        return {
            "input_ids": to_device(input_ids, device),
            "attention_mask": None if only_right_padding(attention_mask) else to_device(attention_mask, device),
            "labels": to_device(labels, device),
            "positions": to_device(losses.predicted_indices(labels), device),
        }

    def pair_inputs(self, batch: dict) -> dict:
        """Chosen and rejected as one batch (one forward instead of two), on the device; with
        LD-DPO (loss.ld_alpha), each token's weight too."""
        cat = losses.concatenated_inputs(batch)
        inputs = self.model_inputs(
            cat["concatenated_input_ids"], cat["concatenated_attention_mask"], cat["concatenated_labels"]
        )
        if self.objective.ld_alpha is not None:
            weights = losses.ld_token_weights(batch["chosen_labels"], batch["rejected_labels"], self.objective.ld_alpha)
            inputs["token_weights"] = to_device(weights, self.device)
        return inputs

    def token_logps(self, model: nn.Module, inputs: dict, aligned: bool = False) -> tuple[torch.Tensor, Any]:
        """log p(labelled token) at each position of each sequence of `model_inputs` (rows,
        seq - 1); aligned: also WPO's log p - log sum p^2 at each position (else None)."""
        labels, positions = inputs.get("model_labels", inputs["labels"]), inputs["positions"]
        extra = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}
        # no KV cache: nothing is generated, and a cache filled in forward breaks recomputation
        # under activation checkpointing
        with self.autocast(), losses.logits_where_predicted(model, labels, positions):
            out = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, **extra)
        per_token = losses.token_logps(out.logits, labels, positions=positions)
        alignment = (
            per_token.detach() - losses.token_log_sum_sq_probs(out.logits, labels, positions) if aligned else None
        )
        if "unpack" in inputs:  # from the packed rows to the padded batch's positions
            per_token = packing.unpack(per_token, *inputs["unpack"])
            alignment = None if alignment is None else packing.unpack(alignment, *inputs["unpack"])
        return per_token, alignment

    def sequence_logps(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """log p(labelled tokens) of each sequence of `model_inputs`."""
        return losses.sequence_logps(self.token_logps(model, inputs)[0], inputs["labels"])

    def reduced_logps(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """The sequence log-probs of `model_inputs` as the loss reads them: summed, or
        LD-weighted or length-averaged where the loss says so."""
        per_token, _ = self.token_logps(model, inputs)
        return self.objective.reduce(per_token, inputs["labels"], inputs.get("token_weights"))

    def concatenated_forward(
        self, model: nn.Module, batch: dict, inputs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected log-probs through the model as one batch (`inputs`: the batch's
        `pair_inputs`, when another model has read them already)."""
        logps = self.reduced_logps(model, inputs if inputs is not None else self.pair_inputs(batch))
        n = batch["chosen_input_ids"].shape[0]
        return logps[:n], logps[n:]

    def get_batch_metrics(
        self,
        batch: dict,
        loss_config: DictConfig,
        train: bool = True,
        nll_scale: float | None = None,
        kl: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of this process's part of a batch, and its metrics, one value per example,
        still on the device (`gather_metrics` brings a whole step's to the host at once).
        `loss_config` is the one the trainer's objective was built from (the reference's
        signature). What the whole batch this part belongs to decides: nll_scale, its examples
        per chosen response token (`nll_scale_of`), for losses with an NLL term; kl, KTO's KL
        estimate (`kl_estimate`). None: this part's own."""
        split = "train" if train else "eval"
        objective = self.objective
        if objective.data != "paired":  # one response per row: an SFT target, or a labelled completion
            inputs = self.model_inputs(
                batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"]
            )
            per_token, _ = self.token_logps(self.policy, inputs)
            if objective.data == "sft":
                per_example, metrics = objective.sft(per_token, split)
                return per_example.mean(), metrics
            completion_reference = None
            if objective.needs_reference:
                assert self.reference_model is not None
                with torch.no_grad():
                    completion_reference = self.reduced_logps(self.reference_model, inputs)
            kl = kl if kl is not None else self.kl_estimate([batch])
            desirable = to_device(batch["desirable"], self.device)
            per_example, metrics = objective.unpaired(
                per_token, inputs["labels"], completion_reference, desirable, kl, split
            )
            return per_example.mean(), metrics
        inputs = self.pair_inputs(batch)
        per_token, aligned = self.token_logps(self.policy, inputs, aligned=objective.wpo)
        reference = self.reference_logps(batch, split, inputs) if objective.needs_reference else None
        scale = nll_scale if nll_scale is not None else nll_scale_of(batch)
        per_example, metrics = objective.paired(per_token, inputs, reference, scale, aligned, split)
        return per_example.mean(), metrics

    def kl_estimate(self, parts: list[dict]) -> torch.Tensor:
        """KTO's z0 for a batch (its parts on this process): the mean over every process's rows
        of log pi(y'|x) - log ref(y'|x) for the mismatched pairs `kl_*` (each prompt with
        another row's completion), clamped at 0 and without gradient, as in the paper and TRL.
        Collective: one gather, whatever the number of parts; stays on the device."""
        if not self.objective.kl:
            return torch.zeros((), device=self.device)
        assert self.reference_model is not None
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of differences, rows
        with torch.no_grad():
            for part in parts:
                inputs = self.model_inputs(part["kl_input_ids"], part["kl_attention_mask"], part["kl_labels"])
                diff = self.reduced_logps(self.policy, inputs) - self.reduced_logps(self.reference_model, inputs)
                total += torch.stack([diff.double().sum(), diff.new_tensor(len(diff), dtype=torch.float64)])
        every = self.dist.gather(total).view(-1, 2).sum(0)
        return (every[0] / every[1]).float().clamp(min=0)

    def reference_logps(self, batch: dict, split: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen reference model's log-probs of chosen and rejected: looked up when they were
        precomputed (precompute_ref_log_probs), else computed from the policy's `inputs`."""
        if self.precomputed is not None:
            table = to_device(self.precomputed[split][batch["item_index"]], self.device)
            return table[:, 0], table[:, 1]
        assert self.reference_model is not None
        with torch.no_grad():
            return self.concatenated_forward(self.reference_model, batch, inputs)

    def precompute_reference_logps(self, reference_weights: str) -> dict[str, torch.Tensor]:
        """The reference model's log-probs of the train and eval items this run will visit,
        computed once (progress bar) and kept on disk keyed by the tokenized data, the reference
        weights, its dtype, the device, TF32, mixed precision and fused GELU. The table has a row
        per item (NaN: not computed yet): a later run with the same key computes only the items
        it lacks."""
        from dpokit.data import every_item

        cfg = self.config
        splits = {"train": train_iterator(cfg, self.data, self.tokenizer, self.seed),
                  "eval": eval_iterator(cfg, self.data, self.tokenizer, self.seed, self.world_size)}  # fmt: skip
        key = hashlib.sha256(json.dumps([
            REFERENCE_LOGPS_FORMAT, [state_fingerprint(vars(it.tokenized)) for it in splits.values()],
            reference_weights, cfg.model.reference_dtype, self.device.type, cfg.mixed_precision, cfg.tf32,
            cfg.model.fused_gelu, cfg.max_length, cfg.max_prompt_length, *self.objective.reference_key(),
            # other kernels, other rounding: in the key when not the defaults (earlier keys stay valid)
            *([["attention", cfg.model.attn_implementation]] if cfg.model.attn_implementation else []),
            *([["packing", packing.row_tokens(cfg)]] if cfg.packing else []),
        ]).encode()).hexdigest()[:24]  # fmt: skip
        path = Path(cache_dir_for(list(cfg.local_dirs))) / "reference_logps" / f"{key}.pt"
        tables = torch.load(path, weights_only=True) if path.is_file() else {}
        computed = 0
        for split, iterator in splits.items():
            n_items = len(iterator.tokenized.offsets)
            table = tables.get(split)
            if table is None or table.shape != (n_items, 2):
                table = tables[split] = torch.full((n_items, 2), float("nan"))
            visited = torch.tensor(sorted(set(iterator.items())), dtype=torch.long)
            missing = set(visited[table[visited].isnan().any(1)].tolist())
            if not missing:
                continue
            assert self.reference_model is not None
            size = cfg.eval_batch_size
            batches = every_item(iterator, size, only=missing)
            found: dict[str, list[torch.Tensor]] = defaultdict(list)
            for batch in progress.bar(batches, total=-(-len(missing) // size), desc=f"Reference log-probs ({split})",
                                      enabled=self.rank == 0):  # fmt: skip
                local = slice_batch(batch, self.rank, self.world_size)
                with torch.no_grad():
                    chosen, rejected = self.concatenated_forward(self.reference_model, local)
                for k, v in (("index", local["item_index"]), ("chosen", chosen), ("rejected", rejected)):
                    found[k].append(v)
            every, _ = gather_metrics(self.dist, found)  # item indices are exact in float64
            index = torch.tensor(every["index"], dtype=torch.long)
            table[index] = torch.tensor([every["chosen"], every["rejected"]]).T.float()
            computed += len(missing)
        if computed == 0:
            self.print(f"reference log-probs from {path}")
        elif self.rank == 0:
            from dpokit.checkpoint import atomic_write

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: torch.save(tables, f), fsync=False)
        return tables

    def clip_gradient(self) -> torch.Tensor:
        return self.dist.clip_grad_norm(self.policy, self.config.max_grad_norm)

    # ---------------------------------------------------------------------------------------
    # evaluation

    def get_batch_samples(self, batch: dict) -> tuple[list[str], list[str]]:
        """Sampled completions of this process's prompts, from the policy and (DPO/IPO) the reference."""

        def sample(model: Any) -> list[str]:
            out = model.generate(
                to_device(batch["prompt_input_ids"], self.device),
                attention_mask=to_device(batch["prompt_attention_mask"], self.device),
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
        per_example: dict[str, list[torch.Tensor]] = defaultdict(list)
        for eval_batch in progress.bar(self.eval_batches, desc="Computing eval metrics", enabled=self.rank == 0):
            local = slice_batch(eval_batch, self.rank, self.world_size)
            with torch.no_grad():
                _, metrics = self.get_batch_metrics(
                    local, self.config.loss, train=False, nll_scale=nll_scale_of(eval_batch)
                )
            for k, v in metrics.items():
                per_example[k].append(v)
        all_metrics, _ = gather_metrics(self.dist, per_example)
        mean_metrics = self.objective.means(all_metrics, "eval")
        if self.config.sample_during_eval and self.config.n_eval_model_samples > 0:
            self.sample()
        self.print(f"eval after {self.example_counter}: {formatted(mean_metrics)}")
        self.log(mean_metrics)
        return mean_metrics

    def sample(self) -> None:
        """n_eval_model_samples completions of the first eval prompts, from every process, into
        samples/step-N.jsonl; the first few are printed."""
        wanted = self.config.n_eval_model_samples
        n_batches = math.ceil(wanted / self.config.eval_batch_size)
        prompts: list[str] = []
        policy_samples: list[str] = []
        reference_samples: list[str] = []
        for eval_batch in progress.bar(
            self.eval_batches[:n_batches], desc="Generating samples", enabled=self.rank == 0
        ):
            local = slice_batch(eval_batch, self.rank, self.world_size)
            with torch.no_grad():
                p, r = self.get_batch_samples(local)
            for mine, into in ((local["prompt"], prompts), (p, policy_samples), (r, reference_samples)):
                into.extend(s for part in self.dist.all_gather_object(mine) for s in part)
        policy_samples, reference_samples = policy_samples[:wanted], reference_samples[:wanted]
        written = self.tracker.samples(self.example_counter, prompts[:wanted], policy_samples, reference_samples)
        for text in policy_samples[:2]:
            self.print(f"policy sample: {json.dumps(text)[:1000]}")
        if written is not None:
            self.print(f"{len(policy_samples)} samples in {written}")

    # ---------------------------------------------------------------------------------------
    # the loop

    def train(self) -> None:
        """SFT, DPO or IPO training with periodic evaluation and checkpoints; ends with an eval.
        Ctrl-C or SIGTERM stops it after the current step (StopTraining); a second Ctrl-C at once."""
        cfg = self.config
        self.print(f"Using {cfg.optimizer} optimizer")
        self.seed_or_restore_rng()
        if self.reference_model is not None:
            self.reference_model.eval()
        stream = train_iterator(cfg, self.data, self.tokenizer, self.seed, skip_batches=self.batch_counter)
        batches = Prefetched(stream)
        bar = progress.bar(
            total=len(stream) * cfg.batch_size, initial=self.example_counter, desc="Training", unit="ex",
            enabled=self.rank == 0, leave=True,
        )  # fmt: skip
        last_log: float | None = None
        with self.stop_on_signals(), bar:
            for batch in batches:
                if self.evaluation_due():
                    metrics = self.evaluate()
                    if self.example_counter > 0 and not cfg.debug:  # the reference saves nothing in debug mode
                        self.checkpointer.save(self.example_counter, metrics)

                start = time.time()
                batch_metrics = self.train_step(batch, meanwhile=batches.prefetch)
                self.batch_counter += 1
                self.example_counter += cfg.batch_size
                self.update_reference()
                batch_metrics["examples_per_second"] = [cfg.batch_size / (time.time() - start)]
                bar.update(cfg.batch_size)

                loss_state = self.objective.after_step(batch_metrics)
                if last_log is None or time.time() - last_log > cfg.minimum_log_interval_secs:
                    mean_metrics = self.objective.means(batch_metrics, "train") | loss_state
                    mean_metrics["counters/examples"] = self.example_counter
                    mean_metrics["counters/updates"] = self.batch_counter
                    bar.set_postfix(loss=f"{mean_metrics['loss/train']:.4g}", refresh=False)
                    self.print(f"train stats after {self.example_counter} examples: {formatted(mean_metrics)}")
                    self.log(mean_metrics)
                    last_log = time.time()
                if self.dist.any(self.stop_requested):  # every process stops after the same step
                    raise StopTraining(self.example_counter)
        self.final_metrics = self.evaluate() if cfg.final_eval else {}

    def update_reference(self) -> None:
        """TR-DPO (loss.sync_ref_model): every ref_model_sync_steps optimizer steps the reference
        becomes alpha * policy + (1 - alpha) * reference."""
        if self.objective.sync is None or self.reference_model is None:
            return
        every, alpha = self.objective.sync
        if self.batch_counter % every == 0:
            mix_weights(self.reference_model, self.policy, alpha)

    def evaluation_due(self) -> bool:
        """Every eval_every examples (at 0 only with do_first_eval), but not again at the step a
        resumed run starts from: its run evaluated and saved there already."""
        n = self.example_counter
        return n % self.config.eval_every == 0 and n != self.resumed_at and (n > 0 or self.config.do_first_eval)

    def seed_or_restore_rng(self) -> None:
        if self.resumed_rng is None:
            torch.manual_seed(self.seed)
            np.random.seed(self.seed)
            random.seed(self.seed)
        else:
            set_rng_state(self.resumed_rng)

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM ask the loop to stop after the current step; a second Ctrl-C stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.print(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to stop now)")

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def train_step(self, batch: dict, meanwhile: Callable[[], None] = lambda: None) -> dict[str, list]:
        """One optimizer step on a global batch: its gradient_accumulation_steps micro-batches,
        each split across processes (and, with length_groups, into groups of similar length,
        weighted so that the loss and gradient are the micro-batch's mean), then clipping, the
        step and the LR schedule. `meanwhile` is host work to do while the device finishes the
        step (the loop collates the next batch)."""
        self.policy.train()
        per_example: dict[str, list[torch.Tensor]] = defaultdict(list)
        n_micro = self.config.gradient_accumulation_steps
        tokens = torch.zeros(2, dtype=torch.long)  # real and padded tokens through the policy
        scale = nll_scale_of(batch)  # NLL terms average per token over the whole global batch
        micro_batches = [
            slice_batch(slice_batch(batch, m, n_micro), self.rank, self.world_size) for m in range(n_micro)
        ]
        kl = self.kl_estimate(micro_batches) if self.objective.data == "unpaired" else None  # of the global batch
        for local_micro in micro_batches:
            for group, rows in length_groups(local_micro, self.config.length_groups):
                tokens += token_counts(group, packing.row_tokens(self.config))
                loss, group_metrics = self.get_batch_metrics(
                    group, self.config.loss, train=True, nll_scale=scale, kl=kl
                )
                (loss * rows / len(local_micro["chosen_input_ids"]) / n_micro).backward()
                for k, v in group_metrics.items():
                    per_example[k].append(v)
        grad_norm = self.clip_gradient()
        self.checkpointer.before_update()  # a background save may still be copying what the step changes
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        own = {"tokens": tokens, "grad_norm": grad_norm, **cuda_memory(self.device)}
        meanwhile()
        # after the update is queued: the host waits for the device here, once, not per micro-batch
        metrics, per_process = gather_metrics(self.dist, per_example, own)
        real, padded = per_process.pop("tokens").sum(0).tolist()
        out = {**metrics, "grad_norm": per_process.pop("grad_norm")[0].tolist(), "tokens/real": [real],
               "tokens/padded": [padded]}  # fmt: skip
        return out | {k: [v.max().item()] for k, v in per_process.items()}  # memory: the fullest process's

    # ---------------------------------------------------------------------------------------
    # logging

    def log(self, metrics: dict) -> None:
        self.tracker.log(metrics, self.example_counter)

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

    def save_on_interrupt(self) -> Path | None:
        """checkpoint.on_interrupt=save: a checkpoint of where the run stopped."""
        if self.config.checkpoint.on_interrupt != "save" or self.example_counter == 0 or self.config.debug:
            return None
        return self.checkpointer.save(self.example_counter, {})

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
            "loss": self.objective.state_dict(),
        }

    def restore(self, point: ResumePoint) -> None:
        """Continue from a resume point: policy, optimizer, scheduler, counters, RNG, data
        position. Records the abandoned continuation logged past that point are dropped from
        metrics.jsonl."""
        state = self.checkpointer.restore(point)
        self.example_counter = self.resumed_at = point.examples
        if self.rank == 0:
            dropped = drop_metrics_after(self.run_dir, self.example_counter)
            if dropped:
                self.print(f"metrics.jsonl: dropped {dropped} records logged after {self.example_counter} examples")
        self.batch_counter = point.batches
        self.objective.load_state_dict(state.get("loss", {}))
        per_process = state.get("rng_per_process") or []
        # the same number of processes continue each its own random stream; otherwise all take the first's
        self.resumed_rng = per_process[self.rank] if len(per_process) == self.world_size else state["rng"]
        self.print(f"resumed from {point.checkpoint} at {self.example_counter} examples ({self.batch_counter} updates)")


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
