"""Where preference data comes from, as prompt tables: prompt -> {responses, pairs, sft_target}.

Named datasets keep the DPO reference's rules: `hh` (Anthropic/hh-rlhf; `hh:PATH` for a local
copy in the hub's schema, `hh_sample` for the bundled test split), `shp` (score ratio >= 2,
best-scored response as SFT target) and `se` (HTML stripped except code, pairs by score, 1% test
split). Your own data, without code, in the formats the ecosystem uses:

    jsonl:PATH  json:PATH  parquet:PATH  disk:DIR (datasets' save_to_disk)   [?test=PATH]

with rows `{prompt, chosen, rejected}` as strings, HH-style `{chosen, rejected}` dialogues, or
conversations (lists of `{role, content}` messages, rendered with the tokenizer's chat template
when it has one); unpaired rows `{prompt, completion, label}` (label true for a desirable
completion) are KTO's data. A file has no splits: one prompt in ten (by hash) is the test split, unless
`?test=PATH` names a test file; a directory holds `train.*` and `test.*`.

Bad rows (a missing field, an empty response, chosen equal to rejected, an HH pair whose two
dialogues have different prompts) are counted and reported once per dataset and split, then
refused or skipped (config key data.on_bad_row).
"""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import itertools
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dpokit.errors import DataError

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
BUNDLED = {"hh_sample": "assets/hh_sample/harmless-base-test.jsonl.gz"}
NAMED = ("hh", "hh_sample", "shp", "se")
FILE_FORMATS = ("jsonl", "json", "parquet", "disk")
TEST_FRACTION_BUCKETS = 10  # a dataset without splits: 1 prompt in 10 goes to the test split
SHOWN_BAD_ROWS = 5

PromptTable = dict[str, dict]
ChatRenderer = Callable[[list[dict]], str]


# ============================================================================================
# which dataset a config entry names


@dataclass(frozen=True)
class Spec:
    text: str  # as written in config key `datasets`
    kind: str  # hh, hh_sample, shp, se, hh_local, or a file format
    path: Path | None = None
    test_path: Path | None = None

    @property
    def own_data(self) -> bool:
        """Data given by path, which the user can fix; the named datasets' rows are not theirs to edit."""
        return self.kind not in NAMED

    @property
    def truncation_mode(self) -> str:
        """Dialogues keep their end when the prompt must be cut (the reference's rule for hh)."""
        return "keep_end" if self.kind in ("hh", "hh_sample", "hh_local") else "keep_start"


def parse_spec(text: str) -> Spec:
    if text in NAMED:
        return Spec(text, text)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("hh", "shp", "se") and rest:
        return Spec(text, f"{prefix}_local", Path(rest).expanduser())
    if sep and prefix in FILE_FORMATS and rest:
        path, _, query = rest.partition("?test=")
        return Spec(text, prefix, Path(path).expanduser(), Path(query).expanduser() if query else None)
    from dpokit.config import did_you_mean

    raise DataError(
        f"unknown dataset '{text}' in config key 'datasets'{did_you_mean(text, list(NAMED))}; known: "
        f"{', '.join(NAMED)}, hh:PATH, shp:PATH or se:PATH (local copies in the hub's layout), or your own file as "
        f"jsonl:PATH, json:PATH, parquet:PATH or disk:DIR"
    )


# ============================================================================================
# bad rows


@dataclass
class BadRows:
    """Bad rows of one dataset split: counted, the first few kept with where and why."""

    seen: int = 0
    found: list[tuple[str, str]] = field(default_factory=list)  # (where, why), the first few
    count: int = 0

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.found) < SHOWN_BAD_ROWS:
            self.found.append((where, why))

    def describe(self) -> str:
        """'FILE: line 4: why; line 9: why, ...' (the file named once when all are in one)."""
        sources = {where.rsplit(", ", 1)[0] for where, _ in self.found}
        if len(sources) == 1 and all(", " in where for where, _ in self.found):
            text = f"{sources.pop()}: " + "; ".join(f"{where.rsplit(', ', 1)[1]}: {why}" for where, why in self.found)
        else:
            text = "; ".join(f"{where}: {why}" for where, why in self.found)
        return text + ("; ..." if self.count > len(self.found) else "")

    def settle(
        self, spec: Spec, split: str, policy: str, log: Callable[[str], None], reported: set | None = None
    ) -> None:
        """Refuse (policy 'error') or report and skip ('skip'); 'auto' refuses the user's own
        files and skips in the named datasets, whose rows cannot be fixed. A report already in
        `reported` is not repeated (both splits of a file split by hash see the same bad rows)."""
        if not self.count:
            return
        what = f"dataset '{spec.text}' has {self.count} bad row(s) in {self.seen} ({self.describe()})"
        if policy == "error" or (policy == "auto" and spec.own_data):
            raise DataError(f"{what}; fix them, or pass data.on_bad_row=skip to train without them")
        if reported is None or what not in reported:
            log(f"WARNING: {what}; skipped (data.on_bad_row={policy})")
        if reported is not None:
            reported.add(what)


def check_pair(prompt: str, chosen: str, rejected: str, where: str, bad: BadRows) -> bool:
    bad.seen += 1
    if not chosen.strip() or not rejected.strip():
        bad.add(where, f"the {'chosen' if not chosen.strip() else 'rejected'} response is empty")
        return False
    if chosen == rejected:
        bad.add(where, "chosen and rejected are the same response")
        return False
    return True


# ============================================================================================
# HH dialogues


def extract_anthropic_prompt(dialogue: str) -> str:
    """The prompt is the dialogue up to and including the last '\\n\\nAssistant:'."""
    idx = dialogue.rfind(ASSISTANT)
    if idx == -1:
        raise ValueError(f"no '{ASSISTANT.strip()}' turn in the dialogue")
    return dialogue[: idx + len(ASSISTANT)]


def split_dialogues(chosen: Any, rejected: Any, where: str, bad: BadRows) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) of an HH pair, or None for a bad row."""
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            bad.seen += 1
            bad.add(where, f"field '{key}' is {'missing' if value is None else 'not a string'}")
            return None
    try:
        prompt = extract_anthropic_prompt(chosen)
    except ValueError as err:
        bad.seen += 1
        bad.add(where, f"'chosen' has {err}")
        return None
    if not rejected.startswith(prompt):
        bad.seen += 1
        bad.add(where, "the rejected dialogue does not start with the chosen dialogue's prompt")
        return None
    triple = (prompt, chosen[len(prompt) :], rejected[len(prompt) :])
    return triple if check_pair(*triple, where, bad) else None


def pairs_table(triples: Iterable[tuple]) -> PromptTable:
    """One entry per prompt; each (prompt, chosen, rejected) adds a pair; the SFT target is the
    last chosen response (the reference's rule for hh). A (prompt, completion, label) row of
    unpaired data (KTO) adds a labelled completion to `unpaired`; the last desirable one is the
    SFT target of a prompt without pairs."""
    data: PromptTable = {}
    for row in triples:
        if isinstance(row[2], bool):
            prompt, completion, desirable = row
            entry = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": None})
            entry.setdefault("unpaired", []).append((len(entry["responses"]), desirable))
            entry["responses"].append(completion)
            if desirable and not entry["pairs"]:
                entry["sft_target"] = completion
            continue
        prompt, chosen, rejected = row
        entry = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": chosen})
        n = len(entry["responses"])
        entry["pairs"].append((n, n + 1))
        entry["responses"].extend([chosen, rejected])
        entry["sft_target"] = chosen
    return data


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_hh_file(path: Path) -> Iterator[tuple[Any, Any, str]]:
    """Yield (chosen dialogue, rejected dialogue, 'file, line N') for each line of a file in the
    hub's schema; a line that is not a JSON object stops with file and line."""
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
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {lineno}: expected an object with fields 'chosen' and 'rejected'")
                yield row.get("chosen"), row.get("rejected"), f"{path}, line {lineno}"
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read the file ({err})") from None


def is_test_prompt(prompt: str) -> bool:
    return hashlib.sha1(prompt.encode()).digest()[0] % TEST_FRACTION_BUCKETS == 0


def get_hh_local(path: Path, split: str, bad: BadRows) -> PromptTable:
    """HH from a local copy in the hub's schema.

    A directory holds `{split}.jsonl[.gz]` files (at its top or in subset folders such as
    `harmless-base/`, all of which are used, as the hub's default config does). A single file has
    no splits: its prompts are divided deterministically, one in ten (by hash) to 'test'.
    """
    root = path
    if root.is_dir():
        files = sorted(p for p in root.rglob(f"{split}.jsonl*") if p.name in (f"{split}.jsonl", f"{split}.jsonl.gz"))
        if not files:
            raise DataError(f"dataset directory {root} has no {split}.jsonl or {split}.jsonl.gz (hub layout expected)")
        rows = itertools.chain.from_iterable(read_hh_file(f) for f in files)
        return pairs_table(t for c, r, where in rows if (t := split_dialogues(c, r, where, bad)))
    if root.is_file():
        triples = (t for c, r, where in read_hh_file(root) if (t := split_dialogues(c, r, where, bad)))
        return pairs_table(t for t in triples if is_test_prompt(t[0]) == (split == "test"))
    raise DataError(f"dataset path {root} does not exist")


# ============================================================================================
# the hub


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be used right now (None: try it). Fails fast instead of
    letting the hub client retry for half a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None  # offline mode: the datasets library answers from its cache at once
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=3):
            return None
    except OSError as err:
        return f"the hub is not reachable ({err.strerror or err})"


def load_hub(name: str, hub_name: str, split: str, cache_dir: str | None) -> Any:
    import datasets

    hint = f"; for a local copy use datasets=[{name}:PATH]" if name == "hh" else ""
    reason = hub_unreachable_reason()
    if reason is not None:
        raise DataError(f"cannot load dataset '{name}' ({hub_name}, split {split}): {reason}{hint}")
    try:
        return datasets.load_dataset(hub_name, split=split, cache_dir=cache_dir)
    except Exception as err:  # the datasets library raises many types for "not reachable"
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(
            f"cannot load dataset '{name}' ({hub_name}, split {split}) from the hub: {type(err).__name__}: {first}{hint}"
        ) from None


def get_hh_hub(split: str, cache_dir: str | None, bad: BadRows) -> PromptTable:
    rows = load_hub("hh", "Anthropic/hh-rlhf", split, cache_dir)
    where = f"Anthropic/hh-rlhf {split} row"
    return pairs_table(
        t for i, row in enumerate(rows) if (t := split_dialogues(row["chosen"], row["rejected"], f"{where} {i}", bad))
    )


def shp_table(rows: Iterable[dict], where: str, bad: BadRows) -> PromptTable:
    """Stanford Human Preferences rows -> prompt table: pairs whose score ratio is at least 2;
    the SFT target is a prompt's best-scored response."""
    data: PromptTable = {}
    for i, row in enumerate(rows):
        scores = [row["score_A"], row["score_B"]]
        if max(scores[0] / scores[1], scores[1] / scores[0]) < 2:
            continue
        prompt = HUMAN + " " + row["history"] + ASSISTANT
        a, b = " " + row["human_ref_A"], " " + row["human_ref_B"]
        chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
        if not check_pair(prompt, chosen, rejected, f"{where} {i}", bad):
            continue
        entry = data.setdefault(prompt, {"responses": [], "pairs": [], "scores": []})
        n = len(entry["responses"])
        entry["pairs"].append((n, n + 1) if row["labels"] == 1 else (n + 1, n))
        entry["responses"].extend([a, b])
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


def se_table(rows: Iterable[dict], where: str, bad: BadRows) -> PromptTable:
    """StackExchange rows -> prompt table: HTML stripped except code, every pair of answers
    ordered by score, the best-scored answer as SFT target."""
    data: PromptTable = {}
    for i, row in enumerate(rows):
        prompt = HUMAN + " " + strip_html(row["question"]) + ASSISTANT
        responses = [" " + strip_html(a["text"]) for a in row["answers"]]
        scores = [a["pm_score"] for a in row["answers"]]
        pairs = []
        for a, b in itertools.combinations(range(len(responses)), 2):
            pair = (a, b) if scores[a] > scores[b] else (b, a)  # the reference's order, ties included
            if check_pair(prompt, responses[pair[0]], responses[pair[1]], f"{where} {i}", bad):
                pairs.append(pair)
        if pairs:
            best = max(range(len(responses)), key=lambda k: scores[k])
            data[prompt] = {"responses": responses, "pairs": pairs, "sft_target": responses[best]}
    return data


def get_shp(split: str, cache_dir: str | None, bad: BadRows, path: Path | None = None) -> PromptTable:
    """From the hub, or a local copy in its layout: `{domain}/{split}.json` files (or one file,
    split by prompt hash)."""
    if path is None:
        return shp_table(load_hub("shp", "stanfordnlp/SHP", split, cache_dir), f"stanfordnlp/SHP {split} row", bad)
    rows, hash_split = _local_hub_copy(path, split, "shp")
    table = shp_table(rows, f"{path} ({split}) row", bad)
    if hash_split:
        table = {p: e for p, e in table.items() if is_test_prompt(p) == (split == "test")}
    return table


def get_se(split: str, cache_dir: str | None, bad: BadRows, path: Path | None = None) -> PromptTable:
    """StackExchange preferences (the hub's, or a local copy: its parquet or JSON files); 1%
    (seeded shuffle) is the test split, as in the reference."""
    if path is None:
        rows = load_hub("se", "HuggingFaceH4/stack-exchange-preferences", "train", cache_dir)
    else:
        rows, _ = _local_hub_copy(path, None, "se")
    rows = rows.shuffle(seed=42)
    n_test = int(len(rows) * 0.01)
    rows = rows.select(range(n_test)) if split == "test" else rows.select(range(n_test, len(rows)))
    return se_table(rows, f"HuggingFaceH4/stack-exchange-preferences {split} row", bad)


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()  # dpokit shows its own progress; these would only clutter logs
    return datasets


def _local_hub_copy(path: Path, split: str | None, name: str) -> tuple[Any, bool]:
    """The rows of a local copy of a hub dataset: a file, or a directory of `{split}.*` files
    (all files when split is None); returns (rows, whether the caller must split by hash)."""
    datasets = _quiet_datasets()

    if not path.exists():
        raise DataError(f"dataset path {path} (config key 'datasets', '{name}:...') does not exist")
    suffixes = (".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")
    if path.is_file():
        files, hash_split = [path], split is not None
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes)
                       and (split is None or p.name.split(".")[0] == split))  # fmt: skip
        hash_split = False
        if not files:
            wanted = f"{split}.json or {split}.parquet" if split else "JSON or parquet"
            raise DataError(f"dataset directory {path} has no {wanted} files (the hub's layout for '{name}')")
    builder = "parquet" if files[0].name.endswith(".parquet") else "json"
    with tempfile.TemporaryDirectory(prefix="dpokit-rows-") as scratch:
        try:
            rows = datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split="train", cache_dir=scratch, keep_in_memory=True
            )
        except Exception as err:
            raise DataError(_unreadable(files[0], builder, err)) from None
    return rows, hash_split


# ============================================================================================
# your own files


def _file_rows(spec: Spec, path: Path) -> tuple[Any, Callable[[int], str]]:
    """The rows of one file (or save_to_disk directory) through the datasets library, and a
    function from row index to where it is ('file, line N' for JSON lines)."""
    datasets = _quiet_datasets()

    if not path.exists():
        raise DataError(f"dataset file {path} (config key 'datasets', '{spec.text}') does not exist")
    if spec.kind == "disk":
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(f"{path} is not a directory written by datasets' save_to_disk ({err})") from None
        return loaded, lambda i: f"{path}, row {i}"
    if path.is_dir():
        raise DataError(f"dataset path {path} is a directory; {spec.kind}: needs a file (or disk:DIR)")
    builder = "parquet" if spec.kind == "parquet" else "json"
    # parsed into memory each time (the tokenized result is what dpokit caches): no Arrow files
    # are left behind by a start that fails
    with tempfile.TemporaryDirectory(prefix="dpokit-rows-") as scratch:
        try:
            rows = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=scratch, keep_in_memory=True
            )
        except Exception as err:
            raise DataError(_unreadable(path, builder, err)) from None
    if spec.kind == "jsonl":
        lines = _nonblank_lines(path)
        return rows, lambda i: f"{path}, line {lines[i] if i < len(lines) else i + 1}"
    return rows, lambda i: f"{path}, row {i}"


def _nonblank_lines(path: Path) -> list[int]:
    with _open_text(path) as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def _unreadable(path: Path, builder: str, err: Exception) -> str:
    """One sentence for a file the datasets library cannot read; for JSON, the first bad line."""
    if builder == "json":
        try:
            with _open_text(path) as f:
                text = f.read()
            try:
                json.loads(text)  # a JSON document (array of rows) that is simply valid: not the problem
            except json.JSONDecodeError:
                for lineno, line in enumerate(text.splitlines(), start=1):
                    if line.strip():
                        try:
                            json.loads(line)
                        except json.JSONDecodeError as line_err:
                            return f"{path}, line {lineno}: not valid JSON ({line_err.msg} at column {line_err.colno})"
        except (OSError, UnicodeDecodeError) as read_err:
            return f"{path}: cannot read the file ({read_err})"
    return f"{path}: cannot read it as {builder} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def render_plain(messages: list[dict]) -> str:
    """A conversation as the reference's HH dialogues spell it (for tokenizers without a chat template)."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    text = "".join(f"\n\n{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)
    return text + ASSISTANT


def _messages(value: Any) -> list[dict] | None:
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    return None


def _assistant_text(messages: list[dict], render: ChatRenderer | None) -> str:
    answer = " " if render is None else ""  # HH dialogues put a space after 'Assistant:'
    return answer + "".join(m["content"] for m in messages if m["role"] == "assistant")


def row_unpaired(row: dict, where: str, bad: BadRows, render: ChatRenderer | None) -> tuple[str, str, bool] | None:
    """(prompt, completion, label) of an unpaired row `{prompt, completion, label}` (strings, or
    lists of {role, content} messages), label a boolean: true for a desirable completion."""
    bad.seen += 1
    missing = [k for k in ("prompt", "completion", "label") if row.get(k) in (None, "")]
    if missing:
        bad.add(where, f"field '{missing[0]}' is missing")
        return None
    prompt, completion, label = row["prompt"], row["completion"], row["label"]
    if not isinstance(label, bool):
        bad.add(where, f"field 'label' is {label!r}; it must be true (desirable) or false (undesirable)")
        return None
    if isinstance(prompt, str) and isinstance(completion, str):
        text = prompt
    else:
        p_msgs, c_msgs = _messages(prompt), _messages(completion)
        if not p_msgs or c_msgs is None:
            bad.add(where, "expected strings 'prompt' and 'completion', or lists of {role, content} messages")
            return None
        text, completion = (render or render_plain)(p_msgs), _assistant_text(c_msgs, render)
    if not completion.strip():
        bad.add(where, "the completion is empty")
        return None
    return text, completion, label


def row_triple(row: dict, where: str, bad: BadRows, render: ChatRenderer | None) -> tuple | None:
    """(prompt, chosen response, rejected response) of a row in any of the supported schemas,
    or (prompt, completion, label) of an unpaired row (`row_unpaired`)."""
    if "completion" in row or "label" in row:
        return row_unpaired(row, where, bad, render)
    missing = [k for k in ("chosen", "rejected") if row.get(k) in (None, "")]
    if missing:
        bad.seen += 1
        bad.add(where, f"field '{missing[0]}' is missing")
        return None
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:  # HH-style dialogues, the prompt inside each
            return split_dialogues(chosen, rejected, where, bad)
        if isinstance(prompt, str):
            return (prompt, chosen, rejected) if check_pair(prompt, chosen, rejected, where, bad) else None
    c_msgs, r_msgs = _messages(chosen), _messages(rejected)
    if c_msgs is not None and r_msgs is not None:
        p_msgs = _messages(prompt) if prompt is not None else None
        if prompt is None:  # the prompt is what the two conversations share
            shared = next((i for i, (a, b) in enumerate(zip(c_msgs, r_msgs, strict=False)) if a != b), 0)
            p_msgs, c_msgs, r_msgs = c_msgs[:shared], c_msgs[shared:], r_msgs[shared:]
        if p_msgs:
            text = (render or render_plain)(p_msgs)
            c, r = _assistant_text(c_msgs, render), _assistant_text(r_msgs, render)
            return (text, c, r) if check_pair(text, c, r, where, bad) else None
    bad.seen += 1
    bad.add(where, "expected strings 'prompt', 'chosen', 'rejected', HH dialogues 'chosen', 'rejected', "
                   "lists of {role, content} messages, or unpaired 'prompt', 'completion', 'label'")  # fmt: skip
    return None


def get_file_dataset(
    spec: Spec, split: str, cache_dir: str | None, bad: BadRows, render: ChatRenderer | None
) -> PromptTable:
    assert spec.path is not None
    path, hash_split = spec.path, True
    if split == "test" and spec.test_path is not None:
        path, hash_split = spec.test_path, False
    elif spec.kind != "disk" and path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.split(".")[0] == split and p.is_file())
        if not found and split == "test":
            found = sorted(p for p in path.iterdir() if p.name.split(".")[0] == "train" and p.is_file())
        else:
            hash_split = False
        if not found:
            raise DataError(f"dataset directory {path} has no {split}.{spec.kind} file")
        path = found[0]
    rows, where = _file_rows(spec, path)
    if spec.kind == "disk" and hasattr(rows, "keys"):  # a DatasetDict: its own splits
        if split not in rows:
            raise DataError(f"{path} holds splits {', '.join(rows.keys())} but no '{split}'")
        rows, hash_split = rows[split], False
    triples = (t for i, row in enumerate(rows) if (t := row_triple(row, where(i), bad, render)))
    if hash_split and spec.test_path is None:
        triples = (t for t in triples if is_test_prompt(t[0]) == (split == "test"))
    return pairs_table(triples)


# ============================================================================================
# one entry point


def get_dataset(
    name: str,
    split: str,
    cache_dir: str | None = None,
    on_bad_row: str = "auto",
    render: ChatRenderer | None = None,
    log: Callable[[str], None] = print,
    reported: set | None = None,
) -> PromptTable:
    """Load one dataset split by its config entry, bad rows refused or skipped."""
    spec = parse_spec(name)
    bad = BadRows()
    if spec.kind == "hh_local":
        assert spec.path is not None
        table = get_hh_local(spec.path, split, bad)
    elif spec.kind == "hh_sample":
        table = get_hh_local(Path(str(resources.files("dpokit") / BUNDLED["hh_sample"])), split, bad)
    elif spec.kind == "hh":
        table = get_hh_hub(split, cache_dir, bad)
    elif spec.kind in ("shp", "shp_local"):
        table = get_shp(split, cache_dir, bad, spec.path)
    elif spec.kind in ("se", "se_local"):
        table = get_se(split, cache_dir, bad, spec.path)
    else:
        table = get_file_dataset(spec, split, cache_dir, bad, render)
    bad.settle(spec, split, on_bad_row, log, reported)
    return table
