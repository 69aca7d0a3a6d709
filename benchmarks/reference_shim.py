"""Runs the DPO reference implementation's own train.py, unchanged, on data from local files.

    python reference_shim.py REFERENCE_DIR HH_DIR [hydra overrides...]

Run by benchmarks/reference.py in the reference's own virtualenv. Two things differ from a run
on a GPU machine with internet, both outside the timed training loop's arithmetic:
`datasets.load_dataset('Anthropic/hh-rlhf', split=...)` reads HH_DIR/{split}.jsonl (the hub's
schema) instead of the hub, and without CUDA the BasicTrainer's batches go to the CPU (it moves
them to device `rank`, i.e. cuda:0) and the models load without `device_map`. And the reference
seeds `random` with numpy integers, which Python 3.11 refuses (3.8-3.10 hashed them, which for
these values is the integer itself): they are passed as Python ints. On a machine without wandb,
tensor_parallel or bs4 (a GPU machine without internet, say), a stand-in module takes the place
of each: the reference imports them but calls them only with wandb enabled, under
TensorParallelTrainer or for the SE dataset, none of which these runs use.
"""

from __future__ import annotations

import importlib
import numbers
import random
import runpy
import sys
import types
from pathlib import Path


def stand_in_if_missing(name: str) -> None:
    """An installed module stays; a missing one becomes a module whose every name fails when used."""
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass

    def missing(*args, **kwargs):
        raise RuntimeError(f"{name} is not installed here (reference_shim stood in for it)")

    def attribute(attr: str):
        if attr.startswith("__"):  # what introspection asks (__file__, __path__, ...): absent, as usual
            raise AttributeError(attr)
        return missing

    module = types.ModuleType(name)
    module.__getattr__ = attribute  # type: ignore[method-assign]
    sys.modules[name] = module


def main() -> None:
    reference_dir, hh_dir, overrides = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), sys.argv[3:]
    import datasets
    import torch
    import transformers

    seed = random.seed
    random.seed = lambda a=None, version=2: seed(int(a) if isinstance(a, numbers.Integral) else a, version)

    hub_load = datasets.load_dataset

    def load_dataset(path: str, *args, split: str | None = None, **kwargs):
        if path == "Anthropic/hh-rlhf":
            files = {split: str(hh_dir / f"{split}.jsonl")}
            return hub_load("json", data_files=files, split=split, cache_dir=kwargs.get("cache_dir"))
        return hub_load(path, *args, split=split, **kwargs)

    datasets.load_dataset = load_dataset
    for name in ("wandb", "tensor_parallel", "bs4"):
        stand_in_if_missing(name)
    sys.path.insert(0, str(reference_dir))
    if not torch.cuda.is_available():
        import trainers  # the reference's module

        move = trainers.slice_and_move_batch_for_device
        trainers.slice_and_move_batch_for_device = lambda batch, rank, world, _device: move(batch, rank, world, "cpu")
        from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

        def on_cpu(*args, device_map=None, **kwargs):
            return from_pretrained(*args, **kwargs)

        transformers.AutoModelForCausalLM.from_pretrained = on_cpu
    sys.argv = [str(reference_dir / "train.py"), *overrides]
    runpy.run_path(str(reference_dir / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
