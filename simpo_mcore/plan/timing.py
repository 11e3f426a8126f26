"""Step time and communication volume of a layout, on paper.

Time = the model FLOPs (the count docs/performance.md's MFU figures use) of the busiest pipeline rank (the last
holds the log-prob head) with the work recomputation adds, at a **measured** MFU, times the pipeline bubble,
plus the communication that this project does not overlap with compute (``optim.wrap_ddp`` sets
``overlap_grad_reduce=False``; megatron's tensor-parallel collectives and 1F1B sends sit on the critical path)
at the links' **datasheet** bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from simpo_mcore.model.flops import PEAK_BF16_TFLOPS
from simpo_mcore.plan.activations import MicroBatchShape
from simpo_mcore.plan.memory import Layout, Setup
from simpo_mcore.plan.shape import ModelShape, attention_flops, batch_flops, head_flops_per_token

PEAK_TFLOPS = PEAK_BF16_TFLOPS["H100"]
"""Dense bf16 peak of an H100 / H200 SXM (989 TFLOP/s), the denominator of every MFU below."""


@dataclass(frozen=True)
class MeasuredMFU:
    """An MFU measured by ``benchmarks/bench_step.py`` (docs/performance.md): one NVIDIA H200, 2026-11-27, one GPU,
    forward + backward of 2 pairs x 2048 tokens, no optimizer step, no gradient all-reduce."""

    mfu: float
    shape: str
    hidden: int
    spec: str
    precision: str

    @property
    def name(self) -> str:
        what = {"te": "TE", "sdpa": "SDPA spec"}[self.spec]
        return f"measured H200 MFU {self.mfu:.3f} ({what} {self.precision}, {self.shape} shape, docs/performance.md)"


MEASURED_MFU = (
    MeasuredMFU(0.526, "Llama-3.2-1B", 2048, "te", "bf16"),
    MeasuredMFU(0.543, "Llama-3-8B layer (8b4)", 4096, "te", "bf16"),
    MeasuredMFU(0.663, "Llama-3.2-1B", 2048, "te", "fp8"),  # delayed scaling, the faster recipe
    MeasuredMFU(0.671, "Llama-3-8B layer (8b4)", 4096, "te", "fp8"),
    MeasuredMFU(0.459, "Llama-3.2-1B", 2048, "sdpa", "bf16"),  # 64.04 TFLOP / 0.1410 s, fused RMSNorm
    MeasuredMFU(0.478, "Llama-3-8B layer (8b4)", 4096, "sdpa", "bf16"),
)


def measured_mfu(spec: str, precision: str, hidden: int) -> tuple[MeasuredMFU, str]:
    """The measured figure for this spec and precision at the nearest hidden size (ties: the larger), and a note
    on how far it is from what it stands for. fp32 was never measured: the bf16 figure, an upper bound on speed."""
    wanted = "bf16" if precision == "fp32" else precision
    rows = [m for m in MEASURED_MFU if m.spec == spec and m.precision == wanted] or \
        [m for m in MEASURED_MFU if m.spec == "te" and m.precision == wanted]
    best = min(rows, key=lambda m: (abs(m.hidden - hidden), -m.hidden))
    notes = []
    if precision == "fp32":
        notes.append("no fp32 measurement: the bf16 figure, so the time is a lower bound")
    if best.hidden != hidden:
        notes.append(f"measured at hidden {best.hidden}, this model has {hidden}")
    return best, "; ".join(notes)


NVLINK_BYTES_S = 450e9
"""NVLink 4 (H100 / H200 SXM), per direction per GPU: datasheet, not measured here."""
NETWORK_BYTES_S = 50e9
"""One 400 Gb/s InfiniBand NDR link per GPU (the usual H100 node): datasheet, not measured here."""


@dataclass(frozen=True)
class Batch:
    """One optimizer step as the planner times it."""

    tokens: float
    """Positions computed per step, all data-parallel ranks together (padding included)."""
    squared_lengths: float
    """Sum over the step's sequences of their (computed) length squared: the attention's work."""
    microbatches: int
    """Micro-batches per data-parallel rank per step."""
    micro: MicroBatchShape
    """The largest micro-batch (the memory bound)."""


@dataclass(frozen=True)
class Comm:
    """Bytes each GPU sends per step, by parallelism (ring collectives: all-reduce ``2 (n-1)/n``, all-gather and
    reduce-scatter ``(n-1)/n`` of the tensor)."""

    dp: float
    tp: float
    pp: float
    cp: float
    ep: float

    @property
    def total(self) -> float:
        return self.dp + self.tp + self.pp + self.cp + self.ep


def slowest_rank_flops(shape: ModelShape, batch: Batch, layout: Layout) -> float:
    """The work of the busiest pipeline rank's replica, all its TP / CP ranks together: its share of the layers
    (each layer's forward twice under ``full`` recomputation, the attention core's under ``selective``) plus,
    on the last stage, the log-prob head. The pipeline runs at that rank's pace."""
    total = batch_flops(shape, batch.tokens, batch.squared_lengths)
    head = batch.tokens * head_flops_per_token(shape)
    layers = total - head
    if layout.recompute == "full":
        layers += layers / 3
    elif layout.recompute == "selective":
        layers += attention_flops(shape, batch.squared_lengths) / 3
    return layers / layout.pp + head


def bubble_fraction(layout: Layout, microbatches: int) -> float:
    """Idle share of the pipeline added to the compute: ``(pp - 1) / M``, interleaved ``(pp - 1) / (vpp M)``."""
    if layout.pp == 1:
        return 0.0
    return (layout.pp - 1) / ((layout.vpp or 1) * microbatches)


def communication(setup: Setup, layout: Layout, batch: Batch, grad_bytes: float, param_bytes: float) -> Comm:
    """Per-GPU bytes per step. ``grad_bytes`` / ``param_bytes``: the rank's DDP buffers (what data parallelism
    reduces and, with the distributed optimizer, gathers back)."""
    shape, a = setup.shape, setup.impl.act_bytes
    d = layout.dp * layout.cp
    if layout.distributed_optimizer:
        dp = (d - 1) / d * (grad_bytes + param_bytes)
    else:
        dp = 2 * (d - 1) / d * grad_bytes
    tokens = batch.tokens / d  # positions one rank runs per step (its replica's, over the context group)
    activation = tokens * shape.hidden_size * a  # the step's [T, h] tensors of one replica, end to end
    t = layout.tp
    layers = shape.num_layers / layout.pp
    per_layer = (10 if layout.sequence_parallel else 8) + (4 if layout.recompute == "full" else 0)
    tp = (layers * per_layer + 4) * activation * (t - 1) / t
    pp = 0.0
    if layout.pp > 1:
        pp = 2 * (layout.vpp or 1) * activation / (t if layout.sequence_parallel else 1)
        if shape.tied_embeddings:  # the embedding's gradient, all-reduced between the first and last stage
            pp += setup.vocab_rows(t) * shape.hidden_size * 4
    c = layout.cp
    kv = tokens * 2 * shape.kv_size / t * a
    cp = layers * (3 + (1 if layout.recompute == "full" else 0)) * (c - 1) * kv  # ring: its KV block, c - 1 times
    moe_layers = sum(shape.is_moe_layer(i) for i in range(shape.num_layers)) / layout.pp
    e = layout.ep
    ep = moe_layers * 4 * (e - 1) / e * tokens * shape.moe_top_k * shape.hidden_size * a
    return Comm(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep)


def within_node(stride: int, size: int, gpus_per_node: int) -> bool:
    """Whether a group of ``size`` ranks ``stride`` apart lies inside one node (megatron orders ranks
    tp-cp-ep-dp-pp, TP fastest)."""
    return size == 1 or stride * size <= gpus_per_node


def communication_seconds(comm: Comm, layout: Layout, gpus_per_node: int) -> float:
    """The communication at NVLink bandwidth inside a node and the network's across nodes (datasheet figures)."""
    def bw(stride: int, size: int) -> float:
        return NVLINK_BYTES_S if within_node(stride, size, gpus_per_node) else NETWORK_BYTES_S

    t, c = layout.tp, layout.cp
    return (comm.tp / bw(1, t) + comm.cp / bw(t, c) + comm.ep / bw(t * c, layout.ep)
            + comm.dp / bw(t * c, layout.dp) + comm.pp / bw(t * c * layout.dp, layout.pp))


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    bubble_s: float
    comm_s: float

    @property
    def total(self) -> float:
        return self.compute_s + self.bubble_s + self.comm_s


def step_time(setup: Setup, layout: Layout, batch: Batch, mfu: float, comm: Comm, gpus_per_node: int) -> StepTime:
    """Compute at the measured MFU on the busiest rank (its replica's work over its DP x TP x CP GPUs), the
    bubble on top of it, and the communication at the links' bandwidth."""
    replicas = layout.dp * layout.tp * layout.cp
    compute = slowest_rank_flops(setup.shape, batch, layout) / (replicas * mfu * PEAK_TFLOPS * 1e12)
    bubble = compute * bubble_fraction(layout, batch.microbatches)
    return StepTime(compute, bubble, communication_seconds(comm, layout, gpus_per_node))


def forward_seconds(shape: ModelShape, tokens: float, squared_lengths: float, gpus: int, mfu: float) -> float:
    """A forward-only pass over ``tokens`` (DPO's reference log-probs): a third of the training FLOPs, at the
    training MFU (forward-only efficiency was not measured)."""
    return batch_flops(shape, tokens, squared_lengths) / 3 / (gpus * mfu * PEAK_TFLOPS * 1e12)
