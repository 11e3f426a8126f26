"""Logits parity of converted checkpoints vs the HF model (any family) at several (TP, PP, SP, EP) layouts.

    torchrun --nproc-per-node=4 parity_logits.py OUT.json LAYOUTS NAME=HF_DIR=CKPT_DIR ...

LAYOUTS is a comma list of ``TPxPP``, ``TPxPPsp``, optionally followed by ``epN`` and ``a2a`` (megatron's
all-to-all token dispatcher instead of its all-gather one; e.g.
``1x1,2x1,2x1sp,1x2,2x2,1x1ep2,1x1ep2a2a,2x1spep2``); every layout runs in this one launch (the
model-parallel groups are rebuilt per layout; spare ranks are data parallel and compute the same thing).
Layouts a model cannot take are skipped for it: EP > 1 or a dispatcher for a dense model, TP > 1 without SP
for a mixture of experts (megatron's MoE layers need SP with TP). A mixture of experts also runs its padded
batch's sequences as one packed row (``packed``). Rank 0 writes ``{layout: {model: {batch: max_abs_err,
batch_rel: max_abs_err / max |logit|, ...}}}``.
"""

from __future__ import annotations

import json
import re
import sys

import torch
import torch.distributed as dist
from parity_common import LENGTHS, batches, hf_logits, load_hf, packed_logits

from simpo_mcore.config import ParallelConfig
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.mcore_io import load_model_weights
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.model.forward import forward_logits
from simpo_mcore.parallel import init_distributed, shutdown


def parse_layout(text: str) -> tuple[int, int, bool, int, str]:
    tp, pp, sp, ep, a2a = re.fullmatch(r"(\d+)x(\d+)(sp)?(?:ep(\d+))?(a2a)?", text).groups()
    return int(tp), int(pp), sp is not None, int(ep or 1), "alltoall" if a2a else "allgather"


def compare(logits: torch.Tensor | None, ref: torch.Tensor, mask: torch.Tensor) -> dict:
    """Worst |logits - ref| over real positions (and relative to the largest |ref|), over the ranks that hold
    logits (the last pipeline stage); how many ranks compared."""
    err, compared = torch.zeros(2, dtype=torch.float64), torch.zeros(1)
    if logits is not None:
        assert logits.shape == ref.shape, (logits.shape, ref.shape)
        real = mask.bool()
        err[0] = (logits - ref).abs()[real].max()
        err[1] = err[0] / ref.abs()[real].max()
        compared[0] = 1
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    dist.all_reduce(compared)
    return {"abs": err[0].item(), "rel": err[1].item(), "ranks_compared": int(compared.item())}


def model_errors(chunks, arch, refs: dict) -> dict:
    errs = {}
    for batch, (tokens, mask, ref) in refs.items():
        got = compare(forward_logits(chunks, tokens, arch.vocab_size), ref, mask)  # [b, s, vocab] on the last stage
        errs.update({batch: got["abs"], f"{batch}_rel": got["rel"], f"{batch}_ranks_compared": got["ranks_compared"]})
    if arch.is_moe:  # the padded batch's real sequences end to end in one packed row
        tokens, mask, ref = refs["padded"]
        logits = packed_logits(chunks, [tokens[r, :n] for r, n in enumerate(LENGTHS)], arch.vocab_size)
        if logits is not None:  # [sum(LENGTHS), vocab] -> the padded layout of the reference
            logits = torch.cat([torch.cat([piece, ref.new_zeros(ref.shape[1] - n, ref.shape[2])])[None]
                                for piece, n in zip(logits.split(list(LENGTHS)), LENGTHS)])  # [b, s, vocab]
        got = compare(logits, ref, mask)
        errs.update({"packed": got["abs"], "packed_rel": got["rel"], "packed_ranks_compared": got["ranks_compared"]})
    return errs


def main(out_path: str, layouts: str, models: list[str]) -> None:
    specs = [m.split("=") for m in models]  # [name, hf_dir, ckpt_dir]
    refs = {}  # HF logits per model and batch, computed once per process
    results: dict = {}
    for layout in layouts.split(","):
        tp, pp, sp, ep, dispatcher = parse_layout(layout)
        init_distributed(ParallelConfig(tp=tp, pp=pp, ep=ep, device="cpu"), seed=1234)
        results[layout] = {}
        for name, hf_dir, ckpt_dir in specs:
            arch = CheckpointMeta.read(ckpt_dir).arch
            if ((ep > 1 or dispatcher != "allgather") and not arch.is_moe) or (arch.is_moe and tp > 1 and not sp):
                continue
            if name not in refs:
                hf = load_hf(hf_dir)
                refs[name] = {k: (t, m, hf_logits(hf, t, m)) for k, (t, m) in batches(arch.vocab_size, 7).items()}
                del hf
            opts = ModelOptions(tp=tp, pp=pp, sequence_parallel=sp, ep=ep, moe_dispatcher=dispatcher, precision="fp32")
            chunks = build_model(arch, opts)
            load_model_weights(chunks, ckpt_dir)
            results[layout][name] = model_errors(chunks, arch, refs[name])
            del chunks
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
