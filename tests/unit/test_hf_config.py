"""HF ``config.json`` -> :class:`ModelArch` and back, on the real hub configs of the supported families.

The dicts below are the ``config.json`` files of the hub models named (as published; weights are
not needed). Every field that decides the function the model computes must be read, refused with
its name, or carried back out on export; none may be silently dropped. Where a family leaves a field
out, what ``transformers`` reads from the same dict (its config classes' defaults and derivations, such
as Qwen2's sliding layers from ``max_window_layers``) is the reference.
"""

from __future__ import annotations

import copy

import pytest
import torch

from simpo_mcore.model.builder import rope_inv_freq
from simpo_mcore.model.hf_config import SLIDING, ModelArch, UnsupportedConfigError

LLAMA2_7B = {  # meta-llama/Llama-2-7b-hf
    "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
LLAMA3_8B = {  # meta-llama/Meta-Llama-3-8B
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}
LLAMA31_8B_INSTRUCT = {  # meta-llama/Llama-3.1-8B-Instruct
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
LLAMA32_1B = {  # meta-llama/Llama-3.2-1B
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
MISTRAL_7B_V03 = {  # mistralai/Mistral-7B-v0.3 (no sliding window since v0.2)
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.0.dev0", "use_cache": True, "vocab_size": 32768,
}
MISTRAL_7B_V01 = {  # mistralai/Mistral-7B-v0.1: a 4096-token sliding window
    **{k: v for k, v in MISTRAL_7B_V03.items() if k not in ("rope_theta", "vocab_size")},
    "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 32000,
}
QWEN25_7B_INSTRUCT = {  # Qwen/Qwen2.5-7B-Instruct: sliding_window present but off (use_sliding_window false)
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
QWEN2_WINDOWED = {  # Qwen2.5-7B with its window switched on: layers 20.. slide (i >= max_window_layers)
    **QWEN25_7B_INSTRUCT, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20,
    "tie_word_embeddings": True,
}
QWEN3_8B = {  # Qwen/Qwen3-8B: q / k norms, head_dim 128 with hidden 4096 / 32 heads
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
GEMMA2_9B_IT = {  # google/gemma-2-9b-it: the SimPO table's Gemma row
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2",
    "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "sliding_window_size": 4096, "torch_dtype": "float32", "transformers_version": "4.42.0.dev0",
    "use_cache": True, "vocab_size": 256000,
}
GEMMA2_MINIMAL = {  # only what transformers cannot default: tying, head_dim, caps, window, scalar from Gemma2Config
    "model_type": "gemma2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
}
LLAMA31_TRANSFORMERS5 = {  # Llama-3.1-8B as transformers 5.x saves it: ``rope_parameters``, ``dtype``
    **{k: v for k, v in LLAMA31_8B_INSTRUCT.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")},
    "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_type": "llama3"},
    "dtype": "bfloat16", "transformers_version": "5.0.0",
}
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

# (config, expected (vocab, hidden, ffn, layers, heads, kv_heads, head_dim, theta, tie, rope_scaling, eos))
CASES = {
    "llama2_7b": (LLAMA2_7B, (32000, 4096, 11008, 32, 32, 32, 128, 10000.0, False, None, 2)),
    "llama3_8b": (LLAMA3_8B, (128256, 4096, 14336, 32, 32, 8, 128, 500000.0, False, None, 128001)),
    "llama31_8b": (LLAMA31_8B_INSTRUCT, (128256, 4096, 14336, 32, 32, 8, 128, 500000.0, False,
                                         LLAMA31_SCALING, [128001, 128008, 128009])),
    "llama32_1b_tied": (LLAMA32_1B, (128256, 2048, 8192, 16, 32, 8, 64, 500000.0, True,
                                     {**LLAMA31_SCALING, "factor": 32.0}, 128001)),
    "mistral_7b_v03": (MISTRAL_7B_V03, (32768, 4096, 14336, 32, 32, 8, 128, 1000000.0, False, None, 2)),
    "mistral_7b_v01": (MISTRAL_7B_V01, (32000, 4096, 14336, 32, 32, 8, 128, 10000.0, False, None, 2)),
    "qwen25_7b_instruct": (QWEN25_7B_INSTRUCT, (152064, 3584, 18944, 28, 28, 4, 128, 1e6, False, None, 151645)),
    "qwen2_windowed": (QWEN2_WINDOWED, (152064, 3584, 18944, 28, 28, 4, 128, 1e6, True, None, 151645)),
    "qwen3_8b": (QWEN3_8B, (151936, 4096, 12288, 36, 32, 8, 128, 1e6, False, None, 151645)),
    "gemma2_9b_it": (GEMMA2_9B_IT, (256000, 3584, 14336, 42, 16, 8, 256, 10000.0, True, None, 1)),
    "llama31_transformers5": (LLAMA31_TRANSFORMERS5, (128256, 4096, 14336, 32, 32, 8, 128, 500000.0, False,
                                                      LLAMA31_SCALING, [128001, 128008, 128009])),
}


@pytest.mark.parametrize("name", CASES)
def test_hub_configs_parse(name):
    cfg, (vocab, hidden, ffn, layers, heads, kv, head_dim, theta, tie, scaling, eos) = CASES[name]
    arch = ModelArch.from_hf_dict(copy.deepcopy(cfg))
    got = (arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers,
           arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim, arch.rope_theta,
           arch.tie_word_embeddings, arch.rope_scaling, arch.eos_token_id)
    assert got == (vocab, hidden, ffn, layers, heads, kv, head_dim, theta, tie, scaling, eos)
    assert arch.rms_norm_eps == cfg["rms_norm_eps"]
    assert arch.max_position_embeddings == cfg["max_position_embeddings"]
    assert arch.torch_dtype == cfg.get("torch_dtype", cfg.get("dtype"))
    assert arch.bos_token_id == cfg["bos_token_id"]


@pytest.mark.parametrize("name", CASES)
def test_hub_configs_survive_export(name):
    """to_hf_dict -> from_hf_dict gives the same arch, and transformers reads the same rope and the same
    attention per layer."""
    from transformers import AutoConfig

    cfg = CASES[name][0]
    arch = ModelArch.from_hf_dict(copy.deepcopy(cfg))
    out = arch.to_hf_dict()
    assert ModelArch.from_hf_dict(copy.deepcopy(out)) == arch
    assert out["architectures"] == cfg["architectures"] and out["model_type"] == cfg["model_type"]
    assert window_per_layer(AutoConfig.for_model(**copy.deepcopy(out))) == \
        window_per_layer(AutoConfig.for_model(**copy.deepcopy(cfg)))
    for key in ("initializer_range", "use_cache"):  # fields we do not model are carried along
        assert out[key] == cfg[key]
    # transformers 5 normalises either layout into ``rope_parameters``: both must agree.
    src = AutoConfig.for_model(**copy.deepcopy(cfg)).rope_parameters
    exported = AutoConfig.for_model(**copy.deepcopy(out)).rope_parameters
    assert exported == src
    assert exported["rope_theta"] == arch.rope_theta


def test_mistral_keeps_its_model_type_and_null_window():
    out = ModelArch.from_hf_dict(copy.deepcopy(MISTRAL_7B_V03)).to_hf_dict()
    assert out["model_type"] == "mistral" and out["sliding_window"] is None


def window_per_layer(hf_config) -> list[int | None]:
    """What transformers' modeling code gives each layer's attention as ``sliding_window`` (None: full)."""
    window = getattr(hf_config, "sliding_window", None)
    types = getattr(hf_config, "layer_types", None)
    if hf_config.model_type in ("llama", "mistral") or types is None:  # Mistral: every layer, no layer_types
        return [window] * hf_config.num_hidden_layers
    return [window if t == SLIDING else None for t in types]


FAMILY_CASES = ["mistral_7b_v01", "qwen25_7b_instruct", "qwen2_windowed", "qwen3_8b", "gemma2_9b_it",
                "gemma2_minimal", "llama3_8b"]


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_arch_reads_what_transformers_reads(name):
    """Each family's fields against transformers' own reading of the same dict (defaults included):
    window per layer, head_dim, tying, eps, soft-capping, score scale, activation."""
    from transformers import AutoConfig

    cfg = GEMMA2_MINIMAL if name == "gemma2_minimal" else CASES[name][0]
    arch = ModelArch.from_hf_dict(copy.deepcopy(cfg))
    hf = AutoConfig.for_model(**copy.deepcopy(cfg))
    ours = [arch.sliding_window if s else None for s in arch.sliding_layers()]
    assert ours == window_per_layer(hf)
    assert arch.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert (arch.tie_word_embeddings, arch.rms_norm_eps, arch.max_position_embeddings) == \
        (hf.tie_word_embeddings, hf.rms_norm_eps, hf.max_position_embeddings)
    assert arch.rope_theta == hf.rope_parameters["rope_theta"]
    family = cfg.get("model_type", "llama")
    assert arch.model_type == family
    assert arch.qkv_bias == (family == "qwen2") and arch.qk_norm == (family == "qwen3")
    gemma = family == "gemma2"
    assert arch.norm_zero_centered == arch.sandwich_norms == arch.scale_embeddings == gemma
    if gemma:
        assert (arch.attn_logit_softcapping, arch.final_logit_softcapping, arch.query_pre_attn_scalar,
                arch.hidden_act) == (hf.attn_logit_softcapping, hf.final_logit_softcapping,
                                     hf.query_pre_attn_scalar, hf.hidden_activation)
        assert arch.softmax_scale == hf.query_pre_attn_scalar ** -0.5
    else:
        assert arch.hidden_act == hf.hidden_act == "silu"
        assert arch.attn_logit_softcapping is arch.final_logit_softcapping is arch.softmax_scale is None


def test_family_window_layouts_by_hand():
    """Mistral v0.1: every layer, 4096. Gemma-2: layers 0, 2, 4, ... (1-based odd) slide. Qwen2 with its
    window on: layers >= max_window_layers (20 of 28). Qwen2.5 as published: none, its 131072 inert."""
    mistral = ModelArch.from_hf_dict(copy.deepcopy(MISTRAL_7B_V01))
    assert mistral.sliding_window == 4096 and all(mistral.sliding_layers())
    gemma = ModelArch.from_hf_dict(copy.deepcopy(GEMMA2_9B_IT))
    assert gemma.sliding_layers() == [i % 2 == 0 for i in range(42)]
    qwen = ModelArch.from_hf_dict(copy.deepcopy(QWEN2_WINDOWED))
    assert qwen.sliding_layers() == [i >= 20 for i in range(28)]
    qwen25 = ModelArch.from_hf_dict(copy.deepcopy(QWEN25_7B_INSTRUCT))
    assert qwen25.sliding_window is None and not any(qwen25.sliding_layers())
    out = qwen25.to_hf_dict()
    assert (out["use_sliding_window"], out["sliding_window"], out["max_window_layers"]) == (False, 131072, 28)


def test_transformers5_default_rope_parameters():
    """``rope_parameters`` with rope_type default: theta read from inside it, no scaling."""
    cfg = {**{k: v for k, v in LLAMA3_8B.items() if k not in ("rope_theta", "rope_scaling")},
           "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    arch = ModelArch.from_hf_dict(cfg)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling is None


def test_legacy_linear_scaling_with_type_key():
    """Old configs name the rope type ``type`` (e.g. CodeLlama-style linear scaling)."""
    cfg = {**LLAMA2_7B, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert ModelArch.from_hf_dict(cfg).rope_scaling == {"rope_type": "linear", "factor": 4.0}


# ---------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("cfg, field", [
    ({**LLAMA3_8B, "sliding_window": 4096}, "sliding_window=4096"),
    ({**LLAMA3_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 8192}}, "'yarn'"),
    ({**LLAMA2_7B, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({**LLAMA31_TRANSFORMERS5,
      "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "'yarn'"),
    ({k: v for k, v in LLAMA3_8B.items() if k != "hidden_size"}, "'hidden_size'"),
    ({k: v for k, v in LLAMA3_8B.items() if k != "vocab_size"}, "'vocab_size'"),
    ({**LLAMA3_8B, "num_hidden_layers": None}, "'num_hidden_layers'"),
    ({**LLAMA31_8B_INSTRUCT, "rope_scaling": {k: v for k, v in LLAMA31_SCALING.items()
                                              if k != "low_freq_factor"}}, "'low_freq_factor'"),
    ({**LLAMA3_8B, "hidden_act": "gelu"}, "'gelu'"),
    ({**LLAMA3_8B, "attention_bias": True}, "attention_bias"),
    ({**LLAMA3_8B, "mlp_bias": True}, "mlp_bias"),
    ({**LLAMA2_7B, "pretraining_tp": 2}, "pretraining_tp=2"),
    ({**LLAMA3_8B, "model_type": "gemma"}, "'gemma'"),
    ({**LLAMA3_8B, "model_type": "qwen2_moe"}, "'qwen2_moe'"),
    ({**LLAMA3_8B, "num_key_value_heads": 5}, "num_key_value_heads=5"),
    ({**MISTRAL_7B_V01, "sliding_window": 0}, "sliding_window=0"),
    ({**MISTRAL_7B_V01, "attention_bias": True}, "attention_bias"),
    ({**QWEN3_8B, "attention_bias": True}, "attention_bias=True"),
    ({**QWEN2_WINDOWED, "layer_types": ["chunked_attention"] * 28}, "'chunked_attention'"),
    ({**QWEN2_WINDOWED, "layer_types": ["full_attention"] * 3}, "layer_types"),
    ({**QWEN25_7B_INSTRUCT, "layer_types": ["sliding_attention"] * 28}, "use_sliding_window is false"),
    ({**QWEN25_7B_INSTRUCT, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 32768}}, "'yarn'"),
    ({**GEMMA2_9B_IT, "hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({**GEMMA2_9B_IT, "attn_logit_softcapping": -1.0}, "attn_logit_softcapping=-1.0"),
    ({**GEMMA2_9B_IT, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({**GEMMA2_9B_IT, "attention_bias": True}, "attention_bias"),
    ({**GEMMA2_9B_IT, "sliding_window": None}, "sliding_window is null"),
], ids=["llama_sliding_window", "yarn", "dynamic", "yarn_rope_parameters", "missing_hidden", "missing_vocab",
        "null_layers", "missing_rope_field", "gelu", "attention_bias", "mlp_bias",
        "pretraining_tp", "model_type_gemma", "model_type_qwen2_moe", "kv_heads", "zero_window",
        "mistral_bias", "qwen3_bias", "qwen_layer_type", "qwen_layer_count", "qwen_inconsistent_window",
        "qwen_yarn", "gemma_exact_gelu", "gemma_negative_cap", "gemma_bidirectional", "gemma_bias",
        "gemma_null_window"])
def test_unsupported_configs_are_refused_naming_the_field(cfg, field):
    with pytest.raises(UnsupportedConfigError) as err:
        ModelArch.from_hf_dict(copy.deepcopy(cfg), source="cfg.json")
    assert "cfg.json" in str(err.value)
    assert field in str(err.value)


def test_from_hf_dir_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelArch.from_hf_dir(tmp_path)


# ----------------------------------------------------------------------------- RoPE frequencies

@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
], ids=["default", "linear", "llama31", "llama3_small_window"])
@pytest.mark.parametrize("theta, head_dim", [(10000.0, 16), (500000.0, 128)])
def test_inv_freq_matches_transformers(scaling, theta, head_dim):
    """Our inverse frequencies against transformers' own RoPE init functions (the reference)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = dict(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_theta=theta)
    if scaling:
        kw["rope_scaling"] = dict(scaling)
    config = LlamaConfig(**kw)
    arch = ModelArch.from_hf_dict(config.to_dict())
    ours = rope_inv_freq(arch)
    if scaling is None:
        ref = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    if scaling and scaling["rope_type"] == "llama3":
        unscaled = rope_inv_freq(ModelArch.from_hf_dict({**config.to_dict(), "rope_parameters": None,
                                                         "rope_scaling": None, "rope_theta": theta}))
        assert not torch.allclose(ours, unscaled)  # the scaling changes something: not a no-op test
