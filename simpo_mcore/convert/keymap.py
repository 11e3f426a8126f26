"""The HF <-> megatron-core checkpoint key map, declaratively, and the two packings.

Megatron checkpoint keys are layout independent: per-layer tensors are stacked on a leading layer
axis (``decoder.layers.<name>`` of global shape ``[num_layers, ...]``), tensor-parallel shards
are slices of the full tensor, and the vocabulary rows are stored unpadded (the embedding and the
output layer load with ``allow_shape_mismatch``). Norm keys use the Transformer Engine names
(``linear_qkv.layer_norm_weight``); the local spec maps its separate norm modules onto them.

One table serves every family: an entry marked ``needs`` / ``unless`` a :class:`ModelArch` flag exists
only for the families that set / do not set it (Qwen2's q / k / v biases, Qwen3's per-head q / k norms,
Gemma-2's four norms per layer, of which HF's ``post_attention_layernorm`` is the norm *after* the
attention, not Llama's pre-MLP norm).

Packing (``packing`` column):
* ``qkv``: per query group g, rows ``[q heads of g; k_g; v_g]`` (HF q/k already use the
  rotate-half RoPE layout megatron expects, so no permutation); the same for the biases.
* ``gate_up``: ``linear_fc1 = [gate; up]``; megatron's checkpoint factory re-slices it per TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simpo_mcore.model.hf_config import ModelArch


@dataclass(frozen=True)
class LayerTensor:
    mcore: str
    """Key under ``decoder.layers.`` in the megatron checkpoint."""
    hf: tuple[str, ...]
    """Names under ``model.layers.{i}.`` in the HF checkpoint (several when packed)."""
    packing: str | None = None
    needs: str | None = None
    """A boolean :class:`ModelArch` field that must be true for this tensor to exist."""
    unless: str | None = None
    """A boolean :class:`ModelArch` field that must be false for this tensor to exist."""

    def applies_to(self, arch: ModelArch) -> bool:
        return (self.needs is None or getattr(arch, self.needs)) and \
            (self.unless is None or not getattr(arch, self.unless))


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LAYER_TENSORS = (
    LayerTensor("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
    LayerTensor("self_attention.linear_qkv.weight", tuple(f"{p}.weight" for p in _QKV), "qkv"),
    LayerTensor("self_attention.linear_qkv.bias", tuple(f"{p}.bias" for p in _QKV), "qkv", needs="qkv_bias"),
    LayerTensor("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), needs="qk_norm"),
    LayerTensor("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), needs="qk_norm"),
    LayerTensor("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    LayerTensor("self_attention.linear_proj.post_norm.weight", ("post_attention_layernorm.weight",),
                needs="sandwich_norms"),
    LayerTensor("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), unless="sandwich_norms"),
    LayerTensor("mlp.linear_fc1.layer_norm_weight", ("pre_feedforward_layernorm.weight",), needs="sandwich_norms"),
    LayerTensor("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    LayerTensor("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    LayerTensor("mlp.linear_fc2.post_norm.weight", ("post_feedforward_layernorm.weight",), needs="sandwich_norms"),
)

# Shapes of the HF per-layer tensors in symbols: h hidden, f ffn, d head_dim, q = heads x d, kv = kv heads x d.
_HF_SHAPES = {
    "weight": {"self_attn.q_proj": ("q", "h"), "self_attn.k_proj": ("kv", "h"), "self_attn.v_proj": ("kv", "h"),
               "self_attn.o_proj": ("h", "q"), "mlp.gate_proj": ("f", "h"), "mlp.up_proj": ("f", "h"),
               "mlp.down_proj": ("h", "f"), "self_attn.q_norm": ("d",), "self_attn.k_norm": ("d",)},
    "bias": {"self_attn.q_proj": ("q",), "self_attn.k_proj": ("kv",), "self_attn.v_proj": ("kv",)},
}

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


def layer_tensors(arch: ModelArch) -> list[LayerTensor]:
    """The per-layer entries of :data:`LAYER_TENSORS` that ``arch``'s family has."""
    return [t for t in LAYER_TENSORS if t.applies_to(arch)]


def global_tensors(arch: ModelArch) -> list[tuple[str, str]]:
    """(megatron key, HF name) of the tensors outside the layer stack."""
    pairs = [EMBEDDING, FINAL_NORM]
    if not arch.tie_word_embeddings:
        pairs.append(OUTPUT_LAYER)
    return pairs


def _hf_layer_shape(name: str, arch: ModelArch) -> tuple[int, ...]:
    d = arch.head_dim
    sizes = {"h": arch.hidden_size, "f": arch.intermediate_size, "d": d, "q": arch.num_attention_heads * d,
             "kv": arch.num_key_value_heads * d}
    module, kind = name.rsplit(".", 1)
    if module.endswith("layernorm"):  # the layer's norms over the hidden size
        return (arch.hidden_size,)
    return tuple(sizes[s] for s in _HF_SHAPES[kind][module])


def expected_hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint of ``arch`` must hold, with its shape."""
    h = arch.hidden_size
    per_layer = {name: _hf_layer_shape(name, arch) for t in layer_tensors(arch) for name in t.hf}
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        for name, shape in per_layer.items():
            shapes[hf_layer_key(i, name)] = shape
    return shapes


def expected_mcore_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model tensors in a megatron checkpoint of ``arch`` (vocab unpadded)."""
    h, n = arch.hidden_size, arch.num_layers
    shapes = {}
    for t in layer_tensors(arch):
        parts = [_hf_layer_shape(name, arch) for name in t.hf]
        rows = sum(p[0] for p in parts)  # packed tensors stack their parts' rows
        shapes[layer_key(t.mcore)] = (n, rows, *parts[0][1:])
    shapes.update({EMBEDDING[0]: (arch.vocab_size, h), FINAL_NORM[0]: (h,)})
    if not arch.tie_word_embeddings:
        shapes[OUTPUT_LAYER[0]] = (arch.vocab_size, h)
    return shapes


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """HF q/k/v projections (weights ``[rows, hidden]`` or biases ``[rows]``) -> megatron's grouped
    ``linear_qkv`` tensor."""
    g, d, rest = arch.num_key_value_heads, arch.head_dim, q.shape[1:]
    per_group = arch.num_attention_heads // g
    q = q.reshape(g, per_group * d, *rest)  # [groups, heads_per_group * head_dim, (hidden)]
    k = k.reshape(g, d, *rest)  # [groups, head_dim, (hidden)]
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # [groups * (hpg + 2) * head_dim, (hidden)]


def unpack_qkv(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_qkv`."""
    g, d, rest = arch.num_key_value_heads, arch.head_dim, qkv.shape[1:]
    per_group = arch.num_attention_heads // g
    grouped = qkv.reshape(g, (per_group + 2) * d, *rest)  # [groups, (hpg + 2) * head_dim, (hidden)]
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def pack(tensors: list[torch.Tensor], packing: str | None, arch: ModelArch) -> torch.Tensor:
    if packing is None:
        return tensors[0]
    if packing == "qkv":
        return pack_qkv(*tensors, arch)
    if packing == "gate_up":
        return torch.cat(tensors, dim=0)
    raise ValueError(packing)


def unpack(tensor: torch.Tensor, packing: str | None, arch: ModelArch) -> list[torch.Tensor]:
    if packing is None:
        return [tensor]
    if packing == "qkv":
        return list(unpack_qkv(tensor, arch))
    if packing == "gate_up":
        return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]
    raise ValueError(packing)
