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

Every field that would change the function the model computes is read, or refused with its name when not
implemented, never dropped: a silently ignored ``rope_scaling``, window or bias gives a model that looks fine
and is wrong. Defaults for absent fields are the ones ``transformers`` uses for that family.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class UnsupportedConfigError(ValueError):
    """The HF config asks for something this model does not implement."""


SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
SLIDING, FULL = "sliding_attention", "full_attention"

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}
"""``model_type`` -> the ``transformers`` class an export names in ``architectures``."""
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)

# transformers' defaults for fields a family's config.json may leave out (``*Config`` class attributes).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, tie_word_embeddings=False,
                    sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
                  sliding_window=4096, use_sliding_window=False, max_window_layers=28),
    "qwen3": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False, head_dim=128,
                  sliding_window=4096, use_sliding_window=False, max_window_layers=28),
    "gemma2": dict(rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=True, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}

_COMMON_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "model_type", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "pretraining_tp", "attention_dropout", "architectures", "transformers_version",
}
# Fields each family reads on top of the common ones (the rest of a config is carried along for export).
_FAMILY_FIELDS = {
    "llama": {"hidden_act", "attention_bias", "mlp_bias", "sliding_window"},
    "mistral": {"hidden_act", "attention_bias", "mlp_bias", "sliding_window"},
    "qwen2": {"hidden_act", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
    "qwen3": {"hidden_act", "attention_bias", "use_sliding_window", "sliding_window", "max_window_layers",
              "layer_types"},
    "gemma2": {"hidden_activation", "attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
               "final_logit_softcapping", "sliding_window", "layer_types", "use_bidirectional_attention"},
}


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

    # ------------------------------------------------------------------ HF config in / out

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config") -> ModelArch:
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"{source}: model_type '{model_type}' is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        defaults = _FAMILY_DEFAULTS[model_type]

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
        family = _PARSERS[model_type](cfg, get, num_layers, source)
        known = _COMMON_FIELDS | _FAMILY_FIELDS[model_type]
        extra = {k: v for k, v in cfg.items() if k not in known}
        extra.update(family.pop("extra", {}))
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
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
        cfg.update(_EXPORTERS[self.model_type](self))
        return cfg

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelArch:
        data = dict(data)
        if data.get("layer_types") is not None:  # JSON has no tuples
            data["layer_types"] = tuple(data["layer_types"])
        return cls(**data)

    # ------------------------------------------------------------------ derived quantities

    @property
    def num_query_groups(self) -> int:
        return self.num_key_value_heads

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


# ------------------------------------------------------------------------------ the families' parsing


def _refuse_true(cfg: dict, source: str, *keys: str, why: str = "") -> None:
    for key in keys:
        if cfg.get(key):
            raise UnsupportedConfigError(f"{source}: {key}={cfg[key]!r} is not supported{why}")


def _check_act(act: str, allowed: str, key: str, source: str) -> str:
    if act != allowed:
        raise UnsupportedConfigError(f"{source}: {key} '{act}' is not supported (only '{allowed}')")
    return act


def _check_window(window, source: str, key: str = "sliding_window") -> int:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise UnsupportedConfigError(f"{source}: {key}={window!r} must be a positive integer")
    return window


def _check_layer_types(layer_types, num_layers: int, source: str) -> tuple[str, ...]:
    if not isinstance(layer_types, list | tuple) or len(layer_types) != num_layers:
        raise UnsupportedConfigError(
            f"{source}: layer_types must list one entry per layer ({num_layers}), got {layer_types!r}")
    bad = [t for t in layer_types if t not in (SLIDING, FULL)]
    if bad:
        raise UnsupportedConfigError(
            f"{source}: layer_types entry '{bad[0]}' is not supported (only '{SLIDING}', '{FULL}')")
    return tuple(layer_types)


def _llama(cfg, get, num_layers, source) -> dict:
    act = _check_act(cfg.get("hidden_act", "silu"), "silu", "hidden_act", source)
    _refuse_true(cfg, source, "attention_bias", "mlp_bias")
    if cfg.get("sliding_window") is not None:
        raise UnsupportedConfigError(
            f"{source}: sliding_window={cfg['sliding_window']} is not supported for model_type 'llama' "
            "(LlamaForCausalLM has no sliding window; a Mistral model says model_type 'mistral')")
    return dict(hidden_act=act)


def _mistral(cfg, get, num_layers, source) -> dict:
    act = _check_act(cfg.get("hidden_act", "silu"), "silu", "hidden_act", source)
    _refuse_true(cfg, source, "attention_bias", "mlp_bias")
    window = get("sliding_window")
    # MistralForCausalLM applies the window on every layer (it ignores any layer_types).
    return dict(hidden_act=act, sliding_window=None if window is None else _check_window(window, source))


def _qwen_window(cfg, get, num_layers, source) -> dict:
    """Qwen2 / Qwen3: the window exists only with ``use_sliding_window``, and then on the layers that
    ``layer_types`` marks, or else on ``i >= max_window_layers`` (transformers' ``Qwen2Config``)."""
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        layer_types = _check_layer_types(layer_types, num_layers, source)
    if not get("use_sliding_window"):
        if layer_types is not None and SLIDING in layer_types:
            raise UnsupportedConfigError(
                f"{source}: layer_types has '{SLIDING}' layers but use_sliding_window is false")
        # Inert without use_sliding_window: carried along for export only.
        inert = {k: cfg[k] for k in ("sliding_window", "max_window_layers", "layer_types") if k in cfg}
        return dict(extra=inert)
    window = _check_window(get("sliding_window"), source)
    if layer_types is None:
        start = get("max_window_layers")
        layer_types = tuple(SLIDING if i >= start else FULL for i in range(num_layers))
    out = dict(sliding_window=window, layer_types=layer_types)
    if "max_window_layers" in cfg:
        out["extra"] = {"max_window_layers": cfg["max_window_layers"]}
    return out


def _qwen2(cfg, get, num_layers, source) -> dict:
    act = _check_act(cfg.get("hidden_act", "silu"), "silu", "hidden_act", source)
    # Qwen2Attention always has q / k / v biases and none on o_proj; its config has no bias flags.
    return dict(hidden_act=act, qkv_bias=True, **_qwen_window(cfg, get, num_layers, source))


def _qwen3(cfg, get, num_layers, source) -> dict:
    act = _check_act(cfg.get("hidden_act", "silu"), "silu", "hidden_act", source)
    _refuse_true(cfg, source, "attention_bias", why=" (biases on q / k / v and o_proj)")
    return dict(hidden_act=act, qk_norm=True, **_qwen_window(cfg, get, num_layers, source))


def _gemma2(cfg, get, num_layers, source) -> dict:
    # Gemma2MLP reads hidden_activation; a legacy hidden_act beside it is inert (kept in extra).
    act = _check_act(get("hidden_activation"), "gelu_pytorch_tanh", "hidden_activation", source)
    _refuse_true(cfg, source, "attention_bias")
    _refuse_true(cfg, source, "use_bidirectional_attention", why=" (causal attention only)")
    layer_types = cfg.get("layer_types")
    if layer_types is None:  # Gemma2Config: layers 0, 2, 4, ... slide
        layer_types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(num_layers))
    layer_types = _check_layer_types(layer_types, num_layers, source)
    window = get("sliding_window")
    if window is None and SLIDING in layer_types:
        raise UnsupportedConfigError(f"{source}: sliding_window is null but layer_types has '{SLIDING}' layers")
    caps = {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        cap = get(key)
        if cap is not None and not (isinstance(cap, int | float) and math.isfinite(cap) and cap > 0):
            raise UnsupportedConfigError(f"{source}: {key}={cap!r} must be a positive number or null")
        caps[key] = cap  # as given: transformers' strict config types an int and a float apart
    scalar = get("query_pre_attn_scalar")
    if not (isinstance(scalar, int | float) and scalar > 0):
        raise UnsupportedConfigError(f"{source}: query_pre_attn_scalar={scalar!r} must be a positive number")
    return dict(hidden_act=act, sliding_window=None if window is None else _check_window(window, source),
                layer_types=layer_types, norm_zero_centered=True, sandwich_norms=True, scale_embeddings=True,
                query_pre_attn_scalar=scalar, **caps)


_PARSERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2}


# ------------------------------------------------------------------------------ the families' export


def _export_llama(arch: ModelArch) -> dict:
    return dict(hidden_act="silu", attention_bias=False, mlp_bias=False)


def _export_mistral(arch: ModelArch) -> dict:
    return dict(hidden_act="silu", sliding_window=arch.sliding_window)


def _export_qwen(arch: ModelArch) -> dict:
    out = dict(hidden_act="silu", use_sliding_window=arch.sliding_window is not None)
    if arch.sliding_window is not None:
        out.update(sliding_window=arch.sliding_window, layer_types=list(arch.layer_types))
    elif "sliding_window" not in arch.extra:  # else the source's inert value, from extra
        out["sliding_window"] = None
    if arch.model_type == "qwen3":
        out["attention_bias"] = False
    return out


def _export_gemma2(arch: ModelArch) -> dict:
    return dict(hidden_activation=arch.hidden_act, attention_bias=False,
                query_pre_attn_scalar=arch.query_pre_attn_scalar, sliding_window=arch.sliding_window,
                layer_types=list(arch.layer_types), attn_logit_softcapping=arch.attn_logit_softcapping,
                final_logit_softcapping=arch.final_logit_softcapping)


_EXPORTERS = {"llama": _export_llama, "mistral": _export_mistral, "qwen2": _export_qwen, "qwen3": _export_qwen,
              "gemma2": _export_gemma2}


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
