"""The ways other Llama converters are known to fail, one explicit test each.

1. tied embeddings: the lm_head skipped (or exported untied and then randomly initialised);
2. padded vocabulary rows leaking into the exported embedding / lm_head;
3. Llama-3.1 rope scaling silently dropped;
4. a wrong QKV layout (visible only when kv_heads < heads, and head_dim != hidden / heads);
5. a family's features dropped on the way (a config written as Llama's, a window or a soft-cap left out):
   each of them changes what the tiny test models compute, so the parity tests would see it.

Each test compares what ``transformers`` computes from the exported directory with the source, and
where the failure could hide, a negative control shows the comparison would have caught it. The
megatron forward at every TP / PP layout is in ``tests/distributed/test_parity.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    FAMILY_MODELS,
    LLAMA31_ROPE,
    QUIET,
    load_hf_model,
    make_tiny_hf_llama,
    make_tiny_hf_model,
    resave_checkpoint,
)
from safetensors.torch import load_file

from simpo_mcore.convert import keymap
from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
from simpo_mcore.convert.mcore_to_hf import convert_mcore_to_hf
from simpo_mcore.model.hf_config import ModelArch

TOKENS = torch.randint(0, 250, (2, 100), generator=torch.Generator().manual_seed(0))  # 100 > 64


pytestmark = pytest.mark.usefixtures("world_of_one")


def export(tmp_path: Path, **model_kw):
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    if model_kw.get("rope_scaling"):  # transformers adds rope_theta to the dict it is given
        model_kw["rope_scaling"] = dict(model_kw["rope_scaling"])
    model = make_tiny_hf_llama(src, **model_kw)
    convert_hf_to_mcore(src, ckpt, **QUIET)
    convert_mcore_to_hf(ckpt, out, **QUIET)
    return model, ckpt, out


def load(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def test_tied_lm_head(tmp_path):
    source, _, out = export(tmp_path, tie=True)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    exported = load(out)
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(exported), logits(source))
    # Negative control: what a converter that drops lm_head and writes tie=false gives.
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    assert (logits(load(out)) - logits(source)).abs().max() > 1e-3


def test_no_padded_rows_in_exports(tmp_path):
    """A checkpoint whose vocab rows are padded (as megatron saves them at TP>1: 250 -> 256 rows,
    the padding filled with a sentinel here) exports exactly ``vocab_size`` rows."""
    from megatron.core import dist_checkpointing

    source, ckpt, _ = export(tmp_path, vocab_size=250, tie=False)
    tensors = dist_checkpointing.load_plain_tensors(str(ckpt))
    padded = resave_checkpoint(ckpt, tmp_path / "padded", put={
        key: torch.cat([tensors[key], torch.full((6, 64), 1.0e4)]) for key in keymap.VOCAB_KEYS})  # [256, h]
    assert tuple(dist_checkpointing.load_tensors_metadata(str(padded))[keymap.EMBEDDING[0]].global_shape) == (256, 64)

    convert_mcore_to_hf(padded, tmp_path / "out2", **QUIET)
    exported = load_file(tmp_path / "out2" / "model.safetensors")
    assert exported["model.embed_tokens.weight"].shape == (250, 64)
    assert exported["lm_head.weight"].shape == (250, 64)
    assert exported["model.embed_tokens.weight"].abs().max() < 1.0e4
    assert torch.equal(logits(load(tmp_path / "out2")), logits(source))


def test_rope_scaling_is_carried_through_export(tmp_path):
    source, ckpt, out = export(tmp_path, rope_scaling=LLAMA31_ROPE)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == LLAMA31_ROPE
    exported = load(out)
    params = exported.config.rope_parameters  # what transformers 5 actually uses
    assert {k: params[k] for k in LLAMA31_ROPE} == LLAMA31_ROPE
    assert torch.equal(logits(exported), logits(source))
    # Negative control: the same weights without the scaling compute something else at seq 100.
    cfg.pop("rope_scaling")
    (out / "config.json").write_text(json.dumps(cfg))
    assert (logits(load(out)) - logits(source)).abs().max() > 1e-3


def test_qkv_layout_grouped_per_query_group():
    """Megatron's fused QKV: for each query group g, rows [q heads of g; k_g; v_g].

    Labels every row by (kind, head) and checks the packed order by hand for 4 heads / 2 groups.
    """
    arch = ModelArch(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=16)
    d, h = 32, 64

    def labelled(kind: int, heads: int) -> torch.Tensor:  # row (head j, dim i) holds kind*100 + j
        return (kind * 100 + torch.arange(heads)).repeat_interleave(d)[:, None].expand(heads * d, h).float()

    q, k, v = labelled(1, 4), labelled(2, 2), labelled(3, 2)
    packed = keymap.pack_qkv(q, k, v, arch)
    assert packed.shape == ((4 + 2 * 2) * d, h)
    heads_in_order = packed[::d, 0].tolist()
    assert heads_in_order == [100, 101, 200, 300, 102, 103, 201, 301]
    assert all(torch.equal(a, b) for a, b in zip(keymap.unpack_qkv(packed, arch), (q, k, v)))


def test_qkv_layout_matters_for_this_model(tmp_path):
    """With kv_heads < heads and head_dim != hidden / heads the export reproduces the model,
    and reading the fused tensor as a plain [q; k; v] (a common converter bug) does not."""
    source, _, out = export(tmp_path, hidden_size=64, heads=4, kv_heads=2, head_dim=32)
    assert torch.equal(logits(load(out)), logits(source))
    arch = ModelArch.from_hf_dir(out)
    wrong = load(out)
    with torch.no_grad():
        for layer in wrong.model.layers:
            attn = layer.self_attn
            packed = keymap.pack_qkv(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, arch)
            q, k, v = torch.split(packed, [4 * 32, 2 * 32, 2 * 32])  # the naive reading
            attn.q_proj.weight.copy_(q)
            attn.k_proj.weight.copy_(k)
            attn.v_proj.weight.copy_(v)
    assert (logits(wrong) - logits(source)).abs().max() > 1e-3


# What a converter that loses each feature would export, as config edits: the feature switched off, or the
# family written as Llama.
DROPPED = {
    "mistral": {"sliding_window": None},
    "qwen2": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},  # loses the q / k / v biases
    "qwen3": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},  # loses the q / k norms
    "gemma2": {"attn_logit_softcapping": None, "final_logit_softcapping": None, "sliding_window": 4096,
               "query_pre_attn_scalar": 32},  # 4096: no window at these lengths; 32: head_dim's own scale
}


@pytest.mark.parametrize("family", DROPPED)
def test_family_features_survive_export_and_each_matters(tmp_path, family):
    """The export computes the source's logits exactly (sequence 100, window 16); each feature the export
    carries changes the logits by more than 0.1 when dropped, so a parity test at this size sees it."""
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    make_tiny_hf_model(src, **FAMILY_MODELS[family])
    convert_hf_to_mcore(src, ckpt, **QUIET)
    convert_mcore_to_hf(ckpt, out, **QUIET)
    reference = logits(load_hf_model(src))
    assert torch.equal(logits(load_hf_model(out)), reference)
    cfg = json.loads((out / "config.json").read_text())
    effects = {}
    for key, value in DROPPED[family].items():
        if key == "architectures":
            continue
        changed = {**cfg, key: value, **({"architectures": ["LlamaForCausalLM"]} if key == "model_type" else {})}
        (out / "config.json").write_text(json.dumps(changed))
        effects[key] = (logits(load_hf_model(out)) - reference).abs().max().item()
    assert all(e > 0.1 for e in effects.values()), effects
    print(f"[dropped] {family}: max |logits change| " + ", ".join(f"{k} {v:.2g}" for k, v in effects.items()))
