"""The bytes autograd saves for one micro-batch on one rank, operation by operation.

Counted: every tensor an operation saves for its backward that is not a parameter, once per storage (a view
saved by several operations, or a slice of a larger output, holds its whole storage: the attention's values are
a view of the QKV projection's output, so that output stays alive whole). Not counted: parameters, the inputs the
data loader made. The implementations differ in what they save, so each term names the implementation it is for:

* ``te``: Transformer Engine's layers on a GPU (norm fused into the QKV / FC1 projections, fused RoPE, flash /
  cuDNN attention, megatron's fused SwiGLU). By analysis of TE 2.20 / megatron-core 0.19; **not yet measured on
  a GPU** (``benchmarks/plan_gpu_check.py`` measures it).
* ``sdpa`` on a GPU: megatron's local linears, ``F.rms_norm``, unfused RoPE, ``scaled_dot_product_attention``.
  By analysis; not yet measured on a GPU.
* ``sdpa`` on a CPU: the same with the HF-formula RMSNorm: checked against ``saved_tensors_hooks`` on built runs
  (``tests/distributed/test_plan_bytes.py``).

Per token of a micro-batch of ``T`` positions on ``tp`` tensor-parallel ranks (``s = tp`` with sequence
parallelism, else 1), ``a`` bytes per activation element (2 bf16, 4 fp32), ``h`` hidden, ``q`` / ``kv`` the query
and key-value widths, ``f`` the FFN width, ``hn`` the head dim, ``np`` the heads (docs/planning.md has the table).
"""

from __future__ import annotations

from dataclasses import dataclass

from simpo_mcore.plan.shape import Chunk, ModelShape

IDS = 8
"""int64 token ids / indices."""
FP32 = 4


@dataclass(frozen=True)
class MicroBatchShape:
    """The shape of one micro-batch as the model sees it on one data-parallel rank (its sizes, no tensors: what
    :class:`simpo_mcore.microbatch.MicroBatch` holds, counted)."""

    tokens: int
    """Positions computed: a packed row's length, or ``2k x S`` padded pairs."""
    rows: int = 1
    """The batch dimension: 1 for a packed row, ``2k`` padded sequences."""
    labelled: int | None = None
    """Positions the log-prob head computes (response tokens); ``None``: all."""
    sequences: int = 2
    """Sequences in the micro-batch (2 per pair)."""
    longest: int | None = None
    """The longest sequence (the SDPA spec's soft-capped scores are ``[heads, s, s]`` per sequence)."""

    @property
    def packed(self) -> bool:
        return self.rows == 1

    @property
    def head_tokens(self) -> int:
        return self.tokens if self.labelled is None else self.labelled


@dataclass(frozen=True)
class Implementation:
    """Which layers run: ``te`` or ``sdpa`` spec, on a GPU or not; the activation dtype."""

    spec: str = "te"
    cuda: bool = True
    act_bytes: int = 2
    fp8: bool = False

    @property
    def fused_norm(self) -> bool:
        """``F.rms_norm`` (GPU) instead of HF's elementwise formula with its fp32 copies (CPU)."""
        return self.cuda


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    sp: bool = False
    cp: int = 1
    ep: int = 1

    @property
    def shard(self) -> int:
        """The sequence shard of the norms and the residual stream (TP under sequence parallelism)."""
        return self.tp if self.sp else 1


def norm_bytes(shape: ModelShape, impl: Implementation, output_saved: bool) -> float:
    """Bytes per token (of its shard) one RMSNorm saves; ``output_saved``: the next operation saves its output
    (the QKV and FC1 projections do; the final norm's and Gemma-2's post-norms' outputs are not saved)."""
    h, a = shape.hidden_size, impl.act_bytes
    out = a * h if output_saved else 0
    if impl.spec == "te":  # TE's LayerNormLinear / TENorm: the input and 1 / rms (its ln_out: the output)
        return a * h + FP32 + (h if impl.fp8 and output_saved else out)
    if impl.fused_norm:  # F.rms_norm: input and 1 / rms; zero-centred: on an fp32 copy
        return (FP32 * h if shape.zero_centered_norms else a * h) + FP32 + out
    # HF's formula: the fp32 input (the input itself when fp32), 1 / rms, the normalised fp32 (zero-centred)
    # or model-dtype (Llama) tensor that the weight multiplies.
    return FP32 * h + FP32 + (FP32 * h if shape.zero_centered_norms else a * h) + out


def attention_bytes(shape: ModelShape, impl: Implementation, par: Parallel, mb: MicroBatchShape,
                    recompute: str) -> float:
    """Bytes per token of the attention block (norm excluded) on one TP rank."""
    a, tp = impl.act_bytes, par.tp
    q, kv = shape.q_size / tp, shape.kv_size / tp
    heads = shape.num_attention_heads / tp
    lse = FP32 * heads
    if par.cp > 1 and recompute != "selective":  # selective: the recomputed attention's inputs, as at CP 1
        out, copied = _context_parallel_qkv_bytes(shape, impl, par, mb, q, kv)
    else:
        # RoPE'd queries and keys (new tensors); the values: a view of the QKV output, which stays alive whole.
        out = a * (q + kv) + a * (q + 2 * kv)
        # The projection saves SDPA's output laid out [s, b, q]: a copy of the per-sequence outputs of a packed
        # row, and (by analysis) of the GPU kernels' [b, s, heads, hn] output; the CPU kernel's output of padded
        # rows already has that layout (the same storage).
        copied = mb.packed or impl.cuda
    if impl.spec == "te":
        # flash / cuDNN attention saves its output, which the output projection saves too (one storage).
        out += a * q + (0 if recompute == "selective" else lse) + (q if impl.fp8 else 0)
    else:
        # SDPA saves its output and log-sum-exp, and the projection its input (see ``copied``).
        out += a * q + (0 if recompute == "selective" else lse + (a * q if copied else 0))
        # unfused RoPE: cos and sin for queries and keys, per position (shared by the rows of a padded batch)
        out += 4 * shape.head_dim * a / mb.rows
    if shape.qk_norm:
        out += _qk_norm_bytes(shape, impl, q + kv, (shape.num_attention_heads + shape.num_query_groups) / tp)
    return out


def _context_parallel_qkv_bytes(shape: ModelShape, impl: Implementation, par: Parallel, mb: MicroBatchShape,
                                q: float, kv: float) -> tuple[float, bool]:
    """Under context parallelism, per local token: what the attention keeps of the queries, keys and values, and
    whether the output projection's input is a copy of the attention's output. The RoPE'd queries are saved; the
    RoPE'd keys and the QKV output are not (no operation keeps a view of them).

    * ``te`` (``cp_comm_type: p2p``): Transformer Engine's ring saves the last key / value block it received, one
      local block (by analysis of ``AttnFuncWithCPAndKVP2P``; not yet measured on a GPU).
    * ``sdpa`` on a CPU, plain causal attention (``model/cp_attention.py``): the keys and values gathered from every
      CP rank (cp local blocks), no mask, the output already laid out for the projection. Checked on CPU ranks.
    * ``sdpa`` with soft-capped scores, or on a GPU: each sequence's keys and values gathered (the same bytes)
      and its ``[s / cp, s]`` bool mask (``s`` bytes per local token), the output copied (by analysis). Sliding
      windows take that path too, and their masks are not counted here, as at CP 1 (the shape has no window)."""
    a = impl.act_bytes
    if impl.spec == "te":
        return a * q + a * 2 * kv, False
    gathered = a * q + a * 2 * kv * par.cp
    if not impl.cuda and not shape.attention_softcap:
        return gathered, False
    return gathered + (mb.longest or mb.tokens / mb.rows), True


def _qk_norm_bytes(shape: ModelShape, impl: Implementation, width: float, heads: float) -> float:
    a = impl.act_bytes
    if impl.spec == "te" or impl.fused_norm:  # a contiguous copy of the q / k view, and 1 / rms per head
        return a * width + FP32 * heads
    return (FP32 * width if a != FP32 else 0) + FP32 * heads + a * width


def mlp_bytes(shape: ModelShape, impl: Implementation, par: Parallel, layer: int) -> float:
    """Bytes per token of the MLP (norm excluded) on one rank; a MoE layer's experts see ``top_k`` copies of a
    token, spread evenly over the expert-parallel ranks (by analysis: not yet measured)."""
    a = impl.act_bytes
    fused = shape.swiglu and impl.cuda
    if not shape.is_moe_layer(layer):
        return _glu_bytes(shape.ffn_hidden_size / par.tp, a, fused, impl.fp8)
    routed = shape.moe_top_k * (a * shape.hidden_size + _glu_bytes(shape.moe_ffn_hidden_size / par.tp, a, fused,
                                                                   impl.fp8))
    shared = _glu_bytes(shape.shared_expert_ffn_hidden_size / par.tp, a, fused, impl.fp8)
    return routed + shared + FP32 * 2 * shape.num_experts


def _glu_bytes(f: float, a: int, fused: bool, fp8: bool) -> float:
    """FC1's output (2f: gate and up), the activation's output and the product FC2 saves: megatron's fused
    SwiGLU saves only its input; unfused, ``x_linear + 0`` and the activation's output are new tensors too."""
    fc2_input = f * (1 if fp8 else a)
    return (a * 2 * f + fc2_input) if fused else (a * 4 * f + fc2_input)


def layer_bytes(shape: ModelShape, impl: Implementation, par: Parallel, mb: MicroBatchShape, layer: int,
                recompute: str) -> float:
    """Bytes one decoder layer saves for a micro-batch (its whole forward, no recomputation of the layer)."""
    tokens = mb.tokens / par.cp
    norms = 2 * norm_bytes(shape, impl, output_saved=True)
    if shape.sandwich_norms:
        norms += 2 * norm_bytes(shape, impl, output_saved=False)
    body = attention_bytes(shape, impl, par, mb, recompute) + mlp_bytes(shape, impl, par, layer)
    return tokens * (norms / par.shard + body) + _score_bytes(shape, impl, par, mb)


def _score_bytes(shape: ModelShape, impl: Implementation, par: Parallel, mb: MicroBatchShape) -> float:
    """The SDPA spec's soft-capped attention (Gemma-2 without TE's ``softcap``) materialises ``[heads, s, s]``
    scores per sequence: the capped scores (model dtype), the fp32 softmax and its model-dtype copy; and the keys
    and values repeated to every query head (by analysis, each sequence taken at the longest)."""
    if impl.spec == "te" or not shape.attention_softcap or mb.longest is None:
        return 0.0
    heads = shape.num_attention_heads / par.tp
    repeated = 2 * impl.act_bytes * shape.q_size / par.tp if shape.num_query_groups < shape.num_attention_heads else 0
    return mb.sequences * heads * mb.longest ** 2 * (2 * impl.act_bytes + FP32) + mb.tokens / par.cp * repeated


def embedding_bytes(mb: MicroBatchShape, par: Parallel) -> float:
    """The embedding lookup saves its indices; vocab-parallel (TP > 1) also the rows outside this rank's shard
    (a bool mask) and the ids shifted into it (a second index tensor)."""
    tokens = mb.tokens / par.cp
    return tokens * (IDS if par.tp == 1 else 2 * IDS + 1)


def head_bytes(shape: ModelShape, impl: Implementation, par: Parallel, mb: MicroBatchShape, keep_logits: bool,
               vocab_rows: int) -> float:
    """The final norm and the fused log-prob head: the labelled tokens' hidden states (gathered whole under
    sequence parallelism), their index and targets (int64), log-sum-exp (fp32), two bool masks; with
    ``model.logprob_recompute: false`` also their logits ``[n, V / tp]``. Under CP each rank computes its own
    chunks' labelled tokens, ``labelled / cp`` on average (the rank holding the prompts' chunks fewer)."""
    n = mb.head_tokens / par.cp
    tokens = mb.tokens / par.cp
    per = impl.act_bytes * shape.hidden_size + 2 * IDS + FP32 + 2
    kept = n * vocab_rows * impl.act_bytes if keep_logits else 0
    return tokens * norm_bytes(shape, impl, output_saved=False) / par.shard + n * per + kept


def loss_bytes(mb: MicroBatchShape, par: Parallel) -> float:
    """The loss on the last stage: the per-sequence token log-probs gathered out of the row (fp32) and the index
    that gathers them (int64), the labels mask the sums are taken with."""
    return mb.tokens / par.cp * (IDS + 2 * FP32 + 1)


def chunk_saved_bytes(shape: ModelShape, impl: Implementation, par: Parallel, mb: MicroBatchShape, chunk: Chunk,
                      recompute: str, recompute_layers: int, keep_logits: bool, vocab_rows: int) -> float:
    """Bytes a model chunk saves for one micro-batch: its layers (under full recomputation only the input of each
    block of ``recompute_layers`` layers, and the RoPE frequencies once), plus the embedding on the first chunk and
    the final norm, head and loss on the last."""
    out = 0.0
    if chunk.first:
        out += embedding_bytes(mb, par)
    if recompute == "full" or impl.spec == "te":
        # the RoPE frequencies [positions, 1, 1, hn] fp32, one tensor for all layers: saved by every recomputed
        # block (an argument of its checkpoint) and by TE's fused RoPE. Under CP padded rows get this rank's
        # chunks of the table (megatron's get_pos_emb_on_this_cp_rank); a packed row's table covers its longest
        # (padded) sequence whole on every rank, each layer picking its rank's positions out of it.
        longest = mb.longest or mb.tokens / mb.rows
        out += (longest if mb.packed else longest / par.cp) * shape.head_dim * FP32
    if recompute == "full":
        blocks = -(-len(chunk.layers) // recompute_layers)
        out += blocks * mb.tokens / par.cp * impl.act_bytes * shape.hidden_size / par.shard
    else:
        out += sum(layer_bytes(shape, impl, par, mb, layer, recompute) for layer in chunk.layers)
    if chunk.last:
        out += head_bytes(shape, impl, par, mb, keep_logits, vocab_rows) + loss_bytes(mb, par)
    return out


def recompute_working_bytes(shape: ModelShape, impl: Implementation, par: Parallel, mb: MicroBatchShape,
                            chunk: Chunk, recompute: str, recompute_layers: int) -> float:
    """Under full recomputation, the activations one block of layers rebuilds for its backward (alive on top of
    the saved inputs while that block's backward runs)."""
    if recompute != "full" or not chunk.layers:
        return 0.0
    block = chunk.layers[:recompute_layers]
    return sum(layer_bytes(shape, impl, par, mb, layer, "none") for layer in block)


def head_working_bytes(shape: ModelShape, impl: Implementation, par: Parallel, mb: MicroBatchShape,
                       chunk_tokens: int, keep_logits: bool, vocab_rows: int) -> float:
    """The fused head's memory at its backward (docs/logprobs.md): its weight gradient ``[V/tp, h]`` in the model
    dtype, the fp32 ``[n, h]`` accumulator of the hidden gradient and its model-dtype partial, one vocabulary
    slice of recomputed logits ``chunk_tokens x V / tp`` (not with kept logits) and, with the torch elementwise
    passes (no GPU), a fp32 block of a quarter of it."""
    a, h = impl.act_bytes, shape.hidden_size
    n = mb.head_tokens / par.cp
    slice_bytes = 0 if keep_logits else min(chunk_tokens, n) * vocab_rows * a
    torch_passes = 0 if impl.cuda else min(chunk_tokens, n) * vocab_rows * FP32 / 4
    return vocab_rows * h * a + n * h * (FP32 + a) + slice_bytes + torch_passes
