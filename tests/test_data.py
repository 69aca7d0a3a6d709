"""Data: tokenization, truncation, collation, HH loading (bundled, local files, hub layout),
error messages for bad data, and the batch iterator's order, limits and resume."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from dpokit.data import BatchIterator, Example, collate, load_examples, tokenize_element
from dpokit.errors import DataError
from dpokit.models import load_tokenizer
from dpokit.sources import extract_anthropic_prompt, get_dataset

EOS_TEXT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    tokenizer = load_tokenizer("tiny")
    assert tokenizer.eos_token == EOS_TEXT and tokenizer.eos_token_id == 0
    return tokenizer


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


LONG_PROMPT = "\n\nHuman: one two three four five six seven eight nine ten\n\nAssistant:"


# --------------------------------------------------------------------------------------------
# tokenize_element


def test_tokenize_element_appends_eos_and_masks_prompt(tok):
    prompt, chosen, rejected = "\n\nHuman: hi there\n\nAssistant:", " hello friend", " go away"
    el = tokenize_element(prompt, chosen, rejected, "keep_end", tok, max_length=512, max_prompt_length=256)
    p, c, r = ids(tok, prompt), ids(tok, chosen), ids(tok, rejected)
    assert el["prompt_input_ids"] == p
    assert el["prompt_attention_mask"] == [1] * len(p)
    assert el["chosen_input_ids"] == p + c + [0]
    assert el["rejected_input_ids"] == p + r + [0]
    assert el["chosen_attention_mask"] == [1] * (len(p) + len(c) + 1)
    # -100 over exactly the prompt positions, the response (with EOS) labelled
    assert el["chosen_labels"] == [-100] * len(p) + c + [0]
    assert el["rejected_labels"] == [-100] * len(p) + r + [0]
    assert el["chosen_labels"][len(p)] != -100
    # strings kept
    assert el["prompt"] == prompt
    assert el["chosen"] == prompt + chosen and el["rejected"] == prompt + rejected
    assert el["chosen_response_only"] == chosen and el["rejected_response_only"] == rejected


def test_no_truncation_when_it_fits(tok):
    p = ids(tok, LONG_PROMPT)
    el = tokenize_element(LONG_PROMPT, " yes", " no", "keep_start", tok, max_length=len(p) + 2, max_prompt_length=4)
    assert el["prompt_input_ids"] == p  # prompt + longer response (yes/no + EOS) == max_length: no cut


def test_truncation_keep_end_keeps_prompt_end(tok):
    p, yes = ids(tok, LONG_PROMPT), ids(tok, " yes")
    assert len(p) > 12
    el = tokenize_element(LONG_PROMPT, " yes", " yes", "keep_end", tok, max_length=12, max_prompt_length=8)
    assert el["prompt_input_ids"] == p[-8:]
    assert el["chosen_input_ids"] == p[-8:] + yes + [0]  # responses fit: not cut, EOS kept
    assert el["chosen_labels"] == [-100] * 8 + yes + [0]
    assert el["prompt_attention_mask"] == [1] * 8


def test_truncation_keep_start_keeps_prompt_start(tok):
    p, yes = ids(tok, LONG_PROMPT), ids(tok, " yes")
    el = tokenize_element(LONG_PROMPT, " yes", " yes", "keep_start", tok, max_length=12, max_prompt_length=8)
    assert el["prompt_input_ids"] == p[:8]
    assert el["rejected_input_ids"] == p[:8] + yes + [0]
    assert el["rejected_labels"] == [-100] * 8 + yes + [0]


def test_truncation_cuts_responses_when_still_too_long(tok):
    p, long, yes = ids(tok, LONG_PROMPT), ids(tok, " x" * 30), ids(tok, " yes")
    max_length, max_prompt = 20, 8
    el = tokenize_element(
        LONG_PROMPT, " x" * 30, " yes", "keep_end", tok, max_length=max_length, max_prompt_length=max_prompt
    )
    budget = max_length - max_prompt
    assert el["prompt_input_ids"] == p[-max_prompt:]
    assert el["chosen_input_ids"] == p[-max_prompt:] + long[:budget]  # EOS cut off with the rest
    assert len(el["chosen_input_ids"]) == max_length
    assert el["chosen_labels"] == [-100] * max_prompt + long[:budget]
    assert el["rejected_input_ids"] == p[-max_prompt:] + yes + [0]  # short response untouched


def test_truncation_cuts_responses_with_short_prompt(tok):
    # prompt shorter than max_prompt_length stays whole; responses cut to max_length - max_prompt_length
    prompt = "\n\nHuman: hi\n\nAssistant:"
    p, long = ids(tok, prompt), ids(tok, " x" * 30)
    assert len(p) < 16
    el = tokenize_element(prompt, " x" * 30, " x" * 30, "keep_start", tok, max_length=26, max_prompt_length=16)
    assert el["prompt_input_ids"] == p
    assert el["chosen_input_ids"] == p + long[:10]
    assert el["rejected_labels"] == [-100] * len(p) + long[:10]


@pytest.mark.parametrize("where", ["prompt", "chosen", "rejected"])
def test_eos_text_in_data_raises_naming_dataset(tok, where):
    texts = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " a", "rejected": " b"}
    texts[where] = texts[where] + EOS_TEXT + " more"
    with pytest.raises(DataError) as exc:
        tokenize_element(
            texts["prompt"],
            texts["chosen"],
            texts["rejected"],
            "keep_end",
            tok,
            max_length=512,
            max_prompt_length=256,
            source="my_dataset",
        )
    assert "my_dataset" in str(exc.value)
    assert where in str(exc.value)


def test_eos_text_in_batch_iterator_names_dataset(tok):
    examples = [
        Example(
            f"\n\nHuman: q{i}{EOS_TEXT}\n\nAssistant:", [" a", " b"], [(0, 1)], " a", "keep_end", "hh:/data/x.jsonl"
        )
        for i in range(2)
    ]
    # items are tokenized when the iterator is made, before any training step
    with pytest.raises(DataError, match="hh:/data/x.jsonl"):
        BatchIterator(examples, tok, batch_size=2, max_length=64, max_prompt_length=32, sft_mode=False, n_epochs=1)


# --------------------------------------------------------------------------------------------
# collate


def test_collate_pads_prompts_left_and_sequences_right():
    elements = [
        {
            "prompt": "p1",
            "prompt_input_ids": [5, 6, 7],
            "prompt_attention_mask": [1, 1, 1],
            "chosen_input_ids": [5, 6, 7, 8],
            "chosen_attention_mask": [1, 1, 1, 1],
            "chosen_labels": [-100, -100, -100, 8],
        },
        {
            "prompt": "p2",
            "prompt_input_ids": [9],
            "prompt_attention_mask": [1],
            "chosen_input_ids": [9, 10, 11, 12, 13, 14],
            "chosen_attention_mask": [1] * 6,
            "chosen_labels": [-100, 10, 11, 12, 13, 14],
        },
    ]
    b = collate(elements, pad_token_id=99)
    assert b["prompt"] == ["p1", "p2"]
    assert b["prompt_input_ids"].tolist() == [[5, 6, 7], [99, 99, 9]]
    assert b["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["chosen_input_ids"].tolist() == [[5, 6, 7, 8, 99, 99], [9, 10, 11, 12, 13, 14]]
    assert b["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert b["chosen_labels"].tolist() == [[-100, -100, -100, 8, -100, -100], [-100, 10, 11, 12, 13, 14]]
    for key in ("prompt_input_ids", "chosen_input_ids", "chosen_labels", "chosen_attention_mask"):
        assert b[key].dtype == torch.long


def test_collate_tokenized_elements_use_tokenizer_pad(tok):
    e1 = tokenize_element("\n\nHuman: hi\n\nAssistant:", " a", " bbb ccc ddd", "keep_end", tok, 512, 256)
    e2 = tokenize_element(LONG_PROMPT, " a", " b", "keep_end", tok, 512, 256)
    b = collate([e1, e2], tok.pad_token_id)
    n1 = len(e1["prompt_input_ids"])
    width = b["prompt_input_ids"].shape[1]
    assert width == len(e2["prompt_input_ids"]) > n1
    assert b["prompt_input_ids"][0, width - n1 :].tolist() == e1["prompt_input_ids"]
    assert (b["prompt_attention_mask"][0, : width - n1] == 0).all()
    r1 = len(e1["rejected_input_ids"])
    assert b["rejected_input_ids"][0, :r1].tolist() == e1["rejected_input_ids"]
    assert b["rejected_labels"][1, len(e2["rejected_labels"]) :].eq(-100).all()
    assert b["rejected_attention_mask"][1, len(e2["rejected_labels"]) :].eq(0).all()


# --------------------------------------------------------------------------------------------
# extract_anthropic_prompt


def test_extract_anthropic_prompt_uses_last_assistant_turn():
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"
    assert (
        extract_anthropic_prompt(dialogue) == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    )
    assert extract_anthropic_prompt("\n\nHuman: x\n\nAssistant:") == "\n\nHuman: x\n\nAssistant:"


def test_extract_anthropic_prompt_without_assistant_raises():
    with pytest.raises(ValueError):
        extract_anthropic_prompt("\n\nHuman: nobody answers")


# --------------------------------------------------------------------------------------------
# hh_sample


def test_hh_sample_loads_and_splits():
    train = get_dataset("hh_sample", "train")
    test = get_dataset("hh_sample", "test")
    assert len(train) > 100 and len(test) > 10
    assert not set(train) & set(test)
    frac = len(test) / (len(train) + len(test))
    assert 0.05 <= frac <= 0.15, frac
    for prompt, entry in list(train.items())[:50]:
        assert prompt.endswith("\n\nAssistant:")
        assert entry["pairs"] and all(a != b and max(a, b) < len(entry["responses"]) for a, b in entry["pairs"])
        assert entry["sft_target"] in entry["responses"]
    # deterministic
    assert get_dataset("hh_sample", "train") == train
    assert get_dataset("hh_sample", "test") == test


def test_load_examples_hh_sample():
    examples = load_examples(["hh_sample"], "test")
    assert examples and all(e.truncation_mode == "keep_end" and e.source == "hh_sample" for e in examples)
    assert len(examples) == len(get_dataset("hh_sample", "test"))


# --------------------------------------------------------------------------------------------
# local HH files


def row(i: int, chosen: str = "good", rejected: str = "bad") -> dict:
    prompt = f"\n\nHuman: question number {i}?\n\nAssistant:"
    return {"chosen": f"{prompt} {chosen} {i}", "rejected": f"{prompt} {rejected} {i}"}


def write_lines(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows])


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_hh_local_single_file(tmp_path, name):
    rows = [row(i) for i in range(80)]
    path = write_rows(tmp_path / name, rows)
    train = get_dataset(f"hh:{path}", "train")
    test = get_dataset(f"hh:{path}", "test")
    all_prompts = {extract_anthropic_prompt(r["chosen"]) for r in rows}
    assert set(train) | set(test) == all_prompts
    assert not set(train) & set(test)
    assert train and test
    assert get_dataset(f"hh:{path}", "test") == test  # deterministic
    p = next(iter(train))
    i = int(p.split("number ")[1].split("?")[0])
    assert train[p] == {"responses": [f" good {i}", f" bad {i}"], "pairs": [(0, 1)], "sft_target": f" good {i}"}


def test_hh_local_directory_hub_layout(tmp_path):
    root = tmp_path / "hh"
    (root / "harmless-base").mkdir(parents=True)
    (root / "helpful-base").mkdir(parents=True)
    write_rows(root / "harmless-base" / "train.jsonl.gz", [row(i) for i in range(0, 6)])
    write_rows(root / "harmless-base" / "test.jsonl.gz", [row(i) for i in range(100, 103)])
    write_rows(root / "helpful-base" / "train.jsonl.gz", [row(i) for i in range(6, 9)])
    # a repeated prompt gets two pairs; sft_target is the last chosen
    write_rows(root / "helpful-base" / "test.jsonl.gz", [row(200, "ok", "no"), row(200, "best", "worst")])
    train = get_dataset(f"hh:{root}", "train")
    test = get_dataset(f"hh:{root}", "test")
    prompt = lambda i: f"\n\nHuman: question number {i}?\n\nAssistant:"  # noqa: E731
    assert set(train) == {prompt(i) for i in range(9)}
    assert set(test) == {prompt(i) for i in (100, 101, 102, 200)}
    assert test[prompt(200)] == {
        "responses": [" ok 200", " no 200", " best 200", " worst 200"],
        "pairs": [(0, 1), (2, 3)],
        "sft_target": " best 200",
    }
    examples = load_examples([f"hh:{root}"], "train")
    assert len(examples) == 9 and all(e.truncation_mode == "keep_end" and e.source == f"hh:{root}" for e in examples)


def test_hh_local_directory_without_split_file(tmp_path):
    (tmp_path / "d" / "harmless-base").mkdir(parents=True)
    write_rows(tmp_path / "d" / "harmless-base" / "train.jsonl.gz", [row(1)])
    with pytest.raises(DataError, match="test.jsonl"):
        get_dataset(f"hh:{tmp_path / 'd'}", "test")


def test_hh_local_missing_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        get_dataset(f"hh:{missing}", "train")


BAD_LINES = {
    "malformed_json": '{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y", "rejected": ',
    "missing_rejected": json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: y"}),
    "no_assistant": json.dumps({"chosen": "\n\nHuman: only a question", "rejected": "\n\nHuman: only a question"}),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_bad_line_names_file_and_line(tmp_path, kind, name, split):
    # line 1 good, line 2 blank, line 3 good, line 4 bad, line 5 good
    lines = [json.dumps(row(1)), "", json.dumps(row(2)), BAD_LINES[kind], json.dumps(row(3))]
    path = write_lines(tmp_path / name, lines)
    with pytest.raises(DataError) as exc:
        get_dataset(f"hh:{path}", split)
    msg = str(exc.value)
    assert str(path) in msg
    assert "line 4" in msg


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_line_in_hub_layout_names_file_and_line(tmp_path, kind):
    d = tmp_path / "hh" / "harmless-base"
    d.mkdir(parents=True)
    bad = write_lines(d / "train.jsonl.gz", [json.dumps(row(1)), BAD_LINES[kind]])
    with pytest.raises(DataError) as exc:
        get_dataset(f"hh:{tmp_path / 'hh'}", "train")
    assert str(bad) in str(exc.value) and "line 2" in str(exc.value)


def test_unknown_dataset_name_raises():
    with pytest.raises(DataError, match="no_such_dataset"):
        get_dataset("no_such_dataset", "train")
    with pytest.raises(DataError, match="no_such_dataset"):
        load_examples(["hh_sample", "no_such_dataset"], "test")


# --------------------------------------------------------------------------------------------
# BatchIterator


def synthetic(n: int, source: str = "synthetic", pairs_per_prompt: int = 1) -> list[Example]:
    out = []
    for i in range(n):
        responses = [f" answer {i} {k}" for k in range(pairs_per_prompt + 1)]
        pairs = [(k, k + 1) for k in range(pairs_per_prompt)]
        out.append(
            Example(f"\n\nHuman: question {i}\n\nAssistant:", responses, pairs, responses[0], "keep_end", source)
        )
    return out


def make(tok, examples, **kw) -> BatchIterator:
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 32)
    kw.setdefault("sft_mode", False)
    return BatchIterator(examples, tok, **kw)


def prompt_ids(batch) -> list[int]:
    return [int(p.split("question ")[1].split("\n")[0]) for p in batch["prompt"]]


def test_shuffle_is_seeded_deterministic_and_differs_between_epochs(tok):
    ex = synthetic(10)
    run1 = [prompt_ids(b) for b in make(tok, ex, batch_size=2, n_epochs=2, seed=3)]
    run2 = [prompt_ids(b) for b in make(tok, ex, batch_size=2, n_epochs=2, seed=3)]
    assert run1 == run2
    assert len(run1) == 10
    epoch0 = sum(run1[:5], [])
    epoch1 = sum(run1[5:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))  # each epoch a permutation
    assert epoch0 != epoch1
    assert epoch0 != list(range(10))  # actually shuffled
    other_seed = sum([prompt_ids(b) for b in make(tok, ex, batch_size=2, n_epochs=1, seed=4)], [])
    assert other_seed != epoch0
    unshuffled = sum([prompt_ids(b) for b in make(tok, ex, batch_size=2, n_epochs=1, shuffle=False)], [])
    assert unshuffled == list(range(10))


@pytest.mark.parametrize("n_items,bs,n_examples", [(10, 4, 10), (10, 4, 8), (10, 4, 5), (20, 4, 10), (20, 3, 7)])
def test_n_examples_stops_after_ceil_batches(tok, n_items, bs, n_examples):
    batches = list(make(tok, synthetic(n_items), batch_size=bs, n_examples=n_examples, shuffle=False))
    assert len(batches) == math.ceil(n_examples / bs)
    assert all(len(b["prompt"]) == bs for b in batches)


def test_n_examples_crosses_epoch_boundary_dropping_remainder(tok):
    # 10 items, bs 4: epoch 0 gives 0-3, 4-7 (8, 9 dropped); the third batch starts epoch 1
    batches = [prompt_ids(b) for b in make(tok, synthetic(10), batch_size=4, n_examples=10, shuffle=False)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


def test_n_epochs_and_incomplete_batch_dropped(tok):
    batches = [prompt_ids(b) for b in make(tok, synthetic(10), batch_size=4, n_epochs=1, shuffle=False)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    batches = list(make(tok, synthetic(10), batch_size=4, n_epochs=3, seed=1))
    assert len(batches) == 6 and all(len(b["prompt"]) == 4 for b in batches)
    # the smaller of n_epochs and n_examples wins
    assert len(list(make(tok, synthetic(10), batch_size=4, n_epochs=3, n_examples=4))) == 1
    assert len(list(make(tok, synthetic(10), batch_size=4, n_epochs=1, n_examples=100))) == 2


def test_pairs_are_items_in_preference_mode(tok):
    ex = synthetic(2, pairs_per_prompt=2)  # 4 items
    (batch,) = list(make(tok, ex, batch_size=4, n_epochs=1, shuffle=False))
    assert batch["chosen_response_only"] == [" answer 0 0", " answer 0 1", " answer 1 0", " answer 1 1"]
    assert batch["rejected_response_only"] == [" answer 0 1", " answer 0 2", " answer 1 1", " answer 1 2"]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_skip_batches_resumes_exactly(tok, k):
    kw = dict(batch_size=3, n_epochs=2, seed=7)
    full = list(make(tok, synthetic(10), **kw))
    skipped = list(make(tok, synthetic(10), skip_batches=k, **kw))
    assert len(full) == 6 and len(skipped) == 6 - k
    for a, b in zip(full[k:], skipped, strict=False):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def test_sft_mode_has_no_rejected_keys(tok):
    ex = synthetic(4)
    batches = list(make(tok, ex, batch_size=2, n_epochs=1, sft_mode=True, shuffle=False))
    assert len(batches) == 2
    for b in batches:
        assert not [k for k in b if "rejected" in k]
        assert {"chosen_input_ids", "chosen_attention_mask", "chosen_labels", "prompt_input_ids"} <= set(b)
    # the target is sft_target followed by EOS
    b = batches[0]
    target = ids(tok, ex[0].sft_target) + [0]
    labels = [t for t in b["chosen_labels"][0].tolist() if t != -100]
    assert labels == target


def test_sft_mode_counts_prompts_not_pairs(tok):
    ex = synthetic(2, pairs_per_prompt=2)  # 4 pairs, 2 prompts
    make(tok, ex, batch_size=4, n_epochs=1)  # enough pairs
    with pytest.raises(DataError):
        make(tok, ex, batch_size=4, n_epochs=1, sft_mode=True)


def test_too_few_examples_raises(tok):
    with pytest.raises(DataError) as exc:
        make(tok, synthetic(3, source="tiny_set"), batch_size=4, n_epochs=1, split="test")
    msg = str(exc.value)
    assert "tiny_set" in msg and "test" in msg and "4" in msg


def test_needs_a_limit(tok):
    with pytest.raises(ValueError):
        make(tok, synthetic(4), batch_size=2)
