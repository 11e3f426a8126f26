"""Model weights in and out of megatron ``dist_checkpointing`` directories (any TP / PP)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from simpo_mcore.convert.checkpoint_meta import TOKENIZER_DIR, CheckpointMeta
from simpo_mcore.convert.hf_io import copy_tokenizer_files


def save_sharded(sharded: dict, ckpt_dir: str | Path) -> None:
    """``dist_checkpointing.save``, synchronously, into an existing empty directory.

    megatron's writer reports results through a ``multiprocessing`` Manager queue, which starts a
    spawn-mode server process (and so needs an ``if __name__ == "__main__"`` guard in whatever
    script saves). A synchronous save writes from threads of this process only, so a plain
    thread-safe queue does the same job without the extra process.
    """
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded, str(ckpt_dir))


def model_sharded_state_dict(chunks: list) -> dict:
    """The chunks' sharded state dicts, nested per chunk (keys inside are layout independent)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _drop_absent_objects(sharded: dict, present: set[str]) -> dict:
    """Remove ShardedObjects (TE ``_extra_state``) the checkpoint does not hold: a converted HF
    checkpoint has no FP8 metadata, and a TE model starts those from scratch."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = {}
    for k, v in sharded.items():
        if isinstance(v, dict):
            out[k] = _drop_absent_objects(v, present)
        elif isinstance(v, ShardedObject) and v.key not in present:
            continue
        else:
            out[k] = v
    return out


@torch.no_grad()
def load_model_weights(chunks: list, ckpt_dir: str | Path) -> CheckpointMeta:
    """Load the model tensors of ``ckpt_dir`` into ``chunks`` (built for any layout)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    ckpt_dir = Path(ckpt_dir)
    meta = CheckpointMeta.read(ckpt_dir)
    sharded = model_sharded_state_dict(chunks)
    present = {k.split("/shard_")[0] for k in load_sharded_metadata(str(ckpt_dir))}
    sharded = _drop_absent_objects(sharded, present)
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    if len(chunks) == 1:
        _load_chunk(chunks[0], loaded["model"])
    else:
        for i, c in enumerate(chunks):
            _load_chunk(c, loaded[f"model{i}"])
    return meta


def _load_chunk(chunk, state: dict) -> None:
    missing, unexpected = chunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ------------------------------------------------------------------------------------------------
# Training checkpoints: model + optimizer + scheduler + RNG + data position, resumable at any layout

LATEST = "latest"
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
    import random

    import numpy as np
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

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
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

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


def save_train_checkpoint(root: str | Path, step: int, ddp_chunks: list, optimizer, scheduler,
                          progress: dict, meta: CheckpointMeta, layout, keep_last: int,
                          with_optimizer: bool = True, tokenizer: str | None = None) -> Path:
    """Write ``root/step_N`` atomically and point ``root/latest`` at it; keep the newest K.

    The tensors go to ``step_N.incomplete``; only when every rank has finished does rank 0 add
    ``simpo_mcore.json``, rename the directory and replace ``latest`` (an atomic rename), so a
    crash at any point leaves the previous checkpoint and ``latest`` untouched. ``tokenizer``: a
    local tokenizer directory (its files are copied in, so exports carry them) or a hub name.
    """
    import os
    import shutil

    import torch.distributed as dist

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
    state["scheduler"] = scheduler.state_dict()
    save_sharded(state, tmp)
    _maybe_crash_for_test(step)
    dist.barrier()
    if dist.get_rank() == 0:
        info = {**meta.info, "step": step, **progress, "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}}
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
def load_train_checkpoint(path: str | Path, ddp_chunks: list, optimizer, scheduler, layout,
                          with_optimizer: bool = True) -> dict:
    """Restore model, optimizer, scheduler and (same layout only) RNG; return the progress dict."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

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
        _load_chunk(chunks[0], loaded["model"])
    else:
        for i, c in enumerate(chunks):
            _load_chunk(c, loaded[f"model{i}"])
    if with_optimizer:
        with _megatron_019_adam_step_fix(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _restore_rng(loaded["rng_state"])
    return dict(common["progress"])


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
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

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
    from megatron.core import dist_checkpointing

    return any(k.startswith("optimizer") for k in dist_checkpointing.load_tensors_metadata(str(path)))


def _maybe_crash_for_test(step: int) -> None:
    """Testing hook: ``SIMPO_MCORE_CRASH_IN_SAVE_AT=6`` kills the process in the middle of the
    step-6 save (tensors written, not yet published), to prove the previous checkpoint survives."""
    import os

    if os.environ.get("SIMPO_MCORE_CRASH_IN_SAVE_AT") == str(step):
        os._exit(17)


def remove_incomplete(root: str | Path) -> list[str]:
    """Delete leftovers of interrupted saves (``step_N.incomplete``); returns their names."""
    import shutil

    removed = []
    for path in Path(root).glob("step_*.incomplete"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed
