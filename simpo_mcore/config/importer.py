"""A SimPO-repo or TRL training YAML -> this project's run config (``simpo-import-config``, docs/migrating.md).

The source is one flat mapping of ``HfArgumentParser`` keys: the alignment-handbook's ``ModelArguments`` and
``DataArguments`` and a trainer config (the SimPO repo's ``SimPOConfig``, TRL's ``CPOConfig`` or ``DPOConfig``,
all ``TrainingArguments``). A key the file leaves out takes the source's default, as the source trainer would
run it; the defaults that differ between TRL versions (:data:`VERSION_DEPENDENT`) must be written in the file.
Every key is mapped (:data:`foreign.MAPPED`), accepted with the one value that means what this project does
(:data:`foreign.FIXED`), ignored because it changes nothing that is trained (:data:`foreign.IGNORED`), or refused:
all refused keys are named in one error. The result is checked by the project's own loader before it is returned.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from simpo_mcore.config.coerce import brief, build_config
from simpo_mcore.config.errors import ConfigError
from simpo_mcore.config.foreign import FIXED, IGNORED, MAPPED
from simpo_mcore.config.loader import read_text, safe_yaml
from simpo_mcore.config.schema import field_types
from simpo_mcore.config.validation import validate

TRAINERS = ("simpo", "cpo", "dpo")
"""``simpo``: the SimPO repo's SimPOTrainer; ``cpo``: TRL's CPOTrainer; ``dpo``: TRL's DPOTrainer."""

TRAINING_ARGUMENTS_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0, "num_train_epochs": 3.0, "max_steps": -1, "lr_scheduler_type": "linear",
    "warmup_ratio": 0.0, "warmup_steps": 0, "logging_steps": 500, "eval_strategy": "no", "save_strategy": "steps",
    "save_steps": 500, "seed": 42, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
    "bf16": False, "gradient_checkpointing": False, "save_total_limit": None, "ddp_timeout": 1800,
}
"""transformers' ``TrainingArguments`` defaults for the keys that change the run."""

TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {
    "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.25, "sft_weight": 0.0, "label_smoothing": 0.0,
              "loss_type": "sigmoid", "max_length": 512, "max_prompt_length": 128},
    "cpo": {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid", "cpo_alpha": 1.0, "simpo_gamma": 0.5},
    "dpo": {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid", "rpo_alpha": None},
}
"""Each trainer's own defaults. The SimPO repo's ``max_length`` / ``max_prompt_length`` default to null, which
its trainer replaces with 512 / 128."""

VERSION_DEPENDENT = {"cpo": ("learning_rate", "max_length", "max_prompt_length", "bf16"),
                     "dpo": ("learning_rate", "max_length", "max_prompt_length", "bf16")}
"""Keys whose TRL default changed between releases (``learning_rate`` 5e-5 -> 1e-6, ``max_length`` null / 512 ->
1024, ``bf16`` false -> true): the file must say which it means."""

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant_with_warmup": "constant", "constant": "constant",
              "cosine_with_min_lr": "cosine"}
"""transformers' ``lr_scheduler_type`` -> ``optim.scheduler``; others (polynomial, inverse_sqrt, restarts, ...)
have no equivalent."""

class _Conversion:
    """The source's values (defaults filled in), what has been read of them, and the project tree being built."""

    def __init__(self, values: dict[str, Any], given: set[str]):
        self.values, self.given = values, given
        self.used: set[str] = set()
        self.tree: dict[str, Any] = {}
        self.notes: list[str] = []
        self.refused: list[str] = []

    def take(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.values.get(key, default)

    def set(self, dotted: str, value: Any) -> None:
        self.tree[dotted] = value

    def refuse(self, key: str, why: str) -> None:
        self.refused.append(f"{key}: {brief(self.values.get(key))} ({why})")

    def count(self, key: str, minimum: int = 0) -> int | None:
        """An integer setting (a step count); floats below 1 (ratios of the run) and others are refused."""
        value = self.take(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.refuse(key, f"a whole number >= {minimum} here (a ratio of the run's steps is not known before "
                             "the data is tokenised)" if isinstance(value, float) else f"a whole number >= {minimum}")
            return None
        return value


def detect_trainer(source: dict[str, Any]) -> str:
    """Which trainer a source file is for, from the keys only one of them has."""
    keys = set(source)
    if source.get("trainer_type") == "simpo" or keys & {"gamma_beta_ratio", "sft_weight"}:
        return "simpo"
    if keys & {"simpo_gamma", "cpo_alpha"} or source.get("loss_type") == "simpo":
        return "cpo"
    if keys & {"rpo_alpha", "reference_free", "ref_model_init_kwargs", "precompute_ref_log_probs",
               "sync_ref_model"}:
        return "dpo"
    raise ConfigError("cannot tell which trainer this file is for: pass --trainer simpo (the SimPO repo's "
                      "SimPOTrainer), cpo (TRL's CPOTrainer) or dpo (TRL's DPOTrainer)")


def import_config(source: dict[str, Any], world_size: int | None, trainer: str | None = None,
                  checkpoint: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """``(project config tree, notes)`` for a source mapping; :class:`ConfigError` naming every key that has no
    equivalent. ``world_size``: the GPUs the source ran on (its global batch is per-device x accumulation x
    that); ``checkpoint``: the converted model's directory (default ``checkpoints/<model name>-mcore``)."""
    if not isinstance(source, dict):
        raise ConfigError(f"expected a mapping of training arguments, got {brief(source)}")
    kind = trainer or detect_trainer(source)
    values = {**TRAINING_ARGUMENTS_DEFAULTS, **TRAINER_DEFAULTS[kind], **source}
    conv = _Conversion(values, set(source))
    for key in VERSION_DEPENDENT.get(kind, ()):
        if key not in source or source[key] is None:
            conv.refused.append(f"{key}: missing (its default differs between TRL versions: write it in the file)")
    _model(conv, checkpoint)
    _data(conv)
    _loss(conv, kind)
    _optim(conv)
    _train(conv, world_size)
    _checkpoint_and_logging(conv)
    _leftovers(conv)
    if conv.refused:
        raise ConfigError(f"cannot convert (docs/migrating.md): {'; '.join(conv.refused)}")
    return nest(conv.tree), conv.notes


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1e-6, "output_dir": ...}`` -> a YAML tree in the schema's order of sections and fields."""
    tree: dict[str, Any] = {}
    for dotted in [k for k in field_types() if k in flat]:
        *sections, leaf = dotted.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = flat[dotted]
    return tree


def _model(conv: _Conversion, checkpoint: str | None) -> None:
    name = conv.take("model_name_or_path")
    if not isinstance(name, str) or not name:
        conv.refused.append("model_name_or_path: missing (the model to start from)")
    else:
        target = checkpoint or f"checkpoints/{Path(name).name}-mcore"
        conv.set("model.checkpoint", target)
        conv.notes.append(f"model.checkpoint: convert {name} first: python tools/convert_hf_to_mcore.py "
                          f"--hf <a local download of {name}> --out {target}")
    if conv.values.get("tokenizer_name_or_path") is not None:
        conv.set("model.tokenizer", conv.take("tokenizer_name_or_path"))
    conv.set("model.recompute", "full" if conv.take("gradient_checkpointing") else "none")


def _data(conv: _Conversion) -> None:
    train_path, train_split, test_split = _dataset(conv)
    if train_path is not None:
        conv.set("data.train_path", train_path)
        conv.set("data.train_split", train_split)
    do_eval = conv.take("do_eval", False)
    evaluate = _eval_strategy(conv) != "no" or do_eval
    if evaluate and train_path is not None and test_split is not None:
        conv.set("data.eval_path", train_path)
        conv.set("data.eval_split", test_split)
    elif evaluate:
        conv.notes.append("no test split: no evaluation")
    for key in ("preprocessing_num_workers", "dataset_num_proc"):
        if conv.values.get(key) is not None:
            conv.set("data.num_proc", conv.take(key))
    for key in ("max_length", "max_prompt_length", "truncation_mode", "chat_template"):
        if conv.values.get(key) is not None:
            conv.set(MAPPED[key].target, conv.take(key))
    completion = conv.take("max_completion_length")
    if completion is not None and completion != conv.values["max_length"] - conv.values["max_prompt_length"]:
        conv.refuse("max_completion_length", "responses are cut to max_length - max_prompt_length here")


def _dataset(conv: _Conversion) -> tuple[str | None, str, str | None]:
    """(hub name or path, train split, test split or None) from a handbook ``dataset_mixer`` or TRL's
    ``dataset_name``."""
    if conv.values.get("dataset_configs") is not None:
        conv.take("dataset_configs")
        conv.refuse("dataset_configs", "no dataset config names: point data.train_path at the files")
    mixer = conv.take("dataset_mixer")
    if mixer is not None:
        if not (isinstance(mixer, dict) and len(mixer) == 1 and list(mixer.values()) == [1.0]):
            conv.refuse("dataset_mixer", "one dataset at fraction 1.0 only: data.train_path takes one dataset")
            return None, "train", None
        splits = conv.take("dataset_splits", ["train", "test"])
        splits = splits if isinstance(splits, list) else [splits]
        train = [s for s in splits if "train" in str(s)]
        test = [s for s in splits if "test" in str(s)]
        if len(train) != 1 or len(test) > 1:
            conv.refuse("dataset_splits", "one split named *train* and at most one named *test*")
            return None, "train", None
        return next(iter(mixer)), train[0], test[0] if test else None
    name = conv.take("dataset_name")
    if name is None:
        conv.refused.append("dataset_mixer / dataset_name: missing (the preference data)")
        return None, "train", None
    if conv.values.get("dataset_config") is not None:
        conv.take("dataset_config")
        conv.refuse("dataset_config", "no dataset config names: point data.train_path at the files")
    return name, conv.take("dataset_train_split", "train"), conv.take("dataset_test_split", "test")


def _eval_strategy(conv: _Conversion) -> str:
    older = conv.take("evaluation_strategy")
    return conv.take("eval_strategy") if "eval_strategy" in conv.given or older is None else older


def _loss(conv: _Conversion, kind: str) -> None:
    beta, loss_type = conv.take("beta"), conv.take("loss_type")
    conv.set("loss.beta", beta)
    conv.set("loss.label_smoothing", conv.take("label_smoothing"))
    if conv.take("trainer_type", "simpo") != "simpo":
        conv.refuse("trainer_type", "the SimPO repo's trainer_type simpo only")
    if kind == "simpo":
        types = {"sigmoid": "simpo", "hinge": "simpo_hinge"}
        conv.set("loss.gamma_beta_ratio", conv.take("gamma_beta_ratio"))
        conv.set("loss.sft_weight", conv.take("sft_weight"))
        if loss_type == "hinge" and conv.values["label_smoothing"]:
            conv.set("loss.label_smoothing", 0.0)
            conv.notes.append("loss.label_smoothing: 0, as the SimPO repo's hinge loss ignores it")
    elif kind == "cpo":
        types = {"simpo": "simpo"}
        simpo_gamma = conv.take("simpo_gamma")
        if isinstance(simpo_gamma, (int, float)) and isinstance(beta, (int, float)) and beta:
            conv.set("loss.gamma_beta_ratio", simpo_gamma / beta)
            conv.notes.append(f"loss.gamma_beta_ratio = simpo_gamma / beta = {simpo_gamma} / {beta}")
        conv.set("loss.sft_weight", conv.take("cpo_alpha"))
    else:
        types = {"sigmoid": "dpo"}
        loss_type = loss_type[0] if isinstance(loss_type, list) and len(loss_type) == 1 else loss_type
        conv.set("loss.sft_weight", conv.take("rpo_alpha") or 0.0)
    if loss_type not in types:
        conv.refuse("loss_type", f"with {kind}: {', '.join(types)} only (the others use summed log-probs "
                                 "without a reference, or another objective)")
    else:
        conv.set("loss.type", types[loss_type])


def _optim(conv: _Conversion) -> None:
    for key in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm"):
        conv.set(MAPPED[key].target, conv.take(key))
    scheduler = conv.take("lr_scheduler_type")
    kwargs = conv.take("lr_scheduler_kwargs") or {}
    if scheduler not in SCHEDULERS:
        conv.refuse("lr_scheduler_type", f"{', '.join(SCHEDULERS)} only")
        return
    conv.set("optim.scheduler", SCHEDULERS[scheduler])
    if scheduler == "cosine_with_min_lr":
        lr = conv.values["learning_rate"]
        conv.set("optim.min_lr", kwargs.get("min_lr", kwargs.get("min_lr_rate", 0.0) * lr))
    elif kwargs:
        conv.refuse("lr_scheduler_kwargs", "only min_lr / min_lr_rate, with cosine_with_min_lr")
    if scheduler == "constant":
        conv.set("optim.warmup_ratio", 0.0)
        conv.notes.append("optim.warmup_ratio: 0, as transformers' constant schedule has no warm-up")
        conv.take("warmup_ratio")
        conv.take("warmup_steps")
        return
    conv.set("optim.warmup_ratio", _warmup_ratio(conv))


def _warmup_ratio(conv: _Conversion) -> float | None:
    """``warmup_steps`` wins over ``warmup_ratio`` (transformers); steps become a ratio of ``max_steps`` whose
    warm-up, ``ceil(max_steps x ratio)`` in floating point, is the same count."""
    ratio, steps, max_steps = conv.take("warmup_ratio"), conv.take("warmup_steps"), conv.values["max_steps"]
    if isinstance(steps, float) and 0 < steps < 1:
        return steps
    if not steps:
        return ratio
    if isinstance(steps, int) and isinstance(max_steps, int) and max_steps > steps:
        exact = steps / max_steps
        while math.ceil(max_steps * exact) > steps:  # 300 x (21 / 300) = 21.000000000000004 would warm up 22
            exact = math.nextafter(exact, 0.0)
        conv.notes.append(f"optim.warmup_ratio = warmup_steps / max_steps = {steps} / {max_steps}")
        return exact
    conv.refuse("warmup_steps", "a warm-up here is a ratio of the run: give warmup_ratio, or max_steps")
    return ratio


def _train(conv: _Conversion, world_size: int | None) -> None:
    per_device = conv.count("per_device_train_batch_size", minimum=1)
    accumulation = conv.count("gradient_accumulation_steps", minimum=1)
    if world_size is None:
        conv.refused.append("--world-size: missing (the global batch is per_device_train_batch_size x "
                            "gradient_accumulation_steps x the number of GPUs the source ran on)")
    elif per_device and accumulation:
        conv.set("train.global_batch_pairs", per_device * accumulation * world_size)
        conv.set("train.micro_batch_pairs", per_device)
        conv.notes.append(f"train.global_batch_pairs = per_device_train_batch_size x gradient_accumulation_steps x "
                          f"world size = {per_device} x {accumulation} x {world_size}")
    conv.set("train.epochs", conv.take("num_train_epochs"))
    max_steps = conv.take("max_steps")
    if max_steps != -1:
        conv.set("train.max_steps", max_steps)
    conv.set("train.seed", conv.take("seed"))
    conv.set("train.precision", "bf16" if conv.take("bf16") else "fp32")
    logging_steps = conv.count("logging_steps", minimum=1)
    conv.set("train.log_interval", logging_steps)
    strategy = _eval_strategy(conv)
    if strategy == "steps":
        steps = conv.values.get("eval_steps")
        conv.set("train.eval_interval", conv.count("eval_steps", 1) if steps is not None else logging_steps)
    elif strategy in ("no", "epoch"):
        conv.take("eval_steps")
        conv.set("train.eval_interval", 0)
        _once_per_run(conv, strategy, "evaluation_strategy" if "evaluation_strategy" in conv.given
                      else "eval_strategy")
    else:
        conv.refuse("eval_strategy", "steps, epoch or no")


def _once_per_run(conv: _Conversion, strategy: str, key: str) -> None:
    """``epoch`` means "at the end" only in a one-epoch run: there is no per-epoch interval here."""
    if strategy == "epoch" and (conv.values["num_train_epochs"] != 1 or conv.values["max_steps"] != -1):
        conv.refuse(key, "epoch only in a one-epoch run (it is then the end of the run): give steps")


def _checkpoint_and_logging(conv: _Conversion) -> None:
    strategy = conv.take("save_strategy")
    if strategy == "steps":
        conv.set("checkpoint.save_interval", conv.count("save_steps", minimum=1))
    elif strategy in ("no", "epoch"):
        conv.take("save_steps")
        conv.set("checkpoint.save_interval", 0)
        _once_per_run(conv, strategy, "save_strategy")
    else:
        conv.refuse("save_strategy", "steps, epoch or no")
    if conv.values["save_total_limit"] is not None:
        conv.set("checkpoint.keep_last", conv.take("save_total_limit"))
    conv.take("save_total_limit")
    timeout = conv.take("ddp_timeout")
    if isinstance(timeout, (int, float)) and timeout > 0:
        conv.set("parallel.timeout_minutes", math.ceil(timeout / 60))
    if conv.values.get("output_dir") is not None:
        conv.set("output_dir", conv.take("output_dir"))
    _report_to(conv)


def _report_to(conv: _Conversion) -> None:
    report = conv.take("report_to", "none")
    report = [report] if isinstance(report, str) else list(report or [])
    if "all" in report:
        report = ["wandb", "tensorboard"]
    run_name = conv.take("run_name")
    conv.set("train.tensorboard", "tensorboard" in report)
    if "wandb" in report:
        conv.set("logging.wandb.project", "huggingface")
        conv.notes.append("logging.wandb.project: huggingface, the HF Trainer's project when WANDB_PROJECT is unset")
        if run_name is not None:
            conv.set("logging.wandb.name", run_name)
    others = [r for r in report if r not in ("wandb", "tensorboard", "none")]
    if others:
        conv.refuse("report_to", f"W&B and TensorBoard only, not {', '.join(map(str, others))}")


def _leftovers(conv: _Conversion) -> None:
    """Every key of the file the rules above did not read: fixed, ignored, or refused by name."""
    for key in sorted(conv.given - conv.used, key=str):
        if key in FIXED:
            allowed, why = FIXED[key]
            if conv.values[key] not in allowed:
                conv.refuse(key, why)
        elif key in IGNORED:
            conv.notes.append(f"{key}: ignored, {IGNORED[key]}")
        else:
            conv.refuse(key, "not a SimPO-repo / TRL key simpo-import-config knows")


def import_file(path: str | Path, world_size: int | None, trainer: str | None = None,
                checkpoint: str | None = None) -> str:
    """The project YAML for a source file, with the notes as comments; checked by the project's loader."""
    path = Path(path)
    source = safe_yaml(read_text(path), f"config file {path}")
    tree, notes = import_config(source, world_size, trainer, checkpoint)
    header = [f"# Converted by simpo-import-config from {path.name} (docs/migrating.md).",
              "# The parallel layout is this project's default (tp 1, pp 1): set parallel.* for your GPUs",
              "# (configs/simpo/_8gpu.yaml is the 8-GPU one); the global batch stays the source's.",
              *(f"# {note}" for note in notes)]
    text = "\n".join(header) + "\n" + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)
    try:
        validate(build_config(safe_yaml(text, "the converted config")))
    except ConfigError as exc:
        raise ConfigError(f"{path} converts to a config this project refuses: {exc}") from None
    return text
