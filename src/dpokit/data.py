"""Preference data: datasets -> prompts with responses and pairs -> token batches.

Each dataset maps a prompt to `{responses, pairs, sft_target}` (pairs are (preferred,
dispreferred) indices into responses), as in the DPO reference. Batches are built lazily from a
seeded, per-epoch permutation, so the position in the stream is just "batches consumed" and a
resumed run can skip ahead without tokenizing what it skips.
"""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from dpokit.errors import DataError

ASSISTANT = "\n\nAssistant:"
HH_HUB_NAME = "Anthropic/hh-rlhf"
BUNDLED = {"hh_sample": "assets/hh_sample/harmless-base-test.jsonl.gz"}
TEST_FRACTION_BUCKETS = 10  # single-file datasets: 1 prompt in 10 goes to the test split


@dataclass
class Example:
    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]]
    sft_target: str
    truncation_mode: str  # keep_end (hh: the end of a dialogue matters) or keep_start
    source: str


PromptTable = dict[str, dict]


# --------------------------------------------------------------------------------------------
# HH (Anthropic helpful-harmless) in the hub's schema: one JSON object per line, {chosen, rejected}


def extract_anthropic_prompt(dialogue: str) -> str:
    """The prompt is the dialogue up to and including the last '\\n\\nAssistant:'."""
    idx = dialogue.rfind(ASSISTANT)
    if idx == -1:
        raise ValueError(f"no '{ASSISTANT.strip()}' turn in the dialogue")
    return dialogue[: idx + len(ASSISTANT)]


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_hh_file(path: Path) -> Iterator[tuple[str, str, str]]:
    """Yield (prompt, chosen_response, rejected_response) for each line; bad lines name file and line."""
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno})"
                    ) from None
                if (
                    not isinstance(row, dict)
                    or not isinstance(row.get("chosen"), str)
                    or not isinstance(row.get("rejected"), str)
                ):
                    raise DataError(
                        f"{path}, line {lineno}: expected an object with string fields 'chosen' and 'rejected'"
                    )
                try:
                    prompt = extract_anthropic_prompt(row["chosen"])
                except ValueError as err:
                    raise DataError(f"{path}, line {lineno}: 'chosen' has {err}") from None
                yield prompt, row["chosen"][len(prompt) :], row["rejected"][len(prompt) :]
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read the file ({err})") from None


def _is_test_prompt(prompt: str) -> bool:
    return hashlib.sha1(prompt.encode()).digest()[0] % TEST_FRACTION_BUCKETS == 0


def hh_table(rows: Iterator[tuple[str, str, str]]) -> PromptTable:
    data: PromptTable = {}
    for prompt, chosen, rejected in rows:
        entry = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": chosen})
        n = len(entry["responses"])
        entry["pairs"].append((n, n + 1))
        entry["responses"].extend([chosen, rejected])
        entry["sft_target"] = chosen
    return data


def get_hh_local(path: str, split: str) -> PromptTable:
    """HH from a local copy in the hub's schema.

    A directory holds `{split}.jsonl[.gz]` files (at its top or in subset folders such as
    `harmless-base/`, all of which are used, as the hub's default config does). A single file has
    no splits: its prompts are divided deterministically, one in ten (by hash) to 'test'.
    """
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.rglob(f"{split}.jsonl*") if p.name in (f"{split}.jsonl", f"{split}.jsonl.gz"))
        if not files:
            raise DataError(f"dataset directory {root} has no {split}.jsonl or {split}.jsonl.gz (hub layout expected)")
        return hh_table(itertools.chain.from_iterable(read_hh_file(f) for f in files))
    if root.is_file():
        want_test = split == "test"
        return hh_table(row for row in read_hh_file(root) if _is_test_prompt(row[0]) == want_test)
    raise DataError(f"dataset path {root} does not exist")


def get_hh_hub(split: str, cache_dir: str | None) -> PromptTable:
    import datasets

    try:
        rows = datasets.load_dataset(HH_HUB_NAME, split=split, cache_dir=cache_dir)
    except Exception as err:  # the datasets library raises many types for "not reachable"
        raise DataError(
            f"cannot load dataset 'hh' ({HH_HUB_NAME}, split {split}) from the hub: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
            f"for a local copy use datasets=[hh:PATH]"
        ) from None

    def split_rows():
        for i, row in enumerate(rows):
            try:
                prompt = extract_anthropic_prompt(row["chosen"])
            except ValueError as err:
                raise DataError(f"{HH_HUB_NAME} {split} row {i}: 'chosen' has {err}") from None
            yield prompt, row["chosen"][len(prompt) :], row["rejected"][len(prompt) :]

    return hh_table(split_rows())


def get_hh_sample(split: str) -> PromptTable:
    return get_hh_local(str(resources.files("dpokit") / BUNDLED["hh_sample"]), split)


# --------------------------------------------------------------------------------------------
# SHP and StackExchange (hub only), with the reference's rules


def get_shp(split: str, cache_dir: str | None) -> PromptTable:
    """Stanford Human Preferences; keeps pairs whose score ratio is at least 2."""
    rows = _load_hub("shp", "stanfordnlp/SHP", split, cache_dir)
    data: PromptTable = {}
    for row in rows:
        scores = [row["score_A"], row["score_B"]]
        if max(scores[0] / scores[1], scores[1] / scores[0]) < 2:
            continue
        prompt = "\n\nHuman: " + row["history"] + ASSISTANT
        entry = data.setdefault(prompt, {"responses": [], "pairs": [], "scores": []})
        n = len(entry["responses"])
        entry["pairs"].append((n, n + 1) if row["labels"] == 1 else (n + 1, n))
        entry["responses"].extend([" " + row["human_ref_A"], " " + row["human_ref_B"]])
        entry["scores"].extend(scores)
    for entry in data.values():
        best = max(range(len(entry["responses"])), key=lambda i: entry["scores"][i])
        entry["sft_target"] = entry["responses"][best]
        del entry["scores"]
    return data


class _TextAndCode(html.parser.HTMLParser):
    """Paragraph text plus <code> blocks, as the reference keeps from StackExchange answers."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self._stack.append(tag)
        if tag in ("p", "code") and (tag == "code" or "code" not in self._stack[:-1]):
            self.parts.append("<code>" if tag == "code" else "")

    def handle_endtag(self, tag):
        if tag == "code" and self.parts:
            self.parts[-1] += "</code>"
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()

    def handle_data(self, data):
        if self.parts and self._stack and self._stack[-1] in ("p", "code"):
            self.parts[-1] += data


def strip_html(text: str) -> str:
    parser = _TextAndCode()
    parser.feed(text)
    return "\n\n".join(p for p in parser.parts if p)


def get_se(split: str, cache_dir: str | None) -> PromptTable:
    """StackExchange preferences; 1% (seeded shuffle) is the test split; pairs ordered by score."""
    rows = _load_hub("se", "HuggingFaceH4/stack-exchange-preferences", "train", cache_dir)
    rows = rows.shuffle(seed=42)
    n_test = int(len(rows) * 0.01)
    rows = rows.select(range(n_test)) if split == "test" else rows.select(range(n_test, len(rows)))
    data: PromptTable = {}
    for row in rows:
        prompt = "\n\nHuman: " + strip_html(row["question"]) + ASSISTANT
        responses = [" " + strip_html(a["text"]) for a in row["answers"]]
        scores = [a["pm_score"] for a in row["answers"]]
        pairs = [
            (i, j) if scores[i] > scores[j] else (j, i)
            for i in range(len(responses))
            for j in range(i + 1, len(responses))
        ]
        best = max(range(len(responses)), key=lambda i: scores[i])
        data[prompt] = {"responses": responses, "pairs": pairs, "sft_target": responses[best]}
    return data


def _load_hub(name: str, hub_name: str, split: str, cache_dir: str | None):
    import datasets

    try:
        return datasets.load_dataset(hub_name, split=split, cache_dir=cache_dir)
    except Exception as err:
        raise DataError(
            f"cannot load dataset '{name}' ({hub_name}, split {split}) from the hub: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None


def get_dataset(name: str, split: str, cache_dir: str | None = None) -> PromptTable:
    """Load one dataset by name: hh, shp, se, hh_sample, or hh:PATH (local HH-format data)."""
    if name.startswith("hh:"):
        return get_hh_local(name[3:], split)
    loaders: dict[str, Callable[[], PromptTable]] = {
        "hh": lambda: get_hh_hub(split, cache_dir),
        "hh_sample": lambda: get_hh_sample(split),
        "shp": lambda: get_shp(split, cache_dir),
        "se": lambda: get_se(split, cache_dir),
    }
    if name not in loaders:
        raise DataError(
            f"unknown dataset '{name}' in config key 'datasets'; "
            f"known: {', '.join(loaders)}, or hh:PATH for a local HH-format file or directory"
        )
    return loaders[name]()


def load_examples(names: list[str], split: str, cache_dir: str | None = None) -> list[Example]:
    examples = []
    for name in names:
        mode = "keep_end" if name.startswith("hh") else "keep_start"  # hh, hh:PATH, hh_sample
        for prompt, entry in get_dataset(name, split, cache_dir).items():
            examples.append(Example(prompt, entry["responses"], entry["pairs"], entry["sft_target"], mode, name))
    return examples


# --------------------------------------------------------------------------------------------
# tokenization and collation


def _tokens(tokenizer, text: str, what: str, source: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id in ids:
        raise DataError(f"a {what} in dataset '{source}' contains the EOS token {tokenizer.eos_token!r}: {text[:80]!r}")
    return ids


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
    """Token ids, attention masks and labels for one (prompt, chosen, rejected) triple.

    EOS is appended to each response. If prompt + the longer response exceeds max_length, the
    prompt is cut to max_prompt_length (its end kept for keep_end), then, if still too long, the
    responses to max_length - max_prompt_length. Labels are -100 on prompt positions.
    """
    prompt_ids = _tokens(tokenizer, prompt, "prompt", source)
    chosen_ids = _tokens(tokenizer, chosen, "chosen response", source) + [tokenizer.eos_token_id]
    rejected_ids = _tokens(tokenizer, rejected, "rejected response", source) + [tokenizer.eos_token_id]

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

    element = {
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
# batches


class BatchIterator:
    """Iterates collated batches; stops after n_epochs or n_examples, whichever comes first.

    As in the reference, each epoch visits prompts in a seeded random order, an incomplete batch
    at the end of an epoch is dropped, and the n_examples limit is checked after each batch.
    `skip_batches` starts the stream after that many batches (exact resume).
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
        seed: int = 0,
        shuffle: bool = True,
        n_epochs: int | None = None,
        n_examples: int | None = None,
        skip_batches: int = 0,
        split: str = "train",
    ) -> None:
        if n_epochs is None and n_examples is None:
            raise ValueError("give n_epochs or n_examples")
        n_items = sum(1 if sft_mode else len(e.pairs) for e in examples)
        if n_items < batch_size:
            names = sorted({e.source for e in examples}) or ["(none)"]
            raise DataError(
                f"dataset(s) {', '.join(names)} have {n_items} examples in the {split} split, "
                f"fewer than one batch of {batch_size}"
            )
        self.examples, self.tokenizer = examples, tokenizer
        self.batch_size, self.max_length, self.max_prompt_length = batch_size, max_length, max_prompt_length
        self.sft_mode, self.seed, self.shuffle = sft_mode, seed, shuffle
        self.n_epochs, self.n_examples, self.skip_batches = n_epochs, n_examples, skip_batches

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def _raw_batches(self) -> Iterator[list[tuple[Example, str, str]]]:
        seen = 0
        for epoch in itertools.count():
            if self.n_epochs is not None and epoch >= self.n_epochs:
                return
            batch = []
            for idx in self._order(epoch):
                ex = self.examples[idx]
                items = (
                    [(ex.sft_target, ex.sft_target)]
                    if self.sft_mode
                    else [(ex.responses[a], ex.responses[b]) for a, b in ex.pairs]
                )
                for chosen, rejected in items:
                    batch.append((ex, chosen, rejected))
                    seen += 1
                    if len(batch) == self.batch_size:
                        yield batch
                        batch = []
                        if self.n_examples is not None and seen >= self.n_examples:
                            return

    def __iter__(self) -> Iterator[dict]:
        for raw in itertools.islice(self._raw_batches(), self.skip_batches, None):
            elements = [
                tokenize_element(
                    ex.prompt,
                    chosen,
                    rejected,
                    ex.truncation_mode,
                    self.tokenizer,
                    self.max_length,
                    self.max_prompt_length,
                    ex.source,
                )
                for ex, chosen, rejected in raw
            ]
            if self.sft_mode:
                elements = [{k: v for k, v in e.items() if "rejected" not in k} for e in elements]
            yield collate(elements, self.tokenizer.pad_token_id)


def cache_dir_for(local_dirs: list[str]) -> str:
    from dpokit.config import get_local_dir

    return os.path.join(get_local_dir(local_dirs), "datasets")
