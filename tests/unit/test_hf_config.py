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
    ({**LLAMA3_8B, "model_type": "deepseek_v3"}, "'deepseek_v3'"),
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
        "pretraining_tp", "model_type_gemma", "model_type_deepseek_v3", "kv_heads", "zero_window",
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


# ------------------------------------------------------------------------------------ mixtures of experts
# Transcribed from the hub's config.json files (no network here to download them).

MIXTRAL_8X7B_INSTRUCT = {  # mistralai/Mixtral-8x7B-Instruct-v0.1
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}
QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN15_MOE_A27B_CHAT = {  # Qwen/Qwen1.5-MoE-A2.7B-Chat (Qwen2MoeForCausalLM): a shared expert, no renormalisation
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2_moe", "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_MOE_MIXED = {  # Qwen3-30B-A3B's fields with dense layers: 0 (mlp_only_layers) and odd ones (sparse step 2)
    **QWEN3_30B_A3B, "num_hidden_layers": 8, "decoder_sparse_step": 2, "mlp_only_layers": [1],
}
MOE_CASES = {"mixtral_8x7b_instruct": MIXTRAL_8X7B_INSTRUCT, "qwen3_30b_a3b": QWEN3_30B_A3B,
             "qwen15_moe_a27b_chat": QWEN15_MOE_A27B_CHAT, "qwen3_moe_mixed": QWEN3_MOE_MIXED}


def hf_moe_layers(hf_config) -> list[bool]:
    """Which layers transformers builds with experts: its modeling code's own rule (Mixtral: every layer)."""
    if hf_config.model_type == "mixtral":
        return [True] * hf_config.num_hidden_layers
    return [i not in hf_config.mlp_only_layers and (i + 1) % hf_config.decoder_sparse_step == 0
            for i in range(hf_config.num_hidden_layers)]


@pytest.mark.parametrize("name", MOE_CASES)
def test_moe_configs_read_what_transformers_reads(name):
    """Experts, top-k, expert FFN, renormalisation, the shared expert and the dense / MoE layers against
    transformers' reading of the same dict; the export survives the round trip and transformers reads the
    same model back."""
    from transformers import AutoConfig

    cfg = MOE_CASES[name]
    arch = ModelArch.from_hf_dict(copy.deepcopy(cfg))
    hf = AutoConfig.for_model(**copy.deepcopy(cfg))
    family = cfg["model_type"]
    assert arch.model_type == family and arch.is_moe
    assert arch.num_experts == (hf.num_experts if family == "qwen2_moe" else hf.num_local_experts)
    assert arch.num_experts_per_tok == hf.num_experts_per_tok
    assert arch.moe_intermediate_size == (hf.intermediate_size if family == "mixtral" else hf.moe_intermediate_size)
    assert arch.norm_topk_prob == (True if family == "mixtral" else hf.norm_topk_prob)
    assert arch.shared_expert_intermediate_size == getattr(hf, "shared_expert_intermediate_size", None)
    assert list(arch.moe_layers) == hf_moe_layers(hf)
    assert arch.qkv_bias == (family == "qwen2_moe") and arch.qk_norm == (family == "qwen3_moe")
    assert arch.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert arch.sliding_window is None and arch.route_weights_fp32 == (family == "mixtral")
    out = arch.to_hf_dict()
    assert ModelArch.from_hf_dict(copy.deepcopy(out)) == arch
    assert out["architectures"] == cfg["architectures"]
    back = AutoConfig.for_model(**copy.deepcopy(out))
    assert hf_moe_layers(back) == hf_moe_layers(hf)
    for key in ("num_experts_per_tok", "hidden_size", "num_hidden_layers"):
        assert getattr(back, key) == getattr(hf, key), key
    assert out["router_aux_loss_coef"] == cfg["router_aux_loss_coef"]  # carried along, not modelled


def test_moe_layer_patterns_by_hand():
    """Qwen3-30B-A3B: experts on all 48 layers. The mixed variant: sparse step 2 keeps layers 1, 3, 5, 7,
    of which mlp_only_layers removes 1. Mixtral: every layer; its top-2 weights renormalised in fp32."""
    assert ModelArch.from_hf_dict(copy.deepcopy(QWEN3_30B_A3B)).moe_layers == (True,) * 48
    mixed = ModelArch.from_hf_dict(copy.deepcopy(QWEN3_MOE_MIXED))
    assert [i for i, moe in enumerate(mixed.moe_layers) if moe] == [3, 5, 7]
    assert mixed.to_hf_dict()["mlp_only_layers"] == [0, 1, 2, 4, 6]  # the same layers, written plainly
    mixtral = ModelArch.from_hf_dict(copy.deepcopy(MIXTRAL_8X7B_INSTRUCT))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (8, 2, 14336)
    assert mixtral.norm_topk_prob and mixtral.route_weights_fp32
    qwen2 = ModelArch.from_hf_dict(copy.deepcopy(QWEN15_MOE_A27B_CHAT))
    assert (qwen2.num_experts, qwen2.num_experts_per_tok, qwen2.shared_expert_intermediate_size) == (60, 4, 5632)
    assert not qwen2.norm_topk_prob and qwen2.extra["sliding_window"] == 32768  # inert, carried for export


def test_transformers5_qwen3_moe_expert_count_alias():
    """transformers 5 saves Qwen3-MoE's expert count as num_local_experts (an alias of the hub's num_experts)."""
    cfg = {k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"}
    assert ModelArch.from_hf_dict({**cfg, "num_local_experts": 64}).num_experts == 64


@pytest.mark.parametrize("cfg, field", [
    ({**MIXTRAL_8X7B_INSTRUCT, "router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ({**MIXTRAL_8X7B_INSTRUCT, "num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({**MIXTRAL_8X7B_INSTRUCT, "num_local_experts": 0}, "num_local_experts=0"),
    ({**MIXTRAL_8X7B_INSTRUCT, "hidden_act": "gelu"}, "'gelu'"),
    ({**QWEN3_30B_A3B, "use_sliding_window": True}, "use_sliding_window=true"),
    ({**QWEN3_30B_A3B, "attention_bias": True}, "attention_bias=True"),
    ({**QWEN3_30B_A3B, "mlp_only_layers": [48]}, "mlp_only_layers=[48]"),
    ({**QWEN3_30B_A3B, "decoder_sparse_step": 0}, "decoder_sparse_step=0"),
    ({**QWEN3_30B_A3B, "moe_intermediate_size": None}, "moe_intermediate_size=None"),
    ({**QWEN15_MOE_A27B_CHAT, "shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0"),
    ({**QWEN15_MOE_A27B_CHAT, "use_sliding_window": True}, "use_sliding_window=true"),
], ids=["mixtral_jitter", "topk_over_experts", "zero_experts", "mixtral_gelu", "qwen3_moe_window",
        "qwen3_moe_bias", "qwen3_moe_dense_layer_out_of_range", "zero_sparse_step", "no_expert_ffn",
        "qwen2_moe_no_shared_expert", "qwen2_moe_window"])
def test_unsupported_moe_configs_are_refused_naming_the_field(cfg, field):
    with pytest.raises(UnsupportedConfigError) as err:
        ModelArch.from_hf_dict(copy.deepcopy(cfg), source="cfg.json")
    assert "cfg.json" in str(err.value) and field in str(err.value)
