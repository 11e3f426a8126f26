"""Model tensors in and out of megatron ``dist_checkpointing`` directories (any TP / PP).

Used by the converters (a converted checkpoint is model tensors + ``simpo_mcore.json``) and by the
training checkpoints of :mod:`simpo_mcore.checkpoint`, which add optimizer, RNG states and progress, and
write them asynchronously (:class:`AsyncShardWriter`) with the fully-parallel strategies
(:func:`save_strategy`, :func:`load_strategy`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import queue
import signal
import sys
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    TorchDistLoadShardedStrategy,
    TorchDistSaveShardedStrategy,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from simpo_mcore import cpu_mode
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.hf_io import CheckpointError
from simpo_mcore.convert.integrity import MANIFEST, sha256_file, verify_manifest
from simpo_mcore.convert.safe_pickle import check_checkpoint_pickles, check_extra_state


class CheckpointWriteFailed(Exception):
    """Writing a checkpoint's shards failed on some rank (raised on every rank, with the same message)."""

    def __init__(self, ckpt_dir: Path, detail: str, needed_bytes: int):
        super().__init__(f"{ckpt_dir}: {detail}")
        self.ckpt_dir, self.detail, self.needed_bytes = ckpt_dir, detail, needed_bytes


def die_with_parent() -> None:
    """Linux: this process is killed when the process that forked it dies, even by ``kill -9`` (an orphaned
    checkpoint writer would go on writing into a directory the relaunch deletes). Elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the line above took effect


WRITER_LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"
"""Where megatron's shard writer logs why a write failed (an ``OSError``'s text, lost from what it reports)."""
_notes = None
"""Beside megatron's results queue: why this process's writers failed (their first error line)."""
_digests = None
"""And the size and SHA-256 of each file they wrote (:func:`written_digests`)."""


def write_results_queue():
    """The queue megatron's shard writers report into (``filesystem_async._results_queue``), made once per process.

    It is megatron's own kind, a ``multiprocessing`` Manager queue: a ``put`` has reached the manager's server
    when it returns, so the results of a writer forked for an asynchronous save arrive whatever their size, and
    a synchronous save's are there at once. The manager is forked, not spawned as megatron's
    ``get_write_results_queue`` does (a spawned one re-imports the launched script, torch and megatron
    included: seconds of blocking at the first save, and an ``if __name__ == "__main__"`` guard in every
    script that saves), and it dies with this process."""
    global _notes, _digests
    if filesystem_async._results_queue is None or _notes is None:
        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=die_with_parent)
        filesystem_async._results_queue, _notes, _digests = manager.Queue(), manager.Queue(), manager.Queue()
    return filesystem_async._results_queue


class _FirstError(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None:
            self.first = record.getMessage()


@contextlib.contextmanager
def _errors_name_their_file():
    """While this process writes shards: a failed write of an item is the ``OSError`` that made it fail (a full
    disk, a quota), naming the file. torch serialises each item into the open file with ``torch.save``, whose zip
    writer turns the file's ``OSError`` into ``RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos``, the ``OSError`` left as its context only, and a failed ``write`` names no file."""
    write_item = filesystem_async._write_item

    @functools.wraps(write_item)  # megatron reads its signature
    def naming(*args, **kwargs):
        try:
            return write_item(*args, **kwargs)
        except Exception as exc:
            cause = exc if isinstance(exc, OSError) else exc.__context__
            if not isinstance(cause, OSError) or cause.errno is None or cause.filename is not None:
                raise
            stream = next((a for a in args if hasattr(a, "write")), None)
            raise OSError(cause.errno, cause.strerror, getattr(stream, "name", None)) from exc

    filesystem_async._write_item = naming
    try:
        yield
    finally:
        filesystem_async._write_item = write_item


def _writing(write, forked: bool):
    """megatron's write function as this process runs it: a forked writer first arranges to die with its rank;
    why a write failed, which megatron only logs, is kept for :func:`write_failure` instead of printed; the files
    written are hashed where they were written (in the background, for a forked writer: the integrity manifest
    then reads only the small files)."""
    notes, digests = _notes, _digests

    def run(rank, buckets, *args, **kwargs):
        if forked:
            die_with_parent()
        logger, handler = logging.getLogger(WRITER_LOGGER), _FirstError()
        logger.addHandler(handler)
        propagate, logger.propagate = logger.propagate, False
        try:
            with _errors_name_their_file():
                result = write(rank, buckets, *args, **kwargs)
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate
            if handler.first is not None:
                notes.put(handler.first.split("error: ", 1)[-1])
        if handler.first is None:
            files = [Path(bucket[0]) for bucket in buckets]
            digests.put((str(files[0].parent), {f.name: (f.stat().st_size, sha256_file(f)) for f in files}))
        return result

    return run


def written_digests(ckpt_dir: str | Path) -> dict[str, tuple[int, str]]:
    """``{file: (size, SHA-256)}`` of the shards this process's writers wrote into ``ckpt_dir`` (taken once)."""
    found: dict = {}
    while _digests is not None:
        try:
            where, files = _digests.get_nowait()
        except queue.Empty:
            break
        if where == str(ckpt_dir):
            found.update(files)
    return found


def save_strategy(parallel_group=None, repeated: bool = False):
    """megatron's ``torch_dist`` writer; over ``parallel_group`` (the data-parallel ranks) fully parallel: each
    replicated tensor is written by one rank of the group, spread evenly, instead of all by the group's first
    rank. ``repeated``: for a checkpoint saved again and again with the same structure (a training run's): the
    spread and megatron's save plans are computed at the first save and reused (its ``cached_metadata``)."""
    base = TorchDistSaveShardedStrategy(cached_metadata=repeated)
    if parallel_group is None or dist.get_world_size(parallel_group) == 1:
        return base
    return FullyParallelSaveStrategyWrapper(base, parallel_group, do_cache_distribution=repeated)


def load_strategy(parallel_group=None) -> TorchDistLoadShardedStrategy | FullyParallelLoadStrategyWrapper:
    """megatron's ``torch_dist`` reader; over ``parallel_group`` fully parallel: each replicated tensor is read
    by one rank of the group and sent to the others."""
    base = TorchDistLoadShardedStrategy()
    if parallel_group is None or dist.get_world_size(parallel_group) == 1:
        return base
    return FullyParallelLoadStrategyWrapper(base, parallel_group)


@cpu_mode.without_gpu
def save_sharded(sharded: dict, ckpt_dir: str | Path, strategy=None, validate: bool = True) -> None:
    """``dist_checkpointing.save``, synchronously, into an existing empty directory (``strategy``, ``validate``:
    as :func:`start_save` takes them). A failed write is :class:`CheckpointWriteFailed` on every rank."""
    request = start_save(sharded, ckpt_dir, strategy, validate=validate)
    try:
        request.execute_sync()
    except CheckpointException:
        raise write_failure(ckpt_dir, _request_bytes(request)) from None


@cpu_mode.without_gpu
def start_save(sharded: dict, ckpt_dir: str | Path, strategy=None, forked: bool = False,
               validate: bool = True) -> AsyncRequest:
    """Plan the save of ``sharded`` into ``ckpt_dir`` (collective) and return megatron's request that writes it:
    run it now (``execute_sync``) or, ``forked``, in a forked writer (:class:`AsyncShardWriter`); its finalize
    functions, run on every rank once every rank's write is done, write ``.metadata`` and ``metadata.json``.
    ``strategy``: from :func:`save_strategy` (default megatron's); ``validate``: megatron's check that every
    shard is saved exactly once and the common state is the same on every rank (skip it only for a structure
    checked before: a training run's saves after its first)."""
    write_results_queue()
    try:
        request = dist_checkpointing.save(sharded, str(ckpt_dir), sharded_strategy=strategy or save_strategy(),
                                          validate_access_integrity=validate, async_sharded_save=True,
                                          async_strategy="mcore")
    except CheckpointException:
        raise write_failure(ckpt_dir, 0) from None
    if request.async_fn is None:  # nothing to write on this rank
        return request
    return request._replace(async_fn=_writing(request.async_fn, forked))


def _request_bytes(request: AsyncRequest) -> int:
    """The bytes this rank's part of ``request`` writes."""
    if request.async_fn is None:
        return 0
    total = 0
    for _, _, (bytes_data, tensor_data) in request.async_fn_args[1]:
        total += sum(t.numel() * t.element_size() for _, t in tensor_data)
        total += sum(len(b.getbuffer()) for _, b in bytes_data)
    return total


def write_failure(ckpt_dir: str | Path, local_bytes: int) -> CheckpointWriteFailed:
    """After megatron's ``CheckpointException`` (a ``BaseException``, raised on every rank alike; which write
    failed and why only its writer's log says): one error every rank raises alike, with the first rank's
    reason and the bytes the save needs (collective)."""
    reason = None
    with contextlib.suppress(queue.Empty):
        reason = _notes.get_nowait()
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, (reason, local_bytes))
    detail = next((f"rank {r}: {why}" for r, (why, _) in enumerate(found) if why), "a rank's shard writer failed")
    return CheckpointWriteFailed(Path(ckpt_dir), detail, sum(b for _, b in found))


@dataclass
class _InFlight:
    request: AsyncRequest
    ckpt_dir: Path
    local_bytes: int


class AsyncShardWriter:
    """At most one asynchronous save at a time, written by a forked process per rank while training goes on.

    megatron's ``AsyncCallsQueue`` with its temporal caller (a process forked per save, which sees the tensors
    as they were at the fork: training may update them meanwhile); the persistent caller is not used: its
    worker is spawned without the CPU redirection (on a CPU it fails, ZeroDivisionError, and the training
    process then waits for it forever). The writer dies with its rank, even on ``kill -9``.

    Every method but :meth:`busy` is collective: all ranks call it at the same point."""

    def __init__(self):
        self.queue = AsyncCallsQueue()
        self.in_flight: _InFlight | None = None

    @cpu_mode.without_gpu
    def start(self, sharded: dict, ckpt_dir: Path, strategy=None, validate: bool = True) -> None:
        """Plan the save (collective, blocking; ``strategy``, ``validate``: as :func:`start_save` takes them) and
        fork the writer; the caller finalizes it later."""
        assert self.in_flight is None, "finalize the save in flight first"
        request = start_save(sharded, ckpt_dir, strategy, forked=True, validate=validate)
        local_bytes = _request_bytes(request)
        self.queue.schedule_async_request(request)
        self.in_flight = _InFlight(request, Path(ckpt_dir), local_bytes)

    def busy(self) -> bool:
        """Whether this rank's writer is still writing (local: no collective)."""
        if self.in_flight is None:
            return False
        process = self.queue.async_calls[0].async_caller.process if self.queue.async_calls else None
        return process is not None and process.is_alive()

    @cpu_mode.without_gpu
    def finish(self, agreed_done: bool = False) -> Path | None:
        """Wait for every rank's writer, then megatron's finalize (``.metadata``, ``metadata.json``); returns the
        directory written, None when nothing was in flight. ``agreed_done``: the caller knows every rank's writer
        has finished (it all-reduced :meth:`busy`), which spares megatron's own all-reduce of it. A failed write is
        :class:`CheckpointWriteFailed` on every rank."""
        if self.in_flight is None:
            return None
        in_flight, self.in_flight = self.in_flight, None
        try:
            self.queue.maybe_finalize_async_calls(blocking=True, no_dist=agreed_done)
        except CheckpointException:
            self.queue.async_calls.clear()
            raise write_failure(in_flight.ckpt_dir, in_flight.local_bytes) from None
        return in_flight.ckpt_dir

    def abort(self) -> None:
        """Kill this rank's writer (a failed run): nothing of that save is published."""
        for call in self.queue.async_calls:
            call.async_caller.close(abort=True)
        self.queue.async_calls.clear()
        self.in_flight = None


def verify_checkpoint(ckpt_dir: str | Path) -> Metadata:
    """Before anything reads ``ckpt_dir``: every file as ``integrity.json`` recorded it, and no pickle in
    it that could run code (:mod:`~simpo_mcore.convert.safe_pickle`). Collective when several ranks exist.
    Raises :class:`CheckpointError` naming the checkpoint and the file (a checkpoint without its manifest
    among them: every one simpo_mcore writes has one); returns the checkpoint's metadata (read safely)."""
    if not verify_manifest(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: its {MANIFEST} is missing, so its files cannot "
                              "be checked (every checkpoint simpo_mcore writes has one)")
    return check_checkpoint_pickles(ckpt_dir)


def load_checked(sharded: dict, ckpt_dir: str | Path, strategy=None) -> dict:
    """``dist_checkpointing.load`` of a verified checkpoint (``strategy``: from :func:`load_strategy`); what still
    fails (one that does not fit the model) is a :class:`CheckpointError` naming it."""
    try:
        return dist_checkpointing.load(sharded, str(ckpt_dir), sharded_strategy=strategy)
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
