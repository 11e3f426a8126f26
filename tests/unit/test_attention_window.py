"""The SDPA / CPU path's sliding window and soft-capping against attention written out query by query.

The reference loops over queries in float64: query i attends to keys ``max(0, i - W + 1) .. i`` (HF's
``sliding_window`` W; megatron / TE ``window_size = (W - 1, 0)``), scores ``q . k * scale``, optionally
``c * tanh(score / c)``, softmax, times v; query head h reads key / value group ``h // (heads / groups)``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from simpo_mcore.model.specs import ExtendedTransformerConfig, RMSNorm, SDPAttention, visible_keys

HEADS, GROUPS, HEAD_DIM, WINDOW = 4, 2, 8, 4
ONE_RANK = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))


def config(window_layers=(1, 0), softcap=None, **kw) -> ExtendedTransformerConfig:
    """Two layers: the first slides (window WINDOW), the second attends fully."""
    return ExtendedTransformerConfig(
        num_layers=2, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=HEAD_DIM, window_size=(WINDOW - 1, 0), window_attn_skip_freq=list(window_layers),
        attn_logit_softcapping=softcap, attention_dropout=0.0, hidden_dropout=0.0, **kw)


def attention(cfg, layer_number: int, softmax_scale=None) -> SDPAttention:
    return SDPAttention(cfg, layer_number, AttnMaskType.causal, "self", softmax_scale=softmax_scale,
                        pg_collection=ONE_RANK)


def inputs(s: int, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, HEADS, HEAD_DIM, generator=g) * 2  # [s, b, np, hn]; scores of several units
    k = torch.randn(s, b, GROUPS, HEAD_DIM, generator=g) * 2  # [s, b, ng, hn]
    v = torch.randn(s, b, GROUPS, HEAD_DIM, generator=g)
    return q, k, v


def reference(q, k, v, window: int | None, scale: float, softcap: float | None = None) -> torch.Tensor:
    s, b = q.shape[:2]
    out = torch.zeros(s, b, HEADS, HEAD_DIM, dtype=torch.float64)
    per_group = HEADS // GROUPS
    for i in range(s):
        first = 0 if window is None else max(0, i - window + 1)
        for h in range(HEADS):
            g = h // per_group
            scores = torch.einsum("bd,jbd->bj", q[i, :, h].double(), k[first:i + 1, :, g].double()) * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            probs = scores.softmax(-1)  # [b, keys]
            out[i, :, h] = torch.einsum("bj,jbd->bd", probs, v[first:i + 1, :, g].double())
    return out.reshape(s, b, HEADS * HEAD_DIM)  # [s, b, np * hn]


def test_visible_keys_by_hand():
    """Window 3 over 5 positions: query i sees keys i-2 .. i; without a window, 0 .. i."""
    pos = torch.arange(5)
    assert visible_keys(pos, pos, 3).int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert torch.equal(visible_keys(pos, pos, None), torch.ones(5, 5, dtype=torch.bool).tril())
    # Per-sequence positions ([b, s]) give one mask per row, as rows packed into one sequence will need.
    assert visible_keys(torch.stack([pos, pos]), torch.stack([pos, pos]), 3).shape == (2, 5, 5)


@pytest.mark.parametrize("softcap", [None, 1.5], ids=["plain", "softcap"])
def test_sliding_and_full_layers_match_the_query_by_query_reference(softcap):
    """Layer 1 (window_attn_skip_freq 1) slides, layer 2 (0) does not, as megatron decides per layer; at
    sequence 12 > window 4 the two differ, so the window is really applied."""
    cfg = config(softcap=softcap)
    q, k, v = inputs(s=12)
    scale = 1 / math.sqrt(HEAD_DIM)
    sliding, full = attention(cfg, 1)(q, k, v, None), attention(cfg, 2)(q, k, v, None)
    assert sliding.shape == (12, 2, HEADS * HEAD_DIM)
    assert (sliding.double() - reference(q, k, v, WINDOW, scale, softcap)).abs().max() < 1e-6
    assert (full.double() - reference(q, k, v, None, scale, softcap)).abs().max() < 1e-6
    assert (sliding - full).abs().max() > 0.1


def test_softcap_and_scale_are_applied():
    """query_pre_attn_scalar's scale and the soft-cap each change the result (scores here reach ~10)."""
    q, k, v = inputs(s=6)
    capped = attention(config(softcap=1.5), 2, softmax_scale=0.2)(q, k, v, None)
    assert (capped.double() - reference(q, k, v, None, 0.2, 1.5)).abs().max() < 1e-6
    assert (capped.double() - reference(q, k, v, None, 0.2, None)).abs().max() > 0.05
    assert (capped.double() - reference(q, k, v, None, 1 / math.sqrt(HEAD_DIM), 1.5)).abs().max() > 0.05


@pytest.mark.parametrize("softcap", [None, 1.5], ids=["plain", "softcap"])
@pytest.mark.parametrize("s", [1, 3, WINDOW])
def test_within_the_window_equals_full_attention(s, softcap):
    """A sequence no longer than the window: the banded mask hides nothing, the sliding layer computes what
    the full layer computes (through its own masked path, not a shortcut)."""
    cfg = config(softcap=softcap)
    q, k, v = inputs(s=s, seed=s)
    sliding, full = attention(cfg, 1), attention(cfg, 2)
    assert sliding.window == WINDOW and full.window is None
    torch.testing.assert_close(sliding(q, k, v, None), full(q, k, v, None), rtol=0, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 1.5], ids=["plain", "softcap"])
@pytest.mark.parametrize("layer", [1, 2], ids=["sliding", "full"])
def test_a_context_parallel_rank_attends_from_positions(layer, softcap):
    """What a CP rank computes: its two chunks of a sequence as queries (rank 1 of 4 keeps chunks 1 and 6 of 8
    chunks of 3: positions 3-5 and 18-20 of 24), every position as a key in the rank-major order of the
    all-gather. The mask from the positions (a window of 4 reaching across chunk boundaries, soft-capped scores)
    must give exactly those rows of the whole sequence's attention."""
    from simpo_mcore.data.context_parallel import chunk_positions

    cfg = config(softcap=softcap)
    q, k, v = inputs(s=24, b=1, seed=3)
    mine = chunk_positions(24, 4, 1)  # [6]: 3, 4, 5, 18, 19, 20
    keys = torch.cat([chunk_positions(24, 4, r) for r in range(4)])  # [24]: every rank's, rank-major
    assert mine.tolist() == [3, 4, 5, 18, 19, 20]
    core = attention(cfg, layer)
    out = core._attend(q[mine].permute(1, 2, 0, 3), k[keys].permute(1, 2, 0, 3), v[keys].permute(1, 2, 0, 3),
                       mine, keys)  # [1, np, 6, hn]
    expected = reference(q, k, v, WINDOW if layer == 1 else None, 1 / math.sqrt(HEAD_DIM), softcap)[mine]
    assert (out.permute(2, 0, 1, 3).reshape(6, 1, -1).double() - expected).abs().max() < 1e-6


def test_every_layer_slides_without_a_pattern():
    """Mistral: window_size set, window_attn_skip_freq None -> every layer slides."""
    cfg = config(window_layers=(1, 1))
    cfg.window_attn_skip_freq = None
    assert attention(cfg, 1).window == attention(cfg, 2).window == WINDOW


def test_rmsnorm_matches_hf_llama_and_gemma_bit_for_bit():
    """Llama's ``weight * x_normed.to(dtype)`` and Gemma's ``(x_normed * (1 + weight)).to(dtype)``: HF's
    norms with the same weights give the same bits in fp32 and bf16."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(5, 3, 32, generator=g) * 3).to(dtype)
        w = torch.rand(32, generator=g) - 0.5
        for zero_centered, hf_norm in ((False, LlamaRMSNorm(32, eps=1e-6)), (True, Gemma2RMSNorm(32, eps=1e-6))):
            ours = RMSNorm(config(layernorm_zero_centered_gamma=zero_centered, params_dtype=dtype), 32, eps=1e-6)
            with torch.no_grad():
                ours.weight.copy_(w if zero_centered else w + 1)
                hf_norm.weight.copy_(w if zero_centered else w + 1)
            hf_norm.to(dtype)
            assert torch.equal(ours(x), hf_norm(x)), (dtype, zero_centered)
