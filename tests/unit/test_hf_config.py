"""HF ``config.json`` -> :class:`LlamaArch` and back, on the real hub configs of the supported families.

The dicts below are the ``config.json`` files of the hub models named (as published; weights are
not needed). Every field that decides the function the model computes must be read, refused with
its name, or carried back out on export; none may be silently dropped.
"""

from __future__ import annotations

import copy

import pytest
import torch

from simpo_mcore.model.hf_config import LlamaArch, UnsupportedConfigError

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
    "llama31_transformers5": (LLAMA31_TRANSFORMERS5, (128256, 4096, 14336, 32, 32, 8, 128, 500000.0, False,
                                                      LLAMA31_SCALING, [128001, 128008, 128009])),
}


@pytest.mark.parametrize("name", CASES)
def test_hub_configs_parse(name):
    cfg, (vocab, hidden, ffn, layers, heads, kv, head_dim, theta, tie, scaling, eos) = CASES[name]
    arch = LlamaArch.from_hf_dict(copy.deepcopy(cfg))
    got = (arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers,
           arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim, arch.rope_theta,
           arch.tie_word_embeddings, arch.rope_scaling, arch.eos_token_id)
    assert got == (vocab, hidden, ffn, layers, heads, kv, head_dim, theta, tie, scaling, eos)
    assert arch.rms_norm_eps == 1e-5
    assert arch.max_position_embeddings == cfg["max_position_embeddings"]
    assert arch.torch_dtype == cfg.get("torch_dtype", cfg.get("dtype"))
    assert arch.bos_token_id == cfg["bos_token_id"]


@pytest.mark.parametrize("name", CASES)
def test_hub_configs_survive_export(name):
    """to_hf_dict -> from_hf_dict gives the same arch, and transformers reads the same rope."""
    from transformers import AutoConfig

    cfg = CASES[name][0]
    arch = LlamaArch.from_hf_dict(copy.deepcopy(cfg))
    out = arch.to_hf_dict()
    assert LlamaArch.from_hf_dict(copy.deepcopy(out)) == arch
    assert out["architectures"] == cfg["architectures"]
    for key in ("initializer_range", "use_cache"):  # fields we do not model are carried along
        assert out[key] == cfg[key]
    # transformers 5 normalises either layout into ``rope_parameters``: both must agree.
    src = AutoConfig.for_model(**copy.deepcopy(cfg)).rope_parameters
    exported = AutoConfig.for_model(**copy.deepcopy(out)).rope_parameters
    assert exported == src
    assert exported["rope_theta"] == arch.rope_theta


def test_mistral_keeps_its_model_type_and_null_window():
    out = LlamaArch.from_hf_dict(copy.deepcopy(MISTRAL_7B_V03)).to_hf_dict()
    assert out["model_type"] == "mistral" and out["sliding_window"] is None


def test_transformers5_default_rope_parameters():
    """``rope_parameters`` with rope_type default: theta read from inside it, no scaling."""
    cfg = {**{k: v for k, v in LLAMA3_8B.items() if k not in ("rope_theta", "rope_scaling")},
           "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    arch = LlamaArch.from_hf_dict(cfg)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling is None


def test_legacy_linear_scaling_with_type_key():
    """Old configs name the rope type ``type`` (e.g. CodeLlama-style linear scaling)."""
    cfg = {**LLAMA2_7B, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert LlamaArch.from_hf_dict(cfg).rope_scaling == {"rope_type": "linear", "factor": 4.0}


# ---------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("cfg, field", [
    (MISTRAL_7B_V01, "sliding_window=4096"),
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
    ({**LLAMA3_8B, "model_type": "qwen2"}, "'qwen2'"),
    ({**LLAMA3_8B, "num_key_value_heads": 5}, "num_key_value_heads=5"),
], ids=["sliding_window", "yarn", "dynamic", "yarn_rope_parameters", "missing_hidden", "missing_vocab",
        "null_layers", "missing_rope_field", "gelu", "attention_bias", "mlp_bias",
        "pretraining_tp", "model_type", "kv_heads"])
def test_unsupported_configs_are_refused_naming_the_field(cfg, field):
    with pytest.raises(UnsupportedConfigError) as err:
        LlamaArch.from_hf_dict(copy.deepcopy(cfg), source="cfg.json")
    assert "cfg.json" in str(err.value)
    assert field in str(err.value)


def test_from_hf_dir_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaArch.from_hf_dir(tmp_path)


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
    arch = LlamaArch.from_hf_dict(config.to_dict())
    ours = arch.inv_freq()
    if scaling is None:
        ref = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    if scaling and scaling["rope_type"] == "llama3":
        unscaled = LlamaArch.from_hf_dict({**config.to_dict(), "rope_parameters": None,
                                           "rope_scaling": None, "rope_theta": theta}).inv_freq()
        assert not torch.allclose(ours, unscaled)  # the scaling changes something: not a no-op test
