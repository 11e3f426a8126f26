"""Model tensors in and out of megatron ``dist_checkpointing`` directories (any TP / PP).

Used by the converters (a converted checkpoint is model tensors + ``simpo_mcore.json``) and by the
training checkpoints of :mod:`simpo_mcore.checkpoint`, which add optimizer, RNG states and progress.
"""

from __future__ import annotations

import queue
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.metadata import Metadata

from simpo_mcore import cpu_mode
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.hf_io import CheckpointError
from simpo_mcore.convert.integrity import MANIFEST, verify_manifest
from simpo_mcore.convert.safe_pickle import check_checkpoint_pickles, check_extra_state


@cpu_mode.without_gpu
def save_sharded(sharded: dict, ckpt_dir: str | Path) -> None:
    """``dist_checkpointing.save``, synchronously, into an existing empty directory.

    megatron's writer reports results through a ``multiprocessing`` Manager queue, which starts a
    spawn-mode server process (and so needs an ``if __name__ == "__main__"`` guard in whatever
    script saves). A synchronous save writes from threads of this process only, so a plain
    thread-safe queue does the same job without the extra process.
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded, str(ckpt_dir))


def verify_checkpoint(ckpt_dir: str | Path) -> Metadata:
    """Before anything reads ``ckpt_dir``: every file as ``integrity.json`` recorded it, and no pickle in
    it that could run code (:mod:`~simpo_mcore.convert.safe_pickle`). Collective when several ranks exist.
    Raises :class:`CheckpointError` naming the checkpoint and the file (a checkpoint without its manifest
    among them: every one simpo_mcore writes has one); returns the checkpoint's metadata (read safely)."""
    if not verify_manifest(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: its {MANIFEST} is missing, so its files cannot "
                              "be checked (every checkpoint simpo_mcore writes has one)")
    return check_checkpoint_pickles(ckpt_dir)


def load_checked(sharded: dict, ckpt_dir: str | Path, **kwargs) -> dict:
    """``dist_checkpointing.load`` of a verified checkpoint; what still fails (one that does not fit the model)
    is a :class:`CheckpointError` naming it."""
    try:
        return dist_checkpointing.load(sharded, str(ckpt_dir), **kwargs)
    except (torch.OutOfMemoryError, dist.DistError):
        raise  # the machine's trouble, not the checkpoint's
    except (CheckpointingException, RuntimeError, OSError, EOFError, KeyError, ValueError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {ckpt_dir} cannot be loaded into this model "
                              f"({type(exc).__name__}: {first[:500]})") from exc


def model_sharded_state_dict(chunks: list) -> dict:
    """The chunks' sharded state dicts, nested per chunk (keys inside are layout independent)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def drop_absent_objects(sharded: dict, present: set[str]) -> dict:
    """Remove ShardedObjects (TE ``_extra_state``) the checkpoint does not hold: a converted HF
    checkpoint has no FP8 metadata, and a TE model starts those from scratch."""
    out = {}
    for k, v in sharded.items():
        if isinstance(v, dict):
            out[k] = drop_absent_objects(v, present)
        elif isinstance(v, ShardedObject) and v.key not in present:
            continue
        else:
            out[k] = v
    return out


@torch.no_grad()
@cpu_mode.without_gpu
def load_model_weights(chunks: list, ckpt_dir: str | Path) -> CheckpointMeta:
    """Load the model tensors of ``ckpt_dir`` into ``chunks`` (built for any layout)."""
    ckpt_dir = Path(ckpt_dir)
    meta = CheckpointMeta.read(ckpt_dir)
    verify_checkpoint(ckpt_dir)
    sharded = model_sharded_state_dict(chunks)
    present = {k.split("/shard_")[0] for k in load_sharded_metadata(str(ckpt_dir))}
    sharded = drop_absent_objects(sharded, present)
    loaded = load_checked(sharded, ckpt_dir)
    if len(chunks) == 1:
        load_chunk(chunks[0], loaded["model"])
    else:
        for i, c in enumerate(chunks):
            load_chunk(c, loaded[f"model{i}"])
    return meta


def load_chunk(chunk, state: dict) -> None:
    """``state`` (one chunk's part of a loaded sharded state dict) into ``chunk``; every tensor must match."""
    for key, value in state.items():
        if key.endswith("_extra_state"):
            check_extra_state(key, value)  # Transformer Engine unpickles it in set_extra_state
    missing, unexpected = chunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
