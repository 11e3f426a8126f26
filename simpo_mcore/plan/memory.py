"""Bytes per GPU of one layout: the parameters, megatron's DDP buffers and optimizer state (exactly, from the
buffer layout megatron computes), and the activations autograd saves for a micro-batch (by the operations each
layer runs, per implementation), the head's working memory and the pipeline's micro-batches in flight.

What ``optim.wrap_ddp`` / ``build_optimizer`` build, and so what is counted:

* **weights**: the parameters in their dtype (bf16 for ``bf16`` / ``fp8``, fp32 for ``fp32``). With the distributed
  optimizer megatron's DDP moves them into one contiguous buffer per model chunk (and per expert group), laid out
  in reverse order with each parameter's start rounded up to 64 elements and the bucket's end to
  ``lcm(dp, 128)``: the padding is counted, as it is allocated.
* **grads**: DDP's gradient buffer, fp32 (``grad_reduce_in_fp32=True``), the same layout (unpadded without the
  distributed optimizer). ``overlap_grad_reduce=False``: one bucket per buffer (the shared embedding split off).
* **optimizer**: AdamW's two fp32 moments and, for bf16 parameters, an fp32 master copy, of the whole model or,
  with the distributed optimizer, of this data-parallel rank's shard of each bucket (the parameters' elements in
  it, not the padding); torch's AdamW (megatron's fallback without Transformer Engine or Apex, the CPU case) adds
  a 4-byte ``step`` tensor per parameter it updates.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from simpo_mcore.plan.activations import (
    Implementation,
    MicroBatchShape,
    Parallel,
    chunk_saved_bytes,
    head_working_bytes,
    layer_bytes,
    recompute_working_bytes,
)
from simpo_mcore.plan.shape import Chunk, ModelShape, ParamTensor, chunk_parameters, chunks_of_stage, padded_vocab

GRAD_BYTES = 4
"""``wrap_ddp`` reduces gradients in fp32 (``grad_reduce_in_fp32=True``): the DDP buffer is fp32."""
PARAM_ALIGN = 64
"""megatron's distributed-optimizer layout starts every parameter at a multiple of 64 elements."""
BUCKET_ALIGN = 128
"""... and ends every bucket at a multiple of ``lcm(dp, 128)`` elements."""


@dataclass(frozen=True)
class Buffer:
    """megatron's DDP buffer of one chunk (``_ParamAndGradBuffer``): its padded size and its buckets."""

    numel: int
    buckets: tuple[tuple[int, int], ...]
    ranges: tuple[tuple[int, int], ...]
    """Each parameter's ``[start, end)`` in the buffer, in the order of the parameter list."""


@functools.lru_cache(maxsize=4096)
def ddp_buffer(params: tuple[ParamTensor, ...], dp: int, distributed_optimizer: bool) -> Buffer:
    """The layout megatron 0.19 gives ``params`` (``named_parameters`` order): filled in reverse order; with the
    distributed optimizer each start rounded up to 64 elements, a ``shared_embedding`` parameter in a bucket of
    its own and each bucket's end rounded up to ``lcm(dp, 128)`` (``DistributedOptimizer.
    _compute_per_buffer_param_layout``); without it, no padding."""
    if not params:
        return Buffer(0, (), ())
    end_align = math.lcm(dp, BUCKET_ALIGN)
    ranges: dict[int, tuple[int, int]] = {}
    buckets: list[tuple[int, int]] = []
    start = bucket_start = 0
    open_bucket = False
    for i in reversed(range(len(params))):
        p = params[i]
        if distributed_optimizer:
            start = _round_up(start, PARAM_ALIGN)
            if p.shared_embedding and open_bucket:
                bucket_start = _close(buckets, bucket_start, start, end_align)
                start = bucket_start
        ranges[i] = (start, start + p.numel)
        start += p.numel
        open_bucket = True
        if distributed_optimizer and p.shared_embedding:
            start = bucket_start = _close(buckets, bucket_start, start, end_align)
            open_bucket = False
    if open_bucket:
        _close(buckets, bucket_start, start, end_align if distributed_optimizer else 1)
    return Buffer(buckets[-1][1], tuple(buckets), tuple(ranges[i] for i in range(len(params))))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _close(buckets: list, bucket_start: int, end: int, align: int) -> int:
    padded = _round_up(end, align)
    buckets.append((bucket_start, padded))
    return padded


def shard_elements(buffer: Buffer, dp: int, dp_rank: int) -> tuple[int, int]:
    """(parameter elements, parameters with any element) in data-parallel rank ``dp_rank``'s shard of every
    bucket: what the distributed optimizer keeps master weights and moments for."""
    shards = []
    for lo, hi in buffer.buckets:
        size = (hi - lo) // dp
        shards.append((lo + dp_rank * size, lo + (dp_rank + 1) * size))
    shards.sort()
    elements, tensors, first = 0, 0, 0
    # Ranges and shards are each disjoint: one sweep over both in address order (a model of thousands of
    # expert tensors would otherwise cost ranges x buckets).
    for start, end in sorted(buffer.ranges):
        while first < len(shards) and shards[first][1] <= start:
            first += 1
        overlap, i = 0, first
        while i < len(shards) and shards[i][0] < end:
            overlap += max(0, min(end, shards[i][1]) - max(start, shards[i][0]))
            i += 1
        elements += overlap
        tensors += overlap > 0
    return elements, tensors


@dataclass(frozen=True)
class Numerics:
    """Byte sizes that follow ``train.precision`` and the optimizer implementation."""

    param_bytes: int
    """2 for bf16 / fp8 (bf16 parameters), 4 for fp32."""
    torch_adam: bool = False
    """megatron's fallback AdamW (torch's; no TE / Apex: the CPU case) keeps a 4-byte ``step`` per parameter."""
    fp8: bool = False

    @classmethod
    def for_precision(cls, precision: str, torch_adam: bool = False) -> Numerics:
        return cls(param_bytes=4 if precision == "fp32" else 2, torch_adam=torch_adam, fp8=precision == "fp8")

    @property
    def master(self) -> bool:
        """An fp32 master copy of the bf16 parameters (fp32 parameters are their own)."""
        return self.param_bytes != 4


@dataclass(frozen=True)
class StaticBytes:
    """What a rank holds whatever the batch: weights, DDP gradient buffers, optimizer state."""

    weights: int
    grads: int
    optimizer: int


def static_bytes(chunks: tuple[tuple[ParamTensor, ...], ...], numerics: Numerics, dp: int, edp: int, dp_rank: int,
                 distributed_optimizer: bool) -> StaticBytes:
    """The static bytes of a rank holding ``chunks`` (each a parameter list): one DDP buffer per chunk for the
    dense parameters (data-parallel group ``dp``) and one for the experts (``edp``), as megatron groups them."""
    weights = grads = optimizer = 0
    for params in chunks:
        for expert, group in ((False, dp), (True, edp)):
            part = tuple(p for p in params if p.expert == expert)
            if not part:
                continue
            buffer = ddp_buffer(part, group, distributed_optimizer)
            grads += buffer.numel * GRAD_BYTES
            if distributed_optimizer:
                weights += buffer.numel * numerics.param_bytes
                elements, tensors = shard_elements(buffer, group, dp_rank % group)
            else:
                elements, tensors = sum(p.numel for p in part), len(part)
                weights += elements * numerics.param_bytes
            optimizer += elements * (8 + (4 if numerics.master else 0)) + (4 * tensors if numerics.torch_adam else 0)
    return StaticBytes(weights, grads, optimizer)


@functools.lru_cache(maxsize=4096)
def stage_parameters(shape: ModelShape, spec: str, tp: int, pp: int, vpp: int | None, pp_rank: int, ep: int,
                     vocab_rows: int) -> tuple[tuple[ParamTensor, ...], ...]:
    """Per chunk of pipeline rank ``pp_rank``, its parameters (:func:`~simpo_mcore.plan.shape.chunk_parameters`)."""
    return tuple(tuple(chunk_parameters(shape, c, spec, tp, pp, ep, vocab_rows))
                 for c in chunks_of_stage(shape, pp, vpp, pp_rank))


@functools.lru_cache(maxsize=4096)
def stage_static_bytes(shape: ModelShape, spec: str, tp: int, pp: int, vpp: int | None, pp_rank: int, ep: int,
                       vocab_rows: int, numerics: Numerics, dp: int, edp: int, dp_rank: int,
                       distributed_optimizer: bool) -> StaticBytes:
    """:func:`static_bytes` of a pipeline rank's :func:`stage_parameters`, kept per layout: the layouts that differ
    only in recomputation or micro-batches share them (keyed on sizes, not on thousands of tensors)."""
    return static_bytes(stage_parameters(shape, spec, tp, pp, vpp, pp_rank, ep, vocab_rows), numerics, dp, edp,
                        dp_rank, distributed_optimizer)


@dataclass(frozen=True)
class Layout:
    """One way to lay a run out on ``gpus = tp x pp x dp x cp`` GPUs."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    dp: int = 1
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    recompute: str = "none"
    recompute_layers: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def edp(self) -> int:
        """The expert data-parallel size (megatron: expert TP = TP, so ``dp x cp / ep``)."""
        return max(1, self.dp * self.cp // self.ep)

    @property
    def parallel(self) -> Parallel:
        return Parallel(tp=self.tp, sp=self.sequence_parallel, cp=self.cp, ep=self.ep)


@dataclass(frozen=True)
class Setup:
    """What is trained and how, apart from the layout: the model, its implementation and numerics, the head."""

    shape: ModelShape
    impl: Implementation
    numerics: Numerics
    vocab_divisor: int = 128
    """``model.make_vocab_size_divisible_by``."""
    chunk_tokens: int = 4096
    """``model.logprob_chunk_tokens``."""
    keep_logits: bool = False
    """``model.logprob_recompute: false``."""

    def vocab_rows(self, tp: int) -> int:
        return padded_vocab(self.shape.vocab_size, self.vocab_divisor, tp) // tp


@dataclass(frozen=True)
class RankMemory:
    """Bytes one GPU holds at its peak, by what holds them."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    """What autograd saves for one micro-batch on this rank (every chunk of the rank)."""
    pipeline_in_flight: float
    """The other micro-batches whose backward has not run yet (and the stage inputs kept for it)."""
    head: float
    """The log-prob head's working memory at its backward (last stage)."""
    buffers: float
    """Pipeline send / receive buffers, FP8 weight copies, the working memory of a layer's backward (one layer's
    saved bytes again) and of a recomputed block."""
    in_flight: int

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.pipeline_in_flight
                + self.head + self.buffers)


def in_flight_microbatches(pp: int, vpp: int | None, pp_rank: int, microbatches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at once, in units of its whole stage: 1F1B holds
    ``min(pp - rank, M)``; the interleaved schedule ``min(2 (pp - rank - 1) + (vpp - 1) pp + 1, M vpp)`` chunk
    passes (megatron's warm-up count + 1), each ``1 / vpp`` of the stage."""
    if pp == 1:
        return 1
    if not vpp:
        return min(pp - pp_rank, microbatches)
    units = min(2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1, microbatches * vpp)
    return units / vpp


def rank_memory(setup: Setup, layout: Layout, mb: MicroBatchShape, pp_rank: int = 0, dp_rank: int = 0,
                microbatches: int = 1) -> RankMemory:
    """The peak bytes of the rank at pipeline stage ``pp_rank`` and data-parallel rank ``dp_rank`` when each step
    runs ``microbatches`` micro-batches like ``mb`` on it."""
    shape, impl, par = setup.shape, setup.impl, layout.parallel
    rows = setup.vocab_rows(layout.tp)
    chunks = chunks_of_stage(shape, layout.pp, layout.vpp, pp_rank)
    params = stage_parameters(shape, impl.spec, layout.tp, layout.pp, layout.vpp, pp_rank, layout.ep, rows)
    static = stage_static_bytes(shape, impl.spec, layout.tp, layout.pp, layout.vpp, pp_rank, layout.ep, rows,
                                setup.numerics, layout.dp * layout.cp, layout.edp, dp_rank,
                                layout.distributed_optimizer)
    saved = sum(chunk_saved_bytes(shape, impl, par, mb, c, layout.recompute, layout.recompute_layers,
                                  setup.keep_logits, rows) for c in chunks)
    flight = in_flight_microbatches(layout.pp, layout.vpp, pp_rank, microbatches)
    stage_input = 0 if pp_rank == 0 and not layout.vpp else mb.tokens / layout.cp * impl.act_bytes \
        * shape.hidden_size / par.shard
    head = sum(head_working_bytes(shape, impl, par, mb, setup.chunk_tokens, setup.keep_logits, rows)
               for c in chunks if c.last)
    return RankMemory(static.weights, static.grads, static.optimizer, saved, (flight - 1) * saved + flight
                      * stage_input, head, _buffers(setup, layout, mb, chunks, params), math.ceil(flight))


def _buffers(setup: Setup, layout: Layout, mb: MicroBatchShape, chunks: list[Chunk],
             params: tuple[tuple[ParamTensor, ...], ...]) -> float:
    shape, impl, par = setup.shape, setup.impl, layout.parallel
    layers = [layer for c in chunks for layer in c.layers]
    out = 0.0
    if layout.pp > 1:  # a forward activation and a backward gradient in flight to / from the neighbours
        out += 2 * mb.tokens / layout.cp * impl.act_bytes * shape.hidden_size / par.shard
    if setup.numerics.fp8:  # TE's FP8 copies of each layer weight, row- and column-wise
        out += 2 * sum(p.numel for chunk in params for p in chunk if "decoder.layers." in p.name)
    if layers:
        out += layer_bytes(shape, impl, par, mb, layers[0], "none")
        out += max(recompute_working_bytes(shape, impl, par, mb, c, layout.recompute, layout.recompute_layers)
                   for c in chunks)
    return out
