"""What a launch does before any rank starts: every check that needs no process group, run once, in under a second;
and a free port for the CPU re-launch's rendezvous.

    simpo-train:  check_train(cfg)   the local data paths; output_dir writable, not held by a live run, no previous
                                     run in the way of a fresh one; the resume point and what the config changes
                                     against its saved run config; steps left to train (when the run's length is
                                     known before the data is read: ``train.max_steps``, or ``train.epochs`` over
                                     the checkpoint's pairs)
    simpo-eval:   check_eval(cfg)    data.eval_path set and (when local) there; output_dir writable

The CPU re-launch runs them in the launcher, before it starts torchrun; under torchrun rank 0 runs them before the
process groups. The ranks run the same checks again (a cluster's torchrun has no launcher of ours, and a second
launch may take the output_dir meanwhile), from the same functions: :mod:`simpo_mcore.output_dir`,
:mod:`simpo_mcore.resume`, :mod:`simpo_mcore.config.paths`. Imports neither torch nor the data libraries, so a
user error is one line within a few seconds of the command instead of after the ranks' imports.
"""

from __future__ import annotations

import socket

from simpo_mcore.config import DataConfig, RunConfig
from simpo_mcore.config.paths import check_local_data_paths
from simpo_mcore.output_dir import check_output_dir, check_writable, previous_run
from simpo_mcore.resume import check_steps_left, find_resume_point, known_total_steps


def check_train(cfg: RunConfig) -> str:
    """``simpo-train``'s checks that need no rank (see the module docstring); returns what the run will do: ``a new
    run``, or ``resuming step_0000100 at step 100 of 150``."""
    check_local_data_paths(cfg.data, ("train", "eval"))
    check_output_dir(cfg.output_dir, cfg.checkpoint)
    resume_from, changes = find_resume_point(cfg)
    if resume_from is None:
        replaced = not cfg.checkpoint.resume and previous_run(cfg.output_dir)
        return "a new run" + (", deleting the previous run's outputs (checkpoint.overwrite)" if replaced else "")
    total = known_total_steps(cfg, resume_from, changes)
    if total is None:
        return f"resuming {resume_from.name}"
    step = check_steps_left(cfg, resume_from, total, changes)
    return f"resuming {resume_from.name} at step {step} of {total}"


def require_eval_path(cfg: DataConfig) -> None:
    if cfg.eval_path is None:
        raise ValueError("data.eval_path is required for simpo-eval")


def check_eval(cfg: RunConfig) -> str:
    """``simpo-eval``'s checks that need no rank; returns what the command will do."""
    require_eval_path(cfg.data)
    check_local_data_paths(cfg.data, ("eval",))
    check_writable(cfg.output_dir)
    return f"evaluating {cfg.model.checkpoint} on {cfg.data.eval_path}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
