"""Build dpokit's bundled ``tiny`` model assets: a byte-level BPE tokenizer and a GPT-2 config.

Why this exists: dpokit must run end to end (SFT, DPO, evaluation, tests) on a machine with no
network access, so it cannot download a tokenizer or a model from the Hugging Face hub. Instead
it ships, in ``src/dpokit/assets/tiny/``, a small tokenizer trained here on the bundled
``hh_sample`` preference data and a ``config.json`` for a small GPT-2 style causal LM. No weights
are shipped: dpokit builds the model from the config with a seed
(``AutoModelForCausalLM.from_config``).

The build is deterministic (rerunning it rewrites byte-identical files), so the committed assets
can always be regenerated and checked with::

    .venv/bin/python scripts/build_tiny_assets.py

After writing the files the script loads them back the way dpokit does and prints some checks
(round trip, eos handling, parameter count, token lengths of the HH pairs); ``--no-check`` skips
them.
"""

from __future__ import annotations

import os

# The tokenizers BPE trainer parallelises with rayon; one thread keeps the merge order (and so the
# written files) independent of the machine's core count. The corpus is small, so this is cheap.
# Must be set before `tokenizers` (also imported by `transformers`) is loaded.
os.environ["RAYON_NUM_THREADS"] = "1"

import argparse
import gzip
import json
import statistics
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "src" / "dpokit" / "assets" / "hh_sample" / "harmless-base-test.jsonl.gz"
DEFAULT_OUT = REPO_ROOT / "src" / "dpokit" / "assets" / "tiny"

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096
MIN_FREQUENCY = 2
MODEL_MAX_LENGTH = 512
N_EMBD = 192
N_LAYER = 4
N_HEAD = 4
ASSISTANT_TAG = "\n\nAssistant:"


def read_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """Yield ``(chosen, rejected)`` from an HH-RLHF style ``.jsonl.gz`` file, line by line."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                yield row["chosen"], row["rejected"]


def iter_texts(path: Path) -> Iterator[str]:
    """Yield the chosen and rejected texts of every pair (the tokenizer's training corpus)."""
    for chosen, rejected in read_pairs(path):
        yield chosen
        yield rejected


def train_tokenizer(data: Path, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style, no unk token) on the HH texts."""
    tok = Tokenizer(models.BPE())  # unk_token left unset: every byte is in the alphabet
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(data), trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> int:
    """Wrap ``tok`` in ``PreTrainedTokenizerFast``, save it to ``out``; return the vocab size."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(str(out))
    # transformers 5 records its own class name ("TokenizersBackend"), which transformers 4 cannot
    # resolve; "PreTrainedTokenizerFast" loads the same tokenizer.json in both (an alias in v5).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(hf_tok)


def save_config(out: Path, vocab_size: int, eos_id: int) -> None:
    """Write ``config.json`` for a small GPT-2 style causal LM (no weights)."""
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=MODEL_MAX_LENGTH,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(str(out))


def build(data: Path, out: Path) -> None:
    """Train and write the tokenizer and the model config into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(data)
    eos_id = tok.token_to_id(EOS_TOKEN)
    assert eos_id is not None
    vocab_size = save_tokenizer(tok, out)
    save_config(out, vocab_size, eos_id)


def split_prompt(chosen: str) -> str:
    """The prompt: ``chosen`` up to and including its last ``"\\n\\nAssistant:"``."""
    idx = chosen.rfind(ASSISTANT_TAG)
    if idx < 0:
        raise ValueError("no assistant turn in dialogue")
    return chosen[: idx + len(ASSISTANT_TAG)]


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile of ``values`` (``q`` in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def check(data: Path, out: Path) -> None:
    """Load the written assets the way dpokit does and print sanity checks."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    print(f"tokenizer class: {type(tok).__name__}, len: {len(tok)}, max_length: {tok.model_max_length}")
    assert tok.eos_token == EOS_TOKEN, tok.eos_token
    assert tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id
    assert tok.bos_token_id == tok.eos_token_id
    print(f"eos/bos/pad id: {tok.eos_token_id}/{tok.bos_token_id}/{tok.pad_token_id}, unk: {tok.unk_token}")

    pairs = list(read_pairs(data))
    chosen, rejected = pairs[0]
    ids = tok(chosen, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == chosen, "round trip failed"
    assert tok(chosen)["input_ids"] == ids, "add_special_tokens=True should add nothing"
    n_bad = sum(tok.decode(tok(t, add_special_tokens=False)["input_ids"]) != t for pair in pairs for t in pair)
    print(f"round trip exact: first pair yes; mismatches over all {2 * len(pairs)} texts: {n_bad}")
    eos_ids = tok(f"Hi.{EOS_TOKEN}Bye.", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id in eos_ids, eos_ids
    print(f"'Hi.{EOS_TOKEN}Bye.' -> {eos_ids}")
    n_rej = len(tok(rejected, add_special_tokens=False)["input_ids"])
    print(f"first pair: chars {len(chosen)}/{len(rejected)}, tokens chosen {len(ids)} / rejected {n_rej}")

    totals: list[int] = []
    n_prefix_mismatch = 0
    for chosen, rejected in pairs:
        prompt = split_prompt(chosen)
        if not rejected.startswith(prompt):
            n_prefix_mismatch += 1
        p = len(tok(prompt, add_special_tokens=False)["input_ids"])
        c = len(tok(chosen[len(prompt) :], add_special_tokens=False)["input_ids"])
        r = len(tok(rejected[len(split_prompt(rejected)) :], add_special_tokens=False)["input_ids"])
        totals.append(p + max(c, r))
    print(
        f"prompt+longest response tokens over {len(totals)} pairs (no eos): "
        f"median {statistics.median(totals)}, p90 {percentile(totals, 90)}, max {max(totals)}, "
        f"> {MODEL_MAX_LENGTH}: {sum(t > MODEL_MAX_LENGTH for t in totals)}; "
        f"rejected not starting with chosen's prompt: {n_prefix_mismatch}"
    )

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(out)))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, parameters: {n_params:,}")

    files = sorted(p for p in out.iterdir() if p.is_file())
    for f in files:
        print(f"  {f.name}: {f.stat().st_size:,} bytes")
    print(f"total: {sum(f.stat().st_size for f in files):,} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build dpokit's bundled tiny tokenizer and GPT-2 config (deterministic).",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF .jsonl.gz to train on")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--no-check", action="store_true", help="skip the checks after building")
    args = parser.parse_args(argv)
    build(args.data, args.out)
    print(f"wrote {args.out}")
    if not args.no_check:
        check(args.data, args.out)


if __name__ == "__main__":
    main()
