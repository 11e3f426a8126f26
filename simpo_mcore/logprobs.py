r"""Token log-probs from a vocab-parallel output layer, without full fp32 logits.

SimPO scores a response by the *average* log-prob of its tokens. With a 128k vocabulary the naive head
(``logits -> .float() -> log_softmax -> gather``) materialises several ``[tokens, vocab]`` fp32 tensors and
dominates memory. This module computes the same numbers chunk by chunk, for an output layer whose weight
is sharded by vocabulary rows across the tensor-parallel (TP) group, as megatron-core's is.

Math (one token with hidden state ``h``, target id ``y``, TP rank ``r`` holding rows ``V_r``)::

    z_j      = <h, W_j>                          logits, j < vocab_size (padded rows j >= vocab_size
                                                 are excluded: they never carry probability)
    M        = max_r max_{j in V_r} z_j          one all-reduce MAX over TP
    S        = sum_r sum_{j in V_r} exp(z_j - M)  \  one all-reduce SUM over TP of the stacked pair;
    z_y      = sum_r [y in V_r] z_y              /  only the rank owning y contributes z_y
    lse      = M + log S
    logp     = z_y - lse                         0.0 where the label is -100 (prompt, padding)

    d logp / d z_j = [j == y] - p_j,   p_j = exp(z_j - lse)
    g_j            = grad_out * ([j == y] - p_j)           (0 for ignored tokens)
    grad_h         = sum_j g_j W_j      a partial sum over this rank's rows: the TP region reduces it
    grad_W_j       = g_j h

With final logit soft-capping (``softcap`` = c, Gemma-2's 30) every ``z_j`` above is ``c * tanh(z_j / c)`` of
the raw logit, and ``g_j`` is multiplied by the cap's derivative ``1 - tanh(z_j / c)^2``; the raw logits are
what the GEMMs produce and what the backward recomputes.

Public API:

* :func:`vocab_parallel_token_logps`: from vocab-parallel logits (megatron's unfused cross-entropy,
  sequence chunk by sequence chunk, recomputed in backward);
* :func:`fused_token_logps`: from hidden states and the weight shard, never holding more than one chunk of
  logits (forward chunks over tokens, backward over vocabulary rows; see :class:`_FusedTokenLogps`);
* :func:`token_logps_output_processor` + :class:`TokenLogpsContext`: the ``GPTModel.forward(...,
  output_processor=...)`` hook that returns ``[b, s]`` token log-probs instead of logits;
* :func:`sequence_logps`: per-sequence ``sum_logps``, ``num_tokens`` and ``avg_logps`` (over the
  context-parallel group when given one: :func:`reduce_over_context_parallel`);
  :func:`unpack_token_logps` lays a packed row's token log-probs out per sequence first.

Layouts follow megatron: hidden ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism), weight
``[v_pad/tp, h]``, logits ``[s, b, v_pad/tp]``; labels are batch-first ``[b, s]`` as ``GPTModel`` receives
them, already shifted (label ``t`` is the target of the logits at ``t``), ``-100`` = ignore. Every token
log-prob returned is fp32 ``[b, s]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

from simpo_mcore import logprobs_kernels as kernels
from simpo_mcore.microbatch import LABEL_PAD, check_label_values, check_sequence_counts

# Vocabulary slices in the fused backward are a multiple of this many rows: GEMMs on 16-byte aligned
# leading dimensions pick the fast kernels, and 8 rows cost nothing in memory.
_VOCAB_ALIGN = 8


# --------------------------------------------------------------------------------------------- helpers


def _tp_group_or_default(tp_group):
    if tp_group is not None:
        return tp_group
    return parallel_state.get_tensor_model_parallel_group()


def _valid_rows(vocab_size: int, rows_per_rank: int, tp_rank: int) -> tuple[int, int]:
    """First global id held by this rank and how many of its rows are real (not padding)."""
    vocab_start = tp_rank * rows_per_rank
    return vocab_start, max(0, min(rows_per_rank, vocab_size - vocab_start))


def _check_softcap(softcap: float | None) -> None:
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


# ----------------------------------------------------------------------------------- unfused: logits in


class _ChunkedVocabParallelLogps(torch.autograd.Function):
    """Token log-probs from vocab-parallel logits via megatron's ``vocab_parallel_cross_entropy``.

    Called directly per chunk under autograd, megatron's function saves its fp32 softmax for backward,
    so all chunks together would keep an fp32 copy of the whole ``[s, b, v/tp]`` logits alive until the
    backward, and slicing the caller's logits would allocate one full-size gradient per chunk. Instead
    the forward runs it without a graph and the backward recomputes it one chunk at a time (a second pass
    of elementwise work, no matmul), writing each chunk's gradient into one preallocated tensor.

    With ``softcap`` megatron's function sees the capped logits ``c * tanh(z / c)``; the backward
    differentiates through the cap by autograd.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, vocab_size, tp_group, seq_chunk, softcap):
        s = logits.shape[0]
        tp_rank = dist.get_rank(tp_group)
        _, n_valid = _valid_rows(vocab_size, logits.shape[-1], tp_rank)
        token_logps = torch.empty(target.shape, dtype=torch.float32, device=logits.device)  # [s, b]
        for s0 in range(0, s, seq_chunk):
            s1 = min(s, s0 + seq_chunk)
            logits32 = _fp32_logits(logits[s0:s1].to(torch.float32, copy=True), n_valid, softcap)  # [c, b, v/tp]
            # megatron returns -logp and overwrites logits32 in place (our private copy).
            token_logps[s0:s1] = -vocab_parallel_cross_entropy(logits32, target[s0:s1], tp_group=tp_group)
            del logits32
        token_logps.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, target, valid)
        ctx.tp_group, ctx.n_valid, ctx.seq_chunk, ctx.softcap = tp_group, n_valid, seq_chunk, softcap
        return token_logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_token_logps):
        logits, target, valid = ctx.saved_tensors
        # d(-nll) = -d(nll); ignored tokens are constant 0.0, so they pass no gradient.
        grad_nll = torch.where(valid, -grad_token_logps.float(), 0.0)  # [s, b]
        grad_logits = torch.empty_like(logits)  # [s, b, v/tp]
        s = logits.shape[0]
        for s0 in range(0, s, ctx.seq_chunk):
            s1 = min(s, s0 + ctx.seq_chunk)
            raw32 = logits[s0:s1].to(torch.float32, copy=True)  # [c, b, v/tp], a private copy
            with torch.enable_grad():
                if ctx.softcap is None:  # the masked copy is the leaf (megatron overwrites it: no second copy)
                    leaf = logits32 = _fp32_logits(raw32, ctx.n_valid, None).requires_grad_()
                else:
                    leaf = raw32.requires_grad_()
                    logits32 = _fp32_logits(leaf, ctx.n_valid, ctx.softcap)
                nll = vocab_parallel_cross_entropy(logits32, target[s0:s1], tp_group=ctx.tp_group)
            # megatron's backward returns its softmax buffer turned into the gradient (no new chunk).
            (grad_chunk,) = torch.autograd.grad(nll, leaf, grad_nll[s0:s1])
            grad_logits[s0:s1] = grad_chunk  # cast to the logits dtype on the copy
            del raw32, leaf, logits32, nll, grad_chunk
        return grad_logits, None, None, None, None, None, None


def _fp32_logits(logits32: torch.Tensor, n_valid: int, softcap: float | None) -> torch.Tensor:
    """The logits megatron's cross-entropy sees, from a private fp32 copy (``.float()`` of fp32 logits
    would alias the caller's tensor, which megatron then overwrites): soft-capped with ``softcap``, and
    padded vocabulary columns at -inf so that they get probability 0 (in place without ``softcap``)."""
    if softcap is not None:
        logits32 = torch.tanh(logits32 / softcap) * softcap
    if n_valid < logits32.shape[-1]:
        logits32[..., n_valid:] = float("-inf")
    return logits32


def vocab_parallel_token_logps(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                               tp_group=None, chunk_tokens: int = 4096, check: bool = True,
                               softcap: float | None = None) -> torch.Tensor:
    """Token log-probs ``[b, s]`` (fp32, 0.0 at label -100) from vocab-parallel logits ``[s, b, v_pad/tp]``.

    Args:
        logits: this rank's vocabulary shard of the logits, any float dtype; never modified.
        labels: ``[b, s]`` int64 targets (already shifted), ``-100`` = ignore.
        vocab_size: the real vocabulary size; columns with global id >= ``vocab_size`` are padding.
        tp_group: the tensor-parallel group the vocabulary is sharded over (``None``: megatron's).
        chunk_tokens: tokens per chunk; each chunk becomes ``chunk_tokens x v/tp`` fp32 temporaries
            (rounded to whole sequence positions, at least one).
        check: check the label values (a device sync on a GPU); ``False`` where the targets were checked on the host
            (a collated ``MicroBatch``'s were: :func:`simpo_mcore.microbatch.check_targets`).
        softcap: final logit soft-capping ``z -> softcap * tanh(z / softcap)`` before the softmax; ``None``: none.
    """
    tp_group = _tp_group_or_default(tp_group)
    _check_softcap(softcap)
    s, b = logits.shape[0], logits.shape[1]
    if labels.shape != (b, s):
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits [s, b, v] = {tuple(logits.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if check:
        check_label_values(labels, vocab_size)
    labels_sb = labels.t().contiguous()  # [s, b]; megatron views its target flat
    valid = labels_sb != LABEL_PAD  # [s, b]
    # megatron has no ignore_index: any real id keeps its arithmetic finite; the result is zeroed.
    target = torch.where(valid, labels_sb, 0)  # [s, b]
    seq_chunk = max(1, chunk_tokens // b)
    token_logps = _ChunkedVocabParallelLogps.apply(logits, target, valid, vocab_size, tp_group, seq_chunk, softcap)
    return token_logps.t().contiguous()  # [b, s]


# ------------------------------------------------------------------------------ fused: hidden states in


class _FusedTokenLogps(torch.autograd.Function):
    """Token log-probs from hidden states ``[T, h]`` and this rank's weight rows ``[v_pad/tp, h]``.

    Forward, per chunk of ``chunk_tokens`` tokens: ``z = h_c W_real^T`` in the input dtype (bf16 on a
    GPU, as the output layer computes it), fp32 statistics, the TP all-reduces, ``logp = z_y - lse``.
    Only ``lse`` ([T] fp32) is saved besides the inputs.

    Backward, per slice of vocabulary rows (``lse`` is known for every token now): recompute
    ``z = h W_slice^T``, ``g = grad_out * (onehot - exp(z - lse))``, then ``grad_W_slice = g^T h`` is final
    (one GEMM, one rounding, written in place) and ``grad_h += g W_slice`` accumulates in fp32. Slicing
    the backward by vocabulary rather than by tokens means the accumulator is ``[T, h]`` (128 MiB for
    8192 tokens x 4096 in fp32) instead of an fp32 ``[v/tp, h]`` weight gradient (2 GiB for Llama-3 8B
    at TP=1). Slices hold ``~chunk_tokens * v/tp / T`` rows so a backward chunk is as big as a forward one.

    The elementwise passes over a chunk (``sum exp(z - M)`` forward, ``g`` backward) are
    :mod:`simpo_mcore.logprobs_kernels`: Triton kernels on a GPU that read the bf16 chunk once and keep no
    fp32 copy of it, or torch in row blocks with fp32 temporaries of 1/4 chunk. ``g`` overwrites the
    recomputed logits, so a chunk costs its bf16 logits (+ the torch path's fp32 block).

    Padded rows (global id >= ``vocab_size``) are left out of every GEMM; their gradient is zero.

    ``recompute=False`` trades memory for the fourth GEMM: the forward writes every chunk's logits into one
    ``[T, n_valid]`` tensor (input dtype) kept for the backward, which turns it into ``g`` in place, chunk by
    chunk, and then runs the two gradient GEMMs over all tokens at once (``grad_h`` rounded once from the
    GEMM's fp32 accumulator). Three ``T x V x h`` GEMMs instead of four; ``T x v/tp`` more elements held
    from the forward to the backward. The backward can then run only once (it overwrites the logits).
    """

    @staticmethod
    def forward(ctx, hidden, weight, local_id, owned, valid, n_valid, chunk_tokens, tp_group, kernel, recompute,
                softcap):
        ctx.kernel = kernels.resolve(kernel, hidden)
        num_tokens = hidden.shape[0]
        weight_real = weight[:n_valid]  # [n_valid, h]
        token_logps = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)  # [T]
        lse = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)  # [T]
        # Without recomputation every chunk's logits land in one tensor kept for the backward.
        all_logits = None if recompute else \
            torch.empty(num_tokens, n_valid, dtype=hidden.dtype, device=hidden.device)  # [T, n_valid]
        for t0 in range(0, num_tokens, chunk_tokens):
            t1 = min(num_tokens, t0 + chunk_tokens)
            if recompute:
                logits = hidden[t0:t1] @ weight_real.t()  # [c, n_valid], input dtype
            else:
                logits = torch.mm(hidden[t0:t1], weight_real.t(), out=all_logits[t0:t1])  # [c, n_valid]
            if n_valid > 0:
                logits_max = logits.max(dim=-1).values.float()  # [c]; exact in any dtype
                # From the same rounded logits as the softmax, so the two agree to the last bit.
                target_logits = logits.gather(1, local_id[t0:t1, None]).squeeze(1).float()  # [c]
                if softcap is not None:  # monotone: the capped maximum is the cap of the maximum
                    logits_max = kernels.softcap_fp32(logits_max, softcap)
                    target_logits = kernels.softcap_fp32(target_logits, softcap)
            else:  # this rank holds only padding
                logits_max = torch.full((t1 - t0,), float("-inf"), device=hidden.device)
                target_logits = torch.zeros(t1 - t0, device=hidden.device)
            target_logits = torch.where(owned[t0:t1], target_logits, 0.0)
            _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
            # [c] fp32; 0 without rows. The torch path may use fp32 logits as scratch unless they are kept.
            sum_exp = kernels.sum_exp(logits, logits_max, ctx.kernel, overwrite=recompute, softcap=softcap)
            del logits
            stats = torch.stack([sum_exp, target_logits])  # [2, c]
            _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
            lse[t0:t1] = logits_max + stats[0].log()
            token_logps[t0:t1] = stats[1] - lse[t0:t1]
        token_logps.masked_fill_(~valid, 0.0)
        if recompute:
            ctx.save_for_backward(hidden, weight, lse, local_id, owned, valid)
        else:
            ctx.save_for_backward(hidden, weight, lse, local_id, owned, valid, all_logits)
        ctx.n_valid, ctx.chunk_tokens, ctx.recompute, ctx.softcap = n_valid, chunk_tokens, recompute, softcap
        return token_logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_token_logps):
        # A second backward (retain_graph) through kept logits is refused by autograd itself: the
        # first one changed them in place.
        saved = ctx.saved_tensors
        hidden, weight, lse, local_id, owned, valid = saved[:6]
        n_valid = ctx.n_valid
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens = hidden.shape[0]
        # Ignored tokens output a constant 0.0: no gradient flows from them.
        minus_grad_out = torch.where(valid, -grad_token_logps.float(), 0.0)  # [T]
        if not ctx.recompute:
            return _FusedTokenLogps._backward_from_kept_logits(ctx, saved, minus_grad_out)
        grad_hidden32 = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) \
            if need_hidden else None  # [T, h]
        grad_weight = torch.zeros_like(weight) if need_weight else None  # [v_pad/tp, h]; padded rows stay 0
        rows = _vocab_slice_rows(ctx.chunk_tokens, n_valid, num_tokens)
        for v0 in range(0, n_valid, rows):
            v1 = min(n_valid, v0 + rows)
            weight_slice = weight[v0:v1]  # [r, h]
            grad_logits = hidden @ weight_slice.t()  # [T, r], input dtype: the logits, overwritten by g
            # -1 at the target column for the tokens whose target lies in this slice; a scatter of zeros
            # elsewhere (boolean indexing would sync the device).
            # The target column in this slice, or -1 for tokens whose target lies elsewhere.
            target = torch.where(owned & (local_id >= v0) & (local_id < v1), local_id - v0, -1)  # [T]
            # g = -grad_out * (p - onehot), written straight into the logits' storage.
            kernels.softmax_grad_(grad_logits, lse, minus_grad_out, target, ctx.kernel, ctx.softcap)
            if need_weight:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[v0:v1])  # [r, h]
            if need_hidden:
                grad_hidden32 += grad_logits @ weight_slice  # [T, h]
            del grad_logits
        grad_hidden = grad_hidden32.to(hidden.dtype) if need_hidden else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None

    @staticmethod
    def _backward_from_kept_logits(ctx, saved, minus_grad_out):
        hidden, weight, lse, local_id, owned, _, logits = saved
        n_valid, num_tokens = ctx.n_valid, hidden.shape[0]
        target = torch.where(owned, local_id, -1)  # [T]: the target column on this rank, or -1
        for t0 in range(0, num_tokens, ctx.chunk_tokens):  # chunks bound the torch path's fp32 blocks
            t1 = min(num_tokens, t0 + ctx.chunk_tokens)
            # g = -grad_out * (p - onehot), over the forward's logits in place.
            kernels.softmax_grad_(logits[t0:t1], lse[t0:t1], minus_grad_out[t0:t1], target[t0:t1], ctx.kernel,
                                  ctx.softcap)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)  # [v_pad/tp, h]; padded rows stay 0
            torch.mm(logits.t(), hidden, out=grad_weight[:n_valid])  # [n_valid, h]
        if ctx.needs_input_grad[0]:
            grad_hidden = logits @ weight[:n_valid]  # [T, h], one rounding from the GEMM's accumulator
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def _vocab_slice_rows(chunk_tokens: int, n_valid: int, num_tokens: int) -> int:
    """Rows per backward slice so that ``[T, rows]`` holds about ``chunk_tokens x n_valid`` elements."""
    rows = -(-chunk_tokens * n_valid // max(1, num_tokens))
    rows = -(-rows // _VOCAB_ALIGN) * _VOCAB_ALIGN
    return max(1, min(n_valid, rows))


def fused_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                      tp_group=None, sequence_parallel: bool = False,
                      chunk_tokens: int = 4096, kernel: str = "auto", recompute: bool = True,
                      check: bool = True, token_index: torch.Tensor | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """Token log-probs ``[b, s]`` (fp32, 0.0 at label -100) from the output layer's input and weight.

    Computes what ``ColumnParallelLinear`` (the output layer) followed by :func:`vocab_parallel_token_logps`
    computes, without ``[tokens, v/tp]`` logits beyond one chunk.

    Args:
        hidden: ``[s, b, h]`` after the final norm; ``[s/tp, b, h]`` (this rank's sequence shard) when
            ``sequence_parallel``.
        weight: this rank's output-layer rows ``[v_pad/tp, h]`` (rank r holds global ids
            ``[r * v_pad/tp, (r+1) * v_pad/tp)``), same dtype as ``hidden``.
        labels: ``[b, s]`` int64 (full sequence on every TP rank), ``-100`` = ignore.
        vocab_size: the real vocabulary size; rows with global id >= ``vocab_size`` are padding.
        tp_group: the tensor-parallel group (``None``: megatron's).
        sequence_parallel: whether ``hidden`` is sharded along ``s`` across ``tp_group``.
        chunk_tokens: tokens per forward chunk (the last may be smaller); each chunk allocates about
            ``chunk_tokens x v/tp`` elements in the input dtype (plus a quarter of that in fp32 on the
            torch path).
        kernel: the elementwise passes: ``auto`` (Triton on a GPU, else torch), ``torch`` or ``triton``
            (see :mod:`simpo_mcore.logprobs_kernels`).
        recompute: recompute the logits in the backward (memory flat in tokens x vocab; four
            ``T x V x h`` GEMMs). ``False`` keeps the forward's ``[tokens, v/tp]`` logits in the input dtype
            instead (2 GiB at 8192 x 128256 bf16) and skips the fourth GEMM; backward can then run once.
        check: check the label values (a device sync on a GPU); ``False`` where the targets were checked on the host
            (a collated ``MicroBatch``'s were: :func:`simpo_mcore.microbatch.check_targets`).
        token_index: :func:`simpo_mcore.microbatch.labelled_positions` of ``labels`` (on ``hidden``'s device,
            the same on every TP rank): the head then runs its GEMMs on those tokens only, not on the prompt and
            padding, whose log-probs are 0 anyway. It must hold every labelled position (extra positions are harmless).
        softcap: final logit soft-capping ``z -> softcap * tanh(z / softcap)`` before the softmax (Gemma-2);
            ``None``: none.
    """
    tp_group = _tp_group_or_default(tp_group)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    tp = dist.get_world_size(tp_group)
    # The TP region around the projection mirrors ColumnParallelLinear: grad_h from this function is a
    # partial sum over this rank's vocabulary rows, so the region's backward must sum it over TP.
    if sequence_parallel and tp > 1:
        # all-gather [s/tp, b, h] -> [s, b, h]; backward reduce-scatters back to this rank's shard.
        hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)
    elif tp > 1:
        # identity; backward all-reduces (megatron's allreduce_dgrad does the same inside its linear).
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden [s, b, h] = {(s, b, h)}"
                         f"{' after the sequence-parallel gather' if sequence_parallel else ''}")
    if check:
        check_label_values(labels, vocab_size)

    vocab_start, n_valid = _valid_rows(vocab_size, weight.shape[0], dist.get_rank(tp_group))
    hidden = hidden.reshape(s * b, h)  # [s*b, h]
    labels_tokens = labels.t().reshape(-1)  # [s*b], the order of hidden's rows
    if token_index is not None:  # the labelled tokens only: [n] rows of each
        hidden, labels_tokens = hidden.index_select(0, token_index), labels_tokens[token_index]
    valid = labels_tokens != LABEL_PAD  # [T]
    local_id = labels_tokens - vocab_start  # [T]
    owned = valid & (local_id >= 0) & (local_id < n_valid)  # [T]: this rank holds the target's row
    local_id = torch.where(owned, local_id, 0)  # [T], a harmless index where not owned

    _check_softcap(softcap)
    token_logps = _FusedTokenLogps.apply(
        hidden, weight, local_id, owned, valid, n_valid, chunk_tokens, tp_group, kernel, recompute, softcap)  # [T]
    if token_index is not None:
        # Every other token is unlabelled: 0.0, and no gradient (index_select's backward adds zeros there).
        token_logps = torch.zeros(s * b, dtype=torch.float32, device=hidden.device).index_copy(
            0, token_index, token_logps)  # [s*b]
    return token_logps.view(s, b).t().contiguous()  # [b, s]


# ----------------------------------------------------------------------------------------- GPTModel hook


@dataclass(frozen=True)
class TokenLogpsContext:
    """What :func:`token_logps_output_processor` needs besides what ``GPTModel`` passes it."""

    vocab_size: int
    """The real (unpadded) vocabulary size; padded output rows never carry probability."""

    chunk_tokens: int = 4096
    """Tokens per chunk of the fused projection + log-prob head. 0: the output layer computes the full
    vocab-parallel logits and :func:`vocab_parallel_token_logps` reduces them (for comparisons)."""

    kernel: str = "auto"
    """The fused head's elementwise passes: ``auto`` (Triton on a GPU, else torch), ``torch``, ``triton``."""

    recompute: bool = True
    """The fused head recomputes its logits in the backward (memory flat in tokens x vocab). ``False`` keeps
    the forward's ``[tokens, v/tp]`` logits instead: one ``T x V x h`` GEMM fewer, that much more memory."""

    labels_checked: bool = False
    """Set (per call, with ``dataclasses.replace``) by a caller whose labels were checked on the host (a
    ``MicroBatch``'s targets are, at collation): the head then skips its own check, which would sync the device."""

    token_index: torch.Tensor | None = None
    """Per call, like ``labels_checked``: ``MicroBatch.token_index`` of this call's labels, on the device.
    The fused head then computes the labelled tokens only (the unfused one ignores it)."""


def token_logps_output_processor(*, hidden_states: torch.Tensor, output_layer, output_weight, labels,
                                 context: TokenLogpsContext, config=None, **_) -> torch.Tensor:
    """``GPTModel.forward(..., labels=labels, output_processor=this, output_processor_context=ctx)``.

    Called on the last pipeline stage with the hidden states after the final norm; returns token log-probs
    ``[b, s]`` fp32 in place of the logits. ``output_weight`` is the shared embedding weight when the
    embeddings are tied, else ``None`` (the output layer's own weight). The model's final logit soft-capping
    (``config.final_logit_softcapping``, :class:`simpo_mcore.model.specs.ExtendedTransformerConfig`) is
    applied inside the head.
    """
    if labels is None:
        raise ValueError("token_logps_output_processor needs labels: call the model with labels=")
    if config is not None:
        # Both change what the output layer computes; this head does not reproduce them.
        if getattr(config, "use_mup", False):
            raise NotImplementedError("MuP logit scaling is not supported by the log-prob head")
        if getattr(config, "defer_embedding_wgrad_compute", False):
            raise NotImplementedError("defer_embedding_wgrad_compute is not supported by the log-prob head")
    if getattr(output_layer, "bias", None) is not None:
        raise NotImplementedError("an output layer with a bias is not supported by the log-prob head")
    weight = output_weight if output_weight is not None else output_layer.weight
    # The layer's own flag: megatron turns sequence parallelism off in it when TP is 1.
    sequence_parallel = bool(output_layer.sequence_parallel)
    # Part of the model (Gemma-2): read from its config, so no caller can leave it out.
    softcap = getattr(config, "final_logit_softcapping", None)
    if context.chunk_tokens > 0:
        return fused_token_logps(hidden_states, weight, labels, context.vocab_size,
                                 tp_group=output_layer.tp_group, sequence_parallel=sequence_parallel,
                                 chunk_tokens=context.chunk_tokens, kernel=context.kernel,
                                 recompute=context.recompute, check=not context.labels_checked,
                                 token_index=context.token_index, softcap=softcap)
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=False)  # [s, b, v/tp]
    return vocab_parallel_token_logps(logits, labels, context.vocab_size, tp_group=output_layer.tp_group,
                                      check=not context.labels_checked, softcap=softcap)


# ------------------------------------------------------------------------------------- per sequence


def unpack_token_logps(token_logps: torch.Tensor, sequence_index: torch.Tensor) -> torch.Tensor:
    """Token log-probs of a packed row ``[1, T]`` as one row per sequence ``[n, L]`` (0.0 beyond each
    sequence's end): ``sequence_index [n, L]`` holds the row position of token j of sequence i, and ``T`` (one
    past the row) beyond its end. One gather, then :func:`sequence_logps` gives the per-sequence sums, counts
    and averages as for padded rows, with no loop over sequences; its backward adds each position's gradient
    once (each real position is read by one sequence only)."""
    flat = torch.cat([token_logps.reshape(-1), token_logps.new_zeros(1)])  # [T + 1]: position T reads 0.0
    return flat[sequence_index]  # [n, L]


def sequence_logps(token_logps: torch.Tensor, labels: torch.Tensor, check: bool = True, cp_group=None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_logps [b] fp32, num_tokens [b] int64, avg_logps [b] fp32)`` over the tokens with label != -100.

    Raises if a sequence has no such token: the data pipeline guarantees at least one, and 0/0 would
    otherwise be a NaN in the loss (the SimPO reference's failure on empty responses). ``check=False``
    skips that test (a device sync on a GPU) where the labels were checked on the host (a ``MicroBatch``'s
    targets are, at collation: under context parallelism on the whole sequences, before the split, since a rank
    may hold none of a sequence's targets).

    ``cp_group``: under context parallelism each rank passes its chunks of every sequence
    (``data.context_parallel``); the sums and counts are then those of the whole sequences, the same on every
    rank of the group (:func:`reduce_over_context_parallel`), and ``check`` looks at the whole sequences' counts.
    """
    if token_logps.shape != labels.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and labels {tuple(labels.shape)} differ")
    mask = labels != LABEL_PAD  # [b, s]
    num_tokens = mask.sum(dim=-1)  # [b]
    sum_logps = torch.where(mask, token_logps.float(), 0.0).sum(dim=-1)  # [b]
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        sum_logps, num_tokens = reduce_over_context_parallel(sum_logps, num_tokens, cp_group)
    if check:
        check_sequence_counts(num_tokens)
    avg_logps = sum_logps / num_tokens
    return sum_logps, num_tokens, avg_logps


def reduce_over_context_parallel(sum_logps: torch.Tensor, num_tokens: torch.Tensor, cp_group
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``(sum_logps [b], num_tokens [b])`` of the whole sequences from each CP rank's partial ones:
    an all-reduce whose backward is the identity for the sums (megatron's ``reduce_from_..._region`` on the CP
    group), a plain all-reduce for the counts (no gradient).

    Why the identity. Every rank then holds the same loss ``L(S)`` of the sums ``S_i = sum_r s_ir`` (``s_ir``:
    rank r's partial sum of sequence i). A token t of sequence i on rank r enters ``L`` only through ``s_ir``, a
    plain sum, so ``dL/d logp_t = dL/dS_i``: what rank r's backward passes to it, unchanged, and each token sits on
    exactly one rank, so it gets its gradient exactly once (an all-reduce in the backward would give cp times
    it). Each rank's parameter gradients are its own tokens' part; megatron's DDP sums them over data- and
    context-parallel ranks together, and its schedule multiplies each loss by cp so that DDP's average over
    dp x cp ranks stays a mean over the dp replicas.
    """
    sum_logps = reduce_from_tensor_model_parallel_region(sum_logps, group=cp_group)  # [b]
    num_tokens = num_tokens.clone()
    dist.all_reduce(num_tokens, group=cp_group)  # [b]
    return sum_logps, num_tokens


__all__ = [
    "TokenLogpsContext",
    "fused_token_logps",
    "reduce_over_context_parallel",
    "sequence_logps",
    "token_logps_output_processor",
    "unpack_token_logps",
    "vocab_parallel_token_logps",
]
