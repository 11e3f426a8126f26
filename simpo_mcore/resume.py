"""What a resumed run may change: the config it is launched with against the run config saved in the checkpoint.

The learning-rate schedule follows the config (it is a function of the config and the updates done,
:class:`simpo_mcore.schedule.LRSchedule`): a longer run continues on the longer schedule, a new lr or schedule applies
from the resumed step, and the log says so. What is optimised (:data:`RESUME_GUARDED`: the
objective, the training pairs and their order, the batch a step averages over, the starting model) may change
only where ``checkpoint.allow_changes`` names it; any other difference is refused before anything loads, naming
each field with its old and new value. The training pairs themselves are compared by content, so a data file
changed in place (or another tokenizer or chat template) is refused too. A relaunch with no step left to train
(:func:`check_steps_left`) is refused.

No torch: what needs only the checkpoint's small files (:func:`find_resume_point`, :func:`check_steps_left` when
the run's length is known) also runs in the launcher, before any rank starts (:mod:`simpo_mcore.preflight`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from simpo_mcore.checkpoint_info import (
    RUN_CONFIG_FILE,
    checkpoint_info,
    checkpoint_root,
    latest_checkpoint,
    read_run_config,
)
from simpo_mcore.config import SECTIONS, ConfigError, OptimConfig, RunConfig
from simpo_mcore.schedule import LRSchedule, total_steps

log = logging.getLogger("simpo_mcore")

Change = tuple[str, Any, Any]
"""``(dotted field, value in the checkpoint's run config, value now)``."""

NEW_RUN = ("to start a new run instead, use another output_dir=... or add checkpoint.resume=false "
           "checkpoint.overwrite=true (which deletes this run's checkpoints and metrics)")
"""The way out every resume refusal names: each flag it takes (``checkpoint.resume=false`` alone meets the
previous-run refusal of :func:`simpo_mcore.output_dir.check_fresh`)."""

RESUME_GUARDED = ("loss", "data", "train.global_batch_pairs", "train.seed", "model.checkpoint",
                  "model.make_vocab_size_divisible_by", "model.moe_aux_loss_coeff", "model.moe_load_balancing_type",
                  "model.moe_freeze_router")
"""What a resumed run may change only with ``checkpoint.allow_changes``: what is optimised (the objective,
the training pairs and their order, the batch a step averages over, the starting model). Data settings that
do not decide the training pairs (:data:`DATA_NOT_GUARDED`) are free."""

DATA_NOT_GUARDED = ("data.eval_path", "data.eval_split", "data.max_eval_pairs", "data.num_proc", "data.cache_dir",
                    "data.packing", "data.pack_tokens")
"""``data.packing`` / ``data.pack_tokens`` lay a step's pairs out (packed rows or padded micro-batches, as
``train.micro_batch_pairs`` does): the same pairs and the same mean, equal to fp32 rounding."""


def flat_config(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"loss.beta": 2.0, ..., "output_dir": ...}`` from a config tree (``dataclasses.asdict`` or YAML)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in SECTIONS:
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_changes(saved: dict[str, Any], cfg: RunConfig) -> list[Change]:
    """``(field, saved value, value now)`` for every field of ``cfg`` that differs from the saved config tree
    (fields the saved config does not have, from another version, are skipped)."""
    old, now = flat_config(saved), flat_config(dataclasses.asdict(cfg))
    return [(name, old[name], value) for name, value in now.items() if name in old and old[name] != value]


def is_guarded(name: str) -> bool:
    """Whether changing the field ``name`` on resume changes what is optimised (:data:`RESUME_GUARDED`)."""
    return name not in DATA_NOT_GUARDED and (name in RESUME_GUARDED or name.split(".")[0] in RESUME_GUARDED)


def is_allowed(name: str, allow: list[str]) -> bool:
    """Whether ``checkpoint.allow_changes`` names the field ``name`` or its section."""
    return name in allow or name.split(".")[0] in allow


def _show(changes: list[Change]) -> str:
    return "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changes)


def check_resume_config(cfg: RunConfig, ckpt_dir: Path) -> list[Change]:
    """Every difference between ``cfg`` and the run config saved in ``ckpt_dir``. Refuses (``ConfigError``, one
    message naming each field with its old and new value) those that change what is optimised unless
    ``checkpoint.allow_changes`` names them, and a global batch that does not divide the pairs consumed. Reads two
    small files: it runs before anything loads."""
    changes = config_changes(read_run_config(ckpt_dir), cfg)
    allow = cfg.checkpoint.allow_changes
    refused = [c for c in changes if is_guarded(c[0]) and not is_allowed(c[0], allow)]
    if refused:
        names = ",".join(name for name, _, _ in refused)
        raise ConfigError(
            f"resuming {ckpt_dir} with a config that changes what is optimised: {_show(refused)} (the checkpoint's "
            f"config: {ckpt_dir / RUN_CONFIG_FILE}). To continue with the new values, add "
            f"checkpoint.allow_changes=[{names}]; {NEW_RUN}")
    if any(name == "train.global_batch_pairs" for name, _, _ in changes):
        consumed = checkpoint_info(ckpt_dir).get("consumed_pairs", 0)
        if consumed % cfg.train.global_batch_pairs:
            raise ConfigError(f"train.global_batch_pairs ({cfg.train.global_batch_pairs}) must divide the {consumed} "
                              f"pairs {ckpt_dir} has consumed to resume from it")
    return changes


def find_resume_point(cfg: RunConfig) -> tuple[Path | None, list[Change]]:
    """The checkpoint to resume from (``checkpoint.resume`` and a ``latest``), and what the config changes
    against it (refused before anything loads when it changes what is optimised)."""
    resume_from = latest_checkpoint(checkpoint_root(cfg.output_dir)) if cfg.checkpoint.resume else None
    return resume_from, check_resume_config(cfg, resume_from) if resume_from is not None else []


def resumed_step(progress: dict[str, Any], changes: list[Change]) -> int:
    """The step a run resumes at from a checkpoint's ``progress``, counted in this run's global batches."""
    new_batch = next((new for name, _, new in changes if name == "train.global_batch_pairs"), None)
    return progress["step"] if new_batch is None else progress["consumed_pairs"] // new_batch


def known_total_steps(cfg: RunConfig, ckpt_dir: Path, changes: list[Change]) -> int | None:
    """This run's total steps as far as they are known before the data is read: ``train.max_steps``; else
    ``train.epochs`` over the pairs ``ckpt_dir`` was trained on, when no setting that decides the training pairs
    changed and ``checkpoint.allow_changes`` does not let other pairs through (the ranks count the pairs
    themselves and check again); else None."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    other_pairs = "data" in cfg.checkpoint.allow_changes or any(
        name.startswith("data.") and is_guarded(name) for name, _, _ in changes)
    pairs = checkpoint_info(ckpt_dir).get("train_data", {}).get("pairs")
    return None if other_pairs or pairs is None else total_steps(cfg.train, pairs)


def check_steps_left(cfg: RunConfig, ckpt_dir: Path, total: int, changes: list[Change]) -> int:
    """The step the run resumes at from ``ckpt_dir``; refuses a run with no step left, ``total`` (this run's steps)
    at or below it: it would train nothing and only evaluate again (a second record of the last evaluation)."""
    progress = checkpoint_info(ckpt_dir).get("progress")
    if not isinstance(progress, dict):
        raise ValueError(f"{ckpt_dir} records no training progress: it is not a training checkpoint of simpo_mcore "
                         "(checkpoints/latest must name a step_N directory a run wrote)")
    step = resumed_step(progress, changes)
    if total > step:
        return step
    t = cfg.train
    asked = (f"train.max_steps is {t.max_steps}" if t.max_steps is not None
             else f"train.epochs={t.epochs} makes {total} steps")
    raise ConfigError(
        f"{ckpt_dir} is at step {step} and {asked}: no step is left to train. To train further, set "
        f"train.max_steps above {step}{'' if t.max_steps is not None else ' (or more train.epochs)'}; {NEW_RUN}")


def check_resume_data(cfg: RunConfig, ckpt_dir: Path, changes: list[Change], train_data: dict) -> None:
    """Refuses training pairs that differ from those ``ckpt_dir`` was trained on (a file changed in place, another
    tokenizer or chat template) unless ``checkpoint.allow_changes`` names ``data``, or names every data setting
    that changed. ``train_data``: this run's ``TokenizedSplit.content_fingerprint()``."""
    saved = checkpoint_info(ckpt_dir)["train_data"]
    if saved == train_data:
        return
    allow = cfg.checkpoint.allow_changes
    changed = [name for name, _, _ in changes if name.startswith("data.") and is_guarded(name)]
    what = (f"{saved['pairs']} pairs (sha256 {saved['sha256'][:12]}) -> {train_data['pairs']} pairs "
            f"(sha256 {train_data['sha256'][:12]})")
    if "data" in allow or (changed and all(is_allowed(name, allow) for name in changed)):
        log.warning("training on other pairs than the checkpoint's, as checkpoint.allow_changes allows: %s", what)
        return
    raise ConfigError(
        f"the training data ({cfg.data.train_path}) differ from those {ckpt_dir} was trained on: {what}; the file, "
        f"the tokenizer or its chat template changed. To train on them anyway, add checkpoint.allow_changes=[data]; "
        f"{NEW_RUN}")


def rebase_progress(progress: dict[str, Any], changes: list[Change]) -> dict[str, Any]:
    """The checkpoint's progress in the units of this run: steps count global batches, so a changed
    ``train.global_batch_pairs`` (allowed, and dividing the pairs consumed: :func:`check_resume_config`) makes the
    resumed step ``consumed_pairs / new batch``, which the sampler, the schedule's total, the intervals and the
    checkpoint names all count in. Skipped updates are rescaled the same way (rounded down)."""
    change = next((c for c in changes if c[0] == "train.global_batch_pairs"), None)
    if change is None:
        return progress
    old, new = change[1], change[2]
    out = dict(progress)
    out["step"] = resumed_step(progress, changes)
    out["skipped_steps"] = progress.get("skipped_steps", 0) * old // new
    out["nonfinite_in_a_row"] = 0
    log.warning("train.global_batch_pairs %d -> %d: resuming at step %d of the new batch (step %d of the old, "
                "%d pairs consumed)", old, new, out["step"], progress["step"], progress["consumed_pairs"])
    return out


def log_resume_changes(changes: list[Change], ckpt_dir: Path, schedule: LRSchedule, updates: int) -> None:
    """Say what the resumed run does differently from the checkpoint's: the schedule it now follows (from update
    ``updates + 1``), the changes ``checkpoint.allow_changes`` let through, and the rest."""
    optim = [c for c in changes if c[0].startswith("optim.")]
    old_total = checkpoint_info(ckpt_dir)["total_steps"]
    if optim or old_total != schedule.total:
        what = [_show(optim)] if optim else []
        what.append(f"{old_total} -> {schedule.total} total steps" if old_total != schedule.total
                    else f"{schedule.total} total steps")
        was = ""
        try:  # the lr the checkpoint's own schedule would have used, when its config says
            old = LRSchedule.from_config(OptimConfig(**read_run_config(ckpt_dir)["optim"]), old_total)
            was = f" (the checkpoint's schedule: {old.lr_at(updates):.6g})"
        except (TypeError, KeyError):
            pass
        log.info("the learning-rate schedule follows this config from update %d on: %s, warm-up %d; update %d uses "
                 "lr %.6g%s", updates + 1, "; ".join(what), schedule.warmup, updates + 1, schedule.lr_at(updates), was)
    allowed = [c for c in changes if is_guarded(c[0])]
    if allowed:
        log.warning("resuming with changes checkpoint.allow_changes allows: %s", _show(allowed))
    rest = [c for c in changes if not is_guarded(c[0]) and not c[0].startswith(("optim.", "checkpoint.allow_changes"))]
    if rest:
        log.info("also changed since the checkpoint: %s", _show(rest))
