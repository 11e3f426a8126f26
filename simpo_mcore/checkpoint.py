"""Training checkpoints: model + optimizer + RNG + data position, resumable at any layout, and the run config.

Model tensors go through :mod:`simpo_mcore.convert.mcore_io` (the same keys as a converted checkpoint),
so a training checkpoint is also a starting checkpoint and exports like one. The learning-rate schedule has
no state of its own: it is a function of the config and the updates done (``optim.LRSchedule``), so a resumed
run follows the config it is launched with. ``run_config.yaml`` beside ``simpo_mcore.json`` records the
resolved config of the run that wrote the checkpoint, for people and for the resume checks.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_common_state_dict
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from simpo_mcore.convert.checkpoint_meta import TOKENIZER_DIR, CheckpointMeta
from simpo_mcore.convert.hf_io import copy_tokenizer_files
from simpo_mcore.convert.mcore_io import load_chunk, model_sharded_state_dict, save_sharded

LATEST = "latest"
RUN_CONFIG_FILE = "run_config.yaml"
"""The resolved config of the run that wrote a training checkpoint (a config ``simpo-train`` accepts)."""
OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
"""The distributed optimizer's default format cannot be saved on 0.19 ("flattened_range is not
supported"); ``fully_reshardable`` saves per-parameter state that reloads at any TP / PP / DP."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``root/latest`` names, if both exist."""
    root = Path(root)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which is not a complete checkpoint")
    return path


def _rng_object(layout):
    """This rank's RNG states, one ShardedObject per (pp, tp, dp) position."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state", state, (layout.pp, layout.tp, layout.dp),
                         (layout.pp_rank, layout.tp_rank, layout.dp_rank), replica_id=0)


def _restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def train_state_dict(ddp_chunks: list, optimizer, layout, with_optimizer: bool, is_loading: bool) -> dict:
    chunks = [c.module for c in ddp_chunks]
    state = model_sharded_state_dict(chunks)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIM_SHARDING)
    state["rng_state"] = _rng_object(layout)
    return state


def save_train_checkpoint(root: str | Path, step: int, ddp_chunks: list, optimizer,
                          progress: dict, meta: CheckpointMeta, layout, keep_last: int,
                          with_optimizer: bool = True, tokenizer: str | None = None,
                          run_config: dict | None = None, run_info: dict | None = None) -> Path:
    """Write ``root/step_N`` atomically and point ``root/latest`` at it; keep the newest K.

    The tensors go to ``step_N.incomplete``; only when every rank has finished does rank 0 add
    ``simpo_mcore.json``, rename the directory and replace ``latest`` (an atomic rename), so a
    crash at any point leaves the previous checkpoint and ``latest`` untouched. ``tokenizer``: a
    local tokenizer directory (its files are copied in, so exports carry them) or a hub name.
    ``run_config``: the run's resolved config, written to ``run_config.yaml``; ``run_info``: what else the
    resume checks need (the training data's fingerprint, the total steps), added to ``simpo_mcore.json``.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".incomplete")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = train_state_dict(ddp_chunks, optimizer, layout, with_optimizer, is_loading=False)
    # Plain values land in the common state (rank 0's copy, checked equal across ranks).
    state["progress"] = dict(progress)
    save_sharded(state, tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        info = {**meta.info, "step": step, **progress, "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
                **(run_info or {})}
        if run_config is not None:
            write_run_config(tmp, run_config)
        tok = tokenizer
        if tokenizer and Path(tokenizer).is_dir() and copy_tokenizer_files(tokenizer, tmp / TOKENIZER_DIR):
            tok = TOKENIZER_DIR
        CheckpointMeta(arch=meta.arch, tokenizer=tok, kind="train", info=info).write(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        marker_tmp = root / (LATEST + ".tmp")
        marker_tmp.write_text(final.name + "\n")
        os.replace(marker_tmp, root / LATEST)
        steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".incomplete"))
        for old in steps[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


@torch.no_grad()
def load_train_checkpoint(path: str | Path, ddp_chunks: list, optimizer, layout,
                          with_optimizer: bool = True) -> dict:
    """Restore model, optimizer state and (same layout only) RNG; return the progress dict. The optimizer's
    hyper-parameters (lr, betas, weight decay) are the caller's to set from its config (``apply_optim_config``)."""
    path = Path(path)
    meta = CheckpointMeta.read(path)
    if meta.kind != "train":
        raise ValueError(f"{path} is a {meta.kind} checkpoint, not a training checkpoint")
    common = load_common_state_dict(str(path))
    saved = meta.info.get("layout", {})
    same_layout = saved == {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
    has_optimizer = any(k.startswith("optimizer") for k in common) or _has_optimizer_tensors(path)
    if with_optimizer and not has_optimizer:
        raise ValueError(f"{path} holds no optimizer state (saved with checkpoint.save_optimizer: false)")
    if with_optimizer:
        _materialize_optimizer_state(ddp_chunks, optimizer)
    state = train_state_dict(ddp_chunks, optimizer, layout, with_optimizer, is_loading=True)
    if not same_layout:
        state.pop("rng_state")  # RNG streams are per rank; a new layout reseeds (no dropout in use)
    loaded = dist_checkpointing.load(state, str(path))
    chunks = [c.module for c in ddp_chunks]
    if len(chunks) == 1:
        load_chunk(chunks[0], loaded["model"])
    else:
        for i, c in enumerate(chunks):
            load_chunk(c, loaded[f"model{i}"])
    if with_optimizer:
        _match_group_learning_rates(loaded["optimizer"], optimizer)
        with _megatron_019_adam_step_fix(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        _restore_rng(loaded["rng_state"])
    return dict(common["progress"])


def write_run_config(ckpt_dir: str | Path, run_config: dict) -> None:
    text = yaml.safe_dump(run_config, sort_keys=False, default_flow_style=False)
    (Path(ckpt_dir) / RUN_CONFIG_FILE).write_text(
        "# The resolved config of the run that wrote this checkpoint (simpo-train accepts it as a config).\n"
        "# A resume compares what is optimised (loss, training data, global batch, seed, model) with it.\n" + text)


def read_run_config(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The saved run config of a training checkpoint; ``None`` for checkpoints written without one."""
    path = Path(ckpt_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc}); the checkpoint's run config is damaged") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a mapping; the checkpoint's run config is damaged")
    return tree


def _match_group_learning_rates(saved, optimizer) -> None:
    """megatron pairs saved and live parameter groups by their settings, ``max_lr`` / ``min_lr`` (the config's
    lr) among them, so a run resumed with another ``optim.lr`` found no group (a ``KeyError``). The lr is the
    schedule's, which follows the config: the saved groups take the live groups' values of these two keys
    (when every live group has the same, as ours do; per-group learning rates are left to megatron)."""
    live = {(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups}
    if len(live) != 1:
        return
    max_lr, min_lr = live.pop()
    pending = [saved]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            groups = node.get("param_groups")
            if isinstance(groups, list):
                for group in groups:
                    if isinstance(group, dict) and "max_lr" in group:
                        group["max_lr"], group["min_lr"] = max_lr, min_lr
            pending.extend(v for k, v in node.items() if k != "param_groups")
        elif isinstance(node, (list, tuple)):
            pending.extend(node)


def _materialize_optimizer_state(ddp_chunks: list, optimizer) -> None:
    """Allocate Adam's state with one step that changes nothing (zero gradients, learning rate 0):
    megatron's optimizers can only load state into tensors that exist (an empty state fails
    ``DistributedOptimizer.state_dict``'s step assertion). The step counters it sets are
    overwritten by the load."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr


@contextlib.contextmanager
def _megatron_019_adam_step_fix(optimizer):
    """Work around two megatron-core 0.19 defects when the distributed optimizer loads a
    ``fully_reshardable`` checkpoint into torch's Adam (no Apex / TE FusedAdam, e.g. on CPU):

    1. ``_set_main_param_and_optimizer_states`` copies every tensor of the live state, including
       torch Adam's per-parameter ``step``, from the loaded tensors, which (by design) hold no
       ``step``: ``KeyError: 'step'``. Keys the loaded state lacks are skipped instead.
    2. ``load_state_dict`` restores the step from the param groups as ONE tensor shared by every
       parameter; Adam increments each parameter's step in place, so the shared counter would
       advance once per parameter per update and the bias correction would drift. Each parameter
       gets its own copy afterwards.
    """
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    patched = [o for o in inner if isinstance(o, DistributedOptimizer)]
    for opt in patched:
        original = opt._set_main_param_and_optimizer_states

        def tolerant(model_param, tensors, _original=original, _opt=opt):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            state = _opt.optimizer.state[main_param]
            missing = {k: state.pop(k) for k in list(state) if k not in tensors and k != "param"}
            try:
                _original(model_param, tensors)
            finally:
                state.update(missing)

        opt._set_main_param_and_optimizer_states = tolerant
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
        for opt in inner:
            for state in getattr(opt, "optimizer", opt).state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def _has_optimizer_tensors(path: Path) -> bool:
    return any(k.startswith("optimizer") for k in dist_checkpointing.load_tensors_metadata(str(path)))


def remove_incomplete(root: str | Path) -> list[str]:
    """Delete leftovers of interrupted saves (``step_N.incomplete``); returns their names."""
    removed = []
    for path in Path(root).glob("step_*.incomplete"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed
