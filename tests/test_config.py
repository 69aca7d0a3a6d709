"""Config: the reference's command line, validation errors that name the key, eval_every
rounding, --help, and the real CLI's one-line errors."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from dpokit.config import (
    Config,
    DPOLossConfig,
    IPOLossConfig,
    ModelConfig,
    SFTLossConfig,
    help_text,
    parse_args,
    round_eval_every,
    validate,
)
from dpokit.errors import ConfigError

BIN = Path(sys.executable).parent

REFERENCE_ARGS = [
    "model=blank_model",
    "model.name_or_path=gpt2",
    "datasets=[hh,shp]",
    "loss=dpo",
    "loss.beta=0.1",
    "model.archive=/p/LATEST/policy.pt",
    "exp_name=e",
    "gradient_accumulation_steps=2",
    "batch_size=64",
]


def build(*args: str):
    cfg = parse_args(list(args))
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# parsing


def test_reference_command_line():
    cfg = build(*REFERENCE_ARGS)
    assert cfg.model.name_or_path == "gpt2"
    assert cfg.model.archive == "/p/LATEST/policy.pt"
    assert cfg.model.reference_dtype == "float16"  # from the blank_model group
    assert cfg.model.policy_dtype == "float32"
    assert cfg.loss.name == "dpo"
    assert cfg.loss.beta == 0.1 and isinstance(cfg.loss.beta, float)
    assert cfg.loss.label_smoothing == 0.0 and cfg.loss.reference_free is False
    assert list(cfg.datasets) == ["hh", "shp"]
    assert cfg.exp_name == "e"
    assert cfg.gradient_accumulation_steps == 2 and isinstance(cfg.gradient_accumulation_steps, int)
    assert cfg.batch_size == 64 and isinstance(cfg.batch_size, int)
    # untouched defaults
    assert cfg.seed == 0 and cfg.optimizer == "RMSprop" and cfg.eval_every == 20_000
    assert OmegaConf.to_container(cfg)["datasets"] == ["hh", "shp"]


def test_group_after_its_override_still_applies():
    cfg = build("loss.beta=0.1", "loss=dpo", "exp_name=x")
    assert cfg.loss.name == "dpo" and cfg.loss.beta == 0.1
    cfg = build("model.name_or_path=gpt2", "model=blank_model", "exp_name=x")
    assert cfg.model.name_or_path == "gpt2" and cfg.model.reference_dtype == "float16"


def test_defaults():
    cfg = build("exp_name=x")
    assert cfg.loss.name == "sft" and "beta" not in cfg.loss
    assert cfg.model.name_or_path == "tiny"
    assert list(cfg.datasets) == ["hh_sample"]


def test_bare_list_value_becomes_list():
    assert list(build("datasets=hh", "exp_name=x").datasets) == ["hh"]
    assert list(build("datasets=hh:/tmp/data.jsonl", "exp_name=x").datasets) == ["hh:/tmp/data.jsonl"]
    assert list(build("local_dirs=/a", "exp_name=x").local_dirs) == ["/a"]


def test_ipo_and_type_coercion():
    cfg = build("loss=ipo", "loss.beta=1", "exp_name=x", "lr=1e-4")
    assert cfg.loss.name == "ipo" and cfg.loss.beta == 1.0 and isinstance(cfg.loss.beta, float)
    assert cfg.lr == pytest.approx(1e-4)


# --------------------------------------------------------------------------------------------
# errors that name the key


def raises_naming(key: str, *args: str, validate_too: bool = True) -> str:
    with pytest.raises(ConfigError) as exc:
        cfg = parse_args(list(args))
        if validate_too:
            validate(cfg)
    msg = str(exc.value)
    assert f"'{key}'" in msg or key in msg, msg
    assert "\n" not in msg
    return msg


def test_unknown_key():
    raises_naming("foo", "foo=1", "exp_name=x")


def test_unknown_nested_key():
    msg = raises_naming("model.foo", "model.foo=1", "exp_name=x")
    assert "unknown" in msg


def test_beta_with_sft_loss():
    raises_naming("loss.beta", "loss=sft", "loss.beta=0.1", "exp_name=x")
    raises_naming("loss.beta", "loss.beta=0.1", "exp_name=x")  # sft is the default
    raises_naming("loss.label_smoothing", "loss=ipo", "loss.beta=0.1", "loss.label_smoothing=0.1", "exp_name=x")


@pytest.mark.parametrize(
    "arg,key",
    [("batch_size=abc", "batch_size"), ("loss.beta=high", "loss.beta"), ("do_first_eval=maybe", "do_first_eval")],
)
def test_wrong_type(arg, key):
    msg = raises_naming(key, "loss=dpo", arg, "exp_name=x")
    assert arg.split("=")[1] in msg


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_missing_beta(loss):
    msg = raises_naming("loss.beta", f"loss={loss}", "exp_name=x")
    assert "required" in msg


def test_missing_exp_name():
    raises_naming("exp_name", "loss=sft")


def test_batch_size_not_divisible():
    msg = raises_naming("batch_size", "batch_size=6", "gradient_accumulation_steps=4", "exp_name=x")
    assert "gradient_accumulation_steps" in msg
    build("batch_size=8", "gradient_accumulation_steps=4", "exp_name=x")  # divisible is fine


def test_bad_optimizer():
    msg = raises_naming("optimizer", "optimizer=Adamm", "exp_name=x")
    assert "Adamm" in msg
    assert build("optimizer=AdamW", "exp_name=x").optimizer == "AdamW"


@pytest.mark.parametrize("key", ["model.policy_dtype", "model.reference_dtype", "model.fsdp_policy_mp"])
def test_bad_dtype(key):
    msg = raises_naming(key, f"{key}=float33", "exp_name=x")
    assert "float33" in msg


@pytest.mark.parametrize("value", ["0.5", "0.7", "-0.1"])
def test_label_smoothing_out_of_range(value):
    raises_naming("loss.label_smoothing", "loss=dpo", "loss.beta=0.1", f"loss.label_smoothing={value}", "exp_name=x")


def test_label_smoothing_in_range():
    assert build("loss=dpo", "loss.beta=0.1", "loss.label_smoothing=0.2", "exp_name=x").loss.label_smoothing == 0.2


def test_bad_group_name():
    msg = raises_naming("loss", "loss=zzz", "exp_name=x")
    assert "zzz" in msg
    msg = raises_naming("model", "model=nonexistent_model", "exp_name=x")
    assert "nonexistent_model" in msg


def test_argument_without_equals():
    raises_naming("exp_name", "exp_name", validate_too=False)


# --------------------------------------------------------------------------------------------
# eval_every


@pytest.mark.parametrize(
    "eval_every,batch_size,expected", [(100, 64, 64), (130, 64, 128), (20_000, 64, 19_968), (10, 64, 64)]
)
def test_round_eval_every_rounds_down_with_warning(eval_every, batch_size, expected):
    cfg = build(f"eval_every={eval_every}", f"batch_size={batch_size}", "exp_name=x")
    with pytest.warns(UserWarning, match="eval_every"):
        round_eval_every(cfg)
    assert cfg.eval_every == expected
    assert cfg.eval_every % batch_size == 0


def test_round_eval_every_multiple_is_unchanged_without_warning():
    cfg = build("eval_every=128", "batch_size=64", "exp_name=x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        round_eval_every(cfg)
    assert cfg.eval_every == 128


# --------------------------------------------------------------------------------------------
# help


def _shown(value) -> str:
    if value is MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _schema_keys(schema, prefix: str = ""):
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _schema_keys(type(default), prefix + f.name + ".")
        elif not prefix and f.name == "model":
            yield "model", "tiny"
        elif not prefix and f.name == "loss":
            yield "loss", "sft"
        else:
            yield prefix + f.name, _shown(default)


def _all_keys():
    keys = dict(_schema_keys(Config))
    keys.update(_schema_keys(ModelConfig, "model."))
    for schema in (SFTLossConfig, DPOLossConfig, IPOLossConfig):
        for key, shown in _schema_keys(schema, "loss."):
            keys.setdefault(key, shown)
    return keys


def test_help_lists_every_key_with_default():
    text = help_text()
    keys = _all_keys()
    assert len(keys) > 50
    for key in (
        "loss.beta",
        "loss.label_smoothing",
        "loss.reference_free",
        "checkpoint.keep_last",
        "wandb.enabled",
        "model.name_or_path",
        "seed",
        "datasets",
    ):
        assert key in keys
    for key, shown in keys.items():
        pattern = re.compile(r"^  " + re.escape(key) + r" +\(" + re.escape(shown) + r"\) \S", re.M)
        assert pattern.search(text), f"help does not list {key} ({shown})"
        assert len(re.findall(r"^  " + re.escape(key) + r" ", text, re.M)) == 1, key


def test_help_specific_defaults():
    text = help_text()
    assert re.search(r"^  batch_size +\(4\)", text, re.M)
    assert re.search(r"^  exp_name +\(required\)", text, re.M)
    assert re.search(r"^  checkpoint\.keep_last +\(null\)", text, re.M)
    assert re.search(r"^  datasets +\(\[hh_sample\]\)", text, re.M)
    assert re.search(r"^  loss +\(sft\).*dpo", text, re.M)


# --------------------------------------------------------------------------------------------
# the real command line


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("DPOKIT_TRACEBACK", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, key: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dpokit: error:")
    assert key in lines[0]


def test_cli_unknown_key(tmp_path):
    proc = run([str(BIN / "dpokit"), "train", "foo=1"], tmp_path)
    assert_one_line_error(proc, "'foo'")


def test_python_m_train_missing_beta(tmp_path):
    proc = run([str(BIN / "python"), "-m", "dpokit.train", "loss=dpo", "exp_name=x"], tmp_path)
    assert_one_line_error(proc, "loss.beta")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_help(tmp_path):
    proc = run([str(BIN / "dpokit"), "train", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "loss.beta" in proc.stdout and "checkpoint.keep_last" in proc.stdout
    assert "Traceback" not in proc.stderr
