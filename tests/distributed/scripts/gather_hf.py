"""Gather a live megatron model's tensors (weights or gradients) into full HF-named tensors.

Run on every rank (it uses TP / PP collectives); returns the dict on global rank 0, ``{}`` elsewhere.
Independent of the checkpoint path on purpose: it reads megatron's own partition attributes.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from simpo_mcore.convert import keymap

LOCAL_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.")


def is_expert(param: torch.Tensor) -> bool:
    """A routed expert's parameter (megatron marks them for the expert data-parallel reduction)."""
    return not getattr(param, "allreduce", True)


def full_tensor(param: torch.Tensor, value: torch.Tensor, name: str) -> torch.Tensor:
    """All-gather a tensor-parallel shard along its partition dim (over the expert tensor-parallel group for a
    routed expert; fc1: re-interleave gate/up)."""
    group = ps.get_expert_tensor_parallel_group() if is_expert(param) else ps.get_tensor_model_parallel_group()
    if not getattr(param, "tensor_model_parallel", False) or group.size() == 1:
        return value.detach().clone()
    parts = [torch.empty_like(value) for _ in range(group.size())]
    dist.all_gather(parts, value.detach().contiguous(), group=group)
    if name.endswith("linear_fc1.weight"):  # each rank holds [gate_r; up_r]
        gates = [p.chunk(2, dim=0)[0] for p in parts]
        ups = [p.chunk(2, dim=0)[1] for p in parts]
        return torch.cat(gates + ups, dim=0)
    return torch.cat(parts, dim=param.partition_dim)


def gather_hf_tensors(chunks: list, arch, kind: str = "grad") -> dict[str, torch.Tensor]:
    """``kind``: ``grad`` (``main_grad`` under DDP, else ``.grad``) or ``weight``."""
    mine: dict[str, torch.Tensor] = {}
    dense_holder = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    expert_holder = ps.get_expert_tensor_parallel_rank() == 0 and ps.get_expert_data_parallel_rank() == 0
    for chunk in chunks:
        model = getattr(chunk, "module", chunk)
        for name, param in model.named_parameters():
            if kind == "weight":
                value = param.data
            else:
                value = getattr(param, "main_grad", None)
                value = param.grad if value is None else value
            full = full_tensor(param, value.float(), name).cpu()  # collective: on every rank
            # One rank per stage contributes each tensor (each expert-parallel rank its own experts).
            if expert_holder if is_expert(param) else dense_holder:
                mine.update(to_hf(model, name, full, arch))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() != 0:
        return {}
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in part.items():
            out.setdefault(k, v)  # tied embeddings: stage 0's copy (the grads were summed across stages)
    return out


def to_hf(model, name: str, full: torch.Tensor, arch) -> dict[str, torch.Tensor]:
    """One full (TP-gathered) megatron parameter -> its HF tensor(s): unpacked, vocab unpadded,
    layers numbered globally (``layer_number`` knows the pipeline / virtual-stage offset)."""
    if name.startswith("decoder.layers."):
        _, _, idx, rest = name.split(".", 3)
        module = model.decoder.layers[int(idx)]
        layer, expert = module.layer_number - 1, None
        if local := LOCAL_EXPERT.match(rest):  # this rank's j-th expert: global ep_rank x local count + j
            experts = module.mlp.experts
            expert = experts.ep_group.rank() * experts.num_local_experts + int(local.group(1))
            rest = "mlp.experts.experts." + rest[local.end():]
        spec = next(t for t in keymap.layer_tensors(arch, layer) if rest in (t.mcore, _local_norm_name(t.mcore)))
        return {keymap.hf_layer_key(layer, hf_name.format(e=expert)): tensor
                for hf_name, tensor in zip(spec.hf, keymap.unpack(full, spec.packing, arch))}
    if name == keymap.EMBEDDING[0]:
        return {keymap.EMBEDDING[1]: full[: arch.vocab_size]}
    if name == keymap.OUTPUT_LAYER[0]:  # the last stage's copy of a tied embedding is not an HF tensor
        return {} if arch.tie_word_embeddings else {keymap.OUTPUT_LAYER[1]: full[: arch.vocab_size]}
    if name == keymap.FINAL_NORM[0]:
        return {keymap.FINAL_NORM[1]: full}
    raise KeyError(f"unmapped parameter {name}")


def _local_norm_name(mcore_name: str) -> str:
    """The local spec's separate norm modules, under their own names."""
    return {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}.get(mcore_name, mcore_name)
