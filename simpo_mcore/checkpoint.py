"""Training checkpoints: model + optimizer + RNG + data position, resumable at any layout, and the run config.

Model tensors go through :mod:`simpo_mcore.convert.mcore_io` (the same keys as a converted checkpoint),
so a training checkpoint is also a starting checkpoint and exports like one. The learning-rate schedule has
no state of its own: it is a function of the config and the updates done (``schedule.LRSchedule``), so a resumed
run follows the config it is launched with. ``run_config.yaml`` beside ``simpo_mcore.json`` records the
resolved config of the run that wrote the checkpoint, for people and for the resume checks (both read without
torch by :mod:`simpo_mcore.checkpoint_info`).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from simpo_mcore.checkpoint_info import LATEST, write_run_config
from simpo_mcore.config import CheckpointConfig
from simpo_mcore.convert.checkpoint_meta import TOKENIZER_DIR, CheckpointMeta
from simpo_mcore.convert.hf_io import copy_tokenizer_files
from simpo_mcore.convert.integrity import write_manifest
from simpo_mcore.convert.mcore_io import (
    load_checked,
    load_chunk,
    model_sharded_state_dict,
    save_sharded,
    verify_checkpoint,
)
from simpo_mcore.optim import zero_grad
from simpo_mcore.parallel import agreed

OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
"""The distributed optimizer's default format cannot be saved on 0.19 ("flattened_range is not
supported"); ``fully_reshardable`` saves per-parameter state that reloads at any TP / PP / DP. A mixture of
experts' optimizer is a chain (dense and expert parameters, over their own data-parallel groups) or not,
depending on the layout: its state keyed by parameter alone (no ``chained_<i>.`` prefix) reloads at any EP."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


RNG_KEY = "rng_state"


def _rng_tensors() -> dict[str, torch.Tensor]:
    """This rank's RNG states as tensors (a checkpoint holds no pickled object of ours): Python's and
    numpy's Mersenne Twisters, torch's CPU (and CUDA) generator, megatron's tracker streams."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    assert version == 3 and name == "MT19937", (version, name)
    state = {
        "python_mt": torch.tensor(mt, dtype=torch.int64),  # 624 words + position
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy_mt": torch.tensor([*keys.tolist(), pos], dtype=torch.int64),
        "numpy_gauss": torch.tensor([has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for stream, tensor in get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{stream}"] = tensor.cpu()
    return state


def _restore_rng_tensors(state: dict[str, torch.Tensor]) -> None:
    gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python_mt"].tolist()), gauss[1] if gauss[0] else None))
    numpy_mt = state["numpy_mt"].tolist()
    has_gauss, cached = state["numpy_gauss"].tolist()
    np.random.set_state(("MT19937", np.array(numpy_mt[:-1], dtype=np.uint32), numpy_mt[-1], int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    streams = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("tracker.")}
    if streams:
        get_cuda_rng_tracker().set_states(streams)


def _rng_sharded(layout, present: set[str] | None = None) -> dict:
    """One ``[pp, tp, dp x cp, n]`` tensor per RNG state, this rank's row at its (pp, tp, dp, cp) position (the
    context-parallel ranks of a replica side by side: each has streams of its own). When loading, ``present``
    limits them to the states the checkpoint holds (a CUDA state saved on a GPU is skipped on a CPU and vice
    versa)."""
    out = {}
    for name, tensor in _rng_tensors().items():
        key = f"{RNG_KEY}.{name}"
        if present is not None and key not in present:
            continue
        out[name] = ShardedTensor.from_rank_offsets(
            key, tensor.reshape(1, 1, 1, -1).clone(), (0, layout.pp_rank, layout.pp),  # [1, 1, 1, n]
            (1, layout.tp_rank, layout.tp), (2, layout.dp_rank * layout.cp + layout.cp_rank, layout.dp * layout.cp),
            replica_id=0)
    return out


def train_state_dict(ddp_chunks: list, optimizer, with_optimizer: bool, is_loading: bool) -> dict:
    chunks = [c.module for c in ddp_chunks]
    state = model_sharded_state_dict(chunks)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIM_SHARDING)
    return state


@dataclass(frozen=True)
class PendingSave:
    """A save whose tensors are written (:meth:`CheckpointManager.write_shards`) and not yet published."""

    step: int
    staging: Path
    """``step_N.incomplete``: where the shards are."""
    progress: dict
    """The training state at ``step``, taken when the shards were written."""


class CheckpointManager:
    """The training checkpoints of one run, in ``root`` (``<output_dir>/checkpoints``). Built once with what a
    checkpoint holds (model chunks, optimizer, the training state, the run's meta, config, tokenizer and data
    fingerprint), it decides when to save (:meth:`save`: every ``checkpoint.save_interval`` steps, and at the end
    of a run or of a stopped one) and keeps the newest ``checkpoint.keep_last``.

    A save is two phases: :meth:`write_shards` (every rank writes its tensors into ``step_N.incomplete``) and
    :meth:`finalize` (once every rank has written: ``simpo_mcore.json`` (architecture, progress: JSON a person can
    read), ``run_config.yaml``, the tokenizer files, ``integrity.json``, then rank 0 renames the directory and
    replaces ``latest``, both atomic renames, and prunes). A crash at any point leaves the previous checkpoint and
    ``latest`` untouched. An asynchronous writer fits behind the same :meth:`save`: schedule the shards, finalize
    later."""

    def __init__(self, root: str | Path, cfg: CheckpointConfig, *, model: list, optimizer, train_state, layout,
                 meta: CheckpointMeta, tokenizer: str, run_config: dict, data_fingerprint: dict, total_steps: int):
        """``model``: the DDP-wrapped chunks; ``train_state``: an object with ``state_dict()`` /
        ``load_state_dict()`` and a ``step`` (the trainer's counters); ``tokenizer``: a local directory (its files
        are copied in, so exports carry them) or a hub name; ``run_config``: the run's resolved config;
        ``data_fingerprint``: the training pairs' (``TokenizedSplit.content_fingerprint``), for the resume
        checks."""
        self.root = Path(root)
        self.cfg = cfg
        self.model, self.optimizer, self.train_state, self.layout = model, optimizer, train_state, layout
        self.meta, self.tokenizer, self.run_config = meta, tokenizer, run_config
        self.run_info = {"train_data": data_fingerprint, "total_steps": total_steps}
        self.last_step = -1
        """The step of this run's newest checkpoint (written or resumed from; -1: none)."""
        self.last_path: Path | None = None
        """That checkpoint's directory."""

    def save(self, step: int, last_step: bool = False) -> Path | None:
        """Save at ``step`` if due: every ``save_interval`` steps, and (``last_step``: the run ends or stops
        here) whenever ``step`` is not saved yet. Returns the checkpoint written, else ``None``."""
        if not self.due(step, last_step):
            return None
        return self.finalize(self.write_shards(step))

    def due(self, step: int, last_step: bool = False) -> bool:
        if step == self.last_step:
            return False
        interval = self.cfg.save_interval
        return last_step or bool(interval and step % interval == 0)

    def write_shards(self, step: int) -> PendingSave:
        """Every rank's tensors (model, optimizer, RNG) into a fresh ``step_N.incomplete``."""
        staging = self.root / (step_dir_name(step) + ".incomplete")

        def fresh_dir():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

        agreed(fresh_dir, run=dist.get_rank() == 0)
        state = train_state_dict(self.model, self.optimizer, self.cfg.save_optimizer, is_loading=False)
        state[RNG_KEY] = _rng_sharded(self.layout)
        save_sharded(state, staging)
        return PendingSave(step, staging, dict(self.train_state.state_dict()))

    def finalize(self, pending: PendingSave) -> Path:
        """Publish a written save once every rank's shards are in: meta, manifest, rename, ``latest``, pruning."""
        dist.barrier()
        rank0 = dist.get_rank() == 0
        agreed(lambda: self._write_meta(pending), run=rank0)
        write_manifest(pending.staging)
        final = self.root / step_dir_name(pending.step)
        agreed(lambda: publish(self.root, pending.staging, final, self.cfg.keep_last, pending.step), run=rank0)
        self.last_step, self.last_path = pending.step, final
        return final

    def _write_meta(self, pending: PendingSave) -> None:
        staging, progress = pending.staging, pending.progress
        info = {**self.meta.info, "step": pending.step, **progress, "progress": progress,
                "layout": _layout_info(self.layout), **self.run_info}
        write_run_config(staging, self.run_config)
        tok = self.tokenizer
        if tok and Path(tok).is_dir() and copy_tokenizer_files(tok, staging / TOKENIZER_DIR):
            tok = TOKENIZER_DIR
        CheckpointMeta(arch=self.meta.arch, tokenizer=tok, kind="train", info=info).write(staging)

    def restore(self, path: Path, adapt: Callable[[dict], dict] | None = None) -> None:
        """Load the checkpoint ``path`` into the model, optimizer and training state (``adapt``: a function of the
        saved progress dict to the one this run counts in, e.g. a changed global batch's)."""
        progress = load_train_checkpoint(path, self.model, self.optimizer, self.layout, self.cfg.save_optimizer)
        self.train_state.load_state_dict(adapt(progress) if adapt is not None else progress)
        self.last_step, self.last_path = self.train_state.step, Path(path)

    def remove_interrupted(self) -> list[str]:
        """Rank 0 deletes what interrupted saves left (``step_N.incomplete``); returns their names."""
        return remove_incomplete(self.root) if dist.get_rank() == 0 else []


def publish(root: Path, staging: Path, final: Path, keep_last: int, step: int) -> None:
    """``staging`` becomes ``final`` and ``root/latest`` names it (atomic renames); the newest ``keep_last``
    are kept."""
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    marker_tmp = root / (LATEST + ".tmp")
    marker_tmp.write_text(final.name + "\n")
    os.replace(marker_tmp, root / LATEST)
    prune_checkpoints(root, keep_last, step)


def _layout_info(layout) -> dict:
    """The layout a checkpoint was saved at (its RNG streams are restored at the same one only)."""
    cp = {"cp": layout.cp} if layout.cp > 1 else {}  # absent at CP 1, as in checkpoints saved without CP
    return {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, **cp, "device": layout.device.type}


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def prune_checkpoints(root: Path, keep_last: int, step: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints at or below ``step`` (the one just
    written); returns the names deleted. Never the one just written, never one of a higher step (another
    run's, or one ``latest`` was pointed back from): the newest K by step number alone would delete the
    checkpoint a run has just written when an older run's higher steps sit beside it."""
    older = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".incomplete")
                    and _step_of(p) < step), key=_step_of)
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return [p.name for p in doomed]


@torch.no_grad()
def load_train_checkpoint(path: str | Path, ddp_chunks: list, optimizer, layout,
                          with_optimizer: bool = True) -> dict:
    """Restore model, optimizer state and (same layout only) RNG; return the progress dict. The optimizer's
    hyper-parameters (lr, betas, weight decay) are the caller's to set from its config (``apply_optim_config``).

    The checkpoint is verified first (every file against ``integrity.json``, no pickle that could run
    code: :func:`~simpo_mcore.convert.mcore_io.verify_checkpoint`)."""
    path = Path(path)
    meta = CheckpointMeta.read(path)
    if meta.kind != "train":
        raise ValueError(f"{path} is a {meta.kind} checkpoint, not a training checkpoint")
    present = {k.split("/shard_")[0] for k in verify_checkpoint(path).state_dict_metadata}
    if with_optimizer and not any(k.startswith("optimizer") for k in present):
        raise ValueError(f"{path} holds no optimizer state (saved with checkpoint.save_optimizer: false)")
    if with_optimizer:
        _materialize_optimizer_state(ddp_chunks, optimizer)
    state = train_state_dict(ddp_chunks, optimizer, with_optimizer, is_loading=True)
    # RNG streams are per rank and per kind of device (a CPU generator's state is not a CUDA one): restored at
    # the same layout on the same kind of device only (a new layout reseeds; no dropout in use).
    same_layout = meta.info["layout"] == _layout_info(layout)
    if same_layout:
        state[RNG_KEY] = _rng_sharded(layout, present)
    loaded = load_checked(state, path)
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
        _restore_rng_tensors({name: t.reshape(-1) for name, t in loaded[RNG_KEY].items()})
    return dict(meta.info["progress"])


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
    zero_grad(ddp_chunks, optimizer)
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


def remove_incomplete(root: str | Path) -> list[str]:
    """Delete leftovers of interrupted saves (``step_N.incomplete``); returns their names."""
    removed = []
    for path in Path(root).glob("step_*.incomplete"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed
