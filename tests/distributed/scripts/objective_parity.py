"""One training step's SimPO objective at given (TP, PP, VPP, DP, SP) layouts, padded and packed; rank 0 writes
what it saw.

argv: pairs.json out_root MODEL [MODEL ...], MODEL = "name=hf_dir=ckpt_dir=LAYOUT[/LAYOUT...]" and
LAYOUT = "tp,pp,sp[,vpp][,ep:N][,etp:N][,aux:C][,cp:N]" (DP is what the world leaves; ``ep`` / ``etp``: a mixture
of experts' expert-parallel and expert tensor-parallel sizes, ``aux``: its ``moe_aux_loss_coeff``; ``cp``: the
context-parallel size; the process groups are rebuilt for each layout, so one launch covers several models and
layouts). For each model, layout and way of batching the step (``padded_k<k>``: micro-batches of k pairs padded to
the step's longest sequence; ``packed_<capacity>``: the global batch packed into rows of at most ``capacity``
positions and split over the data-parallel ranks, as training does; under context parallelism each micro-batch
then split for this rank by the training's own functions, ``data.context_parallel``): per-pair average and summed
log-probs, the reduced metrics (a mixture of experts' too), the micro-batch counts, each data-parallel rank's
micro-batches (their pairs), and the gradients of every parameter (gathered and mapped to HF names) after
megatron's schedule + DDP finalisation, written to
``out_root/<name>/<tp>-<pp>-<dp>-<sp>[-vpp<v>][-ep<N>][-etp<N>][-aux<C>][-cp<c>]/``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from gather_hf import gather_hf_tensors
from helpers import pair_columns
from safetensors.torch import save_file

from simpo_mcore.config import LossConfig, ParallelConfig
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.mcore_io import load_model_weights
from simpo_mcore.data.context_parallel import cp_multiple, split_packed_rows, split_padded_pairs
from simpo_mcore.data.packing import collate_packed_row, pair_positions, step_rows
from simpo_mcore.data.padded import collate_pairs
from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.microbatch import LossScale, MicroBatch
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.objective import (
    batch_sequence_logps,
    make_forward_step,
    reduce_moe_stats,
    reduce_reports,
    run_schedule,
)
from simpo_mcore.optim import wrap_ddp
from simpo_mcore.parallel import init_distributed, shutdown

LOSS = LossConfig(type="simpo", beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1, sft_weight=0.5)
NUM_PAIRS = 8
MULTIPLE = 4  # lengths a multiple of 4: sequence parallelism at TP=2 needs an even number of positions


def padded_micro_batches(pairs: list[dict], start: int, k: int, seq_len: int, vocab: int) -> list[MicroBatch]:
    """[c_0..c_{k-1}, r_0..r_{k-1}] rows per micro-batch, right-padded to seq_len (``collate_pairs``)."""
    return [collate_pairs(pair_columns(pairs[m:m + k]), list(range(start + m, start + m + len(pairs[m:m + k]))),
                          seq_len, pad_id=0, vocab_size=vocab) for m in range(0, len(pairs), k)]


def pair_sizes(pairs: list[dict], split: int) -> list[int]:
    """Positions of each pair in a packed row (each sequence padded to ``split`` under context parallelism)."""
    return [pair_positions((len(p["chosen_input_ids"]), len(p["rejected_input_ids"])), split) for p in pairs]


def packed_micro_batches(pairs: list[dict], capacity: int, dp: int, dp_rank: int, rows_multiple: int,
                         same_shape: bool, vocab: int, cp_split: tuple[int, int, int] | None) -> list[MicroBatch]:
    """This rank's rows of the whole global batch packed as training packs it (``step_rows``), collated
    (``collate_packed_row``) to their own lengths, or all to the longest under pipeline parallelism. Under context
    parallelism (``cp_split``: cp, rank, split multiple) collated without a tail, then split as training splits
    them (``split_packed_rows``)."""
    split = cp_split[2] if cp_split else 1
    rows = step_rows(pair_sizes(pairs, split), capacity, dp, rows_multiple)[dp_rank]
    fills = [sum(len(pairs[i][f"{key}_input_ids"]) for i in row for key in ("chosen", "rejected")) for row in rows]
    if cp_split:
        cp, rank, split = cp_split
        whole = [collate_packed_row(pair_columns([pairs[i] for i in row]), row, fill, pad_id=0, vocab_size=vocab)
                 for row, fill in zip(rows, fills)]
        return split_packed_rows(whole, cp, rank, split, math.lcm(MULTIPLE, split), same_shape, pad_id=0)
    longest = -(-max(fills) // MULTIPLE) * MULTIPLE
    return [collate_packed_row(pair_columns([pairs[i] for i in row]), row,
                               longest if same_shape else -(-fill // MULTIPLE) * MULTIPLE, pad_id=0, vocab_size=vocab)
            for row, fill in zip(rows, fills)]


def batchings(pairs: list[dict], dp: int, pp: int, vpp: int | None, split: int) -> list[tuple[str, object]]:
    """(name, k or capacity): one padded micro-batch per rank and several (of 2 pairs at DP=1, of 1 at
    DP=2); packed rows holding one or two pairs, and rows holding a whole rank's share. The interleaved
    schedule needs a multiple of PP micro-batches: there only the padded micro-batches of 2 pairs."""
    per_rank = NUM_PAIRS // dp
    padded = [2] if vpp else [per_rank, 2 if dp == 1 else 1]
    sizes = pair_sizes(pairs, split)
    return [(f"padded_k{k}", k) for k in padded] + [(f"packed_{c}", c) for c in (max(sizes), sum(sizes))]


def parse_layout(spec: str) -> dict:
    """``"tp,pp,sp[,vpp][,ep:N][,etp:N][,aux:C][,cp:N]"`` -> keyword arguments of :func:`run_layout`."""
    tp, pp, sp, *rest = spec.split(",")
    named = dict(item.split(":") for item in rest if ":" in item)
    vpp = [int(item) for item in rest if ":" not in item]
    return dict(tp=int(tp), pp=int(pp), sp=bool(int(sp)), vpp=vpp[0] if vpp else None, ep=int(named.get("ep", 1)),
                etp=int(named["etp"]) if "etp" in named else None, aux=float(named.get("aux", 0.0)),
                cp=int(named.get("cp", 1)))


def main():
    pairs_path, out_root = sys.argv[1:3]
    for model in sys.argv[3:]:
        name, _, ckpt_dir, layouts = model.split("=")
        for spec in layouts.split("/"):
            run_layout(ckpt_dir, pairs_path, Path(out_root) / name, **parse_layout(spec))
    shutdown()


def run_layout(ckpt_dir, pairs_path, out_root, tp, pp, sp, vpp, ep, etp, aux, cp):
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp, cp=cp, sequence_parallel=sp, ep=ep, etp=etp, device="cpu")
    layout = init_distributed(parallel, seed=0)
    out_dir = Path(out_root) / (f"{tp}-{pp}-{layout.dp}-{int(sp)}" + (f"-vpp{vpp}" if vpp else "")
                                + (f"-ep{ep}" if ep > 1 else "") + (f"-etp{etp}" if etp else "")
                                + (f"-aux{aux:g}" if aux else "") + (f"-cp{cp}" if cp > 1 else ""))
    if layout.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    arch = CheckpointMeta.read(ckpt_dir).arch
    chunks = build_model(arch, ModelOptions(tp=tp, pp=pp, vpp=vpp, cp=cp, sequence_parallel=sp, ep=ep, etp=etp,
                                            moe_aux_loss_coeff=aux))
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
    split = cp_multiple(cp, tp, sp) if cp > 1 else 1
    multiple = math.lcm(MULTIPLE, split)
    seq_len = -(-longest // multiple) * multiple
    head = TokenLogpsContext(vocab_size=arch.vocab_size, chunk_tokens=16)
    results = {}
    for name, size in batchings(pairs, layout.dp, pp, vpp, split):
        if name.startswith("padded"):
            batches = padded_micro_batches(mine, layout.dp_rank * per_rank, size, seq_len, arch.vocab_size)
            if cp > 1:
                batches = [split_padded_pairs(b, cp, layout.cp_rank) for b in batches]
        else:
            batches = packed_micro_batches(pairs, size, layout.dp, layout.dp_rank, pp if vpp else 1, pp > 1,
                                           arch.vocab_size, (cp, layout.cp_rank, split) if cp > 1 else None)
        chosen_tokens = sum(b.chosen_tokens for b in batches)
        totals = torch.tensor([float(chosen_tokens), float(sum(b.num_pairs for b in batches))])
        torch.distributed.all_reduce(totals)
        # every TP/PP/CP rank of a DP replica counted the same tokens: divide the world sum back
        chosen_global, pairs_global = (int(x) // (tp * pp * cp) for x in totals.tolist())
        assert pairs_global == G
        scale = LossScale(len(batches), layout.dp, G, chosen_global)
        inner = make_forward_step(LOSS, head, layout.device, scale)
        seen: list[tuple[list[int], list[float], list[float]]] = []

        def forward_step(it, model, inner=inner, seen=seen):
            batch = next(it)
            output, loss_func = inner(iter([batch]), model)

            def record(token_logps, batch=batch, loss_func=loss_func):
                sum_logps, _, avg = batch_sequence_logps(batch, token_logps)
                seen.append((batch.row_index.tolist(), sum_logps.tolist(), avg.tolist()))
                return loss_func(token_logps)

            return output, record

        for c in ddp:
            c.zero_grad_buffer()
        reports = run_schedule(ddp, forward_step, batches, forward_only=False)
        metrics = reduce_reports(reports, LOSS.sft_weight, layout.device) | reduce_moe_stats(ddp, scale, layout.device)
        grads = gather_hf_tensors(ddp, arch, "grad")
        all_seen = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(all_seen, (layout.dp_rank, seen if layout.tp_rank == layout.cp_rank == 0
                                                       else []))
        counts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(counts, len(batches))
        if layout.rank == 0:
            logps = {}
            micro_batches = [[] for _ in range(layout.dp)]  # each data-parallel rank's, as lists of pairs
            for dp_rank, part in all_seen:
                for idx, sums, avgs in part:
                    k = len(idx)
                    micro_batches[dp_rank].append(idx)
                    for j, i in enumerate(idx):
                        logps[i] = {"sum": (sums[j], sums[k + j]), "avg": (avgs[j], avgs[k + j])}
            results[name] = {"metrics": metrics, "logps": {str(i): v for i, v in sorted(logps.items())},
                             "num_microbatches": counts, "micro_batches": micro_batches}
            save_file({n: t.contiguous() for n, t in grads.items()}, str(Path(out_dir) / f"grads_{name}.safetensors"))
    if layout.rank == 0:
        (out_dir / "result.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
