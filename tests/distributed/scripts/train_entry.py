"""``simpo-train`` under the test launcher: argv = config overrides...

Fault injection for the robustness tests lives here, in the test's entry point, never in the package:

- ``TEST_NAN_AT_STEPS=3,4`` puts a NaN into one gradient of global rank 0 at those steps (as one rank
  blowing up would), after the backward and before the finiteness check;
- ``TEST_CRASH_IN_SAVE_AT=6`` kills the process in the middle of the step-6 save (tensors written, not
  yet published), to prove the previous checkpoint survives;
- ``TEST_SLOW_WRITE_AT=6`` makes the asynchronous writer of the step-6 save wait (10 minutes) before writing,
  so that a test can kill the job while that write is in flight, at a moment of its choosing;
- ``TEST_SIGTERM_IN_STARTUP=1`` sends SIGTERM to each rank as it starts loading the data (before step 1);
- ``TEST_ENOSPC_AT=6`` makes every shard write of the step-6 save fail as a full disk does (``ENOSPC``), where
  the test cannot mount a small file system.
"""

import errno
import functools
import os
import signal
import sys
import time

import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies import filesystem_async

from simpo_mcore import checkpoint, train
from simpo_mcore.cli import train_main
from simpo_mcore.convert import mcore_io
from simpo_mcore.train import Trainer


def inject_nonfinite(steps: set[int]) -> None:
    forward_backward = Trainer.forward_backward

    def with_nan(self, step_batches):
        metrics = forward_backward(self, step_batches)
        if self.state.step + 1 in steps and dist.get_rank() == 0:
            self.model[0].buffers[0].grad_data[0] = float("nan")
        return metrics

    Trainer.forward_backward = with_nan


def crash_in_save(step: int) -> None:
    finalize = checkpoint.CheckpointManager.finalize

    def crashing(self, pending):
        if pending.step == step:
            os._exit(17)
        return finalize(self, pending)

    checkpoint.CheckpointManager.finalize = crashing


def staging_name(step: int) -> str:
    return checkpoint.step_dir_name(step) + ".incomplete"


def slow_write(step: int) -> None:
    writing = mcore_io._writing

    def slowed(write, forked):
        def waiting(rank, buckets, *args, **kwargs):
            if any(staging_name(step) in str(bucket[0]) for bucket in buckets):
                time.sleep(600)
            return write(rank, buckets, *args, **kwargs)

        return writing(waiting, forked)  # a forked writer still dies with its rank

    mcore_io._writing = slowed


def sigterm_in_startup() -> None:
    load_splits = train.load_splits

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load_splits(*args, **kwargs)

    train.load_splits = signalled


def full_disk(step: int) -> None:
    write_item = filesystem_async._write_item

    @functools.wraps(write_item)  # megatron reads its signature
    def failing(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write"))
        if staging_name(step) in str(getattr(stream, "name", "")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), stream.name)
        return write_item(*args, **kwargs)

    filesystem_async._write_item = failing


if __name__ == "__main__":
    if os.environ.get("TEST_NAN_AT_STEPS"):
        inject_nonfinite({int(s) for s in os.environ["TEST_NAN_AT_STEPS"].split(",")})
    if os.environ.get("TEST_CRASH_IN_SAVE_AT"):
        crash_in_save(int(os.environ["TEST_CRASH_IN_SAVE_AT"]))
    if os.environ.get("TEST_SLOW_WRITE_AT"):
        slow_write(int(os.environ["TEST_SLOW_WRITE_AT"]))
    if os.environ.get("TEST_SIGTERM_IN_STARTUP"):
        sigterm_in_startup()
    if os.environ.get("TEST_ENOSPC_AT"):
        full_disk(int(os.environ["TEST_ENOSPC_AT"]))
    sys.exit(train_main(sys.argv[1:]))
