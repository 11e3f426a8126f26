"""The context-parallel attention by blocks (``model/cp_attention.py``) against causal attention over the whole
sequences, written plainly: one ``scaled_dot_product_attention(is_causal=True)`` per whole sequence, its rows of
this rank's chunks taken, and autograd through it for the gradients.

A CP rank's queries are its two chunks of every sequence; its keys and values every rank's rows, gathered
rank-major. Padded rows (one sequence per row, several rows) and a packed row of sequences of different lengths
(each a multiple of 2 x cp), CP 2, 3 and 4, every rank, grouped-query heads (4 query heads over 2 key / value
heads): outputs and the gradients of the queries, keys and values within 1e-5 (fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simpo_mcore.data.context_parallel import chunk_positions
from simpo_mcore.model.cp_attention import ContextParallelCausalAttention

HEADS, GROUPS, HN = 4, 2, 8
SCALE = HN ** -0.5


def rank_order(lengths: list[int], cp: int, rank: int) -> list[tuple[int, int]]:
    """``(sequence, position)`` of each position of CP rank ``rank``'s row: its chunks of each sequence in turn."""
    return [(i, int(p)) for i, n in enumerate(lengths) for p in chunk_positions(n, cp, rank)]


def whole_attention(q, k, v, lengths):
    """Per sequence i, causal attention of ``q[i], k[i], v[i]`` ``[b, heads, n_i, hn]`` (the plain reference)."""
    return [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=SCALE, enable_gqa=True)
            for qi, ki, vi in zip(q, k, v)]


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("packed", [False, True])
def test_blocks_are_the_whole_sequences_causal_attention(cp, packed):
    g = torch.Generator().manual_seed(cp)
    # Packed: one row of three sequences; padded: three rows of one sequence each (the same length).
    lengths = [4 * cp, 2 * cp, 6 * cp] if packed else [6 * cp]
    b = 1 if packed else 3
    q = [torch.randn(b, HEADS, n, HN, generator=g, requires_grad=True) for n in lengths]
    k = [torch.randn(b, GROUPS, n, HN, generator=g, requires_grad=True) for n in lengths]
    v = [torch.randn(b, GROUPS, n, HN, generator=g, requires_grad=True) for n in lengths]
    whole = whole_attention(q, k, v, lengths)
    gathered = [x for r in range(cp) for x in rank_order(lengths, cp, r)]  # every rank's row, rank-major
    k_all = torch.stack([k[i][:, :, p] for i, p in gathered], dim=2).detach().requires_grad_()  # [b, ng, cp t, hn]
    v_all = torch.stack([v[i][:, :, p] for i, p in gathered], dim=2).detach().requires_grad_()
    locals_ = [n // cp for n in lengths]
    segments = [(sum(locals_[:i]), m) for i, m in enumerate(locals_)]
    for rank in range(cp):
        mine = rank_order(lengths, cp, rank)
        q_local = torch.stack([q[i][:, :, p] for i, p in mine], dim=2).detach().requires_grad_()  # [b, np, t, hn]
        out = ContextParallelCausalAttention.apply(q_local, k_all, v_all, cp, rank, segments, SCALE)
        expected = torch.stack([whole[i][:, :, p] for i, p in mine], dim=2)  # [b, np, t, hn]
        assert (out - expected).abs().max() <= 1e-5, (rank, (out - expected).abs().max())

        weight = torch.randn(out.shape, generator=g)
        for x in (*q, *k, *v):
            x.grad = None
        (expected * weight).sum().backward(retain_graph=True)
        (out * weight).sum().backward()
        want_q = torch.stack([q[i].grad[:, :, p] for i, p in mine], dim=2)
        want_k = torch.stack([k[i].grad[:, :, p] for i, p in gathered], dim=2)
        want_v = torch.stack([v[i].grad[:, :, p] for i, p in gathered], dim=2)
        assert (q_local.grad - want_q).abs().max() <= 1e-5, rank
        assert (k_all.grad - want_k).abs().max() <= 1e-5, rank
        assert (v_all.grad - want_v).abs().max() <= 1e-5, rank
        k_all.grad = v_all.grad = None
