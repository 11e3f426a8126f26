"""Layer specs: which classes make up a Llama layer (Transformer Engine, local, local + SDPA).

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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

SPECS = ("te", "sdpa", "local")


def te_available() -> bool:
    """Transformer Engine imports (it needs a GPU driver to do so)."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return bool(HAVE_TE)


def resolve_spec(spec: str, cuda: bool) -> str:
    """``auto`` -> ``te`` on a GPU with TE, else ``sdpa``. An explicit ``te`` without TE is an error."""
    if spec == "auto":
        return "te" if cuda and te_available() else "sdpa"
    if spec == "te" and not (cuda and te_available()):
        raise RuntimeError(
            "model.spec: te needs Transformer Engine and a GPU "
            f"(GPU used: {cuda}, TE importable: {te_available()}); use model.spec: sdpa")
    if spec not in SPECS:
        raise ValueError(f"model.spec must be one of auto, {', '.join(SPECS)}; got {spec!r}")
    return spec


class RMSNorm(torch.nn.Module):
    """Llama's RMSNorm, computed exactly as HF ``LlamaRMSNorm`` does (fp32 statistics, cast back
    to the input dtype *before* the weight multiply) on a CPU.

    On a GPU it calls ``torch.nn.functional.rms_norm`` (one fused kernel each way, fp32 inside,
    nothing saved but the input and the inverse RMS) instead of HF's seven elementwise kernels and
    saved fp32 copy of the input: 33 norms of the 1B model's step. That result is rounded once where
    HF's is rounded twice (before and after the weight multiply), a difference below bf16's resolution.

    Its weight is marked ``sequence_parallel`` under sequence parallelism so that megatron's
    ``finalize_model_grads`` all-reduces the partial gradients each TP rank computes on its
    sequence shard (torch's own norms are refused by megatron under SP for that reason).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SDPAttention(MegatronModule):
    """Causal core attention through ``F.scaled_dot_product_attention`` with native GQA.

    Same interface as megatron's ``DotProductAttention``: inputs ``[s, b, heads/tp, head_dim]``,
    output ``[s, b, heads/tp * head_dim]``. Sequences are right-padded, so the causal mask alone
    keeps padding from touching real tokens and no [s, s] mask is ever built.

    Packed rows (``packed_seq_params`` with ``qkv_format="thd"``: inputs ``[t, heads/tp, head_dim]``, the
    sequences of a row end to end) are attended one segment at a time, each causal on its own, so no token
    sees another sequence: on a CPU this ran 14x faster than one call with a block-diagonal causal mask over
    a real 8k-token row of 22 sequences (``benchmarks/bench_varlen_attention.py``, docs/packing.md), and
    torch's ``flex_attention`` has no CPU backward. A per-sequence mask (a sliding window, from positions within the
    segment) composes with it: :meth:`_attend` sees one sequence at a time.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None, **_):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal attention only, got {attn_mask_type}")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_):
        if attention_bias is not None:
            raise ValueError("SDPAttention takes no attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        s, b = query.shape[0], query.shape[1]
        q = query.permute(1, 2, 0, 3)  # [b, np, s, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, s, hn]
        v = value.permute(1, 2, 0, 3)  # [b, ng, s, hn]
        out = self._attend(q, k, v)  # [b, np, s, hn]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, np * hn]

    def _packed(self, query, key, value, params):
        """One packed row: ``[t, heads, hn]`` inputs (megatron drops the batch dimension of ``thd``), each
        segment of ``cu_seqlens`` attended on its own. Returns ``[t, np * hn]``."""
        if params.qkv_format != "thd" or params.cu_seqlens_q_padded is not None:
            raise ValueError("SDPAttention takes packed rows as qkv_format='thd' without padded cu_seqlens")
        # The host copy when the caller gave one (simpo_mcore.model.forward.PackedRow): no device read.
        seqlens = getattr(params, "seqlens", None) or (params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).tolist()
        if sum(seqlens) != query.shape[0]:
            raise ValueError(f"packed segments cover {sum(seqlens)} positions; the row has {query.shape[0]}")
        q = query.permute(1, 0, 2).unsqueeze(0)  # [1, np, t, hn]
        k = key.permute(1, 0, 2).unsqueeze(0)  # [1, ng, t, hn]
        v = value.permute(1, 0, 2).unsqueeze(0)  # [1, ng, t, hn]
        outs, start = [], 0
        for n in seqlens:
            outs.append(self._attend(q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n]))
            start += n
        out = torch.cat(outs, dim=2)  # [1, np, t, hn]
        return out[0].permute(1, 0, 2).reshape(query.shape[0], -1)  # [t, np * hn]

    def _attend(self, q, k, v):
        """Causal attention of ``[b, np, s, hn]`` queries over ``[b, ng, s, hn]`` keys / values of the same
        sequences (position 0 first)."""
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.heads != self.groups,
        )  # [b, np, s, hn]


def block_spec(spec: str, config: TransformerConfig, vp_stage: int | None = None,
               pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """The decoder block submodules for ``spec`` on this pipeline stage."""
    if spec == "te":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer = get_gpt_layer_with_transformer_engine_spec()
        final_norm = TENorm
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
        if spec == "sdpa":
            attention = layer.submodules.self_attention
            attention.submodules.core_attention = SDPAttention
        final_norm = RMSNorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)


__all__ = ["RMSNorm", "SDPAttention", "block_spec", "resolve_spec", "te_available", "ModuleSpec"]
