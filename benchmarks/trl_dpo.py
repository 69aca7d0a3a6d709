"""One timed DPO run of TRL's DPOTrainer, for benchmarks/peers.py (runs in the peer virtualenv).

    .venv-peers/bin/python benchmarks/trl_dpo.py MODEL_DIR PAIRS.jsonl OUT.json --batch-size 8 ...

Settings mirror `dpokit train loss=dpo` with the reference's defaults: RMSprop, linear warmup then
a constant learning rate, gradient norm clipped at 10, dropout off, a float32 reference model
computed on the fly, one pass over the given pairs, no evaluation and no checkpoints. Writes the
time of every optimizer step (from after its batch is fetched to after the optimizer step, as
dpokit's `examples_per_second` counts) and the interval between consecutive steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.begin = 0.0
        self.step_seconds: list[float] = []
        self.ends: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.begin)
        self.ends.append(now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("pairs")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    pairs = Dataset.from_json(args.pairs, keep_in_memory=True)
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            num_train_epochs=1,
            learning_rate=args.lr,
            optim="rmsprop",
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=args.warmup_steps,
            max_grad_norm=10.0,
            beta=args.beta,
            max_length=args.max_length,
            disable_dropout=True,
            eval_strategy="no",
            save_strategy="no",
            logging_steps=1,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            seed=args.seed,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                             callbacks=[timer])  # fmt: skip
        trainer.train()
    intervals = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    with open(args.out, "w") as f:
        json.dump({"step_seconds": timer.step_seconds, "step_intervals": intervals, "batch_size": args.batch_size}, f)


if __name__ == "__main__":
    main()
