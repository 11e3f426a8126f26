"""Layer specs: which classes make up a decoder layer (Transformer Engine, local, local + SDPA).

``ModuleSpec`` separates *which* modules are used from how megatron wires them, so the three
choices differ only here:

* ``te``    Transformer Engine: RMSNorm fused into the QKV / FC1 projections, fused attention,
            FP8-capable linears. The default on a GPU when TE imports.
* ``sdpa``  megatron's local tensor-parallel linears, :class:`RMSNorm` below and
            :class:`SDPAttention` (``torch.nn.functional.scaled_dot_product_attention``: flash /
            cuDNN / memory-efficient kernels on a GPU). The default without TE and on CPU.
* ``local`` megatron's unfused ``DotProductAttention`` (materialises [b, np, s, s] scores; on an
            H200 at seq 2048 it ran 2.4x slower than HF and needed 80 GiB). Comparisons only.

All three produce the same checkpoint keys: the local layer spec maps ``input_layernorm.`` to
``self_attention.linear_qkv.layer_norm_`` (the TE name) in its sharded state dict.

The families' additions (see :class:`simpo_mcore.model.hf_config.ModelArch`) reach the layers through
:class:`ExtendedTransformerConfig`: sliding windows (megatron's ``window_size`` /
``window_attn_skip_freq``: TE takes them natively, :class:`SDPAttention` builds the banded mask), attention
soft-capping (TE's ``softcap``; computed explicitly by :func:`softcapped_attention` otherwise), q / k norms
(megatron's ``qk_layernorm``), ``(1 + weight)`` norms (``layernorm_zero_centered_gamma``) and Gemma-2's norms
after the attention and MLP projections (:func:`with_post_norm`).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from simpo_mcore.data.context_parallel import chunk_positions
from simpo_mcore.model.cp_attention import ContextParallelCausalAttention
from simpo_mcore.model.moe import moe_mlp

SPECS = ("te", "sdpa", "local")


def te_available() -> bool:
    """Transformer Engine imports (it needs a GPU driver to do so)."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return bool(HAVE_TE)


def te_softcap_available() -> bool:
    """Transformer Engine's ``DotProductAttention`` takes ``softcap`` (attention logit soft-capping)."""
    try:
        import transformer_engine.pytorch as te
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return "softcap" in inspect.signature(te.DotProductAttention.__init__).parameters


def resolve_spec(spec: str, cuda: bool, attn_softcap: bool = False) -> str:
    """``auto`` -> ``te`` on a GPU with TE (that soft-caps attention scores, when the model needs it), else
    ``sdpa``. An explicit ``te`` without TE, or without the soft-capping the model needs, is an error."""
    if spec == "auto":
        usable = cuda and te_available() and (not attn_softcap or te_softcap_available())
        return "te" if usable else "sdpa"
    if spec == "te" and not (cuda and te_available()):
        raise RuntimeError(
            "model.spec: te needs Transformer Engine and a GPU "
            f"(GPU used: {cuda}, TE importable: {te_available()}); use model.spec: sdpa")
    if spec == "te" and attn_softcap and not te_softcap_available():
        raise ValueError(_NO_TE_SOFTCAP)
    if spec not in SPECS:
        raise ValueError(f"model.spec must be one of auto, {', '.join(SPECS)}; got {spec!r}")
    return spec


_NO_TE_SOFTCAP = ("model.spec: te cannot run this model: its attention soft-capping (attn_logit_softcapping) "
                  "needs Transformer Engine's DotProductAttention(softcap=), which this TE build lacks; "
                  "use model.spec: sdpa")


@dataclass
class ExtendedTransformerConfig(TransformerConfig):
    """megatron-core's ``TransformerConfig`` plus the model features it has no field for (0.19); the layer
    specs, the model and the log-prob head read them from here."""

    attn_logit_softcapping: float | None = None
    """Attention scores ``s -> c * tanh(s / c)`` after scaling, before the mask and softmax; None: off."""

    final_logit_softcapping: float | None = None
    """Output logits ``z -> c * tanh(z / c)`` before the softmax (the model's logits and the log-prob head)."""

    embedding_multiplier: float | None = None
    """Embeddings multiplied by this (rounded to their dtype first, as HF Gemma does); None: not scaled."""

    sandwich_norms: bool = False
    """An RMSNorm on the output of the attention projection and of the MLP, before each residual add."""

    moe_norm_topk_prob: bool = False
    """MoE routing (:class:`simpo_mcore.model.moe.HFTopKRouter`): the top-k weights renormalised to sum to 1."""

    moe_route_weights_fp32: bool = False
    """MoE routing: the top-k weights stay fp32 (Mixtral) instead of being rounded to the logits' dtype."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = getattr(self, name)
            if cap is not None and not (math.isfinite(cap) and cap > 0):
                raise ValueError(f"{name} must be a positive finite number or None, got {cap}")


class RMSNorm(torch.nn.Module):
    """RMSNorm computed exactly as HF computes it on a CPU: fp32 statistics, then Llama's
    ``weight * x_normed.to(dtype)`` or, with ``config.layernorm_zero_centered_gamma``, Gemma's
    ``(x_normed * (1 + weight)).to(dtype)`` with ``1 + weight`` in fp32.

    On a GPU it calls ``torch.nn.functional.rms_norm`` (one fused kernel each way, fp32 inside,
    nothing saved but the input and the inverse RMS) instead of HF's seven elementwise kernels and
    saved fp32 copy of the input: 33 norms of the 1B model's step. That result is rounded once where
    HF's Llama norm is rounded twice (before and after the weight multiply), a difference below bf16's
    resolution. The zero-centred form runs it on an fp32 copy with an fp32 ``1 + weight``, one rounding
    at the end as HF's Gemma norm.

    Its weight is marked ``sequence_parallel`` under sequence parallelism so that megatron's
    ``finalize_model_grads`` all-reduces the partial gradients each TP rank computes on its
    sequence shard (torch's own norms are refused by megatron under SP for that reason).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_centered:
            gamma = 1.0 + self.weight.float()
            if x.is_cuda:
                return F.rms_norm(x.float(), (x.shape[-1],), gamma, self.eps).to(x.dtype)
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * gamma).to(x.dtype)
        if x.is_cuda and x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def visible_keys(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[..., sq, sk]`` bool: whether query i may attend to key j, from their positions in their sequence.

    Causal (``k <= q``) and, with a sliding ``window`` of W tokens, ``q - k < W`` (the query and the W - 1
    keys before it: HF's ``sliding_window`` and megatron / TE's ``window_size = (W - 1, 0)``). Positions
    are ``[s]`` or ``[b, s]``; rows packed into one sequence compose by and-ing a same-sequence mask.
    """
    distance = q_positions[..., :, None] - k_positions[..., None, :]  # [..., sq, sk]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    return visible


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                         softcap: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention with tanh soft-capped scores, in HF Gemma-2's (eager) order of operations.

    ``q [b, np, s, hn]``, ``k, v [b, ng, s, hn]`` (query heads of group g are ``g * np/ng ...``), ``visible``
    broadcastable to ``[b, np, s, s]``. Materialises the ``[b, np, s, s]`` scores: no fused kernel of torch
    takes a score modification without compilation.
    """
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:
        k = k.repeat_interleave(repeat, dim=1)  # [b, np, s, hn]
        v = v.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [b, np, sq, sk]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)  # [b, np, sq, hn]


class SDPAttention(MegatronModule):
    """Causal core attention through ``F.scaled_dot_product_attention`` with native GQA.

    Same interface as megatron's ``DotProductAttention``: inputs ``[s, b, heads/tp, head_dim]``,
    output ``[s, b, heads/tp * head_dim]``. Sequences are right-padded, so the causal mask alone
    keeps padding from touching real tokens. Full causal attention builds no ``[s, s]`` mask; a
    sliding-window layer (``config.window_size`` on the layers ``window_attn_skip_freq`` selects,
    decided as megatron decides it) passes the banded mask of :func:`visible_keys`, and attention
    logit soft-capping runs :func:`softcapped_attention`.

    Packed rows (``packed_seq_params`` with ``qkv_format="thd"``: inputs ``[t, heads/tp, head_dim]``, the
    sequences of a row end to end) are attended one segment at a time, each causal on its own, so no token
    sees another sequence: on a CPU this ran 14x faster than one call with a block-diagonal causal mask over
    a real 8k-token row of 22 sequences (``benchmarks/bench_varlen_attention.py``, docs/packing.md), and
    torch's ``flex_attention`` has no CPU backward. Windows and soft-capping compose with it: :meth:`_attend`
    sees one sequence at a time, its positions from 0.

    Context parallelism (``config.context_parallel_size`` > 1): this rank holds two chunks of every sequence
    (:mod:`simpo_mcore.data.context_parallel`: chunks r and 2cp - 1 - r). Keys and values are all-gathered over the
    CP group (``gather_from_sequence_parallel_region``, whose backward reduce-scatters: each key's gradient sums
    the contributions of every rank's queries), and the causal mask, the window and the soft-capping are applied
    on each token's position in its sequence, so a chunk boundary changes nothing. Packed rows are split per
    sequence (their segments are ``cu_seqlens_q_padded``), each attended as above. Plain causal attention on a CPU
    makes no mask at all (:mod:`~simpo_mcore.model.cp_attention`: by blocks, merged by their log-sum-exps); a
    window or soft-capped scores take a ``[s / cp, s]`` mask per sequence. Memory: the whole sequence's keys and
    values on every rank, as TE's ``all_gather`` exchange holds them.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None, **_):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal attention only, got {attn_mask_type}")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = getattr(pg_collection, "cp", None)
            if self.cp_group is None or self.cp_group.size() != config.context_parallel_size:
                raise ValueError(f"context_parallel_size is {config.context_parallel_size} but the attention's "
                                 "context-parallel group is missing or of another size")
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = None  # tokens visible to a query, itself included
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            left, right = config.window_size
            if right != 0 or left < 0:
                raise ValueError(f"SDPAttention supports causal windows (W - 1, 0) only, got {config.window_size}")
            self.window = left + 1
        self.softcap = getattr(config, "attn_logit_softcapping", None)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_):
        if attention_bias is not None:
            raise ValueError("SDPAttention takes no attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        s, b = query.shape[0], query.shape[1]
        q = query.permute(1, 2, 0, 3)  # [b, np, s, hn]
        if self.cp_group is not None:
            key, value = self._gather_cp(key), self._gather_cp(value)  # [cp * s, b, ng, hn], rank-major
        k = key.permute(1, 2, 0, 3)  # [b, ng, s (x cp), hn]
        v = value.permute(1, 2, 0, 3)  # [b, ng, s (x cp), hn]
        out = self._attend(q, k, v) if self.cp_group is None else self._attend_cp(q, k, v, [(0, s)])  # [b, np, s, hn]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, np * hn]

    def _packed(self, query, key, value, params):
        """One packed row: ``[t, heads, hn]`` inputs (megatron drops the batch dimension of ``thd``), each
        segment attended on its own (the padded segments when the row has them). Returns ``[t, np * hn]``."""
        if params.qkv_format != "thd":
            raise ValueError(f"SDPAttention takes packed rows as qkv_format='thd', got {params.qkv_format!r}")
        seqlens = _host_seqlens(params)
        cp = 1 if self.cp_group is None else self.cp_group.size()
        local = [n // cp for n in seqlens]
        t = query.shape[0]
        if sum(local) != t:
            raise ValueError(f"packed segments cover {sum(local)} positions of this rank; its row has {t}")
        q = query.permute(1, 0, 2).unsqueeze(0)  # [1, np, t, hn]
        if cp > 1:
            key, value = self._gather_cp(key), self._gather_cp(value)  # [cp * t, ng, hn], rank-major
        k = key.permute(1, 0, 2).unsqueeze(0)  # [1, ng, t (x cp), hn]
        v = value.permute(1, 0, 2).unsqueeze(0)  # [1, ng, t (x cp), hn]
        starts = [sum(local[:i]) for i in range(len(local))]
        if cp > 1:
            out = self._attend_cp(q, k, v, [(start, m) for start, m in zip(starts, local) if m])  # [1, np, t, hn]
        else:
            out = torch.cat([self._attend(q[:, :, a:a + m], k[:, :, a:a + m], v[:, :, a:a + m])
                             for a, m in zip(starts, local) if m], dim=2)  # [1, np, t, hn]
        return out[0].permute(1, 0, 2).reshape(t, -1)  # [t, np * hn]

    def _attend_cp(self, q, k, v, segments: list[tuple[int, int]]) -> torch.Tensor:
        """Under context parallelism: this rank's ``[b, np, t, hn]`` queries, whose sequences sit at ``segments``
        (local offset, local length), over the keys and values of every rank's rows ``[b, ng, cp x t, hn]``.
        Plain causal attention on a CPU runs by blocks with no mask (:mod:`~simpo_mcore.model.cp_attention`); a
        window or soft-capped scores (or a GPU without TE) take each sequence's mask from the positions."""
        cp, rank, t = self.cp_group.size(), self.cp_group.rank(), q.shape[2]
        dropout = self.dropout if self.training else 0.0
        if self.window is None and self.softcap is None and not dropout and q.device.type == "cpu":
            return ContextParallelCausalAttention.apply(q, k, v, cp, rank, segments, self.softmax_scale)
        outs = []
        for start, m in segments:  # this sequence's keys: m positions at the same offset of every rank's row
            keys = torch.cat([torch.arange(r * t + start, r * t + start + m) for r in range(cp)]).to(q.device)
            outs.append(self._attend(q[:, :, start:start + m], k.index_select(2, keys), v.index_select(2, keys),
                                     *self._cp_positions(m * cp, q.device)))
        return torch.cat(outs, dim=2)  # [b, np, t, hn]

    def _gather_cp(self, x: torch.Tensor) -> torch.Tensor:
        """Every CP rank's ``x`` stacked along dim 0 (rank-major); the backward reduce-scatters the gradient."""
        return gather_from_sequence_parallel_region(x, group=self.cp_group)

    def _cp_positions(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query positions [length / cp], key positions [length])`` of a sequence of ``length`` under CP: this
        rank's chunks, and every rank's in the rank-major order of :meth:`_gather_cp`."""
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        keys = torch.cat([chunk_positions(length, cp, r) for r in range(cp)])  # [length]
        return chunk_positions(length, cp, rank).to(device), keys.to(device)

    def _attend(self, q, k, v, q_positions=None, k_positions=None):
        """Attention of ``[b, np, sq, hn]`` queries over ``[b, ng, sk, hn]`` keys / values of the same sequences:
        causal, within the layer's sliding window, scores soft-capped when the model's are. Positions in the
        sequence: ``q_positions [sq]`` and ``k_positions [sk]`` (any order), or ``None`` for both 0..s-1."""
        dropout = self.dropout if self.training else 0.0
        if q_positions is None:
            if self.window is None and self.softcap is None:
                return F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=self.softmax_scale, dropout_p=dropout,
                    enable_gqa=self.heads != self.groups)  # [b, np, s, hn]
            q_positions = k_positions = torch.arange(q.shape[2], device=q.device)
        # Never empty: every query sees its own key.
        visible = visible_keys(q_positions, k_positions, self.window)  # [sq, sk]
        if self.softcap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=visible, scale=self.softmax_scale, dropout_p=dropout,
                enable_gqa=self.heads != self.groups)  # [b, np, sq, hn]
        return softcapped_attention(q, k, v, visible, self.softmax_scale, self.softcap, dropout)


def _host_seqlens(params) -> list[int]:
    """A packed row's segment lengths (the padded ones when it has them), from the host copy the caller gave
    (:class:`simpo_mcore.model.forward.PackedRow`) without a device read, else from the device."""
    if params.cu_seqlens_q_padded is not None:
        cu = params.cu_seqlens_q_padded
        return list(getattr(params, "padded_seqlens", ())) or (cu[1:] - cu[:-1]).tolist()
    cu = params.cu_seqlens_q
    return list(getattr(params, "seqlens", ())) or (cu[1:] - cu[:-1]).tolist()


@functools.cache
def with_post_norm(linear_cls: type, norm_cls: type) -> type:
    """``linear_cls`` (a row-parallel linear: the attention or MLP output projection) followed by an RMSNorm
    of its output, held as the submodule ``post_norm``: Gemma-2's post-attention / post-feed-forward norms,
    which megatron's layer (input and pre-MLP norms only) has no place for. Under sequence parallelism the
    output is this rank's sequence shard, which the norm's ``sequence_parallel`` weight accounts for."""

    class PostNormed(linear_cls):
        def __init__(self, input_size, output_size, *args, config, **kwargs):
            super().__init__(input_size, output_size, *args, config=config, **kwargs)
            self.post_norm = norm_cls(config=config, hidden_size=output_size, eps=config.layernorm_epsilon)

        def forward(self, *args, **kwargs):
            output, bias = super().forward(*args, **kwargs)
            if bias is not None:
                raise ValueError("a post-normed projection must have no bias (add_bias_linear=False)")
            return self.post_norm(output), None

    PostNormed.__name__ = PostNormed.__qualname__ = f"PostNormed{linear_cls.__name__}"
    return PostNormed


def te_core_attention(config: TransformerConfig) -> type:
    """Transformer Engine's core attention for ``config``: megatron's ``TEDotProductAttention`` (which
    passes ``window_size`` to TE on the layers that slide), and with attention soft-capping a subclass that
    also passes TE ``DotProductAttention(softcap=)``. TE builds without that argument are refused: the
    cap would be dropped. (Wired as TE documents it; not yet measured on a GPU.)

    Context parallelism needs nothing here: with ``config.context_parallel_size`` > 1 megatron's class hands TE
    the CP group, its global ranks, a CUDA stream of its own and ``config.cp_comm_type`` (the layer passes it;
    ``a2a+p2p`` takes megatron's hierarchical CP groups instead), and TE exchanges keys and values itself.
    (Not yet measured on a GPU.) What TE's CP attention cannot do is refused here, by name: soft-capped scores
    (its CP functions take no cap) and sliding windows over the ``p2p`` / ``a2a+p2p`` exchanges."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    _check_te_context_parallel(config)
    if getattr(config, "attn_logit_softcapping", None) is None:
        return TEDotProductAttention
    if not te_softcap_available():
        raise ValueError(_NO_TE_SOFTCAP)
    return _softcap_te_attention()


def _check_te_context_parallel(config: TransformerConfig) -> None:
    if config.context_parallel_size == 1:
        return
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("model.spec: te cannot soft-cap attention scores (attn_logit_softcapping) under "
                         "parallel.cp > 1: Transformer Engine's context-parallel attention takes no cap; use "
                         "model.spec: sdpa")
    if config.window_size is not None and config.cp_comm_type not in ("a2a", "all_gather"):
        raise ValueError(f"model.spec: te runs sliding-window attention under parallel.cp > 1 only with "
                         f"parallel.cp_comm_type a2a or all_gather (Transformer Engine's), not {config.cp_comm_type}")
    # The all-to-all exchanges give each rank whole heads of the whole sequence.
    a2a = {"a2a": config.context_parallel_size, "a2a+p2p": (config.hierarchical_context_parallel_sizes or [1])[0]}
    ranks = a2a.get(config.cp_comm_type, 1)
    groups = config.num_query_groups // config.tensor_model_parallel_size
    if groups % ranks:
        raise ValueError(f"parallel.cp_comm_type: {config.cp_comm_type} spreads heads over {ranks} ranks, but each "
                         f"tensor-parallel rank holds {groups} key / value heads; use p2p or all_gather")


@functools.cache
def _softcap_te_attention() -> type:
    import transformer_engine.pytorch as te
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class _PassSoftcap(te.DotProductAttention):
        # Sits between megatron's TEDotProductAttention and TE's class in the MRO: megatron's __init__
        # sets self.config, then calls this with its own keyword arguments, to which the cap is added.
        def __init__(self, *args, **kwargs):
            super().__init__(*args, softcap=self.config.attn_logit_softcapping, **kwargs)

    class SoftcapTEDotProductAttention(TEDotProductAttention, _PassSoftcap):
        """megatron's TE core attention with TE's tanh soft-capping of the attention scores."""

    return SoftcapTEDotProductAttention


def layer_spec(spec: str, config: TransformerConfig, moe: bool = False) -> ModuleSpec:
    """One decoder layer for ``spec``: a dense MLP, or with ``moe`` megatron's ``MoELayer``
    (:func:`simpo_mcore.model.moe.moe_mlp`) after a pre-MLP norm of its own.

    What the family needs beyond Llama's layer comes from ``config``: per-head q / k norms
    (``qk_layernorm``), norms after the attention and MLP projections (``sandwich_norms``), attention
    soft-capping and sliding windows (read by the core attention itself).
    """
    softcap = getattr(config, "attn_logit_softcapping", None)
    experts = config.num_moe_experts if moe else None
    if spec == "te":
        from megatron.core.extensions.transformer_engine import TENorm, TERowParallelLinear
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer = get_gpt_layer_with_transformer_engine_spec(num_experts=experts,
                                                           moe_grouped_gemm=moe and config.moe_grouped_gemm,
                                                           qk_layernorm=config.qk_layernorm)
        layer.submodules.self_attention.submodules.core_attention = te_core_attention(config)
        norm, row_linear = TENorm, TERowParallelLinear
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.tensor_parallel import RowParallelLinear

        if spec == "local" and softcap is not None:
            raise ValueError("model.spec: local has no attention soft-capping (this model needs it); use sdpa")
        if spec == "local" and config.context_parallel_size > 1:
            raise ValueError("model.spec: local has no context parallelism (megatron's DotProductAttention refuses "
                             "parallel.cp > 1); use sdpa or te")
        layer = get_gpt_layer_local_spec(num_experts=experts, normalization="RMSNorm",
                                         qk_layernorm=config.qk_layernorm)
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
        attention = layer.submodules.self_attention.submodules
        if config.qk_layernorm:
            attention.q_layernorm = attention.k_layernorm = RMSNorm
        if spec == "sdpa":
            attention.core_attention = SDPAttention
        if moe:  # the pre-MLP norm keeps its own name, as in the TE spec (no linear_fc1 to fuse it into)
            layer.submodules.sharded_state_dict_keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        norm, row_linear = RMSNorm, RowParallelLinear
    if moe:
        layer.submodules.mlp = moe_mlp(spec, config.num_moe_experts, grouped=config.moe_grouped_gemm)
    if getattr(config, "sandwich_norms", False):
        post_normed = with_post_norm(row_linear, norm)
        layer.submodules.self_attention.submodules.linear_proj = post_normed
        mlp = layer.submodules.mlp  # partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(...))
        submodules = replace(mlp.keywords["submodules"], linear_fc2=post_normed)
        layer.submodules.mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": submodules})
    return layer


def moe_layer_pattern(config: TransformerConfig) -> list[bool]:
    """Per global layer: whether it is an MoE layer (megatron's ``moe_layer_freq``: 1 = every layer, a list of
    0 / 1 per layer)."""
    if not config.num_moe_experts:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    return [bool(x) for x in freq]


def block_spec(spec: str, config: TransformerConfig, vp_stage: int | None = None,
               pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """The decoder block submodules for ``spec`` on this pipeline stage: each layer dense or MoE as
    :func:`moe_layer_pattern` says."""
    pattern = moe_layer_pattern(config)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    built = {moe: layer_spec(spec, config, moe) for moe in set(pattern[offset:offset + n])}
    if spec == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[built[pattern[offset + i]] for i in range(n)], layer_norm=norm)


__all__ = ["ExtendedTransformerConfig", "RMSNorm", "SDPAttention", "block_spec", "layer_spec", "moe_layer_pattern",
           "resolve_spec", "softcapped_attention", "te_available", "visible_keys", "with_post_norm", "ModuleSpec"]
