"""The HF <-> megatron-core checkpoint key map, declaratively, and the two packings.

Megatron checkpoint keys are layout independent: per-layer tensors are stacked on a leading layer
axis (``decoder.layers.<name>`` of global shape ``[num_layers, ...]``), tensor-parallel shards
are slices of the full tensor, and the vocabulary rows are stored unpadded (the embedding and the
output layer load with ``allow_shape_mismatch``). Norm keys use the Transformer Engine names
(``linear_qkv.layer_norm_weight``); the local spec maps its separate norm modules onto them.

One table serves every family: an entry marked ``needs`` / ``unless`` a :class:`ModelArch` flag exists
only for the families that set / do not set it (Qwen2's q / k / v biases, Qwen3's per-head q / k norms,
Gemma-2's four norms per layer, of which HF's ``post_attention_layernorm`` is the norm *after* the
attention, not Llama's pre-MLP norm); ``families`` limits an entry to some model types, ``mlp`` to
dense-MLP or MoE layers.

Mixtures of experts (megatron's own layouts): a routed expert's tensor is stored with an expert axis after
the layer axis (``decoder.layers.mlp.experts.experts.linear_fc1.weight`` ``[num_layers, E, 2F, H]``; rank r of
EP holds experts ``r x E / EP ...``), so a checkpoint loads at any EP. A model whose layers are not all alike
(a dense / MoE mix) has no stacked layer axis: each layer's tensors are keyed ``decoder.layers.<i>.<name>``
(megatron's non-homogeneous layout). The MoE layer's pre-MLP norm keeps its own name
(``pre_mlp_layernorm.weight``: no ``linear_fc1`` to fuse it into, as in megatron's TE MoE spec). HF names:
the hub's per-expert tensors (``{e}`` in the table), or transformers 5's fused ones (``fused``:
``mlp.experts.gate_up_proj [E, 2F, H]``, already megatron's ``[gate; up]`` per expert, and ``down_proj``).

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
    """Names under ``model.layers.{i}.`` in the HF checkpoint (several when packed; ``{e}``: the expert)."""
    packing: str | None = None
    needs: str | None = None
    """A :class:`ModelArch` field that must be true (set) for this tensor to exist."""
    unless: str | None = None
    """A boolean :class:`ModelArch` field that must be false for this tensor to exist."""
    mlp: str | None = None
    """``dense`` / ``moe``: only on the layers with a dense MLP / with experts; ``None``: every layer."""
    families: tuple[str, ...] | None = None
    """The model types (``model_type``) that name it so; ``None``: every family."""
    fused: str | None = None
    """The name transformers 5 holds it under in memory (all experts of the layer in one tensor)."""

    @property
    def experts(self) -> bool:
        """One tensor per routed expert (an expert axis in the checkpoint)."""
        return "{e}" in self.hf[0]

    def applies_to(self, arch: ModelArch, layer: int) -> bool:
        if self.mlp is not None and (self.mlp == "moe") != arch.is_moe_layer(layer):
            return False
        return (self.needs is None or bool(getattr(arch, self.needs))) and \
            (self.unless is None or not getattr(arch, self.unless)) and \
            (self.families is None or arch.model_type in self.families)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MIXTRAL, _QWEN_MOE = ("mixtral",), ("qwen3_moe", "qwen2_moe")
_GATE_UP, _DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"
LAYER_TENSORS = (
    LayerTensor("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
    LayerTensor("self_attention.linear_qkv.weight", tuple(f"{p}.weight" for p in _QKV), "qkv"),
    LayerTensor("self_attention.linear_qkv.bias", tuple(f"{p}.bias" for p in _QKV), "qkv", needs="qkv_bias"),
    LayerTensor("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), needs="qk_norm"),
    LayerTensor("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), needs="qk_norm"),
    LayerTensor("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    LayerTensor("self_attention.linear_proj.post_norm.weight", ("post_attention_layernorm.weight",),
                needs="sandwich_norms"),
    LayerTensor("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), unless="sandwich_norms",
                mlp="dense"),
    LayerTensor("mlp.linear_fc1.layer_norm_weight", ("pre_feedforward_layernorm.weight",), needs="sandwich_norms"),
    LayerTensor("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up", mlp="dense"),
    LayerTensor("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), mlp="dense"),
    LayerTensor("mlp.linear_fc2.post_norm.weight", ("post_feedforward_layernorm.weight",), needs="sandwich_norms"),
    # Mixture-of-experts layers
    LayerTensor("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), mlp="moe"),
    LayerTensor("mlp.router.weight", ("block_sparse_moe.gate.weight",), mlp="moe", families=_MIXTRAL,
                fused="mlp.gate.weight"),
    LayerTensor("mlp.router.weight", ("mlp.gate.weight",), mlp="moe", families=_QWEN_MOE, fused="mlp.gate.weight"),
    LayerTensor("mlp.experts.experts.linear_fc1.weight", ("block_sparse_moe.experts.{e}.w1.weight",
                "block_sparse_moe.experts.{e}.w3.weight"), "gate_up", mlp="moe", families=_MIXTRAL, fused=_GATE_UP),
    LayerTensor("mlp.experts.experts.linear_fc2.weight", ("block_sparse_moe.experts.{e}.w2.weight",), mlp="moe",
                families=_MIXTRAL, fused=_DOWN),
    LayerTensor("mlp.experts.experts.linear_fc1.weight", ("mlp.experts.{e}.gate_proj.weight",
                "mlp.experts.{e}.up_proj.weight"), "gate_up", mlp="moe", families=_QWEN_MOE, fused=_GATE_UP),
    LayerTensor("mlp.experts.experts.linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), mlp="moe",
                families=_QWEN_MOE, fused=_DOWN),
    LayerTensor("mlp.shared_experts.linear_fc1.weight", ("mlp.shared_expert.gate_proj.weight",
                "mlp.shared_expert.up_proj.weight"), "gate_up", mlp="moe", needs="shared_expert_intermediate_size"),
    LayerTensor("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_expert.down_proj.weight",), mlp="moe",
                needs="shared_expert_intermediate_size"),
    LayerTensor("mlp.shared_experts.gate_weight", ("mlp.shared_expert_gate.weight",), mlp="moe",
                needs="shared_expert_intermediate_size"),
)

# Shapes of the HF per-layer tensors in symbols: h hidden, f ffn, d head_dim, q = heads x d, kv = kv heads x d;
# E experts, m an expert's FFN, s the shared expert's FFN.
_HF_SHAPES = {
    "weight": {"self_attn.q_proj": ("q", "h"), "self_attn.k_proj": ("kv", "h"), "self_attn.v_proj": ("kv", "h"),
               "self_attn.o_proj": ("h", "q"), "mlp.gate_proj": ("f", "h"), "mlp.up_proj": ("f", "h"),
               "mlp.down_proj": ("h", "f"), "self_attn.q_norm": ("d",), "self_attn.k_norm": ("d",),
               "block_sparse_moe.gate": ("E", "h"), "mlp.gate": ("E", "h"),
               "block_sparse_moe.experts.{e}.w1": ("m", "h"), "block_sparse_moe.experts.{e}.w3": ("m", "h"),
               "block_sparse_moe.experts.{e}.w2": ("h", "m"), "mlp.experts.{e}.gate_proj": ("m", "h"),
               "mlp.experts.{e}.up_proj": ("m", "h"), "mlp.experts.{e}.down_proj": ("h", "m"),
               "mlp.shared_expert.gate_proj": ("s", "h"), "mlp.shared_expert.up_proj": ("s", "h"),
               "mlp.shared_expert.down_proj": ("h", "s"), "mlp.shared_expert_gate": ("1", "h")},
    "bias": {"self_attn.q_proj": ("q",), "self_attn.k_proj": ("kv",), "self_attn.v_proj": ("kv",)},
    "fused": {_GATE_UP: ("E", "2m", "h"), _DOWN: ("E", "h", "m")},
}

EMBEDDING = ("embedding.word_embeddings.weight", "model.embed_tokens.weight")
FINAL_NORM = ("decoder.final_layernorm.weight", "model.norm.weight")
OUTPUT_LAYER = ("output_layer.weight", "lm_head.weight")
VOCAB_KEYS = (EMBEDDING[0], OUTPUT_LAYER[0])
"""Megatron keys whose first axis is the (padded) vocabulary."""

# Buffers some older HF checkpoints carry; they hold no learned state.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def stacked(arch: ModelArch) -> bool:
    """Whether the checkpoint stacks each per-layer tensor over a leading layer axis: when every layer holds
    the same tensors (not a dense / MoE mix)."""
    return not arch.moe_layers or len(set(arch.moe_layers)) == 1


def layer_key(name: str, arch: ModelArch | None = None, layer: int | None = None) -> str:
    """The checkpoint key of per-layer tensor ``name`` (of ``layer``, where the layers are not stacked)."""
    return f"decoder.layers.{name}" if arch is None or stacked(arch) else f"decoder.layers.{layer}.{name}"


def hf_layer_key(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def layer_tensors(arch: ModelArch, layer: int) -> list[LayerTensor]:
    """The entries of :data:`LAYER_TENSORS` that layer ``layer`` of ``arch`` has."""
    return [t for t in LAYER_TENSORS if t.applies_to(arch, layer)]


def hf_names(t: LayerTensor, arch: ModelArch) -> list[tuple[str, ...]]:
    """``t``'s HF names, one tuple per expert (``[t.hf]`` for a tensor that is not per expert)."""
    return [tuple(n.format(e=e) for n in t.hf) for e in range(arch.num_experts)] if t.experts else [t.hf]


def global_tensors(arch: ModelArch) -> list[tuple[str, str]]:
    """(megatron key, HF name) of the tensors outside the layer stack."""
    pairs = [EMBEDDING, FINAL_NORM]
    if not arch.tie_word_embeddings:
        pairs.append(OUTPUT_LAYER)
    return pairs


def _hf_layer_shape(name: str, arch: ModelArch) -> tuple[int, ...]:
    d, m = arch.head_dim, arch.moe_intermediate_size or 0
    sizes = {"h": arch.hidden_size, "f": arch.intermediate_size, "d": d, "q": arch.num_attention_heads * d,
             "kv": arch.num_key_value_heads * d, "E": arch.num_experts, "m": m, "2m": 2 * m,
             "s": arch.shared_expert_intermediate_size, "1": 1}
    if name in _HF_SHAPES["fused"]:
        return tuple(sizes[s] for s in _HF_SHAPES["fused"][name])
    module, kind = name.rsplit(".", 1)
    if module.endswith("layernorm"):  # the layer's norms over the hidden size
        return (arch.hidden_size,)
    return tuple(sizes[s] for s in _HF_SHAPES[kind][module])


def expected_hf_shapes(arch: ModelArch, fused: bool = False) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint of ``arch`` must hold, with its shape; ``fused``: the experts (and
    routers) under transformers 5's in-memory names."""
    h = arch.hidden_size
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        for t in layer_tensors(arch, i):
            if fused and t.fused:
                shapes[hf_layer_key(i, t.fused)] = _hf_layer_shape(t.fused, arch)
                continue
            for name in t.hf:
                shape = _hf_layer_shape(name, arch)
                for e in range(arch.num_experts) if t.experts else [None]:
                    shapes[hf_layer_key(i, name.format(e=e))] = shape
    return shapes


def expected_mcore_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model tensors in a megatron checkpoint of ``arch`` (vocab unpadded)."""
    h, n = arch.hidden_size, arch.num_layers
    shapes = {}
    for i in range(n):
        for t in layer_tensors(arch, i):
            parts = [_hf_layer_shape(name, arch) for name in t.hf]
            rows = sum(p[0] for p in parts)  # packed tensors stack their parts' rows
            shape = ((arch.num_experts,) if t.experts else ()) + (rows, *parts[0][1:])
            shapes[layer_key(t.mcore, arch, i)] = (n, *shape) if stacked(arch) else shape
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
