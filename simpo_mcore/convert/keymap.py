"""The HF Llama <-> megatron-core checkpoint key map, declaratively, and the two packings.

Megatron checkpoint keys are layout independent: per-layer tensors are stacked on a leading layer
axis (``decoder.layers.<name>`` of global shape ``[num_layers, ...]``), tensor-parallel shards
are slices of the full tensor, and the vocabulary rows are stored unpadded (the embedding and the
output layer load with ``allow_shape_mismatch``). Norm keys use the Transformer Engine names
(``linear_qkv.layer_norm_weight``); the local spec maps its separate norm modules onto them.

Packing (``packing`` column):
* ``qkv``: per query group g, rows ``[q heads of g; k_g; v_g]`` (HF q/k already use the
  rotate-half RoPE layout megatron expects, so no permutation).
* ``gate_up``: ``linear_fc1 = [gate; up]``; megatron's checkpoint factory re-slices it per TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simpo_mcore.model.hf_config import LlamaArch


@dataclass(frozen=True)
class LayerTensor:
    mcore: str
    """Key under ``decoder.layers.`` in the megatron checkpoint."""
    hf: tuple[str, ...]
    """Names under ``model.layers.{i}.`` in the HF checkpoint (several when packed)."""
    packing: str | None = None


LAYER_TENSORS = (
    LayerTensor("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
    LayerTensor("self_attention.linear_qkv.weight",
                ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    LayerTensor("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    LayerTensor("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
    LayerTensor("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    LayerTensor("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
)

EMBEDDING = ("embedding.word_embeddings.weight", "model.embed_tokens.weight")
FINAL_NORM = ("decoder.final_layernorm.weight", "model.norm.weight")
OUTPUT_LAYER = ("output_layer.weight", "lm_head.weight")
VOCAB_KEYS = (EMBEDDING[0], OUTPUT_LAYER[0])
"""Megatron keys whose first axis is the (padded) vocabulary."""

# Buffers some older HF checkpoints carry; they hold no learned state.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def layer_key(name: str) -> str:
    return f"decoder.layers.{name}"


def hf_layer_key(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def global_tensors(arch: LlamaArch) -> list[tuple[str, str]]:
    """(megatron key, HF name) of the tensors outside the layer stack."""
    pairs = [EMBEDDING, FINAL_NORM]
    if not arch.tie_word_embeddings:
        pairs.append(OUTPUT_LAYER)
    return pairs


def expected_hf_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint of ``arch`` must hold, with its shape."""
    h, f, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        for name, shape in per_layer.items():
            shapes[hf_layer_key(i, name)] = shape
    return shapes


def expected_mcore_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model tensors in a megatron checkpoint of ``arch`` (vocab unpadded)."""
    h, f, d, n = arch.hidden_size, arch.intermediate_size, arch.head_dim, arch.num_layers
    qkv = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * d
    shapes = {
        layer_key("self_attention.linear_qkv.layer_norm_weight"): (n, h),
        layer_key("self_attention.linear_qkv.weight"): (n, qkv, h),
        layer_key("self_attention.linear_proj.weight"): (n, h, arch.num_attention_heads * d),
        layer_key("mlp.linear_fc1.layer_norm_weight"): (n, h),
        layer_key("mlp.linear_fc1.weight"): (n, 2 * f, h),
        layer_key("mlp.linear_fc2.weight"): (n, h, f),
        EMBEDDING[0]: (arch.vocab_size, h),
        FINAL_NORM[0]: (h,),
    }
    if not arch.tie_word_embeddings:
        shapes[OUTPUT_LAYER[0]] = (arch.vocab_size, h)
    return shapes


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: LlamaArch) -> torch.Tensor:
    """HF q/k/v projections -> megatron's grouped ``linear_qkv`` weight."""
    g, d, hidden = arch.num_key_value_heads, arch.head_dim, q.shape[1]
    per_group = arch.num_attention_heads // g
    q = q.view(g, per_group * d, hidden)  # [groups, heads_per_group * head_dim, hidden]
    k = k.view(g, d, hidden)  # [groups, head_dim, hidden]
    v = v.view(g, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)  # [groups * (hpg + 2) * head_dim, hidden]


def unpack_qkv(qkv: torch.Tensor, arch: LlamaArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_qkv`."""
    g, d, hidden = arch.num_key_value_heads, arch.head_dim, qkv.shape[1]
    per_group = arch.num_attention_heads // g
    grouped = qkv.view(g, (per_group + 2) * d, hidden)  # [groups, (hpg + 2) * head_dim, hidden]
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (q.reshape(-1, hidden).contiguous(), k.reshape(-1, hidden).contiguous(),
            v.reshape(-1, hidden).contiguous())


def pack(tensors: list[torch.Tensor], packing: str | None, arch: LlamaArch) -> torch.Tensor:
    if packing is None:
        return tensors[0]
    if packing == "qkv":
        return pack_qkv(*tensors, arch)
    if packing == "gate_up":
        return torch.cat(tensors, dim=0)
    raise ValueError(packing)


def unpack(tensor: torch.Tensor, packing: str | None, arch: LlamaArch) -> list[torch.Tensor]:
    if packing is None:
        return [tensor]
    if packing == "qkv":
        return list(unpack_qkv(tensor, arch))
    if packing == "gate_up":
        return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]
    raise ValueError(packing)
