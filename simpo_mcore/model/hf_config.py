"""Hugging Face ``config.json`` -> a validated architecture description (:class:`ModelArch`), and back.

Families (``model_type``) and what each adds to the Llama computation:

* ``llama``   Llama 2 / 3 / 3.1 (``rope_scaling`` of type ``llama3``) / 3.2 (tied embeddings).
* ``mistral`` Llama's layer; ``sliding_window`` (Mistral v0.1: 4096) applies to every layer.
* ``qwen2``   q / k / v projection biases; a sliding window only where ``use_sliding_window`` is true, and
              then on the layers ``i >= max_window_layers`` (or as ``layer_types`` lists them).
* ``qwen3``   RMSNorm over each head's queries and keys, no biases, an explicit ``head_dim``; the window
              flags as in Qwen2.
* ``gemma2``  embeddings scaled by sqrt(hidden), RMSNorm with ``(1 + weight)``, norms after the attention
              and the MLP as well as before, GeGLU (tanh GELU), ``query_pre_attn_scalar``, attention and
              final logit soft-capping, alternating local (sliding window) / global layers.

Mixtures of experts (an MLP of routed experts instead of the dense MLP, on every layer or on the layers the
config marks; see docs/moe.md):

* ``mixtral``   Mistral's attention (a window on every layer where set); top-k of ``num_local_experts``, the
                top-k softmax weights renormalised and kept in fp32.
* ``qwen3_moe`` Qwen3's attention (q / k norms); ``moe_intermediate_size`` experts, ``norm_topk_prob``,
                dense layers where ``mlp_only_layers`` / ``decoder_sparse_step`` say so.
* ``qwen2_moe`` Qwen2's attention (q / k / v biases); as ``qwen3_moe`` plus one shared expert of
                ``shared_expert_intermediate_size`` on every MoE layer, scaled by a sigmoid gate.

Every field that would change the function the model computes is read, or refused with its name when not
implemented, never dropped: a silently ignored ``rope_scaling``, window or bias gives a model that looks fine
and is wrong. Defaults for absent fields are the ones ``transformers`` uses for that family.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from simpo_mcore.model.hf_families import (
    ARCHITECTURES,
    COMMON_FIELDS,
    EXPORTERS,
    FAMILY_DEFAULTS,
    FAMILY_FIELDS,
    FULL,
    PARSERS,
    SLIDING,
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_ROPE_TYPES,
    UnsupportedConfigError,
)


@dataclass(frozen=True)
class ModelArch:
    """Everything about a decoder-only model of a supported family that decides the function it computes.

    The defaults of the fields after ``extra`` are Llama's: an architecture recorded before they existed
    (checkpoint metadata format 1) reads back as the Llama / Mistral model it was.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    """``None`` or a dict with ``rope_type`` in SUPPORTED_ROPE_TYPES and its parameters."""
    model_type: str = "llama"
    """The family (HF ``model_type``), one of SUPPORTED_MODEL_TYPES; export names its ``architectures``."""
    torch_dtype: str = "bfloat16"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Fields of the source config that do not change the computation (kept for export)."""
    hidden_act: str = "silu"
    """The gated MLP's activation: ``silu`` (SwiGLU) or ``gelu_pytorch_tanh`` (GeGLU, tanh-approximate GELU)."""
    sliding_window: int | None = None
    """Tokens a query sees on a sliding-window layer, itself included (HF: key j visible from query i when
    ``i - sliding_window < j <= i``); ``None``: full causal attention on every layer."""
    layer_types: tuple[str, ...] | None = None
    """Per layer ``sliding_attention`` or ``full_attention`` (HF's words); ``None``: every layer slides when
    ``sliding_window`` is set (Mistral)."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections (Qwen2), none on the output projection."""
    qk_norm: bool = False
    """RMSNorm over ``head_dim`` of every query and key head before RoPE (Qwen3)."""
    norm_zero_centered: bool = False
    """Every RMSNorm multiplies by ``1 + weight`` (Gemma), computed in fp32."""
    sandwich_norms: bool = False
    """An RMSNorm on the attention output and on the MLP output before each residual add (Gemma-2)."""
    scale_embeddings: bool = False
    """Embeddings multiplied by sqrt(hidden_size), rounded to the model's dtype first (Gemma)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores scaled by ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5`` (Gemma-2)."""
    attn_logit_softcapping: float | None = None
    """Attention scores ``s -> c * tanh(s / c)`` after scaling, before the mask and softmax (Gemma-2: 50)."""
    final_logit_softcapping: float | None = None
    """Output logits ``z -> c * tanh(z / c)`` before the softmax (Gemma-2: 30)."""
    num_experts: int | None = None
    """Routed experts of each MoE layer; ``None``: a dense model."""
    num_experts_per_tok: int | None = None
    """Experts each token is sent to (top-k of the router's softmax over all experts, computed in fp32)."""
    moe_intermediate_size: int | None = None
    """FFN size of each routed expert (Mixtral: ``intermediate_size``); dense layers use ``intermediate_size``."""
    moe_layers: tuple[bool, ...] | None = None
    """Per layer: an MoE layer (True) or a dense MLP (False); ``None`` for a dense model."""
    norm_topk_prob: bool = False
    """The top-k weights are renormalised to sum to 1 (Mixtral always; Qwen MoE as its config says)."""
    shared_expert_intermediate_size: int | None = None
    """FFN size of the shared expert every token also goes through, scaled by ``sigmoid(x . w)`` (Qwen2-MoE)."""

    # ------------------------------------------------------------------ HF config in / out

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config") -> ModelArch:
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"{source}: model_type '{model_type}' is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        defaults = FAMILY_DEFAULTS[model_type]

        def get(key):
            value = cfg.get(key)
            return defaults.get(key) if value is None and key not in cfg else value

        def need(key):
            if cfg.get(key) is None:
                raise UnsupportedConfigError(f"{source}: required field '{key}' is missing")
            return cfg[key]

        if cfg.get("pretraining_tp", 1) != 1:
            raise UnsupportedConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported")
        if cfg.get("attention_dropout", 0.0):
            raise UnsupportedConfigError(f"{source}: attention_dropout must be 0")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise UnsupportedConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        num_layers = need("num_hidden_layers")
        rope_theta, rope_scaling = _parse_rope(cfg, source)
        family = PARSERS[model_type](cfg, get, num_layers, source)
        known = COMMON_FIELDS | FAMILY_FIELDS[model_type]
        extra = {k: v for k, v in cfg.items() if k not in known}
        extra.update(family.pop("extra", {}))
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size") or need("intermediate_size"),
            num_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=float(rope_theta),
            max_position_embeddings=get("max_position_embeddings"),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            rope_scaling=rope_scaling,
            model_type=model_type,
            torch_dtype=str(dtype).replace("torch.", ""),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            extra=extra,
            **family,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelArch:
        path = Path(path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (expected a Hugging Face model directory)")
        return cls.from_hf_dict(json.loads(path.read_text()), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that ``transformers`` loads into the same model (same family, same layers)."""
        cfg = dict(self.extra)
        cfg.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            torch_dtype=self.torch_dtype,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        cfg.update(EXPORTERS[self.model_type](self))
        return cfg

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelArch:
        data = dict(data)
        for key in ("layer_types", "moe_layers"):  # JSON has no tuples
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    # ------------------------------------------------------------------ derived quantities

    @property
    def num_query_groups(self) -> int:
        return self.num_key_value_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def route_weights_fp32(self) -> bool:
        """HF Mixtral multiplies each expert's output by its fp32 top-k weight; Qwen MoE rounds the weights to
        the model's dtype first (the same numbers in an fp32 model)."""
        return self.model_type == "mixtral"

    def is_moe_layer(self, layer: int) -> bool:
        """Whether 0-based ``layer`` holds routed experts."""
        return bool(self.moe_layers and self.moe_layers[layer])

    def mlp_params_per_token(self, layer: int) -> int:
        """The MLP weights one token is multiplied by in 0-based ``layer`` (what its FLOPs count): the dense
        MLP's, or the router's, its top-k experts' and the shared expert's (and its gate)."""
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * h * self.intermediate_size
        shared = 3 * h * self.shared_expert_intermediate_size + h if self.shared_expert_intermediate_size else 0
        return self.num_experts * h + self.num_experts_per_tok * 3 * h * self.moe_intermediate_size + shared

    def sliding_layers(self) -> list[bool]:
        """Per layer (0-based): whether it attends through the sliding window."""
        if self.sliding_window is None:
            return [False] * self.num_layers
        if self.layer_types is None:
            return [True] * self.num_layers
        return [t == SLIDING for t in self.layer_types]

    @property
    def softmax_scale(self) -> float | None:
        """The attention score scale when it is not ``head_dim ** -0.5`` (None: the default)."""
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar ** -0.5


ARCH_FIELDS = frozenset(f.name for f in fields(ModelArch))


# ------------------------------------------------------------------------------------------ RoPE


def _parse_rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """Read rope theta and scaling from either the transformers 4.x (``rope_theta`` +
    ``rope_scaling``) or 5.x (``rope_parameters``) layout."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = params
    if theta is None:
        theta = 10000.0
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise UnsupportedConfigError(f"{source}: rope_scaling must be a mapping, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{source}: rope_scaling.rope_type '{rope_type}' is not supported "
            f"(supported: {SUPPORTED_ROPE_TYPES})")
    if rope_type == "default":
        return theta, None
    required = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}[rope_type]
    missing = [k for k in required if k not in scaling]
    if missing:
        raise UnsupportedConfigError(f"{source}: rope_scaling ({rope_type}) is missing '{missing[0]}'")
    allowed = set(required) | {"rope_type", "type", "rope_theta"}
    unknown = sorted(set(scaling) - allowed)
    if unknown:
        raise UnsupportedConfigError(
            f"{source}: rope_scaling field '{unknown[0]}' is not supported for rope_type '{rope_type}'")
    out = {"rope_type": rope_type}
    out.update({k: scaling[k] for k in required})
    return theta, out


__all__ = ["ARCHITECTURES", "ARCH_FIELDS", "FULL", "ModelArch", "SLIDING", "SUPPORTED_MODEL_TYPES",
           "UnsupportedConfigError"]
