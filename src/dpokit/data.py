"""Preference data: prompt tables -> examples -> token batches.

Each dataset maps a prompt to `{responses, pairs, sft_target}` (pairs are (preferred,
dispreferred) indices into responses), as in the DPO reference (`dpokit.sources` reads them).
Batches are built lazily from a seeded, per-epoch permutation, so the position in the stream is
just "batches consumed" and a resumed run can skip ahead without tokenizing what it skips.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from dpokit import packing
from dpokit.errors import DataError
from dpokit.progress import bar as progress_bar
from dpokit.sources import ChatRenderer, get_dataset, parse_spec


@dataclass
class Example:
    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]]
    sft_target: str | None  # None: a prompt with undesirable completions only
    truncation_mode: str  # keep_end (dialogues: their end matters) or keep_start
    source: str
    unpaired: list[tuple[int, bool]] = field(default_factory=list)  # (response, desirable): KTO's rows


def load_examples(
    names: list[str],
    split: str,
    cache_dir: str | None = None,
    on_bad_row: str = "auto",
    render: ChatRenderer | None = None,
    log: Callable[[str], None] = print,
    reported: set | None = None,
) -> list[Example]:
    """The examples of every dataset named in config key `datasets`, mixed as in the reference."""
    examples = []
    for name in names:
        mode = parse_spec(name).truncation_mode
        for prompt, entry in get_dataset(name, split, cache_dir, on_bad_row, render, log, reported).items():
            examples.append(Example(prompt, entry["responses"], entry["pairs"], entry["sft_target"], mode, name,
                                    entry.get("unpaired", [])))  # fmt: skip
    return examples


# --------------------------------------------------------------------------------------------
# tokenization and collation


def _check_no_eos(tokenizer, ids: list[int], text: str, what: str, source: str) -> list[int]:
    if tokenizer.eos_token_id in ids:
        raise DataError(f"a {what} in dataset '{source}' contains the EOS token {tokenizer.eos_token!r}: {text[:80]!r}")
    return ids


def truncate(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    truncation_mode: str,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[int], list[int], list[int]]:
    """The reference's rule: if prompt + the longer response (EOS included) exceeds max_length,
    the prompt is cut to max_prompt_length (its end kept for keep_end), then, if still too long,
    the responses to max_length - max_prompt_length."""
    longer = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longer > max_length:
        if truncation_mode == "keep_start":
            prompt_ids = prompt_ids[:max_prompt_length]
        elif truncation_mode == "keep_end":
            prompt_ids = prompt_ids[-max_prompt_length:]
        else:
            raise ValueError(f"unknown truncation mode {truncation_mode!r}")
    if len(prompt_ids) + longer > max_length:
        chosen_ids = chosen_ids[: max_length - max_prompt_length]
        rejected_ids = rejected_ids[: max_length - max_prompt_length]
    return prompt_ids, chosen_ids, rejected_ids


def build_element(
    prompt: str, chosen: str, rejected: str, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]
) -> dict:
    """The reference's batch element: strings, token ids, attention masks, and labels that are
    -100 on prompt positions."""
    element: dict[str, Any] = {
        "prompt": prompt,
        "chosen": prompt + chosen,
        "rejected": prompt + rejected,
        "chosen_response_only": chosen,
        "rejected_response_only": rejected,
        "prompt_input_ids": prompt_ids,
        "prompt_attention_mask": [1] * len(prompt_ids),
    }
    for name, response_ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        ids = prompt_ids + response_ids
        element[f"{name}_input_ids"] = ids
        element[f"{name}_attention_mask"] = [1] * len(ids)
        element[f"{name}_labels"] = [-100] * len(prompt_ids) + response_ids
    return element


def tokenize_element(
    prompt: str,
    chosen: str,
    rejected: str,
    truncation_mode: str,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    source: str = "?",
) -> dict:
    """Token ids, attention masks and labels for one (prompt, chosen, rejected) triple: no special
    tokens added, EOS appended to each response (and refused inside the text), then truncated."""
    ids = tokenizer([prompt, chosen, rejected], add_special_tokens=False, verbose=False)["input_ids"]
    p = _check_no_eos(tokenizer, ids[0], prompt, "prompt", source)
    c = _check_no_eos(tokenizer, ids[1], chosen, "chosen response", source) + [tokenizer.eos_token_id]
    r = _check_no_eos(tokenizer, ids[2], rejected, "rejected response", source) + [tokenizer.eos_token_id]
    return build_element(prompt, chosen, rejected, *truncate(p, c, r, truncation_mode, max_length, max_prompt_length))


def collate(elements: list[dict], pad_token_id: int) -> dict:
    """Pad token fields into tensors (prompts on the left, sequences on the right); keep strings."""
    batch: dict[str, Any] = {}
    for key in elements[0]:
        if not key.endswith(("_input_ids", "_attention_mask", "_labels")):
            batch[key] = [e[key] for e in elements]
            continue
        pad = pad_token_id if key.endswith("_input_ids") else (-100 if key.endswith("_labels") else 0)
        left = key.startswith("prompt")
        seqs = [torch.tensor(e[key][::-1] if left else e[key], dtype=torch.long) for e in elements]
        padded = pad_sequence(seqs, batch_first=True, padding_value=pad)
        batch[key] = padded.flip(dims=[1]) if left else padded
    return batch


# --------------------------------------------------------------------------------------------
# every item tokenized once (and cached)


@dataclass
class TokenizedSplit:
    """The token ids of every item of a split, truncated, back to back: item k is
    prompt tokens[o0:o1], chosen response tokens[o1:o2], rejected response tokens[o2:o3]
    (EOS included; SFT items have no rejected part); example i owns items first_item[i]:first_item[i+1]."""

    tokens: torch.Tensor  # int32
    offsets: torch.Tensor  # int64 [n_items, 4]
    first_item: torch.Tensor  # int64 [n_examples + 1]
    kept: torch.Tensor  # int64: indices of the examples kept (a prompt longer than max_length may be dropped)
    desirable: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # unpaired: per item

    def ids(self, item: int) -> tuple[list[int], list[int], list[int]]:
        o = self.offsets[item].tolist()
        return self.tokens[o[0] : o[1]].tolist(), self.tokens[o[1] : o[2]].tolist(), self.tokens[o[2] : o[3]].tolist()


def _items(example: Example, sft_mode: bool, unpaired: bool = False) -> list[tuple[str, str, bool]]:
    """(chosen, rejected, desirable) texts of an example's items: its sft_target (SFT), its pairs,
    or (unpaired) its labelled completions and each pair split into a desirable and an
    undesirable completion, as TRL's unpair_preference_dataset does."""
    if sft_mode:
        return [(example.sft_target, "", True)] if example.sft_target is not None else []
    pairs = [(example.responses[a], example.responses[b], True) for a, b in example.pairs]
    if not unpaired:
        return pairs
    split = [item for c, r, _ in pairs for item in ((c, "", True), (r, "", False))]
    return split + [(example.responses[k], "", desirable) for k, desirable in example.unpaired]


def _fingerprint(examples: list[Example], tokenizer: Any, settings: dict) -> str:
    from dpokit import __version__

    h = hashlib.sha256(json.dumps({**settings, "dpokit": __version__}, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer).encode())
    h.update(f"{tokenizer.eos_token_id}".encode())
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.responses, ex.pairs, ex.sft_target, ex.truncation_mode]).encode())
    return h.hexdigest()[:24]


def tokenize_examples(
    examples: list[Example],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    sft_mode: bool,
    unpaired: bool = False,
    on_bad_row: str = "auto",
    cache_dir: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> TokenizedSplit:
    """Tokenize every item once (batched), with the reference's truncation. A prompt longer than
    max_length is a bad row (refused or skipped by data.on_bad_row). With a cache_dir, the result
    is kept there keyed by the examples' content, the tokenizer and the lengths."""
    settings = {"max_length": max_length, "max_prompt_length": max_prompt_length, "sft": sft_mode, "bad": on_bad_row}
    if unpaired:
        settings["unpaired"] = True
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / "tokenized" / f"{_fingerprint(examples, tokenizer, settings)}.pt"
        if cache_file.is_file():
            try:
                return TokenizedSplit(**torch.load(cache_file, weights_only=True))
            except Exception:  # a damaged cache is rebuilt, never trusted
                cache_file.unlink(missing_ok=True)
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    offsets: list[list[int]] = []
    first_item, kept, desirable = [0], [], []
    too_long: dict[str, list[tuple[int, str]]] = {}
    chunk = 256
    bar = progress_bar(total=len(examples), desc="Tokenizing", unit="prompt", enabled=progress)
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        texts = [
            t for ex in part for t in (ex.prompt, *(x for item in _items(ex, sft_mode, unpaired) for x in item[:2]))
        ]
        # verbose=False: texts longer than the tokenizer's model_max_length are expected; truncation is ours
        encoded = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
        for k, ex in enumerate(part):
            prompt_ids = _check_no_eos(tokenizer, next(encoded), ex.prompt, "prompt", ex.source)
            items = []
            for chosen, rejected, label in _items(ex, sft_mode, unpaired):
                c = _check_no_eos(tokenizer, next(encoded), chosen, "chosen response", ex.source) + [eos]
                r = next(encoded)
                r = _check_no_eos(tokenizer, r, rejected, "rejected response", ex.source) + [eos] if rejected else []
                items.append((c, r, label))
            if len(prompt_ids) > max_length:
                too_long.setdefault(ex.source, []).append((len(prompt_ids), ex.prompt))
                if on_bad_row != "auto":  # 'auto' keeps them: truncation is the reference's answer
                    continue
            for c, r, label in items:
                p, c, r = truncate(prompt_ids, c, r, ex.truncation_mode, max_length, max_prompt_length)
                desirable.append(label)
                base = len(tokens)
                offsets.append([base, base + len(p), base + len(p) + len(c), base + len(p) + len(c) + len(r)])
                tokens.extend(p + c + r)
            first_item.append(len(offsets))
            kept.append(start + k)
        bar.update(len(part))
    bar.close()
    for source, found in too_long.items():
        _settle_too_long(source, found, max_length, on_bad_row, log)
    split = TokenizedSplit(
        torch.tensor(tokens, dtype=torch.int32),
        torch.tensor(offsets, dtype=torch.int64).reshape(-1, 4),
        torch.tensor(first_item, dtype=torch.int64),
        torch.tensor(kept, dtype=torch.int64),
        torch.tensor(desirable if unpaired else [], dtype=torch.bool),
    )
    if cache_file is not None:
        _write_cache(cache_file, split)
    return split


def _settle_too_long(source: str, found: list[tuple[int, str]], max_length: int, policy: str, log) -> None:
    """Prompts longer than max_length: refused ('error'), dropped ('skip'), or, with 'auto', kept
    and cut by the reference's truncation rule (which exists for them), with a report."""
    n_tokens, prompt = found[0]
    what = (
        f"dataset '{source}' has {len(found)} prompt(s) longer than max_length ({max_length} tokens), "
        f"e.g. one of {n_tokens} tokens starting {prompt[:60]!r}"
    )
    if policy == "error":
        raise DataError(f"{what}; raise max_length, shorten them, or pass data.on_bad_row=skip to train without them")
    if policy == "skip":
        log(f"WARNING: {what}; skipped (data.on_bad_row=skip)")
    else:
        log(f"note: {what}; they are cut to max_prompt_length as in the reference (data.on_bad_row=skip drops them)")


def _write_cache(path: Path, split: TokenizedSplit) -> None:
    from dpokit.checkpoint import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(vars(split), f), fsync=False)
    except Exception:  # a cache that cannot be written only costs the next run the tokenization
        pass


# --------------------------------------------------------------------------------------------
# a run's data


@dataclass
class PreparedData:
    train: list[Example]
    train_tokens: TokenizedSplit
    eval: list[Example]
    eval_tokens: TokenizedSplit


def chat_renderer(tokenizer: Any) -> ChatRenderer | None:
    """Conversations become prompts through the tokenizer's chat template, when it has one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prepare_data(cfg: Any, tokenizer: Any, log: Callable[[str], None] = print, progress: bool = False) -> PreparedData:
    """Every dataset of config key `datasets`, both splits: read, bad rows refused or skipped,
    tokenized once (from the cache when the same data, tokenizer and lengths were seen before)."""
    cache_dir = cache_dir_for(list(cfg.local_dirs))
    render = chat_renderer(tokenizer)
    mode = data_mode(cfg)
    settings = {
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "sft_mode": mode == "sft",
        "unpaired": mode == "unpaired",
        "on_bad_row": cfg.data.on_bad_row,
        "cache_dir": cache_dir if cfg.data.cache else None,
        "progress": progress,
        "log": log,
    }
    splits = {}
    reported: set = set()  # each bad-row report once per run
    for split in ("train", "test"):
        examples = load_examples(list(cfg.datasets), split, cache_dir, cfg.data.on_bad_row, render, log, reported)
        check_fits_loss(examples, mode, cfg, split)
        splits[split] = (examples, tokenize_examples(examples, tokenizer, **settings))
    return PreparedData(*splits["train"], *splits["test"])


def check_fits_loss(examples: list[Example], mode: str, cfg: Any, split: str) -> None:
    """Refuse unpaired rows for a loss that trains on pairs, and, for an unpaired loss, a train
    split whose completions all have one label (KTO needs both kinds)."""
    from dpokit.loss_registry import display_name

    name = display_name(cfg.loss)
    if mode == "paired":
        unpaired = [ex for ex in examples if ex.unpaired]
        if unpaired:
            sources = sorted({ex.source for ex in unpaired})
            n = sum(len(ex.unpaired) for ex in unpaired)
            raise DataError(
                f"dataset(s) {', '.join(sources)} have {n} unpaired row(s) {{prompt, completion, label}} in the {split} "
                f"split, which loss={name} cannot train on: it needs pairs {{prompt, chosen, rejected}} (unpaired rows "
                f"train loss=kto or apo_zero_unpaired)"
            )
    if mode == "unpaired" and split == "train":
        labels = {d for ex in examples for _, d in ex.unpaired}
        if any(ex.pairs for ex in examples):  # each pair gives one completion of each label
            labels |= {True, False}
        if len(labels) == 1:
            which = "desirable (label true)" if True in labels else "undesirable (label false)"
            raise DataError(
                f"dataset(s) {', '.join(cfg.datasets)} have only {which} completions in the train split; loss={name} "
                f"needs both desirable and undesirable ones"
            )


# --------------------------------------------------------------------------------------------
# batches

LENGTH_WINDOW = 50  # sampler=length_grouped sorts within windows of this many batches


class BatchIterator:
    """Iterates collated batches; stops after n_epochs or n_examples, whichever comes first.

    As in the reference, each epoch visits prompts in a seeded random order, an incomplete batch
    at the end of an epoch is dropped, and the n_examples limit is checked after each batch.
    `skip_batches` starts the stream after that many batches (exact resume). Items are tokenized
    once, up front (`tokenized`, or here when not given).
    """

    def __init__(
        self,
        examples: list[Example],
        tokenizer,
        *,
        batch_size: int,
        max_length: int,
        max_prompt_length: int,
        sft_mode: bool,
        unpaired: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        n_epochs: int | None = None,
        n_examples: int | None = None,
        skip_batches: int = 0,
        split: str = "train",
        tokenized: TokenizedSplit | None = None,
        sampler: str = "random",
    ) -> None:
        if n_epochs is None and n_examples is None:
            raise ValueError("give n_epochs or n_examples")
        if tokenized is None:
            tokenized = tokenize_examples(
                examples,
                tokenizer,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                sft_mode=sft_mode,
                unpaired=unpaired,
            )
        self.examples = [examples[i] for i in tokenized.kept.tolist()]
        n_items = len(tokenized.offsets)
        if n_items < batch_size:
            names = sorted({e.source for e in examples}) or ["(none)"]
            fix = (
                "lower batch_size or give more rows" if split == "train" else "give a test file (jsonl:FILE?test=TEST)"
            )
            raise DataError(
                f"dataset(s) {', '.join(names)} have {n_items} examples in the {split} split, "
                f"fewer than one batch of {batch_size}; {fix}"
            )
        self.tokenized, self.pad_token_id = tokenized, tokenizer.pad_token_id
        self.batch_size, self.sft_mode, self.seed, self.shuffle = batch_size, sft_mode, seed, shuffle
        self.unpaired, self.max_length = unpaired, max_length
        self.n_epochs, self.n_examples, self.skip_batches = n_epochs, n_examples, skip_batches
        self.sampler = sampler

    def __len__(self) -> int:
        """Batches in the whole stream (those skipped on resume included)."""
        per_epoch = len(self.tokenized.offsets) // self.batch_size
        limits = []
        if self.n_epochs is not None:
            limits.append(self.n_epochs * per_epoch)
        if self.n_examples is not None:
            limits.append(-(-self.n_examples // self.batch_size))
        return min(limits)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def _epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's full batches of (example index, item index), in order."""
        first = self.tokenized.first_item.tolist()
        items = [(int(idx), item) for idx in self._order(epoch) for item in range(first[idx], first[idx + 1])]
        batches = [items[i : i + self.batch_size] for i in range(0, len(items) - self.batch_size + 1, self.batch_size)]
        if self.sampler == "length_grouped":
            batches = self._grouped_by_length(items, epoch)
        return batches

    def _grouped_by_length(self, items: list[tuple[int, int]], epoch: int) -> list[list[tuple[int, int]]]:
        """Within windows of LENGTH_WINDOW batches of the shuffled stream, items sorted by length
        and cut into batches, which are then shuffled: each batch holds similar lengths (less
        padding), the order of the data is not the reference's. Seeded, so resume stays exact."""
        o = self.tokenized.offsets
        lengths = (o[:, 1] - o[:, 0] + torch.maximum(o[:, 2] - o[:, 1], o[:, 3] - o[:, 2])).tolist()
        window = LENGTH_WINDOW * self.batch_size
        rng = np.random.default_rng([self.seed, epoch, 1])
        batches = []
        usable = len(items) - len(items) % self.batch_size
        for start in range(0, usable, window):
            chunk = sorted(items[start : min(start + window, usable)], key=lambda it: lengths[it[1]])
            group = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            batches += [group[i] for i in rng.permutation(len(group))]
        return batches

    def _raw_batches(self) -> Iterator[list[tuple[int, int]]]:
        seen = 0
        for epoch in itertools.count():
            if self.n_epochs is not None and epoch >= self.n_epochs:
                return
            for batch in self._epoch_batches(epoch):
                yield batch
                seen += len(batch)
                if self.n_examples is not None and seen >= self.n_examples:
                    return

    def items(self) -> list[int]:
        """The item indices the whole stream visits (skipped batches included), in its order."""
        return [item for raw in self._raw_batches() for _, item in raw]

    def __iter__(self) -> Iterator[dict]:
        for raw in itertools.islice(self._raw_batches(), self.skip_batches, None):
            yield self.collated(raw)

    def collated(self, raw: list[tuple[int, int]]) -> dict:
        batch = collate([self.element(idx, item) for idx, item in raw], self.pad_token_id)
        batch["item_index"] = torch.tensor([item for _, item in raw])  # for per-item data (reference log-probs)
        if self.unpaired:
            batch["desirable"] = self.tokenized.desirable[batch["item_index"]]
            batch.update(self.mismatched(raw))
        return batch

    def mismatched(self, raw: list[tuple[int, int]]) -> dict:
        """KTO's KL sequences `kl_*`: row i's prompt with row i-1's completion (the batch
        rotated by one, as the paper and TRL pair them: the same completions, other prompts),
        the completion cut to fit max_length."""
        rows = []
        for (_, item), (_, previous) in zip(raw, raw[-1:] + raw[:-1], strict=True):
            p, _, _ = self.tokenized.ids(item)
            _, c, _ = self.tokenized.ids(previous)
            c = c[: max(self.max_length - len(p), 1)]
            rows.append({"kl_input_ids": p + c, "kl_attention_mask": [1] * (len(p) + len(c)),
                         "kl_labels": [-100] * len(p) + c})  # fmt: skip
        return collate(rows, self.pad_token_id)

    def element(self, idx: int, item: int) -> dict:
        ex = self.examples[idx]
        p, c, r = self.tokenized.ids(item)
        if self.sft_mode or self.unpaired:  # one response: the SFT target, or an unpaired completion
            first = int(self.tokenized.first_item[idx])
            text = ex.sft_target if self.sft_mode else _items(ex, False, True)[item - first][0]
            assert text is not None
            element = build_element(ex.prompt, text, text, p, c, c)
            return {k: v for k, v in element.items() if "rejected" not in k}
        a, b = ex.pairs[item - int(self.tokenized.first_item[idx])]
        return build_element(ex.prompt, ex.responses[a], ex.responses[b], p, c, r)


class Prefetched:
    """An iterator that can take its next item early. The training loop asks for the next batch
    (`prefetch`) once a step's work is queued and before the host waits for the device to finish
    it: on a GPU the batch is then collated while the GPU computes, instead of while it idles
    between steps. The items and their order are the iterator's."""

    _END = object()

    def __init__(self, items: Iterable) -> None:
        self._items = iter(items)
        self._ahead: list = []

    def prefetch(self) -> None:
        if not self._ahead:
            self._ahead.append(next(self._items, self._END))

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self) -> Any:
        self.prefetch()
        item = self._ahead.pop()
        if item is self._END:
            raise StopIteration
        return item


def length_groups(batch: dict, n_groups: int) -> list[tuple[dict, int]]:
    """A batch split into up to n_groups sub-batches of similar sequence length, each with the
    padding columns no row of it needs cut off; returns (sub-batch, rows). The rows' losses,
    weighted by rows / batch rows, add up to the batch's mean: the same loss and gradient, with
    less padding computed."""
    masks = [k for k in batch if k.endswith("_attention_mask") and not k.startswith("prompt")]
    n_rows = len(batch[masks[0]])
    if n_groups <= 1 or n_rows <= 1:
        return [(batch, n_rows)]
    lengths = torch.stack([batch[k].sum(-1) for k in masks]).amax(0)
    order = torch.argsort(lengths, stable=True)
    groups = []
    for rows in order.tensor_split(min(n_groups, n_rows)):
        part: dict[str, Any] = {}
        longest = int(lengths[rows].max())
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value[rows]
                # sequences are right-padded: their columns past the longest row are padding only
                if key.endswith(("_input_ids", "_attention_mask", "_labels")) and not key.startswith("prompt"):
                    value = value[:, :longest]
                part[key] = value
            else:
                part[key] = [value[i] for i in rows.tolist()]
        groups.append((part, len(rows)))
    return groups


def every_item(iterator: BatchIterator, batch_size: int, only: Collection[int] | None = None) -> Iterator[dict]:
    """Every item of a split (or those in `only`) once, in item order, as batches of batch_size
    (the last one filled up by repeating its last item, so that it still divides among processes)."""
    first = iterator.tokenized.first_item.tolist()
    items = [
        (idx, item)
        for idx in range(len(iterator.examples))
        for item in range(first[idx], first[idx + 1])
        if only is None or item in only
    ]
    for start in range(0, len(items), batch_size):
        raw = items[start : start + batch_size]
        raw += [raw[-1]] * (batch_size - len(raw))
        yield iterator.collated(raw)


def token_counts(batch: dict, packed_row_tokens: int | None = None) -> torch.Tensor:
    """(real, computed) tokens a batch puts through the policy: chosen and rejected are padded to
    one length and run together (SFT: chosen only); with packing, rows of at most
    packed_row_tokens (`packing.layout`)."""
    masks = [batch[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in batch]
    if packed_row_tokens is not None:
        lengths = [n for m in masks for n in m.sum(-1).tolist()]
        return torch.tensor(packing.token_counts(lengths, packed_row_tokens))
    real = sum(int(m.sum()) for m in masks)
    return torch.tensor([real, len(masks) * masks[0].shape[0] * max(m.shape[1] for m in masks)])


def _iterator_settings(cfg: Any, tokenizer: Any, seed: int) -> dict:
    mode = data_mode(cfg)
    return {"tokenizer": tokenizer, "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
            "sft_mode": mode == "sft", "unpaired": mode == "unpaired", "seed": seed}  # fmt: skip


def train_iterator(cfg: Any, data: PreparedData, tokenizer: Any, seed: int, skip_batches: int = 0) -> BatchIterator:
    """The reference's training stream: seeded epochs, n_epochs or n_examples, global batches."""
    return BatchIterator(
        data.train, **_iterator_settings(cfg, tokenizer, seed), batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
        n_examples=cfg.n_examples, skip_batches=skip_batches, tokenized=data.train_tokens, sampler=cfg.sampler,
    )  # fmt: skip


def eval_iterator(
    cfg: Any,
    data: PreparedData,
    tokenizer: Any,
    seed: int,
    world_size: int = 1,
    log: Callable[[str], None] | None = None,
) -> BatchIterator:
    """The first n_eval_examples of the test split, in the same seeded order every time. A test
    split smaller than one eval batch (a small file, split by dpokit) is evaluated whole, as one
    shorter batch (a multiple of the processes, which each take an equal part), said once in
    `log`; it is refused only when it has fewer examples than that."""
    n_items = len(data.eval_tokens.offsets)
    batch_size, n_examples = cfg.eval_batch_size, cfg.n_eval_examples
    least = max(world_size, 2 if data_mode(cfg) == "unpaired" else 1)  # KTO pairs each row with another's
    if least <= n_items < batch_size:
        batch_size = n_examples = n_items - n_items % world_size
        if log is not None:
            names = ", ".join(sorted({e.source for e in data.eval}))
            log(f"note: the test split of {names} has {n_items} examples, fewer than eval_batch_size={cfg.eval_batch_size}: "
                f"each evaluation uses {batch_size} of them, as one batch")  # fmt: skip
    return BatchIterator(
        data.eval, **_iterator_settings(cfg, tokenizer, seed), batch_size=batch_size,
        n_examples=n_examples, split="test", tokenized=data.eval_tokens,
    )  # fmt: skip


def data_mode(cfg: Any) -> str:
    """What the loss trains on: 'sft' (each prompt's sft_target), 'paired' or 'unpaired'."""
    from dpokit.loss_registry import objective

    return objective(cfg).data


def cache_dir_for(local_dirs: list[str]) -> str:
    from dpokit.config import get_local_dir

    return os.path.join(get_local_dir(local_dirs), "datasets")
