"""One training step's SimPO objective at given (TP, PP, DP, SP) layouts; rank 0 writes what it saw.

argv: pairs.json out_root MODEL [MODEL ...], MODEL = "name=hf_dir=ckpt_dir=LAYOUT[/LAYOUT...]" and
LAYOUT = "tp,pp,sp" (DP is what the world leaves; the process groups are rebuilt for each layout, so one
launch covers several models and layouts). For each model, layout and micro-batch size: per-pair average
log-probs, the reduced metrics, and the gradients of every parameter (gathered and mapped to HF names)
after megatron's schedule + DDP finalisation, written to ``out_root/<name>/<tp>-<pp>-<dp>-<sp>/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from gather_hf import gather_hf_tensors
from safetensors.torch import save_file

from simpo_mcore.config import LossConfig, ParallelConfig
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.mcore_io import load_model_weights
from simpo_mcore.data.batching import shift_labels
from simpo_mcore.logprobs import TokenLogpsContext, sequence_logps
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.optim import wrap_ddp
from simpo_mcore.parallel import init_distributed, shutdown
from simpo_mcore.step import LossScale, make_forward_step, reduce_reports, run_schedule

LOSS = LossConfig(type="simpo", beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1, sft_weight=0.5)


def micro_batches(pairs: list[dict], start: int, k: int, seq_len: int) -> list[dict]:
    """[c_0..c_{k-1}, r_0..r_{k-1}] rows per micro-batch, right-padded to seq_len, labels -100 on
    prompt and padding (pairs hold ``{chosen,rejected}_{input_ids,labels}``, the pipeline's columns)."""
    out = []
    for m in range(0, len(pairs), k):
        group = pairs[m:m + k]
        tokens = torch.zeros(2 * len(group), seq_len, dtype=torch.long)
        labels = torch.full_like(tokens, -100)
        for side, key in enumerate(("chosen", "rejected")):
            for i, pair in enumerate(group):
                row = side * len(group) + i
                seq = pair[f"{key}_input_ids"]
                tokens[row, :len(seq)] = torch.tensor(seq)
                labels[row, :len(seq)] = torch.tensor(pair[f"{key}_labels"])
        out.append({"tokens": tokens, "labels": labels, "index": torch.arange(start + m, start + m + len(group))})
    return out


def micro_sizes(dp: int) -> list[int]:
    """One micro-batch per rank, and several (of 2 pairs at DP=1, of 1 pair at DP=2)."""
    return [NUM_PAIRS // dp, 2 if dp == 1 else 1]


NUM_PAIRS = 8


def main():
    pairs_path, out_root = sys.argv[1:3]
    for model in sys.argv[3:]:
        name, _, ckpt_dir, layouts = model.split("=")
        for spec in layouts.split("/"):
            tp, pp, sp = (int(x) for x in spec.split(","))
            run_layout(ckpt_dir, pairs_path, Path(out_root) / name, tp, pp, bool(sp))
    shutdown()


def run_layout(ckpt_dir, pairs_path, out_root, tp, pp, sp):
    layout = init_distributed(ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp, device="cpu"), seed=0)
    out_dir = Path(out_root) / f"{tp}-{pp}-{layout.dp}-{int(sp)}"
    if layout.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    arch = CheckpointMeta.read(ckpt_dir).arch
    chunks = build_model(arch, ModelOptions(tp=tp, pp=pp, sequence_parallel=sp))
    load_model_weights(chunks, ckpt_dir)
    ddp = wrap_ddp(chunks, distributed_optimizer=False, cpu=True)
    from megatron.core.distributed import finalize_model_grads
    chunks[0].config.finalize_model_grads_func = finalize_model_grads

    pairs = json.loads(Path(pairs_path).read_text())
    G = len(pairs)
    assert G == NUM_PAIRS
    per_rank = G // layout.dp
    mine = pairs[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
    longest = max(len(p[f"{key}_input_ids"]) for p in pairs for key in ("chosen", "rejected"))
    seq_len = -(-longest // 4) * 4
    head = TokenLogpsContext(vocab_size=arch.vocab_size, chunk_tokens=16)
    results = {}
    for k in micro_sizes(layout.dp):
        batches = micro_batches(mine, layout.dp_rank * per_rank, k, seq_len)
        chosen_tokens = sum(int((b["labels"][: b["labels"].shape[0] // 2] != -100).sum()) for b in batches)
        totals = torch.tensor([float(chosen_tokens)])
        torch.distributed.all_reduce(totals)
        # every TP/PP rank of a DP replica counted the same tokens: divide the world sum back
        chosen_global = int(totals.item()) // (tp * pp)
        scale = LossScale(len(batches), layout.dp, G, chosen_global)
        inner = make_forward_step(LOSS, head, layout.device, scale)
        seen: list[tuple[list[int], list[float]]] = []

        def forward_step(it, model, inner=inner, seen=seen):
            batch = next(it)
            output, loss_func = inner(iter([batch]), model)

            def record(token_logps, batch=batch, loss_func=loss_func):
                _, _, avg = sequence_logps(token_logps, shift_labels(batch["labels"]))
                kk = avg.shape[0] // 2
                seen.append((batch["index"].tolist(), avg[:kk].tolist(), avg[kk:].tolist()))
                return loss_func(token_logps)

            return output, record

        for c in ddp:
            c.zero_grad_buffer()
        reports = run_schedule(ddp, forward_step, batches, forward_only=False)
        metrics = reduce_reports(reports, LOSS.sft_weight, layout.device)
        grads = gather_hf_tensors(ddp, arch, "grad")
        all_seen = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(all_seen, seen if layout.tp_rank == 0 else [])
        if layout.rank == 0:
            avg = {}
            for part in all_seen:
                for idx, c, r in part:
                    for i, ci, ri in zip(idx, c, r):
                        avg[i] = (ci, ri)
            results[k] = {"metrics": metrics, "avg_logps": {str(i): v for i, v in sorted(avg.items())},
                          "num_microbatches": len(batches)}
            save_file({n: t.contiguous() for n, t in grads.items()}, str(Path(out_dir) / f"grads_k{k}.safetensors"))
    if layout.rank == 0:
        (out_dir / "result.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
