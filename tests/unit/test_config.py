"""Config loading: errors name the key; every shipped YAML (recursively) loads and validates."""

from __future__ import annotations

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


def test_batch_sizes_must_divide():
    msg = r"train\.global_batch_pairs \(10\) must be a multiple of train\.micro_batch_pairs \(4\)"
    with pytest.raises(ConfigError, match=msg):
        load_config(None, ["train.global_batch_pairs=10", "train.micro_batch_pairs=4", "data.packing=false"])
    # Packed, a micro-batch is a row of pack_tokens: micro_batch_pairs is unused and need not divide.
    assert load_config(None, ["train.global_batch_pairs=10", "train.micro_batch_pairs=4"]).data.packing


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
    """Unchecked, a negative learning rate would train in reverse until something else broke."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_overwrite_needs_a_fresh_run():
    with pytest.raises(ConfigError, match=r"checkpoint\.overwrite .* needs checkpoint\.resume: false"):
        load_config(None, ["checkpoint.overwrite=true"])
    assert load_config(None, ["checkpoint.overwrite=true", "checkpoint.resume=false"]).checkpoint.overwrite
