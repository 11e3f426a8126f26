"""Which pairs each data-parallel rank reads at each step: deterministic, resumable, DP-invariant.

Epoch e visits the pairs in the order ``permutation(num_pairs)`` seeded by ``(seed, e)``. Global
batch g of the epoch is ``perm[g*G:(g+1)*G]`` (the incomplete tail is dropped), so the contents of
a step do not depend on the data-parallel size: a DP=2 run sees exactly the DP=1 global batches.
Rank r takes the r-th contiguous ``G/dp`` slice, split into micro-batches of ``k`` pairs. Training
state is one integer, the pairs consumed (``step * G``), from which any step is recomputed exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_pairs: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The visiting order of one epoch (numpy PCG64 seeded by ``[seed, epoch]``)."""
    return tuple(np.random.default_rng([seed, epoch]).permutation(num_pairs).tolist())


@dataclass(frozen=True)
class PairSampler:
    num_pairs: int
    """Pairs in the training dataset."""
    global_batch_pairs: int
    """Pairs per optimizer step over all data-parallel ranks (G)."""
    micro_batch_pairs: int
    """Pairs per micro-batch (k)."""
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 42

    def __post_init__(self):
        g, k, dp = self.global_batch_pairs, self.micro_batch_pairs, self.dp_size
        if not 0 <= self.dp_rank < dp:
            raise ValueError(f"dp_rank {self.dp_rank} is not in [0, {dp})")
        if g % (k * dp):
            raise ValueError(f"train.global_batch_pairs ({g}) must be a multiple of "
                             f"train.micro_batch_pairs ({k}) x data-parallel size ({dp})")
        if self.num_pairs < g:
            raise ValueError(f"the training set has {self.num_pairs} pairs, fewer than one global "
                             f"batch (train.global_batch_pairs = {g})")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // self.global_batch_pairs

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of all pairs of optimizer step ``step`` (0-based, counted over epochs)."""
        epoch, g = divmod(step, self.steps_per_epoch)
        size = self.global_batch_pairs
        return list(epoch_permutation(self.num_pairs, self.seed, epoch)[g * size:(g + 1) * size])

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of ``step``: G / (k x dp) lists of k indices."""
        per_rank = self.global_batch_pairs // self.dp_size
        mine = self.global_batch(step)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        k = self.micro_batch_pairs
        return [mine[i:i + k] for i in range(0, per_rank, k)]

    def step_at(self, consumed_pairs: int) -> int:
        """The step that follows ``consumed_pairs`` pairs of training (a multiple of G)."""
        step, rest = divmod(consumed_pairs, self.global_batch_pairs)
        if rest or consumed_pairs < 0:
            raise ValueError(f"consumed_pairs {consumed_pairs} is not a whole number of global "
                             f"batches of {self.global_batch_pairs}")
        return step


def eval_micro_batches(num_pairs: int, micro_batch_pairs: int, dp_rank: int = 0,
                       dp_size: int = 1) -> list[list[int]]:
    """All pairs once, in order: rank r gets the r-th contiguous shard (sizes differ by at most 1)
    in micro-batches of ``micro_batch_pairs`` (its last one may be smaller; a rank may get none)."""
    shard = np.array_split(np.arange(num_pairs), dp_size)[dp_rank].tolist()
    return [shard[i:i + micro_batch_pairs] for i in range(0, len(shard), micro_batch_pairs)]
