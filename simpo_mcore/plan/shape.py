"""The model as the planner counts it: a shape derived from :class:`~simpo_mcore.model.hf_config.ModelArch`, the
parameter tensors each pipeline chunk builds (in megatron's order), and the model FLOPs of a batch.

The shape has mixture-of-experts fields that default to a dense model; a MoE architecture fills them in
:meth:`ModelShape.from_arch` (see ``MOE_ARCH_FIELDS``) and every count below already follows them: the expert MLPs
of a MoE layer are sharded over the expert-parallel group, its router is replicated, and the FLOPs count the
``top_k`` experts a token visits plus the shared expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from simpo_mcore.model.flops import model_flops_per_token
from simpo_mcore.model.hf_config import ModelArch

MOE_ARCH_FIELDS = {"num_experts": "num_experts", "moe_top_k": "num_experts_per_tok",
                   "moe_ffn_hidden_size": "moe_intermediate_size",
                   "shared_expert_ffn_hidden_size": "shared_expert_intermediate_size",
                   "moe_layers": "moe_layers"}
"""``ModelShape`` field -> the ``ModelArch`` attribute it is read from when the architecture has it (absent: a
dense model). The attribute names follow HF's Qwen-MoE / Mixtral config keys."""


@dataclass(frozen=True)
class ModelShape:
    """What decides a model's parameter count, FLOPs and activation sizes (not the numbers it computes)."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False
    """Gemma-2's norms after the attention and MLP projections (two more norms per layer)."""
    swiglu: bool = True
    """SwiGLU (megatron fuses it on a GPU); ``False``: GeGLU with tanh GELU, never fused."""
    zero_centered_norms: bool = False
    attention_softcap: bool = False
    num_experts: int = 0
    """0: dense. Otherwise experts per MoE layer."""
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    shared_expert_ffn_hidden_size: int = 0
    moe_layers: tuple[bool, ...] | None = None
    """Per layer whether it is a MoE layer; ``None`` with ``num_experts > 0``: every layer."""

    @classmethod
    def from_arch(cls, arch: ModelArch) -> ModelShape:
        moe = {name: getattr(arch, attr) for name, attr in MOE_ARCH_FIELDS.items()
               if getattr(arch, attr, None) is not None}
        if "moe_layers" in moe:
            moe["moe_layers"] = tuple(bool(x) for x in moe["moe_layers"])
        return cls(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
                   num_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
                   num_query_groups=arch.num_key_value_heads, head_dim=arch.head_dim,
                   tied_embeddings=arch.tie_word_embeddings, qkv_bias=arch.qkv_bias, qk_norm=arch.qk_norm,
                   sandwich_norms=arch.sandwich_norms, swiglu=arch.hidden_act == "silu",
                   zero_centered_norms=arch.norm_zero_centered,
                   attention_softcap=arch.attn_logit_softcapping is not None, **moe)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        if not self.num_experts:
            return False
        return True if self.moe_layers is None else self.moe_layers[layer]

    # The names model.flops.model_flops_per_token reads, so that the planner's FLOPs are the count the measured
    # MFU figures were computed with.
    @property
    def num_key_value_heads(self) -> int:
        return self.num_query_groups

    def mlp_params_per_token(self, layer: int) -> int:
        """The MLP weights one token is multiplied by in 0-based ``layer``: the dense MLP's, or the router's, its
        top-k experts' and the shared expert's with its gate (as ``ModelArch.mlp_params_per_token`` counts)."""
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * h * self.ffn_hidden_size
        shared = 3 * h * self.shared_expert_ffn_hidden_size + h if self.shared_expert_ffn_hidden_size else 0
        return self.num_experts * h + self.moe_top_k * 3 * h * self.moe_ffn_hidden_size + shared

    def parameters(self) -> int:
        """All parameters of the model (experts counted once each, the output layer unless tied)."""
        layers = sum(sum(p.numel for p in layer_parameters(self, i, "sdpa", 1, 1)) for i in range(self.num_layers))
        embedding = self.vocab_size * self.hidden_size
        return layers + embedding * (1 if self.tied_embeddings else 2) + self.hidden_size


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor as a rank holds it."""

    name: str
    numel: int
    expert: bool = False
    """Sharded over the expert-parallel group (its gradients reduce over the expert data-parallel group)."""
    shared_embedding: bool = False
    """megatron's ``shared_embedding``: the tied embedding / output weight when the pipeline splits them; the
    distributed optimizer gives it a bucket of its own."""


def layer_parameters(shape: ModelShape, layer: int, spec: str, tp: int, ep: int,
                     local: int | None = None) -> list[ParamTensor]:
    """The parameters of decoder layer ``layer`` (global index; ``local``: its index in its chunk, for the names)
    on one rank, in ``named_parameters`` order: the ``te`` spec holds the norms before the QKV and FC1
    projections inside them (``layer_norm_weight``), the ``sdpa`` and ``local`` specs as modules of their own."""
    h, hn = shape.hidden_size, shape.head_dim
    qkv = (shape.q_size + 2 * shape.kv_size) // tp
    p = f"decoder.layers.{layer if local is None else local}."
    norm = [ParamTensor(p + "input_layernorm.weight", h)]
    proj = [ParamTensor(p + "self_attention.linear_proj.weight", h * shape.q_size // tp)]
    if shape.sandwich_norms:
        proj.append(ParamTensor(p + "self_attention.linear_proj.post_norm.weight", h))
    attn = [ParamTensor(p + "self_attention.linear_qkv.weight", qkv * h)]
    if shape.qkv_bias:
        attn.append(ParamTensor(p + "self_attention.linear_qkv.bias", qkv))
    if shape.qk_norm:
        attn += [ParamTensor(p + "self_attention.q_layernorm.weight", hn),
                 ParamTensor(p + "self_attention.k_layernorm.weight", hn)]
    pre_mlp = [ParamTensor(p + "pre_mlp_layernorm.weight", h)]
    mlp = _mlp_parameters(shape, layer, p, tp, ep)
    if spec == "te":
        return proj + norm + attn + pre_mlp + mlp
    return norm + proj + attn + pre_mlp + mlp


def _mlp_parameters(shape: ModelShape, layer: int, p: str, tp: int, ep: int) -> list[ParamTensor]:
    h = shape.hidden_size
    post = [ParamTensor(p + "mlp.linear_fc2.post_norm.weight", h)] if shape.sandwich_norms else []
    if not shape.is_moe_layer(layer):
        f = shape.ffn_hidden_size // tp
        return [ParamTensor(p + "mlp.linear_fc1.weight", 2 * f * h), ParamTensor(p + "mlp.linear_fc2.weight", h * f),
                *post]
    # megatron's MoE layer: a replicated router, E / EP local experts (expert TP = TP), an optional shared expert.
    f = shape.moe_ffn_hidden_size // tp
    out = [ParamTensor(p + "mlp.router.weight", shape.num_experts * h)]
    for e in range(shape.num_experts // ep):
        q = f"{p}mlp.experts.local_experts.{e}."
        out += [ParamTensor(q + "linear_fc1.weight", 2 * f * h, expert=True),
                ParamTensor(q + "linear_fc2.weight", h * f, expert=True)]
    if shape.shared_expert_ffn_hidden_size:
        s = shape.shared_expert_ffn_hidden_size // tp
        out += [ParamTensor(p + "mlp.shared_experts.linear_fc1.weight", 2 * s * h),
                ParamTensor(p + "mlp.shared_experts.linear_fc2.weight", h * s),
                ParamTensor(p + "mlp.shared_experts.gate_weight", h)]
    return out + post


def padded_vocab(vocab_size: int, divisor: int, tp: int) -> int:
    """megatron pads the embedding to a multiple of ``divisor x tp`` rows (``model.make_vocab_size_divisible_by``)."""
    multiple = divisor * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class Chunk:
    """One model chunk of a pipeline rank: its layers (global indices) and whether it holds the embedding or
    the output end (final norm and head)."""

    layers: tuple[int, ...]
    first: bool
    last: bool


def chunks_of_stage(shape: ModelShape, pp: int, vpp: int | None, pp_rank: int) -> list[Chunk]:
    """The chunks pipeline rank ``pp_rank`` builds (one, or ``vpp`` under the interleaved schedule): megatron's
    even split, chunk ``v`` of rank ``r`` holding layers ``(v x pp + r) x n ...`` with ``n = layers / (pp x vpp)``."""
    v = vpp or 1
    n = shape.num_layers // (pp * v)
    out = []
    for stage in range(v):
        start = (stage * pp + pp_rank) * n
        out.append(Chunk(tuple(range(start, start + n)), first=stage == 0 and pp_rank == 0,
                         last=stage == v - 1 and pp_rank == pp - 1))
    return out


def chunk_parameters(shape: ModelShape, chunk: Chunk, spec: str, tp: int, pp: int, ep: int,
                     vocab_rows: int) -> list[ParamTensor]:
    """The parameters of ``chunk`` on one rank in ``named_parameters`` order (``vocab_rows``: the padded vocabulary
    over TP). Tied embeddings with a pipeline: the last stage holds a copy of the embedding as its output weight."""
    h = shape.hidden_size
    split = shape.tied_embeddings and pp > 1
    out = []
    if chunk.first:
        out.append(ParamTensor("embedding.word_embeddings.weight", vocab_rows * h, shared_embedding=split))
    for i, layer in enumerate(chunk.layers):
        out += layer_parameters(shape, layer, spec, tp, ep, local=i)
    if chunk.last:
        out.append(ParamTensor("decoder.final_layernorm.weight", h))
        if not shape.tied_embeddings or not chunk.first:
            out.append(ParamTensor("output_layer.weight", vocab_rows * h, shared_embedding=split))
    return out


def batch_flops(shape: ModelShape, tokens: float, squared_lengths: float) -> float:
    """Model FLOPs (forward + backward) of ``tokens`` positions in sequences whose lengths squared sum to
    ``squared_lengths``: :func:`~simpo_mcore.model.flops.model_flops_per_token` (the count of the measured MFU
    figures) is ``6 x parameters + 6 x layers x q_size x sequence length`` per token, so a batch of sequences of
    lengths ``s_i`` costs ``sum_i s_i x (6 P + 6 n q s_i)``."""
    per_token = model_flops_per_token(shape, 0)
    per_length = model_flops_per_token(shape, 1) - per_token
    return tokens * per_token + squared_lengths * per_length


def head_flops_per_token(shape: ModelShape) -> float:
    """The output layer's share of :func:`batch_flops` per token (6 x vocab x hidden)."""
    return 6.0 * shape.vocab_size * shape.hidden_size


def attention_flops(shape: ModelShape, squared_lengths: float) -> float:
    """The causal attention matmuls' share of :func:`batch_flops` (forward + backward)."""
    return squared_lengths * (model_flops_per_token(shape, 1) - model_flops_per_token(shape, 0))
