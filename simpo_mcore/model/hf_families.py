"""The supported families' ``config.json`` fields: defaults, parsing into
:class:`~simpo_mcore.model.hf_config.ModelArch` fields (or a refusal naming the field), and the fields an export
writes back.

Each parser takes ``(cfg, get, num_layers, source)`` (``get`` applies the family's transformers defaults) and
returns ``ModelArch`` keyword arguments, ``extra`` holding fields carried along for export only; each exporter
takes the ``ModelArch`` (not imported here: it is built from these) and returns the family's fields of a
``config.json`` transformers loads into the same model.
"""

from __future__ import annotations

import math
from typing import Any


class UnsupportedConfigError(ValueError):
    """The HF config asks for something this model does not implement."""


SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
SLIDING, FULL = "sliding_attention", "full_attention"

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
"""``model_type`` -> the ``transformers`` class an export names in ``architectures``."""
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)

# transformers' defaults for fields a family's config.json may leave out (``*Config`` class attributes).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
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
    "mixtral": dict(rms_norm_eps=1e-5, max_position_embeddings=4096 * 32, tie_word_embeddings=False,
                    intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
                      intermediate_size=6144, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      decoder_sparse_step=1, norm_topk_prob=False),
    "qwen2_moe": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
                      intermediate_size=5632, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      decoder_sparse_step=1, norm_topk_prob=False, shared_expert_intermediate_size=5632,
                      qkv_bias=True),
}

COMMON_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "model_type", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "pretraining_tp", "attention_dropout", "architectures", "transformers_version",
}
_MOE_FIELDS = {"hidden_act", "num_experts_per_tok", "router_jitter_noise", "num_experts", "num_local_experts",
               "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob"}
# Fields each family reads on top of the common ones (the rest of a config is carried along for export).
FAMILY_FIELDS = {
    "llama": {"hidden_act", "attention_bias", "mlp_bias", "sliding_window"},
    "mistral": {"hidden_act", "attention_bias", "mlp_bias", "sliding_window"},
    "qwen2": {"hidden_act", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
    "qwen3": {"hidden_act", "attention_bias", "use_sliding_window", "sliding_window", "max_window_layers",
              "layer_types"},
    "gemma2": {"hidden_activation", "attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
               "final_logit_softcapping", "sliding_window", "layer_types", "use_bidirectional_attention"},
    "mixtral": _MOE_FIELDS | {"sliding_window"},
    "qwen3_moe": _MOE_FIELDS | {"attention_bias", "use_sliding_window"},
    "qwen2_moe": _MOE_FIELDS | {"qkv_bias", "use_sliding_window", "shared_expert_intermediate_size"},
}


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


def _positive_int(value, key: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UnsupportedConfigError(f"{source}: {key}={value!r} must be a positive integer")
    return value


def _experts(cfg, get, source: str, moe_ffn_key: str, layers: list[bool]) -> dict:
    """The routed experts every MoE family has: how many, top-k, their FFN size, which layers hold them."""
    jitter = cfg.get("router_jitter_noise") or 0.0
    if jitter:
        raise UnsupportedConfigError(f"{source}: router_jitter_noise={jitter!r} is not supported (only 0: the "
                                     "router's input is not perturbed in training)")
    # transformers 5 writes Qwen3-MoE's count as num_local_experts (an alias of the hub's num_experts).
    key = next((k for k in ("num_experts", "num_local_experts") if cfg.get(k) is not None), None)
    experts = _positive_int(cfg[key] if key else get("num_experts") or get("num_local_experts"),
                            key or "num_experts", source)
    topk = _positive_int(get("num_experts_per_tok"), "num_experts_per_tok", source)
    if topk > experts:
        raise UnsupportedConfigError(f"{source}: num_experts_per_tok={topk} is more than the {experts} experts")
    return dict(num_experts=experts, num_experts_per_tok=topk,
                moe_intermediate_size=_positive_int(get(moe_ffn_key), moe_ffn_key, source), moe_layers=tuple(layers))


def _mixtral(cfg, get, num_layers, source) -> dict:
    experts = _experts(cfg, get, source, "intermediate_size", [True] * num_layers)
    return dict(_mistral(cfg, get, num_layers, source), **experts, norm_topk_prob=True)  # always renormalised


def _qwen_moe(cfg, get, num_layers, source) -> dict:
    """Qwen2 / Qwen3 MoE: layer i holds experts unless it is in ``mlp_only_layers`` or ``(i + 1) %
    decoder_sparse_step`` is not 0; full attention only (the window fields are carried along, inert)."""
    act = _check_act(cfg.get("hidden_act", "silu"), "silu", "hidden_act", source)
    if cfg.get("use_sliding_window"):
        raise UnsupportedConfigError(f"{source}: use_sliding_window=true is not supported for model_type "
                                     f"'{cfg['model_type']}' (full attention on every layer only)")
    step = _positive_int(get("decoder_sparse_step"), "decoder_sparse_step", source)
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list | tuple) or not all(isinstance(i, int) and 0 <= i < num_layers for i in dense):
        raise UnsupportedConfigError(f"{source}: mlp_only_layers={dense!r} must list layer indices below {num_layers}")
    layers = [i not in dense and (i + 1) % step == 0 for i in range(num_layers)]
    inert = {k: cfg[k] for k in ("sliding_window", "max_window_layers", "layer_types") if k in cfg}
    return dict(hidden_act=act, extra=inert, norm_topk_prob=bool(get("norm_topk_prob")),
                **_experts(cfg, get, source, "moe_intermediate_size", layers))


def _qwen3_moe(cfg, get, num_layers, source) -> dict:
    _refuse_true(cfg, source, "attention_bias", why=" (biases on q / k / v and o_proj)")
    return dict(_qwen_moe(cfg, get, num_layers, source), qk_norm=True)


def _qwen2_moe(cfg, get, num_layers, source) -> dict:
    shared = _positive_int(get("shared_expert_intermediate_size"), "shared_expert_intermediate_size", source)
    return dict(_qwen_moe(cfg, get, num_layers, source), qkv_bias=bool(get("qkv_bias")),
                shared_expert_intermediate_size=shared)


PARSERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2,
            "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe}


# ------------------------------------------------------------------------------ the families' export


def _export_llama(arch) -> dict:
    return dict(hidden_act="silu", attention_bias=False, mlp_bias=False)


def _export_mistral(arch) -> dict:
    return dict(hidden_act="silu", sliding_window=arch.sliding_window)


def _export_qwen(arch) -> dict:
    out = dict(hidden_act="silu", use_sliding_window=arch.sliding_window is not None)
    if arch.sliding_window is not None:
        out.update(sliding_window=arch.sliding_window, layer_types=list(arch.layer_types))
    elif "sliding_window" not in arch.extra:  # else the source's inert value, from extra
        out["sliding_window"] = None
    if arch.model_type == "qwen3":
        out["attention_bias"] = False
    return out


def _export_gemma2(arch) -> dict:
    return dict(hidden_activation=arch.hidden_act, attention_bias=False,
                query_pre_attn_scalar=arch.query_pre_attn_scalar, sliding_window=arch.sliding_window,
                layer_types=list(arch.layer_types), attn_logit_softcapping=arch.attn_logit_softcapping,
                final_logit_softcapping=arch.final_logit_softcapping)


def _sparse_step(moe_layers: tuple[bool, ...]) -> tuple[int, list[int]]:
    """``decoder_sparse_step`` and ``mlp_only_layers`` that give ``moe_layers`` (the plain step when one does)."""
    n = len(moe_layers)
    for step in range(1, n + 1):
        if all(moe == ((i + 1) % step == 0) for i, moe in enumerate(moe_layers)):
            return step, []
    return 1, [i for i, moe in enumerate(moe_layers) if not moe]


def _export_moe(arch) -> dict:
    if arch.model_type == "mixtral":
        return dict(_export_mistral(arch), num_local_experts=arch.num_experts,
                    num_experts_per_tok=arch.num_experts_per_tok, router_jitter_noise=0.0)
    step, dense = _sparse_step(arch.moe_layers)
    out = dict(hidden_act="silu", use_sliding_window=False, num_experts=arch.num_experts,
               num_experts_per_tok=arch.num_experts_per_tok, moe_intermediate_size=arch.moe_intermediate_size,
               decoder_sparse_step=step, mlp_only_layers=dense, norm_topk_prob=arch.norm_topk_prob)
    if arch.model_type == "qwen2_moe":
        out.update(qkv_bias=arch.qkv_bias, shared_expert_intermediate_size=arch.shared_expert_intermediate_size)
    else:
        out["attention_bias"] = False
    return out


EXPORTERS = {"llama": _export_llama, "mistral": _export_mistral, "qwen2": _export_qwen, "qwen3": _export_qwen,
              "gemma2": _export_gemma2, "mixtral": _export_moe, "qwen3_moe": _export_moe, "qwen2_moe": _export_moe}
