"""Config loading: errors name the key; every shipped YAML (recursively) loads and validates."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from simpo_mcore.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("_"))


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    # Found recursively: a test that listed only the top folder would check 1 file of 43.
    assert len(SHIPPED) >= 43, SHIPPED
    for path in SHIPPED:
        load_config(path)  # validates every section: a bad value raises, naming the file's key


def test_shipped_reference_rows():
    """The reference table's hyper-parameters reach the loaded config (through _base_ chains)."""
    rows = {"simpo/llama3_8b_base_8gpu": ("simpo", 2.0, 0.5, 6e-7, 2048),
            "simpo/llama3_8b_instruct_v0.2_multinode": ("simpo", 10.0, 0.3, 1e-6, 2048),
            "simpo/mistral_7b_base_8gpu": ("simpo", 2.0, 0.8, 3e-7, 1024),
            "simpo/gemma2_9b_it_8gpu": ("simpo", 10.0, 0.5, 8e-7, 2048),
            "simpo/qwen25_7b_instruct_8gpu": ("simpo", 2.5, 0.55, 1e-6, 2048),  # the Llama-3-Instruct row's
            "dpo/qwen25_7b_instruct_beta0.01_multinode": ("dpo", 0.01, None, 7e-7, 2048),
            "dpo/llama3_8b_base_beta0.01_8gpu": ("dpo", 0.01, None, 5e-7, 2048),
            "dpo/marin_llama3.1_8b_instruct_beta0.1_8gpu": ("dpo", 0.1, None, 5e-7, 4096)}
    for name, (loss, beta, ratio, lr, max_len) in rows.items():
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert (cfg.loss.type, cfg.loss.beta, cfg.optim.lr, cfg.data.max_length) == (loss, beta, lr, max_len), name
        if ratio is not None:
            assert cfg.loss.gamma_beta_ratio == ratio
        assert cfg.train.precision == "bf16" and cfg.optim.warmup_ratio == 0.1 and cfg.train.seed == 42
        assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel


def test_unknown_key_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key loss\.gama_beta_ratio"):
        load_config(write(tmp_path, "loss:\n  gama_beta_ratio: 0.5\n"))
    with pytest.raises(ConfigError, match=r"unknown config key modle"):
        load_config(write(tmp_path, "modle:\n  checkpoint: x\n"))


def test_wrong_type_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.micro_batch_pairs: expected an integer, got 'two'"):
        load_config(write(tmp_path, "train:\n  micro_batch_pairs: two\n"))
    with pytest.raises(ConfigError, match=r"loss\.type: 'ipo' is not one of"):
        load_config(write(tmp_path, "loss:\n  type: ipo\n"))
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel: expected true/false"):
        load_config(None, ["parallel.sequence_parallel=3"])


def test_packing_is_the_default_with_rows_of_8192():
    cfg = load_config(None)
    assert cfg.data.packing and cfg.data.pack_tokens == 8192


@pytest.mark.parametrize("overrides, message", [
    (["data.pack_tokens=4100"], r"data\.pack_tokens \(4100\) must be a multiple of 16"),
    (["data.pack_tokens=2048"], r"data\.pack_tokens \(2048\) must be at least 2 x data\.max_length \(4096\)"),
    (["data.pack_tokens=4112", "parallel.tp=3", "parallel.sequence_parallel=true"],
     r"data\.pack_tokens \(4112\) must be a multiple of parallel\.tp \(3\)"),
    (["data.pack_tokens=0"], r"data\.pack_tokens must be >= 1, got 0"),
])
def test_pack_tokens_must_hold_two_sequences_in_whole_multiples(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_packing_needs_an_attention_that_takes_packed_rows():
    with pytest.raises(ConfigError, match=r"data\.packing needs model\.spec te or sdpa.*set data\.packing: false"):
        load_config(None, ["model.spec=local"])
    assert not load_config(None, ["model.spec=local", "data.packing=false"]).data.packing


def test_pack_tokens_is_not_looked_at_unpacked():
    assert load_config(None, ["data.packing=false", "data.pack_tokens=100"]).data.pack_tokens == 100


def test_prompt_length_below_max_length():
    with pytest.raises(ConfigError, match=r"data\.max_prompt_length \(2048\) must be below data\.max_length \(2048\)"):
        load_config(None, ["data.max_prompt_length=2048", "data.max_length=2048"])


def test_overrides_and_base_chain(tmp_path):
    write(tmp_path, "loss:\n  beta: 3.0\ntrain:\n  seed: 1\n", "_a.yaml")
    write(tmp_path, "train:\n  seed: 2\n  max_steps: 9\n", "_b.yaml")
    child = write(tmp_path, "_base_: [_a.yaml, _b.yaml]\ntrain:\n  max_steps: 5\n")
    cfg = load_config(child, ["optim.lr=2e-6", "model.checkpoint=/x"])
    assert (cfg.loss.beta, cfg.train.seed, cfg.train.max_steps) == (3.0, 2, 5)
    assert cfg.optim.lr == 2e-6 and cfg.model.checkpoint == "/x"
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["train.seed"])


@pytest.mark.parametrize("overrides, message", [
    (["parallel.sequence_parallel=true"], "sequence_parallel needs parallel.tp > 1"),
    (["parallel.vpp=2"], "parallel.vpp needs parallel.pp >= 2"),
    (["train.precision=fp8", "model.spec=sdpa"], "fp8 needs the Transformer Engine spec"),
])
def test_a_parallel_or_precision_setting_without_what_it_needs_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-6", r"optim\.lr must be a positive number, got -1e-06"),
    ("optim.lr=0", r"optim\.lr must be a positive number, got 0\.0"),
    ("optim.lr=.nan", r"optim\.lr must be a positive number, got nan"),
    ("optim.min_lr=1e-3", r"optim\.min_lr must be in \[0, optim\.lr=6e-07\], got 0\.001"),
    ("optim.adam_beta2=1.0", r"optim\.adam_beta2 must be in \[0, 1\), got 1\.0"),
    ("optim.adam_eps=0", r"optim\.adam_eps must be positive, got 0\.0"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay must be >= 0, got -0\.1"),
    ("optim.clip_grad=-1", r"optim\.clip_grad must be >= 0, got -1\.0"),
])
def test_optim_values_are_checked_when_the_config_loads(override, message):
    """A negative learning rate would train (in reverse) until something else broke."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_overwrite_needs_a_fresh_run():
    with pytest.raises(ConfigError, match=r"checkpoint\.overwrite .* needs checkpoint\.resume: false"):
        load_config(None, ["checkpoint.overwrite=true"])
    assert load_config(None, ["checkpoint.overwrite=true", "checkpoint.resume=false"]).checkpoint.overwrite


def test_every_unknown_key_is_reported_at_once_with_a_suggestion(tmp_path):
    """A close spelling in the section, the same name in another section, or another trainer's name."""
    path = write(tmp_path, "learning_rate: 1.0e-6\nmodle: {}\ntrain:\n  max_step: 3\n  lr: 1.0\n"
                           "loss:\n  gama_beta_ratio: 0.5\n  simpo_gamma: 1.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.max_lenght=10"])
    message = str(err.value)
    assert message.startswith("7 unknown config keys: ") and "\n" not in message
    for unknown, meant in [("learning_rate", "another trainer's name: here optim.lr"), ("modle", "did you mean model?"),
                           ("train.max_step", "did you mean train.max_steps?"), ("train.lr", "did you mean optim.lr?"),
                           ("loss.gama_beta_ratio", "did you mean loss.gamma_beta_ratio?"),
                           ("loss.simpo_gamma",
                            "another trainer's name: here loss.gamma_beta_ratio: simpo_gamma / beta"),
                           ("data.max_lenght", "did you mean data.max_length?")]:
        assert f"{unknown} ({meant}" in message, (unknown, message)
    assert "simpo-import-config" in message  # several foreign names: point at the converter


def test_unknown_key_without_a_close_match_lists_the_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key train\.zzzz \(no close match; the keys of train: "
                                          r"epochs, eval_interval, "):
        load_config(None, ["train.zzzz=1"])


def test_override_that_is_not_yaml_names_the_key_and_how_to_quote():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lr=[1"])
    assert str(err.value).startswith("override optim.lr=[1: the value is not YAML (")
    assert "optim.lr takes a number" in str(err.value) and str(err.value).endswith("""'optim.lr="[1"'""")


def test_string_fields_take_the_text_as_given():
    template = "{% for m in messages %}{{ m['role'] }}: {{ m.content }}\n{% endfor %}"
    cfg = load_config(None, [f"data.chat_template={template}", "output_dir=runs/a: b #c", "model.tokenizer=null",
                             "data.train_path=[not, a, list]", "loss.type=dpo", "data.columns.prompt=a: b"])
    assert cfg.data.chat_template == template
    assert cfg.output_dir == "runs/a: b #c" and cfg.data.train_path == "[not, a, list]"
    assert cfg.model.tokenizer is None and cfg.loss.type == "dpo"
    assert cfg.data.columns == {"prompt": "a: b"}
    # One pair of YAML quotes is removed: the text null, and a template written as a quoted YAML string.
    assert load_config(None, ["model.tokenizer='null'"]).model.tokenizer == "null"
    assert load_config(None, ["data.chat_template='{{ x }}'"]).data.chat_template == "{{ x }}"
    assert load_config(None, ["model.tokenizer="]).model.tokenizer is None
    # Typed fields still read YAML.
    cfg = load_config(None, ["train.seed=3", "checkpoint.allow_changes=[loss, data]", "data.max_pairs=null",
                             "optim.lr=2e-6"])
    assert (cfg.train.seed, cfg.checkpoint.allow_changes, cfg.data.max_pairs, cfg.optim.lr) == (
        3, ["loss", "data"], None, 2e-6)
    with pytest.raises(ConfigError, match=r"output_dir: expected a string, got None"):
        load_config(None, ["output_dir=null"])


LATIN1 = "output_dir: caf\xe9\n".encode("latin-1")


@pytest.mark.parametrize("text, overrides, message", [
    ("_base_: 5\n", [], r"c\.yaml: _base_ must be a file name or a list of file names \(relative to the file\), "
                        r"got 5$"),
    ("_base_: [a.yaml, {b: 1}]\n", [], r"_base_ must be a file name or a list of file names"),
    (LATIN1, [], r"c\.yaml is not UTF-8 text \(byte 0xe9 on line 1\); save it as UTF-8$"),
    ("train:\n  epochs: .inf\n", [], r"^train\.epochs must be a finite number, got inf$"),
    ("", ["train.epochs=.nan"], r"^train\.epochs must be a finite number, got nan$"),
    ("", ["loss.beta=.inf"], r"^loss\.beta must be a finite number, got inf$"),
    ("", [f"parallel.timeout_minutes={10**12}"],
     r"^parallel\.timeout_minutes must be at most 10080 \(a week\), got 1000000000000$"),
    ("train: [1\n", [], r"c\.yaml is not valid YAML: .* \(line 2, column 1\)$"),
    ("a: &a [*a]\n", [], r"c\.yaml: a YAML alias refers to a value that contains it$"),
])
def test_config_file_mistakes_are_one_line(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, overrides)
    assert "\n" not in str(err.value)


def test_a_timeout_of_a_week_is_accepted():
    assert load_config(None, ["parallel.timeout_minutes=10080"]).parallel.timeout_minutes == 10080


def test_config_path_that_is_a_directory_or_unreadable(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .* is a directory, not a YAML file$"):
        load_config(tmp_path)
    unreadable = Path("/proc/self/mem")  # exists, is not a directory, and reading it from the start fails
    with pytest.raises(ConfigError, match=r"config file /proc/\d+/mem cannot be read: \w"):
        load_config(unreadable)


BILLION_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, name in zip("abcdefgh", "bcdefghi")
)
"""Nine levels of nine aliases over a list of nine strings: 9^9 (387 million) strings once expanded."""


def test_yaml_alias_bomb_is_refused_fast_in_one_short_line(tmp_path):
    """Run as the command in a process of its own, bounded in time: expanding the aliases, or printing the
    expanded value in an error message, would not end."""
    path = tmp_path / "bomb.yaml"
    path.write_text('a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BILLION_LAUGHS
                    + "data:\n  columns: *i\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "simpo_mcore.cli", "simpo-train", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert proc.stderr.splitlines() == [
        f"simpo-train: error: config file {path}: more than 10000 values once its YAML aliases are expanded "
        "(an alias bomb?); a run config holds a few hundred"]


@pytest.mark.parametrize("args, start", [
    (["optim.lr=[1"], "simpo-train: error: override optim.lr=[1: the value is not YAML"),
    (["train.max_step=3", "learning_rate=1"],
     "simpo-train: error: 2 unknown config keys: train.max_step (did you mean train.max_steps?), learning_rate"),
    (["train.epochs=.inf"], "simpo-train: error: train.epochs must be a finite number, got inf"),
])
def test_the_command_prints_one_error_line_and_exits_2(capsys, args, start):
    from simpo_mcore.cli import train_main

    assert train_main([str(ROOT / "configs" / "tiny_cpu.yaml"), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(start), err
