"""Causal attention of a context-parallel rank's query chunks over the whole sequences' keys, with no ``[s, s]`` mask.

Under context parallelism a rank holds two of the ``2 x cp`` chunks of every sequence
(:mod:`simpo_mcore.data.context_parallel`); query chunk ``g`` sees the key chunks before it whole and its own
causally. One attention call with an explicit mask would build, and keep for the backward, a ``[s / cp, s]``
mask per sequence and layer: memory quadratic in the sequence length, the very thing CP is there to divide.
Instead each query chunk attends in two blocks through torch's CPU flash kernel (no mask; it returns the
log-sum-exp): its own key chunk (causal: a square block) and the chunks before it (no mask); the blocks are
merged by their log-sum-exps, as Transformer Engine's ring attention merges its steps. The backward runs the
kernel's backward on each block with the merged output and log-sum-exp, which is the gradient of that block of a
softmax taken over all of them. Saved for the backward: the queries, the gathered keys and values, the output
and the log-sum-exp (linear in the sequence length; the planner counts them, ``plan/activations.py``).

Layout: queries ``[b, np, t, hn]`` are this rank's rows of ``t`` positions, in which a sequence (a padded row,
or a segment of a packed row) of local length ``m`` at offset ``start`` holds chunks ``r`` and ``2cp - 1 - r``
(``m / 2`` positions each); keys and values ``[b, ng, cp x t, hn]`` are every rank's rows gathered rank-major.
"""

from __future__ import annotations

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def chunk_keys(cp: int, t: int, start: int, m: int, chunk: int) -> torch.Tensor:
    """``[m / 2]`` int64: where global chunk ``chunk`` of the sequence at local offset ``start`` (local length
    ``m``) sits in the gathered rows (rank ``chunk`` holds it first, rank ``2cp - 1 - chunk`` second)."""
    half = m // 2
    late = chunk >= cp
    rank = 2 * cp - 1 - chunk if late else chunk
    first = rank * t + start + (half if late else 0)
    return torch.arange(first, first + half)


def query_blocks(cp: int, rank: int, t: int, segments: list[tuple[int, int]]):
    """Per query chunk of this rank: ``(local start, length, its own key chunk [n], earlier key chunks [k])``,
    for the sequences ``segments`` (local offset, local length) of rows of ``t`` positions."""
    for start, m in segments:
        half = m // 2
        for offset, chunk in ((0, rank), (half, 2 * cp - 1 - rank)):
            earlier = [chunk_keys(cp, t, start, m, c) for c in range(chunk)]
            yield (start + offset, half, chunk_keys(cp, t, start, m, chunk),
                   torch.cat(earlier) if earlier else None)


class ContextParallelCausalAttention(torch.autograd.Function):
    """See the module docstring. ``forward(q, k, v, cp, rank, segments, scale)`` -> ``[b, np, t, hn]``."""

    @staticmethod
    def forward(ctx, q, k, v, cp: int, rank: int, segments: list[tuple[int, int]], scale: float):
        t = q.shape[2]
        out = torch.empty_like(q)  # [b, np, t, hn], laid out as q
        lse = q.new_empty((q.shape[0], q.shape[1], t), dtype=torch.float32)  # [b, np, t]
        for start, n, own, earlier in query_blocks(cp, rank, t, segments):
            query = q[:, :, start:start + n]
            o, m = _flash(query, k[:, :, own], v[:, :, own], 0.0, True, scale=scale)
            if earlier is not None:
                o2, m2 = _flash(query, k[:, :, earlier], v[:, :, earlier], 0.0, False, scale=scale)
                merged = torch.logaddexp(m, m2)  # [b, np, n]
                o = (o.float() * torch.exp(m - merged)[..., None] + o2.float() * torch.exp(m2 - merged)[..., None])
                m = merged
            out[:, :, start:start + n] = o
            lse[:, :, start:start + n] = m
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = (cp, rank, segments, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        cp, rank, segments, scale = ctx.plan
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        for start, n, own, earlier in query_blocks(cp, rank, q.shape[2], segments):
            rows = slice(start, start + n)
            for keys, causal in ((own, True), (earlier, False)):
                if keys is None:
                    continue
                dq_b, dk_b, dv_b = _flash_backward(grad_out[:, :, rows], q[:, :, rows], k[:, :, keys],
                                                   v[:, :, keys], out[:, :, rows], lse[:, :, rows], 0.0, causal,
                                                   scale=scale)
                dq[:, :, rows] += dq_b
                dk.index_add_(2, keys, dk_b.float())
                dv.index_add_(2, keys, dv_b.float())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
