"""simpo-import-config: SimPO-repo and TRL YAMLs become project configs with the same optimiser, schedule,
loss and batch; what has no equivalent is refused by name, all of it in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simpo_mcore.cli import import_config_main
from simpo_mcore.config import ConfigError, load_config
from simpo_mcore.config.foreign import FIXED, IGNORED, MAPPED
from simpo_mcore.config.importer import import_config
from simpo_mcore.config.schema import field_types
from simpo_mcore.schedule import warmup_steps

SIMPO_LLAMA3_8B_BASE = {
    "model_name_or_path": "princeton-nlp/Llama-3-Base-8B-SFT", "torch_dtype": None,
    "dataset_mixer": {"princeton-nlp/llama3-ultrafeedback": 1.0}, "dataset_splits": ["train", "test"],
    "preprocessing_num_workers": 12, "trainer_type": "simpo", "bf16": True, "beta": 2.0, "gamma_beta_ratio": 0.5,
    "do_eval": True, "evaluation_strategy": "steps", "eval_steps": 400, "gradient_accumulation_steps": 16,
    "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "learning_rate": 6.0e-7, "log_level": "info", "logging_steps": 5, "lr_scheduler_type": "cosine",
    "max_length": 2048, "max_prompt_length": 1800, "num_train_epochs": 1, "optim": "adamw_torch",
    "output_dir": "outputs/llama-3-8b-base-simpo", "run_name": "llama-3-8b-base-simpo",
    "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, "push_to_hub": False,
    "save_strategy": "steps", "save_steps": 1000000, "report_to": ["wandb"], "save_total_limit": 20, "seed": 42,
    "warmup_ratio": 0.1,
}
"""The SimPO repo's training_configs/llama-3-8b-base-simpo.yaml, key by key (run on 4 GPUs)."""

CPO_SIMPO = {
    "model_name_or_path": "/models/Qwen2.5-7B-Instruct", "dataset_name": "trl-lib/ultrafeedback_binarized",
    "loss_type": "simpo", "beta": 2.5, "simpo_gamma": 1.375, "cpo_alpha": 0.05, "learning_rate": 1.0e-6,
    "max_length": 2048, "max_prompt_length": 1800, "bf16": True, "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4, "num_train_epochs": 1, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
    "eval_strategy": "steps", "eval_steps": 50, "logging_steps": 10,
}
"""A TRL CPOConfig for SimPO (CPO-SimPO: the SimPO loss plus cpo_alpha x the chosen responses' NLL)."""


def convert(tmp_path: Path, source: dict, *args: str) -> Path:
    """``simpo-import-config`` on ``source`` written as YAML; the path of the project YAML it wrote."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src, out = tmp_path / "source.yaml", tmp_path / "converted.yaml"
    src.write_text(yaml.safe_dump(source))
    assert import_config_main([str(src), *args, "-o", str(out)]) == 0
    return out


def test_the_simpo_repo_llama3_8b_base_config(tmp_path):
    cfg = load_config(convert(tmp_path, SIMPO_LLAMA3_8B_BASE, "--world-size", "4"))
    o, t, loss, d = cfg.optim, cfg.train, cfg.loss, cfg.data
    assert (o.lr, o.scheduler, o.warmup_ratio, o.min_lr) == (6e-7, "cosine", 0.1, 0.0)
    assert (o.weight_decay, o.adam_beta1, o.adam_beta2, o.adam_eps, o.clip_grad) == (0.0, 0.9, 0.999, 1e-8, 1.0)
    assert (loss.type, loss.beta, loss.gamma_beta_ratio, loss.sft_weight, loss.label_smoothing) == (
        "simpo", 2.0, 0.5, 0.0, 0.0)
    assert t.global_batch_pairs == 2 * 16 * 4 == 128 and t.micro_batch_pairs == 2
    assert (t.precision, t.epochs, t.max_steps, t.seed) == ("bf16", 1.0, None, 42)
    assert (t.eval_interval, t.log_interval) == (400, 5)
    assert (d.max_length, d.max_prompt_length, d.num_proc) == (2048, 1800, 12)
    assert (d.train_path, d.train_split, d.eval_path, d.eval_split) == (
        "princeton-nlp/llama3-ultrafeedback", "train", "princeton-nlp/llama3-ultrafeedback", "test")
    assert cfg.model.recompute == "full"
    assert cfg.model.checkpoint == "checkpoints/Llama-3-Base-8B-SFT-mcore"
    assert (cfg.checkpoint.save_interval, cfg.checkpoint.keep_last) == (1000000, 20)
    assert cfg.output_dir == "outputs/llama-3-8b-base-simpo"
    assert (cfg.logging.wandb.project, cfg.logging.wandb.name) == ("huggingface", "llama-3-8b-base-simpo")


def test_the_shipped_reference_config_agrees_with_the_conversion(tmp_path):
    """configs/simpo/llama3_8b_base.yaml was written from the same reference row."""
    converted = load_config(convert(tmp_path, SIMPO_LLAMA3_8B_BASE, "--world-size", "4"))
    shipped = load_config(Path(__file__).resolve().parents[2] / "configs" / "simpo" / "llama3_8b_base.yaml")
    for section in ("loss", "optim"):
        assert getattr(converted, section) == getattr(shipped, section), section
    for name in ("global_batch_pairs", "micro_batch_pairs", "epochs", "seed", "precision"):
        assert getattr(converted.train, name) == getattr(shipped.train, name), name


def test_a_trl_cpo_simpo_config(tmp_path):
    cfg = load_config(convert(tmp_path, CPO_SIMPO, "--world-size", "8"))
    assert cfg.loss.type == "simpo" and cfg.loss.beta == 2.5
    assert cfg.loss.gamma_beta_ratio == 1.375 / 2.5  # TRL: logits - simpo_gamma / beta
    assert cfg.loss.sft_weight == 0.05  # TRL: loss + cpo_alpha x NLL(chosen)
    assert cfg.train.global_batch_pairs == 4 * 4 * 8 and cfg.optim.lr == 1e-6
    assert (cfg.data.train_path, cfg.data.train_split, cfg.data.eval_split) == (
        "trl-lib/ultrafeedback_binarized", "train", "test")
    assert cfg.model.recompute == "none" and cfg.train.precision == "bf16"
    # cpo_alpha left out is TRL's default 1.0, not this project's 0.
    without_alpha = {k: v for k, v in CPO_SIMPO.items() if k != "cpo_alpha"}
    assert load_config(convert(tmp_path / "b", without_alpha, "--world-size", "8")).loss.sft_weight == 1.0


def test_a_trl_dpo_config_and_warmup_steps(tmp_path):
    source = {"model_name_or_path": "m", "dataset_name": "d", "beta": 0.01, "loss_type": "sigmoid",
              "learning_rate": 5e-7, "max_length": 1024, "max_prompt_length": 512, "bf16": False, "rpo_alpha": 0.5,
              "max_steps": 300, "warmup_steps": 21, "lr_scheduler_type": "linear"}
    cfg = load_config(convert(tmp_path, source, "--world-size", "2", "--trainer", "dpo"))
    assert (cfg.loss.type, cfg.loss.beta, cfg.loss.sft_weight, cfg.train.precision) == ("dpo", 0.01, 0.5, "fp32")
    assert cfg.train.global_batch_pairs == 8 * 1 * 2  # transformers' defaults: 8 per device, no accumulation
    assert cfg.train.max_steps == 300 and cfg.optim.scheduler == "linear"
    assert warmup_steps(cfg.optim.warmup_ratio, 300) == 21


def test_left_out_keys_take_the_source_trainers_defaults():
    """The SimPO repo's SimPOConfig and its trainer, and transformers' TrainingArguments."""
    tree, _ = import_config({"model_name_or_path": "m", "dataset_mixer": {"d": 1.0}, "trainer_type": "simpo"}, 1)
    assert tree["loss"]["gamma_beta_ratio"] == 0.25 and tree["loss"]["beta"] == 2.0
    assert (tree["data"]["max_length"], tree["data"]["max_prompt_length"]) == (512, 128)
    assert (tree["optim"]["lr"], tree["optim"]["scheduler"], tree["optim"]["warmup_ratio"]) == (5e-5, "linear", 0.0)
    assert (tree["train"]["epochs"], tree["train"]["global_batch_pairs"], tree["train"]["precision"]) == (
        3.0, 8, "fp32")
    assert "eval_path" not in tree["data"]  # no evaluation by default


def test_everything_without_an_equivalent_is_named_in_one_error(tmp_path, capsys):
    source = {**CPO_SIMPO, "use_peft": True, "lora_r": 16, "optim": "adamw_8bit", "mystery_key": 1,
              "lr_scheduler_type": "polynomial", "dataset_name": None,
              "dataset_mixer": {"a": 0.5, "b": 1.0}}
    del source["learning_rate"]
    src = tmp_path / "source.yaml"
    src.write_text(yaml.safe_dump(source))
    assert import_config_main([str(src), "--world-size", "8"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("simpo-import-config: error: cannot convert (docs/migrating.md): ")
    for named in ("learning_rate: missing (its default differs between TRL versions", "use_peft: True (full",
                  "optim: 'adamw_8bit' (AdamW is the only optimizer)", "mystery_key: 1 (not a SimPO-repo / TRL key",
                  "lr_scheduler_type: 'polynomial' (", "dataset_mixer: {'a': 0.5, 'b': 1.0} (one dataset"):
        assert named in err[0], named
    assert "lora_r" not in err[0]  # LoRA's settings follow use_peft, already refused


@pytest.mark.parametrize("change, refused", [
    ({"loss_type": "sigmoid"}, "loss_type: 'sigmoid' (with cpo: simpo only"),
    ({"eval_strategy": "epoch", "num_train_epochs": 2}, "eval_strategy: 'epoch' (epoch only in a "),
    ({"logging_steps": 0.01}, "logging_steps: 0.01 (a whole number >= 1 here (a ratio"),
    ({"max_completion_length": 100}, "max_completion_length: 100 (responses are cut to"),
])
def test_single_refusals(change, refused):
    with pytest.raises(ConfigError, match="cannot convert") as err:
        import_config({**CPO_SIMPO, **change}, 8)
    assert refused in str(err.value)


def test_world_size_and_trainer_must_be_known(tmp_path):
    with pytest.raises(ConfigError, match=r"--world-size: missing \(the global batch is"):
        import_config(SIMPO_LLAMA3_8B_BASE, None)
    with pytest.raises(ConfigError, match=r"cannot tell which trainer .* pass --trainer simpo"):
        import_config({"model_name_or_path": "m", "beta": 0.1}, 1)


def test_the_output_is_written_once_and_checked_by_the_loader(tmp_path, capsys):
    out = convert(tmp_path, SIMPO_LLAMA3_8B_BASE, "--world-size", "4")
    src = tmp_path / "source.yaml"
    assert import_config_main([str(src), "--world-size", "4", "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("exists: remove it or pick another name (nothing is replaced)")
    # A value the project refuses is reported through its own validation, naming the project key.
    src.write_text(yaml.safe_dump({**SIMPO_LLAMA3_8B_BASE, "max_prompt_length": 4096}))
    assert import_config_main([str(src), "--world-size", "4"]) == 2
    assert "converts to a config this project refuses: data.max_prompt_length (4096) must be below" in \
        capsys.readouterr().err


def test_the_table_of_foreign_names_points_at_real_keys():
    keys = set(field_types())
    assert all(m.target in keys for m in MAPPED.values()), [m.target for m in MAPPED.values() if m.target not in keys]
    assert not set(MAPPED) & set(FIXED) and not set(MAPPED) & set(IGNORED) and not set(FIXED) & set(IGNORED)
