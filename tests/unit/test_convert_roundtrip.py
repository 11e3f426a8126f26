"""HF -> megatron checkpoint -> HF reproduces every tensor bit for bit, and the config that matters.

Single process (``ensure_process_group`` gives the world of one that ``dist_checkpointing`` needs).
The exported directory is also loaded with ``AutoModelForCausalLM`` and must compute exactly the
source model's logits: the config it carries (rope scaling, tying, head_dim, eps, theta; per family
the window and its layers, biases, q / k norms, Gemma-2's norms, scalar and soft-capping) is the one
transformers actually reads, not just keys that look right. Every family: Llama, Mistral with its
sliding window, Qwen2 (biases, tied), Qwen3, Gemma-2, and the mixtures of experts: Mixtral, Qwen3-MoE with
dense and MoE layers, Qwen2-MoE with its shared expert (per-expert hub tensors in and out).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import (
    FAMILY_MODELS,
    LLAMA31_ROPE,
    MOE_MODELS,
    QUIET,
    load_hf_model,
    make_tiny_hf_llama,
    make_tiny_hf_model,
    read_tensors,
)
from safetensors import safe_open

from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.hf_io import INDEX_FILE, SINGLE_FILE
from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
from simpo_mcore.convert.mcore_to_hf import convert_mcore_to_hf
from simpo_mcore.model.hf_config import ModelArch

pytestmark = pytest.mark.usefixtures("world_of_one")


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = load_hf_model(hf_dir, dtype="auto")
    with torch.no_grad():
        return model(tokens).logits


def roundtrip(tmp_path: Path, max_shard_bytes: int = 5 * 10**9, **model_kw) -> tuple[Path, Path, Path]:
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    if model_kw.get("rope_scaling"):  # transformers adds rope_theta to the dict it is given
        model_kw["rope_scaling"] = dict(model_kw["rope_scaling"])
    make_tiny_hf_model(src, **model_kw)
    convert_hf_to_mcore(src, ckpt, **QUIET)
    convert_mcore_to_hf(ckpt, out, max_shard_bytes=max_shard_bytes, **QUIET)
    return src, ckpt, out


CASES = {
    "fp32_untied": dict(dtype="float32"),
    "bf16_untied": dict(dtype="bfloat16"),
    "fp32_tied_llama32_like": dict(dtype="float32", tie=True, rope_scaling=LLAMA31_ROPE, head_dim=32),
    "bf16_tied_llama32_like": dict(dtype="bfloat16", tie=True, rope_scaling=LLAMA31_ROPE, head_dim=32),
    **{f"fp32_{name}": dict(dtype="float32", **kw) for name, kw in FAMILY_MODELS.items()},
    "bf16_gemma2": dict(dtype="bfloat16", **FAMILY_MODELS["gemma2"]),
    "fp32_qwen2_untied_no_window": dict(dtype="float32", family="qwen2"),
    **{f"fp32_{name}": dict(dtype="float32", **kw) for name, kw in MOE_MODELS.items()},
    "bf16_qwen2_moe": dict(dtype="bfloat16", **MOE_MODELS["qwen2_moe"]),
}


@pytest.mark.parametrize("sharded", [False, True], ids=["one_file", "sharded"])
@pytest.mark.parametrize("case", CASES)
def test_roundtrip_is_bit_exact(tmp_path, case, sharded):
    limit = 20_000 if sharded else 5 * 10**9  # 20 KB: a tiny model still spreads over many files
    src, ckpt, out = roundtrip(tmp_path, max_shard_bytes=limit, vocab_size=1000, **CASES[case])
    a, b = read_tensors(src), read_tensors(out)
    assert sorted(b) == sorted(a)  # same names: a tied export has no lm_head, an untied one has it
    for name in a:
        assert b[name].dtype == a[name].dtype, name
        assert torch.equal(b[name], a[name]), name
    if sharded:
        index = json.loads((out / INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 5 and not (out / SINGLE_FILE).exists()
        assert sorted(index["weight_map"]) == sorted(a)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
        for name in files:
            size = (out / name).stat().st_size
            with safe_open(out / name, framework="pt") as f:
                # A file goes over the limit only when it holds one tensor bigger than the limit.
                assert size <= limit + 4096 or len(list(f.keys())) == 1, (name, size)
    else:
        assert (out / SINGLE_FILE).is_file() and not (out / INDEX_FILE).exists()


@pytest.mark.parametrize("case", CASES)
def test_roundtrip_config_and_logits(tmp_path, case):
    src, ckpt, out = roundtrip(tmp_path, vocab_size=1000, **CASES[case])
    a, b = ModelArch.from_hf_dir(src), ModelArch.from_hf_dir(out)
    for f in dataclasses.fields(ModelArch):
        if f.name != "extra":
            assert getattr(b, f.name) == getattr(a, f.name), f.name
    meta = CheckpointMeta.read(ckpt)
    assert meta.arch == a  # the checkpoint's own copy of the architecture
    family = CASES[case].get("family", "llama")
    assert meta.arch.model_type == family
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == family
    assert exported["architectures"] == json.loads((src / "config.json").read_text())["architectures"]
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    # seq 100 > original_max_position_embeddings 64 and > the families' window 16: rope scaling and the
    # window decide these logits.
    tokens = torch.randint(0, 1000, (2, 100), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(out, tokens), hf_logits(src, tokens))


def test_cast_on_import_and_on_export(tmp_path):
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    make_tiny_hf_llama(src, dtype="float32")
    convert_hf_to_mcore(src, ckpt, dtype="bfloat16", **QUIET)
    assert CheckpointMeta.read(ckpt).arch.torch_dtype == "bfloat16"
    convert_mcore_to_hf(ckpt, out, **QUIET)
    convert_mcore_to_hf(ckpt, tmp_path / "out32", dtype="float32", **QUIET)
    a, b, c = read_tensors(src), read_tensors(out), read_tensors(tmp_path / "out32")
    for name in a:
        assert b[name].dtype == torch.bfloat16 and torch.equal(b[name], a[name].to(torch.bfloat16)), name
        assert c[name].dtype == torch.float32 and torch.equal(c[name], b[name].float()), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "out32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_tokenizer_and_generation_files_travel(tmp_path):
    """Files copied from the HF dir into <ckpt>/tokenizer/ and from there into the export."""
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    make_tiny_hf_llama(src)
    payload = {"tokenizer.json": '{"fake": 1}', "tokenizer_config.json": '{"fake": 2}',
               "special_tokens_map.json": "{}", "chat_template.jinja": "{{ messages }}"}
    for name, text in payload.items():
        (src / name).write_text(text)
    convert_hf_to_mcore(src, ckpt, **QUIET)
    assert CheckpointMeta.read(ckpt).tokenizer == "tokenizer"
    convert_mcore_to_hf(ckpt, out, **QUIET)
    for name, text in payload.items():
        assert (ckpt / "tokenizer" / name).read_text() == text
        assert (out / name).read_text() == text
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    # --tokenizer DIR wins over the checkpoint's copy
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_text('{"other": 1}')
    convert_mcore_to_hf(ckpt, tmp_path / "out2", tokenizer_dir=other, **QUIET)
    assert (tmp_path / "out2" / "tokenizer.json").read_text() == '{"other": 1}'
    assert not (tmp_path / "out2" / "tokenizer_config.json").exists()


def test_real_tokenizer_loads_after_export(tmp_path, shared_data):
    from transformers import AutoTokenizer

    tok_src = shared_data / "smollm2_tokenizer"
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    make_tiny_hf_llama(src)
    for f in tok_src.iterdir():
        if f.is_file():
            (src / f.name).write_bytes(f.read_bytes())
    convert_hf_to_mcore(src, ckpt, **QUIET)
    convert_mcore_to_hf(ckpt, out, **QUIET)
    text = "Conversion keeps the tokenizer: ünïcödé, 12345."
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(tok_src)(text).input_ids


def test_checkpoint_is_layout_independent_and_unpadded(tmp_path):
    """What the converted checkpoint holds: global shapes, unpadded vocab, the meta file."""
    from megatron.core import dist_checkpointing

    from simpo_mcore.convert import keymap

    src, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    make_tiny_hf_llama(src, vocab_size=250, tie=False)
    convert_hf_to_mcore(src, ckpt, **QUIET)
    arch = ModelArch.from_hf_dir(src)
    md = dist_checkpointing.load_tensors_metadata(str(ckpt))
    shapes = {k: tuple(v.global_shape) for k, v in md.items()}
    assert shapes == keymap.expected_mcore_shapes(arch)
    assert shapes["embedding.word_embeddings.weight"] == (250, 64)  # not padded to 256
    assert shapes["decoder.layers.self_attention.linear_qkv.weight"] == (4, (4 + 2 * 2) * 16, 64)
    meta = json.loads((ckpt / "simpo_mcore.json").read_text())
    assert meta["kind"] == "converted" and meta["arch"]["vocab_size"] == 250
    assert not list(tmp_path.glob("*.incomplete*"))


def test_format_1_metadata_still_reads(tmp_path):
    """A checkpoint converted before the model families (format 1: no family fields in ``arch``) reads as
    the Llama it was; an unknown format is refused naming it."""
    src, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    make_tiny_hf_llama(src)
    convert_hf_to_mcore(src, ckpt, **QUIET)
    meta_path = ckpt / "simpo_mcore.json"
    data = json.loads(meta_path.read_text())
    assert data["format_version"] == 2 and data["arch"]["model_type"] == "llama"
    old_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                  "tie_word_embeddings", "rope_scaling", "model_type", "torch_dtype", "bos_token_id",
                  "eos_token_id", "pad_token_id", "extra")  # LlamaArch's fields in format 1
    meta_path.write_text(json.dumps({**data, "format_version": 1,
                                     "arch": {k: data["arch"][k] for k in old_fields}}))
    arch = CheckpointMeta.read(ckpt).arch
    assert arch == ModelArch.from_hf_dir(src)
    assert arch.sliding_window is None and not arch.qkv_bias and not arch.sandwich_norms
    meta_path.write_text(json.dumps({**data, "format_version": 3}))
    with pytest.raises(ValueError, match="format_version 3"):
        CheckpointMeta.read(ckpt)
