"""Mixture-of-experts checkpoints: the layouts a converted checkpoint holds, transformers 5's fused expert
tensors read like the hub's per-expert ones, and incomplete expert sets refused by name.

(The per-expert round trip HF -> megatron -> HF and the exported model's logits are in
``test_convert_roundtrip.py``; logits at EP 2 from a checkpoint converted at EP 1 in
``tests/distributed/test_parity.py``.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import MOE_MODELS, QUIET, make_tiny_hf_model, read_tensors
from megatron.core import dist_checkpointing
from safetensors.torch import save_file

from simpo_mcore.convert import keymap
from simpo_mcore.convert.hf_io import CheckpointError
from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
from simpo_mcore.convert.mcore_to_hf import convert_mcore_to_hf
from simpo_mcore.model.hf_config import ModelArch

pytestmark = pytest.mark.usefixtures("world_of_one")


def checkpoint_shapes(ckpt) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(str(ckpt)).items()}


def test_stacked_and_per_layer_expert_layouts(tmp_path):
    """Mixtral (every layer MoE): layer-stacked tensors, experts on the axis after the layers. Qwen3-MoE with
    dense layers 0 and 3: megatron's per-layer keys, the dense layers' MLP as in a dense model, the MoE layers'
    router, experts and own pre-MLP norm."""
    make_tiny_hf_model(tmp_path / "mixtral", **MOE_MODELS["mixtral"])
    convert_hf_to_mcore(tmp_path / "mixtral", tmp_path / "mixtral_ckpt", **QUIET)
    shapes = checkpoint_shapes(tmp_path / "mixtral_ckpt")
    assert shapes == keymap.expected_mcore_shapes(ModelArch.from_hf_dir(tmp_path / "mixtral"))
    assert shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (4, 6, 2 * 160, 64)  # [L, E, 2F, H]
    assert shapes["decoder.layers.mlp.experts.experts.linear_fc2.weight"] == (4, 6, 64, 160)
    assert shapes["decoder.layers.mlp.router.weight"] == (4, 6, 64)
    assert shapes["decoder.layers.pre_mlp_layernorm.weight"] == (4, 64)
    assert not any(k.startswith("decoder.layers.mlp.linear_fc") for k in shapes)

    make_tiny_hf_model(tmp_path / "qwen3", **MOE_MODELS["qwen3_moe"])
    convert_hf_to_mcore(tmp_path / "qwen3", tmp_path / "qwen3_ckpt", **QUIET)
    shapes = checkpoint_shapes(tmp_path / "qwen3_ckpt")
    assert shapes == keymap.expected_mcore_shapes(ModelArch.from_hf_dir(tmp_path / "qwen3"))
    for dense in (0, 3):
        assert shapes[f"decoder.layers.{dense}.mlp.linear_fc1.weight"] == (2 * 160, 64)
        assert shapes[f"decoder.layers.{dense}.mlp.linear_fc1.layer_norm_weight"] == (64,)
        assert f"decoder.layers.{dense}.mlp.router.weight" not in shapes
    for moe in (1, 2):
        assert shapes[f"decoder.layers.{moe}.mlp.experts.experts.linear_fc1.weight"] == (8, 2 * 48, 64)
        assert shapes[f"decoder.layers.{moe}.mlp.router.weight"] == (8, 64)
        assert shapes[f"decoder.layers.{moe}.pre_mlp_layernorm.weight"] == (64,)
        assert f"decoder.layers.{moe}.mlp.linear_fc1.weight" not in shapes
    assert not any(k.startswith("decoder.layers.self_attention") for k in shapes)  # nothing stacked


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_expert_tensors_convert_like_the_hub_layout(tmp_path, family):
    """A checkpoint holding transformers 5's in-memory names (``mlp.experts.gate_up_proj [E, 2F, H]``,
    ``down_proj``, Mixtral's router as ``mlp.gate``) converts to the same checkpoint as the hub layout: its
    export equals the per-expert source tensor by tensor."""
    model = make_tiny_hf_model(tmp_path / "hub", **MOE_MODELS[family])
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_bytes((tmp_path / "hub" / "config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in read_tensors(fused))
    convert_hf_to_mcore(fused, tmp_path / "ckpt", **QUIET)
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "out", **QUIET)
    hub, out = read_tensors(tmp_path / "hub"), read_tensors(tmp_path / "out")
    assert sorted(out) == sorted(hub)
    for name in hub:
        assert torch.equal(out[name], hub[name]), name


def test_missing_expert_is_refused_by_name(tmp_path):
    make_tiny_hf_model(tmp_path / "hf", **MOE_MODELS["qwen2_moe"])
    tensors = read_tensors(tmp_path / "hf")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight is missing"):
        convert_hf_to_mcore(tmp_path / "hf", tmp_path / "ckpt", **QUIET)
