"""``simpo-train`` under the test launcher: argv = config overrides...

Fault injection for the robustness tests lives here, in the test's entry point, never in the package:

- ``TEST_NAN_AT_STEPS=3,4`` puts a NaN into one gradient of global rank 0 at those steps (as one rank
  blowing up would), after the backward and before the finiteness check;
- ``TEST_CRASH_IN_SAVE_AT=6`` kills the process in the middle of the step-6 save (tensors written, not
  yet published), to prove the previous checkpoint survives.
"""

import os
import sys
from pathlib import Path

import torch.distributed as dist

from simpo_mcore import checkpoint
from simpo_mcore.cli import train_main
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
    save_sharded = checkpoint.save_sharded

    def crashing(state, ckpt_dir):
        save_sharded(state, ckpt_dir)
        if Path(ckpt_dir).name == checkpoint.step_dir_name(step) + ".incomplete":
            os._exit(17)

    checkpoint.save_sharded = crashing


if __name__ == "__main__":
    if os.environ.get("TEST_NAN_AT_STEPS"):
        inject_nonfinite({int(s) for s in os.environ["TEST_NAN_AT_STEPS"].split(",")})
    if os.environ.get("TEST_CRASH_IN_SAVE_AT"):
        crash_in_save(int(os.environ["TEST_CRASH_IN_SAVE_AT"]))
    sys.exit(train_main(sys.argv[1:]))
