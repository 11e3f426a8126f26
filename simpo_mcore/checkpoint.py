"""Training checkpoints: model + optimizer + RNG + data position, resumable at any layout, and the run config.

Model tensors go through :mod:`simpo_mcore.convert.mcore_io` (the same keys as a converted checkpoint),
so a training checkpoint is also a starting checkpoint and exports like one. The learning-rate schedule has
no state of its own: it is a function of the config and the updates done (``schedule.LRSchedule``), so a resumed
run follows the config it is launched with. ``run_config.yaml`` beside ``simpo_mcore.json`` records the
resolved config of the run that wrote the checkpoint, for people and for the resume checks (both read without
torch by :mod:`simpo_mcore.checkpoint_info`).
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import random
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from simpo_mcore.checkpoint_info import LATEST, write_run_config
from simpo_mcore.config import CheckpointConfig, UserError
from simpo_mcore.convert.checkpoint_meta import META_FILE, TOKENIZER_DIR, CheckpointMeta
from simpo_mcore.convert.hf_io import copy_tokenizer_files
from simpo_mcore.convert.integrity import collect_manifest, store_manifest
from simpo_mcore.convert.mcore_io import (
    AsyncShardWriter,
    CheckpointWriteFailed,
    load_checked,
    load_chunk,
    load_strategy,
    model_sharded_state_dict,
    save_sharded,
    save_strategy,
    verify_checkpoint,
    written_digests,
)
from simpo_mcore.optim import load_optimizer_state, materialize_optimizer_state
from simpo_mcore.parallel import agreed
from simpo_mcore.snapshot import Snapshot, gather_groups, take

log = logging.getLogger("simpo_mcore")

PRUNED = ".pruned"
"""A checkpoint ``keep_last`` let go is renamed ``step_N.pruned``, then deleted."""
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


@dataclass
class PendingSave:
    """A save whose tensors are written, or being written (:meth:`CheckpointManager.write_shards`), and not yet
    published."""

    step: int
    staging: Path
    """``step_N.incomplete``: where the shards are."""
    progress: dict
    """The training state at ``step``, taken when the shards were written."""
    snapshot: Snapshot | None = None
    """An asynchronous save's state at ``step`` while its optimizer shards are gathered; None once its writer
    has started."""


class CheckpointManager:
    """The training checkpoints of one run, in ``root`` (``<output_dir>/checkpoints``). Built once with what a
    checkpoint holds (model chunks, optimizer, the training state, the run's meta, config, tokenizer and data
    fingerprint), it decides when to save (:meth:`save`: every ``checkpoint.save_interval`` steps, and at the end
    of a run or of a stopped one) and keeps the newest ``checkpoint.keep_last`` of the run's line.

    A save is two phases: :meth:`write_shards` (every rank writes its tensors into ``step_N.incomplete``: at once,
    or with ``checkpoint.async_save`` in a forked writer while training goes on) and :meth:`finalize` (once every
    rank's write is complete: ``simpo_mcore.json`` (architecture, progress: JSON a person can read),
    ``run_config.yaml``, the tokenizer files, ``integrity.json``, then rank 0 renames the directory and replaces
    ``latest``, both atomic renames, and prunes). At most one save is in flight: a new one, the end of the run and
    a stop wait for it (:meth:`wait`), and :meth:`poll` publishes it at the first step boundary after every rank's
    writer is done. A crash at any point leaves the previous checkpoint and ``latest`` untouched.

    Every method is collective (all ranks call it at the same point) except :meth:`due` and :meth:`writing`."""

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
        """The step of this run's newest checkpoint (written, being written, or resumed from; -1: none)."""
        self.last_path: Path | None = None
        """The newest complete checkpoint of this run (published, or resumed from)."""
        self.pending: PendingSave | None = None
        """The save in flight (asynchronous saves only)."""
        self.writer = AsyncShardWriter() if cfg.async_save and can_write_async() else None
        self.gather_groups = gather_groups(optimizer) if self.writer is not None else {}
        self.strategy = None
        self.validated = False
        """Whether megatron checked this run's checkpoint structure (at its first save; the same at every save)."""
        self.not_ours: set[str] = beyond(self.root, -1) if dist.get_rank() == 0 else set()
        """(Rank 0) complete checkpoints past the point this run started from: all there are, until :meth:`restore`
        says which are this run's line; the rest (one ``latest`` was pointed back from, another run's) are never
        pruned."""

    def save(self, step: int, last_step: bool = False) -> list[Path]:
        """Save at ``step`` if due: every ``save_interval`` steps, and (``last_step``: the run ends or stops
        here) whenever ``step`` is not saved yet; with ``last_step`` also wait for the save in flight. Returns the
        checkpoints published by this call: synchronously this one; asynchronously the previous save, which a new
        one waits for, and at the last step this one too."""
        published = []
        if self.due(step, last_step):
            published += self.wait()
            self.pending = self.write_shards(step)
        if self.writer is None or last_step:
            published += self.wait()
        return published

    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether ``step`` is to be saved. Never step 0 (nothing trained: a run stopped before its first step
        restarts, or resumes from where it started)."""
        if step in (0, self.last_step):
            return False
        interval = self.cfg.save_interval
        return last_step or bool(interval and step % interval == 0)

    def writing(self) -> bool:
        """Whether this rank is still working on the save in flight: gathering its state, or writing it (local:
        the trainer all-reduces it)."""
        pending = self.pending
        if pending is None or self.writer is None:
            return False
        return not pending.snapshot.ready() if pending.snapshot is not None else self.writer.busy()

    def poll(self, all_done: bool) -> list[Path]:
        """Move the save in flight on once every rank is done with its current phase (``all_done``:
        :meth:`writing` agreed over the ranks, which the trainer folds into the all-reduce it does every step
        anyway, so a poll adds no collective of its own): a gathered state goes to the writers, a written one is
        published. Returns what it published."""
        if self.pending is None or not all_done:
            return []
        if self.pending.snapshot is not None:
            self._start_writer(self.pending)
            return []
        return self.wait(agreed_done=True)

    def wait(self, agreed_done: bool = False) -> list[Path]:
        """Wait for the save in flight, if any, and publish it. A failed write is one error naming the checkpoint
        and the free space on every rank; ``latest`` stays where it was."""
        if self.pending is None:
            return []
        pending, self.pending = self.pending, None
        if pending.snapshot is not None:
            self._start_writer(pending)
        if self.writer is not None:
            try:
                self.writer.finish(agreed_done)
            except CheckpointWriteFailed as exc:
                self._write_failed(pending, exc)
        return [self.finalize(pending)]

    def abort(self) -> None:
        """The run failed: kill this rank's writer; the save in flight is not published (its
        ``step_N.incomplete`` is removed by the next launch)."""
        if self.writer is not None:
            self.writer.abort()
        self.pending = None

    def write_shards(self, step: int) -> PendingSave:
        """Every rank's tensors (model, optimizer, RNG) into a fresh ``step_N.incomplete``: written when this
        returns, or being written by the asynchronous writer (finalize after :meth:`wait`)."""
        staging = self.root / (step_dir_name(step) + ".incomplete")

        def fresh_dir():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

        agreed(fresh_dir, run=dist.get_rank() == 0)
        pending = PendingSave(step, staging, dict(self.train_state.state_dict()))
        if self.strategy is None:
            self.strategy = save_strategy(_dp_group() if self.cfg.fully_parallel_save else None, repeated=True)
        if self.writer is None:
            try:
                save_sharded(self._state_dict(), staging, self.strategy, validate=not self.validated)
            except CheckpointWriteFailed as exc:
                self._write_failed(pending, exc)
            self.validated = True
        else:
            pending.snapshot = take(self.optimizer, self._state_dict, self.gather_groups)
            if not self.gather_groups:  # nothing to gather (no distributed optimizer): the writer starts now
                self._start_writer(pending)
        self.last_step = step
        return pending

    def _state_dict(self) -> dict:
        state = train_state_dict(self.model, self.optimizer, self.cfg.save_optimizer, is_loading=False)
        state[RNG_KEY] = _rng_sharded(self.layout)
        return state

    def _start_writer(self, pending: PendingSave) -> None:
        """Hand a gathered snapshot to the asynchronous writer (plans the save, forks the writer)."""
        state, pending.snapshot = pending.snapshot.wait(), None
        try:
            self.writer.start(state, pending.staging, self.strategy, validate=not self.validated)
        except CheckpointWriteFailed as exc:
            self._write_failed(pending, exc)
        self.validated = True

    def finalize(self, pending: PendingSave) -> Path:
        """Publish a written save once every rank's shards are in: meta, manifest, rename, ``latest``, pruning."""
        dist.barrier()
        self._on_rank0(pending, lambda: self._write_meta(pending))
        manifest = collect_manifest(pending.staging, written_digests(pending.staging))
        self._on_rank0(pending, lambda: store_manifest(pending.staging, manifest))
        name = self._on_rank0(pending, lambda: publish(self.root, pending.staging, pending.step,
                                                       self.cfg.keep_last, self.not_ours))
        names = [name]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(names, src=0)
        self.last_path = self.root / names[0]
        return self.last_path

    def _on_rank0(self, pending: PendingSave, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, agreed by every rank; a full disk is every rank's one-line error."""
        def guarded():
            try:
                return fn()
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self._give_up(pending, str(exc), 0)

        return agreed(guarded, run=dist.get_rank() == 0)

    def _write_failed(self, pending: PendingSave, exc: CheckpointWriteFailed) -> NoReturn:
        """A failed shard write as one error on every rank."""
        if self.writer is not None:
            self.writer.abort()
        agreed(lambda: self._give_up(pending, exc.detail, exc.needed_bytes), run=dist.get_rank() == 0)

    def _give_up(self, pending: PendingSave, detail: str, needed: int) -> NoReturn:
        """Rank 0: remove the partial save and raise the error naming the checkpoint, why, and the free space."""
        free = shutil.disk_usage(self.root).free
        shutil.rmtree(pending.staging, ignore_errors=True)
        needs = f", the checkpoint needs about {_size(needed)}" if needed else ""
        previous = (f"latest still names {self.last_path.name}" if self.last_path is not None
                    else "no earlier checkpoint of this run exists")
        raise UserError(f"checkpoint {self.root / step_dir_name(pending.step)} could not be saved: {detail} "
                        f"({_size(free)} free on the file system of {self.root}{needs}); {previous}, and the partial "
                        "save was removed. Make room (or move output_dir) and relaunch the same command")

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
        group = _dp_group() if self.cfg.fully_parallel_load else None
        progress = load_train_checkpoint(path, self.model, self.optimizer, self.layout, self.cfg.save_optimizer,
                                         group)
        self.train_state.load_state_dict(adapt(progress) if adapt is not None else progress)
        self.last_step, self.last_path = self.train_state.step, Path(path)
        if dist.get_rank() == 0:
            self.not_ours = beyond(self.root, progress["consumed_pairs"])

    def remove_interrupted(self) -> list[str]:
        """Rank 0 deletes what interrupted saves left (``step_N.incomplete``); returns their names."""
        return remove_incomplete(self.root) if dist.get_rank() == 0 else []


def can_write_async() -> bool:
    """Whether this platform can fork the asynchronous writer (Linux, macOS; not Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


def _dp_group():
    """The data-parallel group (with context parallelism) that fully-parallel saves and loads spread over."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def publish(root: Path, staging: Path, step: int, keep_last: int, not_ours: set[str] = frozenset()) -> str:
    """``staging`` becomes ``root/step_N`` and ``root/latest`` names it (atomic renames); the newest ``keep_last``
    of the run's line are kept. A name never replaces an existing checkpoint: one another line left (a global
    batch changed on resume restarts the step count; ``latest`` pointed back past it) makes this one
    ``step_N-2`` (``-3``, ...), and the log says so. Returns the name."""
    base = name = step_dir_name(step)
    copy = 1
    while (root / name).exists():
        copy += 1
        name = f"{base}-{copy}"
    if name != base:
        log.warning("checkpoint %s already exists (%s pairs consumed); it is kept, and this one (%s pairs consumed) "
                    "is %s", base, pairs_consumed(root / base), pairs_consumed(staging), name)
    final = root / name
    staging.rename(final)
    marker_tmp = root / (LATEST + ".tmp")
    marker_tmp.write_text(final.name + "\n")
    os.replace(marker_tmp, root / LATEST)
    prune_checkpoints(root, keep_last, final, not_ours, background=True)
    return name


def _layout_info(layout) -> dict:
    """The layout a checkpoint was saved at (its RNG streams are restored at the same one only)."""
    cp = {"cp": layout.cp} if layout.cp > 1 else {}  # absent at CP 1, as in checkpoints saved without CP
    return {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, **cp, "device": layout.device.type}


def pairs_consumed(path: Path) -> int | None:
    """The training pairs a complete checkpoint had consumed (its progress), None when unreadable."""
    try:
        return int(json.loads((path / META_FILE).read_text())["info"]["consumed_pairs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_checkpoints(root: Path) -> list[Path]:
    """``step_N`` directories (not ``step_N.incomplete`` nor ``step_N.pruned``)."""
    return [p for p in root.glob("step_*") if p.is_dir() and "." not in p.name]


def beyond(root: Path, consumed_pairs: int) -> set[str]:
    """Complete checkpoints in ``root`` past ``consumed_pairs`` (or whose progress cannot be read)."""
    out = set()
    for path in complete_checkpoints(root):
        pairs = pairs_consumed(path)
        if pairs is None or pairs > consumed_pairs:
            out.add(path.name)
    return out


def prune_checkpoints(root: Path, keep_last: int, newest: Path, not_ours: set[str] = frozenset(),
                      background: bool = False) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints of the run's line, ordered by progress (the pairs
    consumed, which a changed global batch does not restart as it does the step count); returns the names
    deleted. Never ``newest`` (the one just written, which ``latest`` names), never one of ``not_ours`` (past the
    point the run started from: a line ``latest`` was pointed back from, damaged perhaps, or another run's),
    never one whose progress cannot be read, never one of more progress than ``newest``. Each is renamed
    ``step_N.pruned`` first, then deleted (``background``: by a thread, while training goes on)."""
    limit = pairs_consumed(newest)
    ours = []
    for path in complete_checkpoints(root):
        pairs = pairs_consumed(path)
        if path != newest and path.name not in not_ours and pairs is not None and limit is not None \
                and pairs <= limit:
            ours.append((pairs, path.name, path))
    ours.sort()
    doomed = [path for _, _, path in ours[:max(0, len(ours) - (keep_last - 1))]]
    aside = []
    for old in doomed:  # a rename is atomic; deleting a large checkpoint can take long on a parallel file system
        aside.append(old.with_name(old.name + PRUNED))
        old.rename(aside[-1])
    deleting = threading.Thread(target=lambda: [shutil.rmtree(a, ignore_errors=True) for a in aside],
                                name="checkpoint-prune")
    deleting.start()  # not a daemon: the process finishes the deletion before it exits
    if not background:
        deleting.join()
    return [p.name for p in doomed]


@torch.no_grad()
def load_train_checkpoint(path: str | Path, ddp_chunks: list, optimizer, layout,
                          with_optimizer: bool = True, parallel_group=None) -> dict:
    """Restore model, optimizer state and (same layout only) RNG; return the progress dict. The optimizer's
    hyper-parameters (lr, betas, weight decay) are the caller's to set from its config (``apply_optim_config``).
    ``parallel_group``: read fully parallel over these ranks (:func:`~simpo_mcore.convert.mcore_io.load_strategy`).

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
        materialize_optimizer_state(ddp_chunks, optimizer)
    state = train_state_dict(ddp_chunks, optimizer, with_optimizer, is_loading=True)
    # RNG streams are per rank and per kind of device (a CPU generator's state is not a CUDA one): restored at
    # the same layout on the same kind of device only (a new layout reseeds; no dropout in use).
    same_layout = meta.info["layout"] == _layout_info(layout)
    if same_layout:
        state[RNG_KEY] = _rng_sharded(layout, present)
    loaded = load_checked(state, path, load_strategy(parallel_group))
    chunks = [c.module for c in ddp_chunks]
    if len(chunks) == 1:
        load_chunk(chunks[0], loaded["model"])
    else:
        for i, c in enumerate(chunks):
            load_chunk(c, loaded[f"model{i}"])
    if with_optimizer:
        load_optimizer_state(optimizer, loaded["optimizer"])
    if same_layout:
        _restore_rng_tensors({name: t.reshape(-1) for name, t in loaded[RNG_KEY].items()})
    return dict(meta.info["progress"])




def remove_incomplete(root: str | Path) -> list[str]:
    """Delete leftovers of interrupted saves (``step_N.incomplete``) and prunings (``step_N.pruned``); returns
    their names."""
    removed = []
    for path in [*Path(root).glob("step_*.incomplete"), *Path(root).glob(f"step_*{PRUNED}")]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed
