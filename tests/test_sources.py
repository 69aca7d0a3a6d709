"""Your own data and the reference's named datasets from local files, in each supported format
and schema, written as small fixture files; bad rows of each kind; the hub failing fast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import write_dataset
from dpokit.data import load_examples, tokenize_examples
from dpokit.errors import DataError
from dpokit.models import load_tokenizer
from dpokit.sources import get_dataset, is_test_prompt, parse_spec


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def plain_rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"}
            for i in range(start, start + n)]  # fmt: skip


def hh_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: question number {i}?\n\nAssistant:"
        rows.append({"chosen": f"{prompt} good {i}", "rejected": f"{prompt} bad {i}"})
    return rows


def chat_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"Say the number {i}."}],
            "chosen": [{"role": "assistant", "content": f"{i}"}],
            "rejected": [{"role": "assistant", "content": f"{i + 1}"}],
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def both_splits(spec: str, **kw) -> tuple[dict, dict]:
    return get_dataset(spec, "train", **kw), get_dataset(spec, "test", **kw)


# ============================================================================================
# formats


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "disk"])
def test_each_format_gives_the_same_table(tmp_path, fmt):
    spec = write_dataset(tmp_path / f"data.{fmt}", plain_rows(60), fmt)
    train, test = both_splits(spec)
    assert train and test and not set(train) & set(test)
    assert len(train) + len(test) == 60
    assert all(is_test_prompt(p) for p in test) and not any(is_test_prompt(p) for p in train)
    prompt = "Question 7: what is 7 plus 7?"
    entry = (train if prompt in train else test)[prompt]
    assert entry == {"responses": [" 14", " 15"], "pairs": [(0, 1)], "sft_target": " 14"}
    assert parse_spec(spec).truncation_mode == "keep_start"


def test_test_file_and_directory_splits(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", plain_rows(20))
    test_file = write_jsonl(tmp_path / "test.jsonl", plain_rows(5, start=100))
    for spec in (f"jsonl:{train_file}?test={test_file}", f"jsonl:{tmp_path}"):
        train, test = both_splits(spec)
        assert len(train) == 20 and len(test) == 5
        assert all(p.startswith("Question 10") for p in test)


def test_save_to_disk_dataset_dict_keeps_its_splits(tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(plain_rows(10)), "test": datasets.Dataset.from_list(plain_rows(3, 50))}
    ).save_to_disk(str(tmp_path / "dd"))
    train, test = both_splits(f"disk:{tmp_path / 'dd'}")
    assert len(train) == 10 and len(test) == 3


def test_hh_style_rows_in_a_jsonl_file(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows(40))
    train, test = both_splits(f"jsonl:{path}")
    entry = {**train, **test}["\n\nHuman: question number 3?\n\nAssistant:"]
    assert entry["responses"] == [" good 3", " bad 3"]


def test_conversations_without_chat_template_read_as_hh_dialogues(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    assert not getattr(tok, "chat_template", None)
    examples = load_examples([f"jsonl:{path}"], "train") + load_examples([f"jsonl:{path}"], "test")
    by_prompt = {e.prompt: e for e in examples}
    e = by_prompt["\n\nHuman: Say the number 4.\n\nAssistant:"]
    assert e.responses == [" 4", " 5"] and e.sft_target == " 4"


def test_conversations_use_the_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}<assistant>"
    tok.chat_template = template
    try:
        from dpokit.data import chat_renderer

        table = {**get_dataset(f"jsonl:{path}", "train", render=chat_renderer(tok)),
                 **get_dataset(f"jsonl:{path}", "test", render=chat_renderer(tok))}  # fmt: skip
    finally:
        tok.chat_template = None
    assert table["<user>Say the number 4.</user><assistant>"]["responses"] == ["4", "5"]


def test_conversations_with_an_implicit_prompt(tmp_path):
    rows = [
        {"chosen": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "go away"}]}
        for i in range(20)
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    table = {**get_dataset(f"jsonl:{path}", "train"), **get_dataset(f"jsonl:{path}", "test")}
    assert table["\n\nHuman: Hi 3\n\nAssistant:"]["responses"] == [" hello", " go away"]


def test_several_datasets_mix(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", plain_rows(30))
    examples = load_examples(["hh_sample", f"jsonl:{a}"], "train")
    sources = {e.source for e in examples}
    assert sources == {"hh_sample", f"jsonl:{a}"}
    assert {e.truncation_mode for e in examples if e.source == "hh_sample"} == {"keep_end"}


# ============================================================================================
# the reference's named datasets from local copies in the hub's schema


def shp_row(i: int, score_a: int, score_b: int, label: int) -> dict:
    return {"history": f"post {i}", "human_ref_A": f"answer A{i}", "human_ref_B": f"answer B{i}",
            "labels": label, "score_A": score_a, "score_B": score_b}  # fmt: skip


def test_shp_keeps_pairs_with_a_score_ratio_of_two_and_the_best_response_as_target(tmp_path):
    root = tmp_path / "shp" / "askscience"
    root.mkdir(parents=True)
    rows = [shp_row(1, 10, 2, 1), shp_row(1, 3, 9, 0), shp_row(2, 10, 6, 1)]  # the last: ratio 1.67, dropped
    write_jsonl(root / "train.json", rows)
    write_jsonl(root / "test.json", [shp_row(9, 4, 1, 1)])
    train, test = both_splits(f"shp:{tmp_path / 'shp'}")
    prompt = "\n\nHuman: post 1\n\nAssistant:"
    assert set(train) == {prompt} and set(test) == {"\n\nHuman: post 9\n\nAssistant:"}
    entry = train[prompt]
    assert entry["responses"] == [" answer A1", " answer B1", " answer A1", " answer B1"]
    assert entry["pairs"] == [(0, 1), (3, 2)]  # labels 1: A preferred; 0: B preferred
    assert entry["sft_target"] == " answer A1"  # score 10, the best of all its responses


def test_se_strips_html_but_code_orders_pairs_by_score_and_splits_one_percent(tmp_path):
    import datasets

    def row(i: int) -> dict:
        return {"question": f"<p>How do I print {i}?</p>",
                "answers": [{"text": f"<p>Use</p><pre><code>print({i})</code></pre>", "pm_score": 5},
                            {"text": "<p>You <b>cannot</b>.</p>", "pm_score": 1}]}  # fmt: skip

    path = tmp_path / "se.parquet"
    datasets.Dataset.from_list([row(i) for i in range(200)]).to_parquet(str(path))
    train, test = both_splits(f"se:{path}")
    assert len(test) == 2 and len(train) == 198  # 1% by the reference's seeded shuffle
    entry = {**train, **test}["\n\nHuman: How do I print 7?\n\nAssistant:"]
    # the reference keeps a paragraph's own text (not that of tags inside it) and code blocks whole
    assert entry["responses"] == [" Use\n\n<code>print(7)</code>", " You ."]
    assert entry["pairs"] == [(0, 1)] and entry["sft_target"] == entry["responses"][0]


def test_the_hub_unreachable_fails_fast_with_the_local_hint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(DataError, match=r"not reachable.*hh:PATH"):
        get_dataset("hh", "train")


# ============================================================================================
# bad rows


BAD = {
    "empty response": {"prompt": "Q?", "chosen": " ", "rejected": " no"},
    "same response": {"prompt": "Q?", "chosen": " yes", "rejected": " yes"},
    "missing field": {"prompt": "Q?", "chosen": " yes"},
    "two prompts": {"chosen": "\n\nHuman: one\n\nAssistant: a", "rejected": "\n\nHuman: two\n\nAssistant: b"},
}
WHY = {"empty response": "response is empty", "same response": "same response", "missing field": "'rejected' is missing",
       "two prompts": "does not start with the chosen dialogue's prompt"}  # fmt: skip


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_row_in_your_file_is_refused_naming_file_and_line(tmp_path, kind):
    rows = [*plain_rows(3), BAD[kind], *plain_rows(3, 10)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as err:
        get_dataset(f"jsonl:{path}", "train")
    message = str(err.value)
    assert str(path) in message and "line 4" in message and WHY[kind] in message
    assert "1 bad row(s)" in message and "data.on_bad_row=skip" in message


def test_bad_rows_skipped_are_counted_and_reported_once(tmp_path):
    rows = [*plain_rows(10), *BAD.values(), *plain_rows(10, 50)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    said: list[str] = []
    reported: set = set()  # one per run
    train = get_dataset(f"jsonl:{path}", "train", on_bad_row="skip", log=said.append, reported=reported)
    test = get_dataset(f"jsonl:{path}", "test", on_bad_row="skip", log=said.append, reported=reported)
    assert len(train) + len(test) == 20
    assert len(said) == 1  # a file split by hash: one report, not one per split
    assert "4 bad row(s) in 24" in said[0] and "line 11" in said[0] and "line 14" in said[0]


def test_named_datasets_skip_their_bad_rows_by_default(capsys):
    train = get_dataset("hh_sample", "train", log=print)
    assert len(train) > 2000
    out = capsys.readouterr().out
    assert "hh_sample" in out and "8 bad row(s)" in out and "skipped" in out


@pytest.mark.parametrize("policy", ["auto", "skip", "error"])
def test_prompts_longer_than_max_length(tok, policy):
    from dpokit.data import Example

    examples = [Example("word " * n, [" a", " b"], [(0, 1)], " a", "keep_start", "jsonl:x") for n in (5, 300, 6)]
    said: list[str] = []
    kwargs = {"max_length": 64, "max_prompt_length": 32, "sft_mode": False, "on_bad_row": policy, "log": said.append}
    if policy == "error":
        with pytest.raises(DataError, match="1 prompt.*longer than max_length"):
            tokenize_examples(examples, tok, **kwargs)
        return
    split = tokenize_examples(examples, tok, **kwargs)
    assert len(said) == 1 and "longer than max_length (64 tokens)" in said[0]
    if policy == "skip":
        assert split.kept.tolist() == [0, 2]
    else:  # kept, its start cut as the reference does
        assert split.kept.tolist() == [0, 1, 2]
        prompt, chosen, _ = split.ids(1)
        assert len(prompt) == 32 and math.isclose(len(prompt) + len(chosen), 34)


def test_tokenized_data_is_cached_by_content(tmp_path, tok):
    from dpokit.data import Example

    examples = [Example(f"prompt {i}", [" a", " b"], [(0, 1)], " a", "keep_start", "x") for i in range(8)]
    kwargs = {"max_length": 64, "max_prompt_length": 32, "sft_mode": False, "cache_dir": str(tmp_path)}
    first = tokenize_examples(examples, tok, **kwargs)
    files = list((tmp_path / "tokenized").iterdir())
    assert len(files) == 1
    again = tokenize_examples(examples, tok, **kwargs)  # from the file
    assert again.tokens.equal(first.tokens) and again.offsets.equal(first.offsets)
    examples[3].responses[0] = " changed"
    tokenize_examples(examples, tok, **kwargs)
    assert len(list((tmp_path / "tokenized").iterdir())) == 2  # other content, other key
