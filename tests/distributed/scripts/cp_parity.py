"""Context parallelism at the model level: CP 2 against CP 1, same weights and rows; rank 0 writes what it saw.

    torchrun --nproc-per-node=N cp_parity.py OUT.json LAYOUTS NAME=CKPT_DIR [NAME=CKPT_DIR ...]
        [--device cuda --spec te --precision bf16 --cp-comm-type p2p --ref-spec sdpa --ref-precision fp32]

LAYOUTS: ``cp,tp,pp,sp[/cp,tp,pp,sp...]`` (DP is what the world leaves; the groups are rebuilt per layout).

For each model: the CP 1 reference first, on every rank alike (TP 1, PP 1, by default the SDPA spec in fp32, the
model called directly: the plain padded and packed paths that the parity tests prove against HF), then each
layout through megatron's schedule and DDP as training runs it, with the options' spec and precision, the
micro-batches split by ``data.context_parallel``: padded ``[2k, S]`` rows and packed rows (a tail segment of
padding; under PP one row length for the step). The objective, over all pairs of the step, uses both reductions
of the head::

    J = sum_pairs -logsigmoid(2 (avg_c - avg_r - 0.5))  +  0.01 sum_sequences w_i sum_i

Rank 0 writes ``{model: {layout: {batching: {"sum": [[got, ref], ...], "avg": ..., "grads": {hf: rel err}}}},
"checks": ...}``. Besides, on the first layout with CP > 1: megatron's own ``get_batch_on_this_cp_rank`` against
``split_rows``, and the CP reduction's gradient on bare token log-probs against one process's.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gather_hf import gather_hf_tensors, to_hf
from helpers import pair_columns, token_pairs
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

from simpo_mcore.config import ParallelConfig
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.mcore_io import load_model_weights
from simpo_mcore.data.batching import collate_pairs, round_up, shift_labels
from simpo_mcore.data.context_parallel import cp_multiple, padded_row_length, split_packed_row, split_rows
from simpo_mcore.data.packing import collate_packed_row, sequence_targets, shift_packed_labels
from simpo_mcore.logprobs import (
    TokenLogpsContext,
    labelled_positions,
    sequence_logps,
    token_logps_output_processor,
    unpack_token_logps,
)
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.model.forward import packed_row_params, position_ids_like
from simpo_mcore.optim import wrap_ddp
from simpo_mcore.parallel import init_distributed, shutdown

# (prompt, chosen, rejected) lengths: no sequence a multiple of 2 x CP x TP = 8, all longer than the window (16).
SHAPES = ((9, 28, 14), (0, 23, 41), (17, 30, 21), (5, 44, 33))
COLLATE_MULTIPLE = 16  # the collation's own rounding: a tail segment of padding the split carries along


def make_pairs(vocab: int) -> list[dict]:
    return token_pairs(SHAPES, vocab, seed=3)


columns = pair_columns


def objective(sum_logps: torch.Tensor, avg_logps: torch.Tensor, row_index: list[int]) -> torch.Tensor:
    """J over the pairs of one micro-batch (chosen sequences first), with a weight per sequence by its index."""
    k = len(row_index)
    pref = -F.logsigmoid(2.0 * (avg_logps[:k] - avg_logps[k:] - 0.5)).sum()
    idx = torch.tensor(row_index + [i + len(SHAPES) for i in row_index], dtype=torch.float32)
    return pref + 0.01 * ((idx.to(sum_logps.device) + 1) / 4 * sum_logps).sum()


def record(seen: dict, row_index: list[int], sum_logps, avg_logps) -> None:
    k = len(row_index)
    for j, i in enumerate(row_index):
        for side, at in ((0, j), (1, k + j)):
            seen[2 * i + side] = (sum_logps[at].item(), avg_logps[at].item())


# ----------------------------------------------------------------------------------------- the CP 1 reference


def reference(ckpt: str, arch, pairs: list[dict], head: TokenLogpsContext, options) -> dict:
    """Per sequence (sum, avg) and HF-named gradients of J over all pairs at CP 1, per batching."""
    layout = init_distributed(ParallelConfig(device=options.device), seed=0)  # CP 1, TP 1, PP 1 (DP unused)
    (model,) = build_model(arch, ModelOptions(spec=options.ref_spec, precision=options.ref_precision,
                                              cuda=options.device == "cuda"))
    load_model_weights([model], ckpt)
    everything = list(range(len(pairs)))
    out = {}
    for batching in ("padded", "packed"):
        model.zero_grad(set_to_none=True)
        token_logps, targets = plain_forward(model, pairs, batching, head, layout.device)
        sum_logps, _, avg_logps = sequence_logps(token_logps, targets)
        objective(sum_logps, avg_logps, everything).backward()
        seen: dict = {}
        record(seen, everything, sum_logps, avg_logps)
        grads = {}
        for name, p in model.named_parameters():
            grads.update(to_hf(model, name, p.grad.detach().float().cpu(), arch))
        out[batching] = (seen, grads)
    return out


def plain_forward(model, pairs, batching: str, head, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logps [2k, L], targets [2k, L]) of all pairs in one micro-batch, without any split."""
    everything = list(range(len(pairs)))
    if batching == "padded":
        batch = collate_pairs(columns(pairs), everything, seq_len=80, pad_id=0)
        targets = shift_labels(batch["labels"]).to(device)  # [2k, S]
        tokens = batch["tokens"].to(device)
        return model(tokens, position_ids_like(tokens), None, labels=targets,
                     output_processor=token_logps_output_processor, output_processor_context=head), targets
    batch = collated_row(pairs, everything)
    row_targets = shift_packed_labels(batch["labels"], batch["cu_seqlens"]).to(device)  # [1, T]
    index = batch["sequence_index"].to(device)
    token_logps = model(batch["tokens"].to(device), batch["position_ids"].to(device), None, labels=row_targets,
                        packed_seq_params=packed_row_params(batch["cu_seqlens"], device),
                        output_processor=token_logps_output_processor, output_processor_context=head)
    return unpack_token_logps(token_logps, index), sequence_targets(row_targets, index)  # [2k, L] each


# ------------------------------------------------------------------------------------- split micro-batches


def padded_cp_batch(pairs, row_index, seq_len, layout) -> dict:
    """A padded micro-batch as the CP collation gives it: shifted, then this CP rank's chunks of every row."""
    batch = collate_pairs(columns(pairs), row_index, seq_len, pad_id=0)
    targets = shift_labels(batch["labels"])  # [2k, S]
    positions = position_ids_like(batch["tokens"])  # [2k, S]
    local = {name: split_rows(x, layout.cp, layout.cp_rank).to(layout.device)
             for name, x in (("tokens", batch["tokens"]), ("targets", targets), ("position_ids", positions))}
    return {**local, "token_index": labelled_positions(split_rows(targets, layout.cp, layout.cp_rank)).to(
        layout.device), "row_index": row_index}


def collated_row(pairs, row_index) -> dict:
    """The packed row of ``row_index``'s pairs as collated today: rounded up to COLLATE_MULTIPLE (a tail)."""
    fill = sum(len(pairs[i][f"{s}_input_ids"]) for i in row_index for s in ("chosen", "rejected"))
    return collate_packed_row(columns([pairs[i] for i in row_index]), row_index, round_up(fill, COLLATE_MULTIPLE),
                              pad_id=0)


def packed_cp_batch(batch, multiple, length, layout) -> dict:
    """A packed row as the CP collation gives it: labels shifted per sequence on the whole row, every segment
    padded to ``multiple`` and split, ``length`` shared by the step's rows under PP (else ``None``)."""
    row_targets = shift_packed_labels(batch["labels"], batch["cu_seqlens"])  # [1, T]
    split = split_packed_row(batch["cu_seqlens"], layout.cp, layout.cp_rank, multiple, length)
    targets = split.take(row_targets, -100)  # [1, T_local]
    return {"tokens": split.take(batch["tokens"], 0).to(layout.device), "targets": targets.to(layout.device),
            "position_ids": split.positions.unsqueeze(0).to(layout.device),
            "token_index": labelled_positions(targets).to(layout.device),
            "params": packed_row_params(split.cu_seqlens(padded=False), layout.device, split.cu_seqlens(padded=True)),
            "sequence_index": split.sequence_index(batch["sequence_index"]).to(layout.device),
            "row_index": batch["row_index"].tolist()}


def cp_micro_batches(pairs, layout, batching: str, sp: bool) -> list[dict]:
    """This replica's two micro-batches (of its pairs, split over DP), one shape per step under PP."""
    per_replica = len(pairs) // layout.dp
    mine = list(range(layout.dp_rank * per_replica, (layout.dp_rank + 1) * per_replica))
    groups = [mine[:len(mine) // 2], mine[len(mine) // 2:]]
    multiple = cp_multiple(layout.cp, layout.tp, sp)
    if batching == "padded":
        longest = max(len(p[f"{s}_input_ids"]) for p in pairs for s in ("chosen", "rejected"))
        return [padded_cp_batch([pairs[i] for i in g], g, round_up(longest, multiple), layout) for g in groups]
    rows = [collated_row(pairs, g) for g in groups]
    length = max(padded_row_length(r["cu_seqlens"], multiple) for r in rows) if layout.pp > 1 else None
    return [packed_cp_batch(r, multiple, length, layout) for r in rows]


def schedule(ddp: list, forward_step, batches: list[dict], cp: int) -> None:
    """megatron's schedule over ``batches``; it divides ``seq_length`` by cp for the pipeline's tensor shapes, so
    it is given the length before the split."""
    many = len(ddp) > 1
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(batches) for _ in ddp] if many else iter(batches),
        model=ddp if many else ddp[0], num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1] * cp,
        micro_batch_size=batches[0]["tokens"].shape[0], forward_only=False)


def run_layout(ckpt, arch, pairs, head, layout_spec: str, options, checks) -> dict:
    cp, tp, pp, sp = (int(x) for x in layout_spec.split(","))
    parallel = ParallelConfig(tp=tp, pp=pp, cp=cp, cp_comm_type=options.cp_comm_type, sequence_parallel=bool(sp),
                              device=options.device)
    layout = init_distributed(parallel, seed=0)
    assert (layout.cp, layout.tp, layout.pp) == (cp, tp, pp)
    if checks is not None and cp > 1:
        checks.update(split_and_reduce_checks(layout))
    chunks = build_model(arch, ModelOptions(spec=options.spec, precision=options.precision, tp=tp, pp=pp, cp=cp,
                                            cp_comm_type=options.cp_comm_type, sequence_parallel=bool(sp),
                                            cuda=options.device == "cuda"))
    load_model_weights(chunks, ckpt)
    ddp = wrap_ddp(chunks, distributed_optimizer=False, cpu=True)
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    out = {}
    for batching in ("padded", "packed"):
        batches = cp_micro_batches(pairs, layout, batching, bool(sp))
        seen: dict = {}
        forward_step = cp_forward_step(head, seen, len(batches) * layout.dp)
        for c in ddp:
            c.zero_grad_buffer()
        schedule(ddp, forward_step, batches, layout.cp)
        grads = gather_hf_tensors(ddp, arch, "grad")
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, seen)
        merged = {}
        for part in gathered:
            for i, value in part.items():
                assert i not in merged or merged[i] == value, (i, merged[i], value)  # CP ranks agree exactly
                merged[i] = value
        out[batching] = (merged, grads, [b["tokens"].shape[1] for b in batches])
    return out


def cp_forward_step(head: TokenLogpsContext, seen: dict, scale: int):
    """A ``forward_step`` over split micro-batches; its loss records each sequence's reduced (sum, avg) in ``seen``
    and returns J x ``scale`` (micro-batches x dp: the schedule divides by the first and multiplies by cp, DDP
    averages over dp x cp ranks, so the gradients are those of J over every pair)."""
    cp_group = ps.get_context_parallel_group()

    def forward_step(it, model):
        b = next(it)
        context = TokenLogpsContext(head.vocab_size, head.chunk_tokens, labels_checked=True,
                                    token_index=b["token_index"])
        output = model(b["tokens"], b["position_ids"], None, labels=b["targets"], packed_seq_params=b.get("params"),
                       output_processor=token_logps_output_processor, output_processor_context=context)

        def loss_func(token_logps):
            targets = b["targets"]
            if "sequence_index" in b:
                token_logps = unpack_token_logps(token_logps, b["sequence_index"])  # [2k, L_local]
                targets = sequence_targets(targets, b["sequence_index"])  # [2k, L_local]
            sum_logps, _, avg_logps = sequence_logps(token_logps, targets, check=False, cp_group=cp_group)
            record(seen, b["row_index"], sum_logps, avg_logps)
            return objective(sum_logps, avg_logps, b["row_index"]) * scale, {}

        return output, loss_func

    return forward_step


def split_and_reduce_checks(layout) -> dict:
    """megatron's own split of a padded batch against ``split_rows``; the CP reduction's gradient against one
    process's autograd on the whole sequences (a nonlinear loss of sums and averages)."""
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 100, (3, 24), generator=g)
    labels = torch.randint(0, 100, (3, 24), generator=g)
    megatron_split = get_batch_on_this_cp_rank({"tokens": tokens.clone(), "labels": labels.clone(),
                                                "cu_seqlens": None}, is_hybrid_cp=False,
                                               cp_group=ps.get_context_parallel_group())
    same = torch.equal(megatron_split["tokens"], split_rows(tokens, layout.cp, layout.cp_rank)) and \
        torch.equal(megatron_split["labels"], split_rows(labels, layout.cp, layout.cp_rank))
    token_logps = (-torch.rand(3, 24, generator=g, dtype=torch.float64) * 5).to(layout.device)  # [b, s]
    targets = torch.where(torch.rand(3, 24, generator=g) < 0.3, -100, labels)  # [b, s]
    targets[0, :] = -100
    targets[0, 5] = 7  # a sequence with one labelled token: on one rank only
    targets = targets.to(layout.device)

    def loss(sums, avgs):
        return (torch.sigmoid(avgs) * sums).sum() + (avgs ** 2).sum()

    whole = token_logps.clone().requires_grad_()
    loss(*sequence_logps(whole, targets)[0::2]).backward()
    local = split_rows(token_logps, layout.cp, layout.cp_rank).clone().requires_grad_()
    sums, _, avgs = sequence_logps(local, split_rows(targets, layout.cp, layout.cp_rank),
                                   cp_group=ps.get_context_parallel_group())
    loss(sums, avgs).backward()
    expected = split_rows(whole.grad, layout.cp, layout.cp_rank)
    err = torch.tensor([(local.grad - expected).abs().max().item()], dtype=torch.float64, device=layout.device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return {"megatron_split_equal": same, "reduction_grad_max_abs_err": err.item(),
            "reduction_grad_max_abs": whole.grad.abs().max().item()}


def compare(ref: tuple, got: tuple) -> dict:
    (ref_seen, ref_grads), (seen, grads, lengths) = ref, got
    assert sorted(seen) == sorted(ref_seen), (sorted(seen), sorted(ref_seen))
    return {"sum": [[seen[i][0], ref_seen[i][0]] for i in sorted(ref_seen)],
            "avg": [[seen[i][1], ref_seen[i][1]] for i in sorted(ref_seen)],
            "grads": {n: ((grads[n] - r).norm() / r.norm()).item() for n, r in ref_grads.items()},
            "missing_grads": sorted(set(ref_grads) - set(grads)), "local_lengths": lengths}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("layouts")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spec", default="sdpa")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cp-comm-type", default="p2p")
    parser.add_argument("--ref-spec", default="sdpa")
    parser.add_argument("--ref-precision", default="fp32")
    options = parser.parse_args()
    results: dict = {"checks": {}}
    for spec in options.models:
        name, ckpt = spec.split("=")
        arch = CheckpointMeta.read(ckpt).arch
        head = TokenLogpsContext(vocab_size=arch.vocab_size, chunk_tokens=16)
        pairs = make_pairs(arch.vocab_size)
        ref = reference(ckpt, arch, pairs, head, options)
        for layout_spec in options.layouts.split("/"):
            checks = results["checks"] if not results["checks"] else None
            got = run_layout(ckpt, arch, pairs, head, layout_spec, options, checks)
            if dist.get_rank() == 0:
                results.setdefault(name, {})[layout_spec] = {b: compare(ref[b], got[b]) for b in got}
    if dist.get_rank() == 0:
        with open(options.out, "w") as f:
            json.dump(results, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
