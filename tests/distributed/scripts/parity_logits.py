"""Logits parity of converted checkpoints vs the HF model (any family) at several (TP, PP, SP) layouts.

    torchrun --nproc-per-node=4 parity_logits.py OUT.json LAYOUTS NAME=HF_DIR=CKPT_DIR ...

LAYOUTS is a comma list of ``TPxPP`` or ``TPxPPsp`` (e.g. ``1x1,2x1,2x1sp,1x2,2x2``); every layout
runs in this one launch (the model-parallel groups are rebuilt per layout; spare ranks are data
parallel and compute the same thing). Rank 0 writes ``{layout: {model: {batch: max_abs_err}}}``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from parity_common import batches, hf_logits, load_hf

from simpo_mcore.config import ParallelConfig
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.mcore_io import load_model_weights
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.model.forward import forward_logits
from simpo_mcore.parallel import init_distributed, shutdown


def parse_layout(text: str) -> tuple[int, int, bool]:
    sp = text.endswith("sp")
    tp, pp = text.removesuffix("sp").split("x")
    return int(tp), int(pp), sp


def main(out_path: str, layouts: str, models: list[str]) -> None:
    specs = [m.split("=") for m in models]  # [name, hf_dir, ckpt_dir]
    refs = {}  # HF logits per model and batch, computed once per process
    results: dict = {}
    for layout in layouts.split(","):
        tp, pp, sp = parse_layout(layout)
        init_distributed(ParallelConfig(tp=tp, pp=pp, device="cpu"), seed=1234)
        results[layout] = {}
        for name, hf_dir, ckpt_dir in specs:
            arch = CheckpointMeta.read(ckpt_dir).arch
            if name not in refs:
                hf = load_hf(hf_dir)
                refs[name] = {k: (t, m, hf_logits(hf, t, m)) for k, (t, m) in batches(arch.vocab_size, 7).items()}
                del hf
            chunks = build_model(arch, ModelOptions(tp=tp, pp=pp, sequence_parallel=sp, precision="fp32"))
            load_model_weights(chunks, ckpt_dir)
            errs = {}
            for batch, (tokens, mask, ref) in refs[name].items():
                logits = forward_logits(chunks, tokens, arch.vocab_size)  # [b, s, vocab] on the last stage, else None
                err, compared = torch.zeros(1), torch.zeros(1)
                if logits is not None:
                    assert logits.shape == ref.shape, (logits.shape, ref.shape)
                    err[0] = (logits - ref).abs()[mask.bool()].max()  # real positions only
                    compared[0] = 1
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                dist.all_reduce(compared)
                errs[batch] = err.item()
                errs[f"{batch}_ranks_compared"] = int(compared.item())
            results[layout][name] = errs
            del chunks
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
