"""Hugging Face Llama ``config.json`` -> a validated architecture description, and back.

Accepts Llama 2 / 3 / 3.1 (``rope_scaling`` of type ``llama3``) / 3.2 (tied embeddings) and
Mistral-style configs without a sliding window. Anything that would change the function the
model computes and that we do not implement is refused with the field's name, never dropped:
a silently ignored ``rope_scaling`` or sliding window gives a model that looks fine and is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


class UnsupportedConfigError(ValueError):
    """The HF config asks for something this model does not implement."""


SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class LlamaArch:
    """Everything about a Llama-family model that decides the function it computes."""

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
    torch_dtype: str = "bfloat16"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Fields of the source config that do not change the computation (kept for export)."""

    # ------------------------------------------------------------------ HF config in / out

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config") -> LlamaArch:
        def need(key):
            if key not in cfg or cfg[key] is None:
                raise UnsupportedConfigError(f"{source}: required field '{key}' is missing")
            return cfg[key]

        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"{source}: model_type '{model_type}' is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"{source}: hidden_act '{act}' is not supported (only 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise UnsupportedConfigError(f"{source}: {key}=true is not supported")
        if cfg.get("sliding_window") is not None:
            raise UnsupportedConfigError(
                f"{source}: sliding_window={cfg['sliding_window']} is not supported "
                "(full causal attention only; set it to null for Mistral v0.2+)")
        if cfg.get("pretraining_tp", 1) != 1:
            raise UnsupportedConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported")
        if cfg.get("attention_dropout", 0.0):
            raise UnsupportedConfigError(f"{source}: attention_dropout must be 0")

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise UnsupportedConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        rope_theta, rope_scaling = _parse_rope(cfg, source)

        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
            "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
            "model_type", "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id",
            "hidden_act", "attention_bias", "mlp_bias", "sliding_window", "pretraining_tp",
            "attention_dropout", "architectures", "transformers_version",
        }
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            model_type=model_type,
            torch_dtype=str(dtype).replace("torch.", ""),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> LlamaArch:
        path = Path(path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (expected a Hugging Face model directory)")
        return cls.from_hf_dict(json.loads(path.read_text()), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that ``transformers`` loads into the same model."""
        cfg = dict(self.extra)
        cfg.update(
            architectures=["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
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
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            torch_dtype=self.torch_dtype,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "mistral":
            cfg["sliding_window"] = None
        return cfg

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LlamaArch:
        return cls(**data)

    # ------------------------------------------------------------------ derived quantities

    @property
    def num_query_groups(self) -> int:
        return self.num_key_value_heads

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim / 2] in fp32, the same numbers HF computes."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        rs = self.rope_scaling
        if rs is None or rs["rope_type"] == "default":
            return inv
        if rs["rope_type"] == "linear":
            return inv / rs["factor"]
        # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)


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
