"""The rules a run config must satisfy before anything starts: one function per section, then the rules between
sections in one place. Each raises :class:`ConfigError` naming the field and its value. Rules that need the
launch (the data-parallel size, the number of training pairs) belong to the jobs that know it
(``train.check_batch_sizes``, ``train.total_steps``); the data functions assume a config that passed these.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from simpo_mcore.config.errors import ConfigError
from simpo_mcore.config.schema import (
    DATA_COLUMNS,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    config_fields,
)

MAX_TIMEOUT_MINUTES = 7 * 24 * 60
"""``parallel.timeout_minutes`` at most a week: a collective that waits longer is a hang, and far larger values
overflow the timeout's ``timedelta``."""


def validate(cfg: RunConfig) -> RunConfig:
    """Every section's rules, then those between sections; returns ``cfg``."""
    check_model(cfg.model)
    check_data(cfg.data)
    check_loss(cfg.loss)
    check_parallel(cfg.parallel)
    check_optim(cfg.optim)
    check_train(cfg.train)
    check_checkpoint(cfg.checkpoint, config_fields(cfg))
    check_logging(cfg.logging)
    check_finite(cfg)
    check_across_sections(cfg)
    return cfg


def _at_least(section, prefix: str, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ConfigError(f"{prefix}.{name} must be >= {minimum}, got {value}")


def check_model(m: ModelConfig) -> None:
    _at_least(m, "model", ("make_vocab_size_divisible_by", "recompute_num_layers"))
    if m.logprob_chunk_tokens < 0:
        raise ConfigError("model.logprob_chunk_tokens must be >= 0")
    if not m.moe_aux_loss_coeff >= 0:
        raise ConfigError(f"model.moe_aux_loss_coeff must be a number >= 0, got {m.moe_aux_loss_coeff}")
    if m.moe_aux_loss_coeff and m.moe_load_balancing_type == "none":
        raise ConfigError(f"model.moe_aux_loss_coeff ({m.moe_aux_loss_coeff}) has no effect with "
                          "model.moe_load_balancing_type: none; set it to 0 or pick a loss")


def check_data(d: DataConfig) -> None:
    _at_least(d, "data", ("max_length", "max_prompt_length", "pack_tokens"))
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({d.max_prompt_length}) must be below data.max_length "
            f"({d.max_length}): no room would be left for the responses")
    for key, column in d.columns.items():
        if key not in DATA_COLUMNS:
            raise ConfigError(f"data.columns.{key}: unknown column role (known: {', '.join(DATA_COLUMNS)})")
        if not column:
            raise ConfigError(f"data.columns.{key}: empty column name")
    if sorted(set(d.columns.values())) != sorted(d.columns.values()):
        raise ConfigError(f"data.columns maps one column to several roles: {d.columns}")
    if d.packing:
        if d.pack_tokens % 16:
            raise ConfigError(f"data.pack_tokens ({d.pack_tokens}) must be a multiple of 16")
        if d.pack_tokens < 2 * d.max_length:
            raise ConfigError(
                f"data.pack_tokens ({d.pack_tokens}) must be at least 2 x data.max_length ({2 * d.max_length}): "
                "a pair (chosen and rejected, each up to max_length tokens) must fit in one row")
    if d.chat_template is not None and not d.chat_template.strip():
        raise ConfigError("data.chat_template is empty; leave it unset to use the tokenizer's template")


def check_loss(loss: LossConfig) -> None:
    if loss.beta <= 0:
        raise ConfigError(f"loss.beta must be positive, got {loss.beta}")
    if not 0.0 <= loss.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing}")
    if loss.sft_weight < 0:
        raise ConfigError(f"loss.sft_weight must be >= 0, got {loss.sft_weight}")
    if loss.type == "simpo_hinge" and loss.label_smoothing:
        raise ConfigError("loss.label_smoothing has no effect with loss.type: simpo_hinge; set it to 0")


def check_parallel(p: ParallelConfig) -> None:
    _at_least(p, "parallel", ("tp", "pp", "cp", "ep", "timeout_minutes"))
    if p.etp is not None and p.etp < 1:
        raise ConfigError(f"parallel.etp must be >= 1 or null, got {p.etp}")
    if p.timeout_minutes > MAX_TIMEOUT_MINUTES:
        raise ConfigError(f"parallel.timeout_minutes must be at most {MAX_TIMEOUT_MINUTES} (a week), "
                          f"got {p.timeout_minutes}")
    if p.vpp is not None:
        if p.vpp < 2:
            raise ConfigError(f"parallel.vpp must be >= 2 or null, got {p.vpp}")
        if p.pp < 2:
            raise ConfigError("parallel.vpp needs parallel.pp >= 2")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
    if p.cp_comm_type == "a2a+p2p":
        a2a = p.cp_a2a_size
        if a2a is None or not (2 <= a2a <= p.cp // 2 and p.cp % a2a == 0):
            raise ConfigError(f"parallel.cp_a2a_size must be a divisor of parallel.cp ({p.cp}) between 2 and "
                              f"{p.cp // 2} with parallel.cp_comm_type: a2a+p2p, got {a2a}")
    elif p.cp_a2a_size is not None:
        raise ConfigError(f"parallel.cp_a2a_size is only used with parallel.cp_comm_type: a2a+p2p "
                          f"(it is {p.cp_comm_type}); leave it unset")


def check_optim(o: OptimConfig) -> None:
    """AdamW and schedule values that would train nothing or diverge silently."""
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"optim.lr must be a positive number, got {o.lr}")
    if not 0.0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if not 0.0 <= o.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    if not o.adam_eps > 0:
        raise ConfigError(f"optim.adam_eps must be positive, got {o.adam_eps}")
    for name in ("weight_decay", "clip_grad"):
        if not getattr(o, name) >= 0:
            raise ConfigError(f"optim.{name} must be >= 0, got {getattr(o, name)}")
    if o.scheduler == "constant" and o.min_lr:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) has no effect with optim.scheduler: constant; set it to 0")


def check_train(t: TrainConfig) -> None:
    _at_least(t, "train", ("micro_batch_pairs", "global_batch_pairs", "log_interval"))
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1 or null, got {t.max_steps}")
    if t.epochs <= 0:
        raise ConfigError(f"train.epochs must be positive, got {t.epochs}")


def check_checkpoint(c: CheckpointConfig, names: set[str]) -> None:
    """``names``: what ``allow_changes`` may hold (:func:`config_fields`)."""
    for name in c.allow_changes:
        if name not in names:
            raise ConfigError(f"checkpoint.allow_changes: {name!r} is not a config section or field "
                              "(e.g. loss, data, loss.beta)")
    _at_least(c, "checkpoint", ("save_interval",), minimum=0)
    _at_least(c, "checkpoint", ("keep_last",))
    if c.overwrite and c.resume:
        raise ConfigError("checkpoint.overwrite deletes a previous run to start over: it needs "
                          "checkpoint.resume: false (resuming keeps the previous run)")


def check_logging(log: LoggingConfig) -> None:
    if log.progress_interval_s < 0:
        raise ConfigError(f"logging.progress_interval_s must be >= 0, got {log.progress_interval_s}")
    for name in ("project", "name", "entity"):
        if getattr(log.wandb, name) == "":
            raise ConfigError(f"logging.wandb.{name} is empty; leave it unset (null) instead")


def check_finite(cfg: RunConfig) -> None:
    """No setting is infinite or NaN (``train.epochs: .inf`` would run forever, a NaN compares false with every
    bound above)."""
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for name, tp in typing.get_type_hints(type(value)).items():
            number = getattr(value, name)
            if float in (tp, *typing.get_args(tp)) and number is not None and not math.isfinite(number):
                raise ConfigError(f"{section.name}.{name} must be a finite number, got {number}")


def check_across_sections(cfg: RunConfig) -> None:
    """The rules that tie one section's values to another's."""
    d, p, spec = cfg.data, cfg.parallel, cfg.model.spec
    if d.packing and p.sequence_parallel and d.pack_tokens % p.tp:
        raise ConfigError(f"data.pack_tokens ({d.pack_tokens}) must be a multiple of parallel.tp ({p.tp}) "
                          "under sequence parallelism")
    if d.packing and spec == "local":
        raise ConfigError("data.packing needs model.spec te or sdpa (megatron's local attention takes no "
                          "packed rows); set data.packing: false to use model.spec: local")
    if p.cp > 1 and spec == "local":
        raise ConfigError("parallel.cp > 1 needs model.spec te or sdpa: megatron's local attention has no context "
                          "parallelism")
    if p.cp > 1 and spec == "te" and d.packing and p.cp_comm_type in ("all_gather", "a2a+p2p"):
        raise ConfigError(f"parallel.cp_comm_type: {p.cp_comm_type} takes no packed rows in Transformer Engine's "
                          "attention (model.spec: te); use p2p or a2a, or data.packing: false")
    if p.cp > 1 and d.packing:
        check_context_parallel_rows(d, p)
    if cfg.train.precision == "fp8" and spec in ("local", "sdpa"):
        raise ConfigError(f"train.precision: fp8 needs the Transformer Engine spec; model.spec is {spec!r}")


def check_context_parallel_rows(d: DataConfig, p: ParallelConfig) -> None:
    """Packed rows under context parallelism: each sequence is padded to a multiple of ``split`` (megatron's 2 x cp
    chunks, x tp under sequence parallelism) and each row to a multiple of ``row`` (each rank's share a multiple of
    16); a row of ``pack_tokens`` must stay one, and hold a pair of two ``max_length`` sequences so padded."""
    split = 2 * p.cp * (p.tp if p.sequence_parallel else 1)
    row = math.lcm(16 * p.cp, split)
    if d.pack_tokens % row:
        raise ConfigError(f"data.pack_tokens ({d.pack_tokens}) must be a multiple of {row} under parallel.cp "
                          f"{p.cp}: each rank computes 1/{p.cp} of a row, a multiple of 16 positions, and every "
                          f"sequence is split in multiples of {split}")
    pair = 2 * (-(-d.max_length // split) * split)
    if d.pack_tokens < pair:
        raise ConfigError(f"data.pack_tokens ({d.pack_tokens}) must be at least {pair} under parallel.cp {p.cp}: "
                          f"a pair of two data.max_length ({d.max_length}) sequences, each padded to a multiple of "
                          f"{split} for the split")
