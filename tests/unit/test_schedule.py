"""The learning-rate schedule is transformers' to the last bit; the resume policy's field rules.

The reference is transformers itself: ``get_cosine_schedule_with_warmup`` / ``get_linear_schedule_with_warmup`` /
``get_constant_schedule_with_warmup`` (and ``get_cosine_with_min_lr_schedule_with_warmup`` for ``min_lr``) stepped
on a torch optimizer, with ``TrainingArguments.get_warmup_steps`` warm-up steps, the lr of each update read as the
HF Trainer reads it.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    TrainingArguments,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from simpo_mcore.config import ConfigError, OptimConfig, RunConfig, load_config
from simpo_mcore.optim import apply_optim_config
from simpo_mcore.resume import config_changes, is_allowed, is_guarded
from simpo_mcore.schedule import LRSchedule, warmup_steps

CASES = [(8, 0.1), (477, 0.1), (4, 0.1), (3, 0.05), (100, 0.07), (10, 0.0), (1, 0.5), (2, 0.9), (100, 0.25),
         (7, 0.3), (1000, 0.03)]
"""(total steps, warm-up ratio): ratio x steps below 1 (8 x 0.1: the issue's case), at a whole number that floating
point puts just above it (100 x 0.07 = 7.000000000000001: HF warms up 8), the reference's recipe (477 steps)."""


def hf_lrs(make, total: int, lr: float = 3e-4, **kwargs) -> list[float]:
    """The lr of each of ``total`` updates (and one past the end) as the HF Trainer steps ``make``'s schedule."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make(optimizer, **kwargs)
    lrs = []
    for _ in range(total + 1):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("total,ratio", CASES)
@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_schedule_equals_transformers(total, ratio, style):
    hf_warmup = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
    assert warmup_steps(ratio, total) == hf_warmup
    make = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}.get(style)
    kwargs = {"num_training_steps": total} if make else {}
    expected = hf_lrs(make or get_constant_schedule_with_warmup, total, num_warmup_steps=hf_warmup, **kwargs)
    schedule = LRSchedule.from_config(OptimConfig(lr=3e-4, scheduler=style, warmup_ratio=ratio), total)
    assert [schedule.lr_at(n) for n in range(total + 1)] == expected  # bit for bit
    if ratio > 0:
        assert schedule.lr_at(0) == 0.0  # any warm-up: the first update uses lr 0, as the reference's does


def test_warmup_is_hf_ceil_not_floor():
    """The issue's cases: 8 steps at 0.1 warm up 1 step (not 0), the reference's 477 steps 48 (not 47)."""
    assert [warmup_steps(r, n) for n, r in [(8, 0.1), (477, 0.1), (3, 0.05), (8, 0.0), (100, 0.07)]] == [1, 48, 1, 0, 8]
    schedule = LRSchedule.from_config(OptimConfig(lr=1.0, warmup_ratio=0.1), 8)
    assert schedule.lr_at(0) == 0.0 and schedule.lr_at(1) == 1.0 and schedule.lr_at(7) < schedule.lr_at(2)


@pytest.mark.parametrize("total,ratio", [(8, 0.1), (477, 0.1), (20, 0.0)])
def test_min_lr_is_transformers_cosine_with_min_lr(total, ratio):
    hf_warmup = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
    expected = hf_lrs(get_cosine_with_min_lr_schedule_with_warmup, total, lr=3e-4, num_warmup_steps=hf_warmup,
                      num_training_steps=total, min_lr=3e-5)
    schedule = LRSchedule.from_config(OptimConfig(lr=3e-4, min_lr=3e-5, warmup_ratio=ratio), total)
    assert [schedule.lr_at(n) for n in range(total + 1)] == expected
    assert schedule.lr_at(total) == pytest.approx(3e-5, rel=1e-12)  # decays to min_lr, not 0
    linear = LRSchedule.from_config(OptimConfig(lr=3e-4, min_lr=3e-5, scheduler="linear", warmup_ratio=ratio), total)
    assert linear.lr_at(total) == pytest.approx(3e-5, rel=1e-12) and linear.lr_at(hf_warmup) == 3e-4


def test_apply_optim_config_sets_every_group_from_the_config():
    """lr, betas and eps on every group; weight decay times megatron's wd_mult (0 for norms and biases), so a
    checkpoint's saved group values never outlive a config change."""
    weight, norm = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [weight], "wd_mult": 1.0}, {"params": [norm], "wd_mult": 0.0}],
                                  lr=9.0, betas=(0.1, 0.2), eps=1.0, weight_decay=5.0)
    apply_optim_config(optimizer, OptimConfig(lr=1e-3, weight_decay=0.01, adam_beta1=0.8, adam_beta2=0.95,
                                              adam_eps=1e-6), lr=4e-4)
    for group, decay in zip(optimizer.param_groups, (0.01, 0.0)):
        assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (4e-4, decay, (0.8, 0.95), 1e-6)


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match=r"optim.min_lr must be in \[0, optim.lr"):
        load_config(None, ["optim.lr=1e-6", "optim.min_lr=1e-5"])
    with pytest.raises(ConfigError, match="optim.min_lr .* has no effect with optim.scheduler: constant"):
        load_config(None, ["optim.scheduler=constant", "optim.min_lr=1e-8"])


def test_resume_guard_rules():
    """What a resume may change freely (the schedule's settings, the length, the layout) and what only with
    checkpoint.allow_changes (the objective, the training pairs and their order, the batch, the model)."""
    for name in ("loss.beta", "loss.type", "data.train_path", "data.max_length", "data.chat_template",
                 "train.global_batch_pairs", "train.seed", "model.checkpoint"):
        assert is_guarded(name), name
    for name in ("optim.lr", "optim.scheduler", "train.max_steps", "train.epochs", "train.micro_batch_pairs",
                 "parallel.tp", "data.eval_path", "data.num_proc", "data.cache_dir", "output_dir",
                 "checkpoint.allow_changes"):
        assert not is_guarded(name), name
    assert is_allowed("loss.beta", ["loss"]) and is_allowed("loss.beta", ["loss.beta"])
    assert not is_allowed("loss.type", ["loss.beta"])

    cfg = load_config(None, ["checkpoint.allow_changes=loss.beta", "loss.beta=4.0", "optim.lr=1e-6"])
    assert cfg.checkpoint.allow_changes == ["loss.beta"]  # one name on the command line is a list of one
    saved = dataclasses.asdict(RunConfig())
    del saved["train"]["seed"]  # a field the saved config (of another version) lacks is not compared
    assert config_changes(saved, cfg) == [("loss.beta", 2.0, 4.0), ("optim.lr", 6e-7, 1e-6),
                                          ("checkpoint.allow_changes", [], ["loss.beta"])]
    with pytest.raises(ConfigError, match="checkpoint.allow_changes: 'loss.bta' is not a config section or field"):
        load_config(None, ["checkpoint.allow_changes=[loss.bta]"])
    with pytest.raises(ConfigError, match=r"checkpoint.allow_changes\[0\]: expected a string"):
        load_config(None, ["checkpoint.allow_changes=[3]"])
