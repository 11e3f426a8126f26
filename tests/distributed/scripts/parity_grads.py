"""Gradient parity at TP=2 (with and without sequence parallelism) vs the HF model (any family); a mixture of
experts at TP=2 with sequence parallelism (``sp``) and at EP=2 (``ep2``), through megatron's DDP and
``finalize_model_grads`` (the expert gradients reduced over their own data-parallel group).

    torchrun --nproc-per-node=2 parity_grads.py OUT.json PADDED_CKPT_DIR NAME=HF_DIR=CKPT_DIR ...

The same scalar loss on both sides, over the real positions of a right-padded batch::

    loss = sum_{b, t real} w[b, t] * log_softmax(logits[b, t])[target[b, t]]

(random targets and weights, fixed seed). The TP shards of every megatron gradient are gathered,
unpacked through the key map (QKV, gate/up) and compared per HF parameter with HF's ``.grad``.
Rank 0 writes ``{model: {"sp" | "nosp": {hf_name: relative_error}, ...}}``.

It also saves the first model as loaded at TP=2 into PADDED_CKPT_DIR (a training-style checkpoint:
padded vocabulary rows, which are filled with a sentinel so an export that leaks them shows it), and the first
mixture of experts as loaded at EP=2 into ``<NAME>_ep2_saved`` beside it (each rank writing its own experts).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from gather_hf import full_tensor, gather_hf_tensors, to_hf
from helpers import hub_names
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from parity_common import LENGTHS, batches, load_hf

from simpo_mcore.config import ParallelConfig
from simpo_mcore.convert import keymap
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.integrity import write_manifest
from simpo_mcore.convert.mcore_io import load_model_weights, model_sharded_state_dict, save_sharded
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.model.forward import position_ids_like
from simpo_mcore.optim import wrap_ddp
from simpo_mcore.parallel import init_distributed, shutdown

PADDED_ROW_SENTINEL = 1.0e4


def relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``|got - ref| / |ref|``; where HF's gradient is exactly 0 (an expert no real token chose), 0 if ours is
    exactly 0 too, else infinity."""
    if ref.norm() == 0:
        return 0.0 if got.norm() == 0 else float("inf")
    return ((got - ref).norm() / ref.norm()).item()


def weighted_logp_sum(logits: torch.Tensor, targets, weights, mask) -> torch.Tensor:
    """The shared loss: logits [b, s, vocab] -> scalar."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [b, s]
    return (logp * weights * mask).sum()


def hf_grads(hf_dir, arch, tokens, mask, targets, weights) -> dict[str, torch.Tensor]:
    """HF's gradients under the checkpoint's names (a MoE layer's fused experts split per expert)."""
    model = load_hf(hf_dir)
    logits = model(input_ids=tokens, attention_mask=mask).logits  # [b, s, vocab]
    weighted_logp_sum(logits, targets, weights, mask).backward()
    # named_parameters lists a tied lm_head once, as model.embed_tokens.weight (both uses summed).
    return hub_names({n: p.grad for n, p in model.named_parameters()}, arch)


def mcore_grads(chunks, arch, tokens, mask, targets, weights) -> tuple[dict[str, torch.Tensor], float]:
    (model,) = chunks
    model.zero_grad(set_to_none=True)
    out = model(tokens, position_ids_like(tokens), attention_mask=None)  # [b, s, v_padded / tp]
    logits = gather_from_tensor_model_parallel_region(out)[..., : arch.vocab_size]  # [b, s, vocab]
    weighted_logp_sum(logits, targets, weights, mask).backward()
    grads = {}
    for name, p in model.named_parameters():
        # Partial sums that megatron's finalize_model_grads all-reduces over TP, by its own rule: weights
        # marked sequence_parallel (over this rank's sequence shard), and q / k norms (over its heads).
        sp_partial = chunks[0].config.sequence_parallel and getattr(p, "sequence_parallel", False)
        if sp_partial or "q_layernorm" in name or "k_layernorm" in name:
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        grads[name] = full_tensor(p, p.grad, name)
    padded_rows_grad = max(  # vocab rows megatron pads: no gradient may reach them
        grads[k][arch.vocab_size:].abs().max().item()
        for k in ("embedding.word_embeddings.weight", "output_layer.weight") if k in grads)
    return grads, padded_rows_grad


MOE_LAYOUTS = {"sp": dict(tp=2, sequence_parallel=True), "ep2": dict(ep=2, moe_dispatcher="allgather")}


def moe_grads(arch, ckpt_dir: str, batch: tuple, saved_dir: str | None) -> dict:
    """``{layout: {hf_name: relative error}, ...}`` of an MoE model at each of :data:`MOE_LAYOUTS`, its
    gradients reduced by megatron's DDP (every rank runs the same batch: the data-parallel mean is that batch's
    gradient) and gathered over tensor-, expert-tensor- and expert-parallel ranks."""
    tokens, mask, targets, weights, ref = batch
    out = {}
    for key, layout in MOE_LAYOUTS.items():
        init_distributed(ParallelConfig(tp=layout.get("tp", 1), ep=layout.get("ep", 1), device="cpu"), seed=1234)
        chunks = build_model(arch, ModelOptions(precision="fp32", **layout))
        load_model_weights(chunks, ckpt_dir)
        ddp = wrap_ddp(chunks, distributed_optimizer=False, cpu=True)
        logits = ddp[0](tokens, position_ids_like(tokens), attention_mask=None)  # [b, s, v_padded / tp]
        logits = gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size]  # [b, s, vocab]
        weighted_logp_sum(logits, targets, weights, mask).backward()
        finalize_model_grads(ddp)
        padded = max(full_tensor(p, p.main_grad, n)[arch.vocab_size:].abs().max().item()
                     for n, p in chunks[0].named_parameters() if n in keymap.VOCAB_KEYS)
        got = gather_hf_tensors(ddp, arch, kind="grad")  # on rank 0
        out[key] = {n: relative(got[n], ref[n]) for n in ref if n in got}
        out[f"{key}_missing"] = sorted(set(ref) - set(got))  # rank 0 writes the results
        out[f"{key}_unexpected"] = sorted(set(got) - set(ref))
        out[f"{key}_padded_rows_grad"] = padded
        if key == "ep2" and saved_dir:
            save_checkpoint(chunks, ckpt_dir, saved_dir, "ep2")
    return out


def save_checkpoint(chunks, ckpt_dir: str, out_dir: str, saved_at: str) -> None:
    """The model as this layout holds it, saved by megatron (every rank its shards) as a converted checkpoint."""
    if dist.get_rank() == 0:
        Path(out_dir).mkdir(parents=True)
    dist.barrier()
    save_sharded(model_sharded_state_dict(chunks), out_dir)
    if dist.get_rank() == 0:
        meta = CheckpointMeta.read(ckpt_dir)
        CheckpointMeta(arch=meta.arch, tokenizer=None, kind="converted", info={"saved_at": saved_at}).write(out_dir)
    dist.barrier()
    write_manifest(out_dir)  # as every checkpoint simpo_mcore writes has (collective)


def save_padded(chunks, arch, ckpt_dir: str, out_dir: str) -> None:
    """Save the TP=2 model with its padded vocabulary rows set to a sentinel."""
    with torch.no_grad():
        for name, p in chunks[0].named_parameters():
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                start = ps.get_tensor_model_parallel_rank() * p.shape[0]
                pad_from = max(arch.vocab_size - start, 0)  # local index of the first padded row
                p[pad_from:] = PADDED_ROW_SENTINEL
    save_checkpoint(chunks, ckpt_dir, out_dir, "tp2")


def main(out_path: str, padded_dir: str, models: list[str]) -> None:
    results = {}
    specs = [spec.split("=") for spec in models]  # [name, hf_dir, ckpt_dir]
    first_moe = True
    for index, (name, hf_dir, ckpt_dir) in enumerate(specs):
        init_distributed(ParallelConfig(tp=2, pp=1, device="cpu"), seed=1234)
        arch = CheckpointMeta.read(ckpt_dir).arch
        tokens, mask = batches(arch.vocab_size, 11)["padded"]
        if arch.pad_token_id is not None:
            # HF builds nn.Embedding(padding_idx=pad_token_id), whose lookup never passes a gradient
            # to that row; megatron has no such notion. Keep the pad id out of the batch, as in
            # training, where it only fills padding (whose gradient is zero on both sides anyway).
            tokens[tokens == arch.pad_token_id] = (arch.pad_token_id + 1) % arch.vocab_size
        g = torch.Generator().manual_seed(5)
        targets = torch.randint(0, arch.vocab_size, tokens.shape, generator=g)  # [b, s]
        weights = torch.rand(tokens.shape, generator=g) - 0.5  # [b, s], both signs
        ref = hf_grads(hf_dir, arch, tokens, mask, targets, weights)
        results[name] = {"num_hf_params": len(ref), "real_tokens": sum(LENGTHS),
                         "zero_hf_grads": sorted(n for n, g in ref.items() if g.norm() == 0)}
        if arch.is_moe:
            saved = str(Path(padded_dir).parent / f"{name}_ep2_saved") if first_moe else None
            first_moe = False
            results[name].update(moe_grads(arch, ckpt_dir, (tokens, mask, targets, weights, ref), saved))
            continue
        for sp in (False, True):
            chunks = build_model(arch, ModelOptions(tp=2, sequence_parallel=sp, precision="fp32"))
            load_model_weights(chunks, ckpt_dir)
            grads, padded_rows_grad = mcore_grads(chunks, arch, tokens, mask, targets, weights)
            got = {k: v for name, g in grads.items() for k, v in to_hf(chunks[0], name, g, arch).items()}
            key = "sp" if sp else "nosp"
            results[name][key] = {n: relative(got[n], ref[n]) for n in ref if n in got}
            results[name][f"{key}_missing"] = sorted(set(ref) - set(got))
            results[name][f"{key}_unexpected"] = sorted(set(got) - set(ref))
            results[name][f"{key}_padded_rows_grad"] = padded_rows_grad
            if index == 0 and not sp:
                save_padded(chunks, arch, ckpt_dir, padded_dir)
            del chunks
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
