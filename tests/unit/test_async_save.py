"""Asynchronous shard writes (megatron's ``AsyncCallsQueue`` behind ``AsyncShardWriter``) in a world of one: the
save returns while a forked writer writes the tensors as they were when it started (training may change them),
and a failed write (a full disk) is one error saying why, on the synchronous and the asynchronous path alike."""

from __future__ import annotations

import errno
import functools
import os
import time

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies import filesystem_async

from simpo_mcore.convert.mcore_io import AsyncShardWriter, CheckpointWriteFailed, save_sharded

pytestmark = pytest.mark.usefixtures("world_of_one")

N = 1 << 20


def state(tensor: torch.Tensor) -> dict:
    return {"w": ShardedTensor.from_rank_offsets("w", tensor, replica_id=0)}


def load(ckpt_dir) -> torch.Tensor:
    return dist_checkpointing.load(state(torch.empty(N)), str(ckpt_dir))["w"]


def test_training_goes_on_while_the_tensors_as_of_the_save_are_written(tmp_path, monkeypatch):
    """The writer is slowed (0.5 s per item): ``start`` returns before anything is written, the caller then
    changes the tensor in place, and the checkpoint holds the values of the moment the save started."""
    write_item = filesystem_async._write_item

    @functools.wraps(write_item)  # megatron reads its signature
    def slow(*args, **kwargs):
        time.sleep(0.5)
        return write_item(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", slow)
    weights = torch.arange(N, dtype=torch.float32)
    writer = AsyncShardWriter()
    out = tmp_path / "ckpt"
    out.mkdir()
    writer.start(state(weights), out)
    assert writer.busy() and not (out / ".metadata").exists()
    weights.mul_(-1.0)  # an optimizer step while the shards are written
    process = writer.queue.async_calls[0].async_caller.process
    assert writer.finish() == out
    assert not writer.busy() and not process.is_alive()
    assert torch.equal(load(out), torch.arange(N, dtype=torch.float32))
    assert writer.finish() is None  # nothing in flight


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("fails", ["item", "file"])
def test_a_full_disk_is_one_error_naming_the_reason(tmp_path, monkeypatch, capfd, mode, fails):
    """megatron's writer catches the ``OSError`` and only logs it, then raises ``CheckpointException`` (a
    ``BaseException``) from its finalize: here it is :class:`CheckpointWriteFailed` with the writer's reason and
    the bytes the save needed, and megatron's log lines are not printed. ``item``: the item's write raises the
    ``OSError``; ``file``: the file's ``write`` does, under torch's serialisation of the item, whose zip writer
    raises what it raised on a full tmpfs here: a ``RuntimeError`` with the file's ``OSError`` (no file name) as
    its context."""
    @functools.wraps(filesystem_async._write_item)  # megatron reads its signature
    def full(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write"))
        if fails == "item":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), stream.name)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904 - as torch raises it

    monkeypatch.setattr(filesystem_async, "_write_item", full)
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(CheckpointWriteFailed) as failed:
        if mode == "sync":
            save_sharded(state(torch.ones(N)), out)
        else:
            writer = AsyncShardWriter()
            writer.start(state(torch.ones(N)), out)
            writer.finish()
    assert failed.value.detail == f"rank 0: [Errno 28] No space left on device: '{out}/__0_0.distcp'"
    assert failed.value.ckpt_dir == out and failed.value.needed_bytes >= 4 * N
    assert "encountered an error" not in capfd.readouterr().err

    monkeypatch.undo()  # the next save works (nothing of the failure is left in the queues)
    again = tmp_path / "again"
    again.mkdir()
    save_sharded(state(torch.full((N,), 2.0)), again)
    assert torch.equal(load(again), torch.full((N,), 2.0))
