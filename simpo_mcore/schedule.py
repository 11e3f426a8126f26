"""The run's length and the learning rate of every update: a pure function of the config and the updates done, so
a resumed run follows the config it is launched with. No torch: the launcher computes a run's length before any
rank starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from simpo_mcore.config import ConfigError, OptimConfig, TrainConfig


def total_steps(t: TrainConfig, num_pairs: int) -> int:
    """The run's optimizer steps: ``train.max_steps``, else ``train.epochs`` over ``num_pairs`` training pairs
    (whole global batches per epoch)."""
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = num_pairs // t.global_batch_pairs
    if per_epoch == 0:
        raise ConfigError(f"train.global_batch_pairs ({t.global_batch_pairs}) exceeds the {num_pairs} "
                          "training pairs: not one step fits in an epoch")
    return max(1, math.floor(per_epoch * t.epochs))


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """The HF Trainer's warm-up length (``TrainingArguments.get_warmup_steps``): ``ceil(total x ratio)``,
    the product taken in floating point as HF takes it (so 100 x 0.07 = 7.000000000000001 warms up 8 steps,
    as HF does). Any ratio > 0 warms up at least one step: the first update then uses lr 0."""
    return math.ceil(total_steps * warmup_ratio)


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every update, exactly the HF Trainer's (the schedule the SimPO reference runs).

    ``factor(n)`` is the multiplier of update ``n + 1`` (``n`` updates done), written as transformers'
    ``lr_lambda`` of ``get_cosine_schedule_with_warmup`` / ``get_linear_schedule_with_warmup`` /
    ``get_constant_schedule_with_warmup``, and ``lr_at(n) = lr x factor(n)`` as ``LambdaLR`` computes it, so
    the values are equal to the last bit. ``min_lr > 0`` (cosine or linear) decays to ``min_lr`` instead of 0:
    the decay factor ``f`` becomes ``f x (1 - min_lr / lr) + min_lr / lr``, transformers'
    ``get_cosine_with_min_lr_schedule_with_warmup(min_lr=...)`` for cosine (HF has no linear equivalent; the
    same formula is used). The warm-up always starts at 0.

    The schedule is a pure function of the config and the number of updates, so a resumed run follows the
    config it is launched with (a longer run continues on the longer schedule; a new lr applies at once).
    """

    lr: float
    min_lr: float
    style: str
    warmup: int
    total: int

    @classmethod
    def from_config(cls, cfg: OptimConfig, total_steps: int) -> LRSchedule:
        return cls(lr=cfg.lr, min_lr=cfg.min_lr, style=cfg.scheduler,
                   warmup=warmup_steps(cfg.warmup_ratio, total_steps), total=total_steps)

    def factor(self, step: int) -> float:
        """The multiplier of the lr after ``step`` updates (transformers' ``lr_lambda(step)``)."""
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        if self.style == "constant":
            return 1.0
        if self.style == "linear":
            decay = max(0.0, float(self.total - step) / float(max(1, self.total - self.warmup)))
        else:
            progress = float(step - self.warmup) / float(max(1, self.total - self.warmup))
            decay = max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(COSINE_CYCLES) * 2.0 * progress)))
        if self.min_lr:
            rate = self.min_lr / self.lr
            decay = max(0, decay * (1 - rate) + rate)
        return decay

    def lr_at(self, step: int) -> float:
        """The learning rate of update ``step + 1``."""
        return self.lr * self.factor(step)


COSINE_CYCLES = 0.5
"""transformers' default ``num_cycles``: half a cosine, from the peak down to the floor."""
