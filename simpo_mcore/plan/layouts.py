"""Every valid layout of a run on N GPUs, evaluated (memory of its peak rank, step time, communication) and
ranked: the layouts that fit first, then by predicted step time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from simpo_mcore.plan.activations import MicroBatchShape
from simpo_mcore.plan.inputs import Workload
from simpo_mcore.plan.memory import Layout, RankMemory, Setup, rank_memory
from simpo_mcore.plan.timing import Batch, Comm, StepTime, communication, forward_seconds, step_time

GIB = 2**30
RECOMPUTE = ("none", "selective", "full")
SAMPLED_STEPS = 64
"""Global batches drawn from the data's lengths to estimate a step's tokens and micro-batches."""


@dataclass(frozen=True)
class LayoutPlan:
    """One layout, evaluated."""

    layout: Layout
    memory: RankMemory
    """The rank with the most memory."""
    peak_stage: int
    fits: bool
    time: StepTime
    comm: Comm
    microbatches: int
    overrides: tuple[str, ...]
    """``key=value`` overrides that turn the config into this layout (empty: the config's own layout)."""
    configured: bool
    reference_pass_s: float | None = None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(setup: Setup, gpus: int, configured: Layout, cp_sizes: tuple[int, ...] = (1,),
                      ep_sizes: tuple[int, ...] = (1,)) -> Iterator[Layout]:
    """Every (TP, CP, PP, VPP, DP, EP) that divides ``gpus`` and the model (heads and key-value heads by TP, layers by
    PP x VPP, experts by EP, EP within DP x CP), each with every recomputation and the distributed optimizer on and
    off (one of them where there is no data parallelism to shard over). Sequence parallelism is on wherever TP > 1
    (plus the configured layout's setting)."""
    shape = setup.shape
    for tp in divisors(gpus):
        if shape.num_attention_heads % tp or shape.num_query_groups % tp:
            continue
        for cp in [c for c in cp_sizes if (gpus // tp) % c == 0]:
            for pp in [p for p in divisors(gpus // (tp * cp)) if shape.num_layers % p == 0]:
                dp = gpus // (tp * cp * pp)
                vpps = [None] + [v for v in range(2, shape.num_layers // pp + 1)
                                 if pp > 1 and shape.num_layers % (pp * v) == 0]
                eps = [e for e in ep_sizes if (dp * cp) % e == 0 and (e == 1 or shape.num_experts % e == 0)]
                sps = {tp > 1} | ({configured.sequence_parallel} if tp == configured.tp else set())
                optimizers = (True, False) if dp * cp > 1 else (configured.distributed_optimizer,)
                for vpp in vpps:
                    for ep in eps:
                        for sp in sps:
                            for recompute in RECOMPUTE:
                                for do in optimizers:
                                    yield Layout(tp=tp, pp=pp, vpp=vpp, dp=dp, cp=cp, ep=ep, sequence_parallel=sp,
                                                 distributed_optimizer=do, recompute=recompute,
                                                 recompute_layers=configured.recompute_layers)


def step_batch(work: Workload, layout: Layout, multiple: int) -> Batch | None:
    """The step's tokens and micro-batches on ``layout`` (``None``: the global batch does not divide). Packed rows
    are at most ``pack_tokens`` long (the memory bound); a rank's step takes at least ``tokens / pack_tokens`` rows
    (the estimate: packing balances rows to within a pair), a multiple of PP under the interleaved schedule."""
    dp = layout.dp
    per_rank = work.global_pairs / dp
    if work.packed:
        if work.global_pairs % dp:
            return None
        tokens, squared, longest = _pair_tokens(work)
        if work.lengths is None:  # every pair 2 x max_length tokens: whole pairs per row
            rows = math.ceil(per_rank / max(1, work.pack_tokens // (2 * work.max_length)))
        else:
            rows = math.ceil(per_rank * tokens / work.pack_tokens)
        if layout.vpp:
            rows = -(-rows // layout.pp) * layout.pp
        micro = MicroBatchShape(tokens=work.pack_tokens, rows=1, labelled=_labelled(work, work.pack_tokens),
                           sequences=2 * max(1, round(per_rank / rows)), longest=longest)
        return Batch(work.global_pairs * tokens, work.global_pairs * squared, rows, micro)
    k = work.micro_batch_pairs
    if work.global_pairs % (k * dp):
        return None
    padded = _padded_length(work, k, multiple)
    micro = MicroBatchShape(tokens=2 * k * work.max_length, rows=2 * k,
                       labelled=_labelled(work, 2 * k * work.max_length), sequences=2 * k, longest=work.max_length)
    return Batch(work.global_pairs * 2 * padded, work.global_pairs * 2 * padded ** 2, work.global_pairs // (k * dp),
                 micro)


def _pair_tokens(work: Workload) -> tuple[float, float, int]:
    """Mean tokens of a pair, mean sum of its two lengths squared, the longest sequence."""
    if work.lengths is None:
        return 2.0 * work.max_length, 2.0 * work.max_length ** 2, work.max_length
    c, r = work.lengths.chosen, work.lengths.rejected
    return float((c + r).mean()), float((c ** 2 + r ** 2).mean()), int(max(c.max(), r.max()))


def _labelled(work: Workload, tokens: int) -> int:
    return tokens if work.lengths is None else math.ceil(tokens * work.lengths.labelled_fraction)


def _padded_length(work: Workload, k: int, multiple: int) -> float:
    """The expected length a padded micro-batch of ``k`` pairs takes (its longest sequence, rounded up), from
    ``SAMPLED_STEPS`` draws of the data's lengths; ``max_length`` without data."""
    if work.lengths is None:
        return float(-(-work.max_length // multiple) * multiple)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, work.lengths.pairs, size=(SAMPLED_STEPS * 8, k))
    longest = np.maximum(work.lengths.chosen[picks], work.lengths.rejected[picks]).max(axis=1)
    return float((-(-longest // multiple) * multiple).mean())


@dataclass(frozen=True)
class Options:
    """How to judge layouts."""

    gpu_memory_gib: float = 80.0
    reserve_gib: float = 4.0
    """Kept free for what the planner does not count (docs/planning.md)."""
    gpus_per_node: int = 8
    mfu: float = 0.5
    dpo_tokens: tuple[float, float] | None = None
    """DPO: the training split's (tokens, sum of squared lengths), for the reference pass."""


def evaluate(setup: Setup, work: Workload, layout: Layout, options: Options,
             configured: Layout, overrides: Callable[[Layout], tuple[str, ...]]) -> LayoutPlan | None:
    """``layout`` judged: memory of every pipeline stage that can peak (the first holds the most micro-batches in
    flight and the embedding, the last the head), step time, communication."""
    multiple = 16 * (layout.tp if layout.sequence_parallel else 1)
    batch = step_batch(work, layout, multiple)
    if batch is None:
        return None
    stages = range(layout.pp) if setup.shape.moe_layers is not None else sorted({0, layout.pp - 1})
    peaks = [(rank_memory(setup, layout, batch.micro, s, r, batch.microbatches), s)
             for s in stages for r in sorted({0, layout.dp - 1})]
    memory, stage = max(peaks, key=lambda x: x[0].total)
    comm = communication(setup, layout, batch, memory.grads, memory.weights)
    time = step_time(setup, layout, batch, options.mfu, comm, options.gpus_per_node)
    fits = memory.total / GIB + options.reserve_gib <= options.gpu_memory_gib
    reference = forward_seconds(setup.shape, *options.dpo_tokens, layout.gpus, options.mfu) \
        if options.dpo_tokens else None
    return LayoutPlan(layout, memory, stage, fits, time, comm, batch.microbatches, overrides(layout),
                      layout == configured, reference)


def ranked(plans: list[LayoutPlan]) -> list[LayoutPlan]:
    """Fitting layouts first; then faster; then less communication; then less memory."""
    return sorted(plans, key=lambda p: (not p.fits, round(p.time.total, 6), p.comm.total, p.memory.total))
