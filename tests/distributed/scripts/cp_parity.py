"""Context parallelism at the model level: CP 2 against CP 1, same weights and rows; rank 0 writes what it saw.

    torchrun --nproc-per-node=N cp_parity.py OUT.json LAYOUTS NAME=CKPT_DIR [NAME=CKPT_DIR ...]
        [--device cuda --spec te --precision bf16 --cp-comm-type p2p --ref-spec sdpa --ref-precision fp32]

LAYOUTS: ``cp,tp,pp,sp[/cp,tp,pp,sp...]`` (DP is what the world leaves; the groups are rebuilt per layout).

For each model: the CP 1 reference first, on every rank alike (TP 1, PP 1, by default the SDPA spec in fp32, the
model called directly on one micro-batch of every pair: the plain padded and packed paths that the parity tests
prove against HF), then each layout through megatron's schedule and DDP as training runs it (``run_schedule``),
with the options' spec and precision, the micro-batches made by the training's own collation
(``data.pipeline.collate``: collated whole, checked, then split for this CP rank): padded ``[2k, S]`` rows and
packed rows (under PP one row length for the step). The objective, over all pairs of the step, uses both
reductions of the head (``objective.batch_sequence_logps``: per-sequence sums reduced over the CP group)::

    J = sum_pairs -logsigmoid(2 (avg_c - avg_r - 0.5))  +  0.01 sum_sequences w_i sum_i

Rank 0 writes ``{model: {layout: {batching: {"sum": [[got, ref], ...], "avg": ..., "grads": {hf: rel err}}}},
"checks": ...}``. Besides, on the first layout with CP > 1: megatron's own ``get_batch_on_this_cp_rank`` against
``split_rows``, and the CP reduction's gradient on bare token log-probs against one process's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gather_hf import gather_hf_tensors, to_hf
from helpers import random_pairs
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import get_batch_on_this_cp_rank

from simpo_mcore.config import DataConfig, ParallelConfig
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.mcore_io import load_model_weights
from simpo_mcore.data.context_parallel import cp_multiple, split_rows
from simpo_mcore.data.pipeline import BatchLayout, collate
from simpo_mcore.logprobs import TokenLogpsContext, sequence_logps
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.objective import batch_sequence_logps, run_schedule, token_logps_forward
from simpo_mcore.optim import wrap_ddp
from simpo_mcore.parallel import init_distributed, shutdown

# (prompt, chosen, rejected) lengths: no sequence a multiple of 2 x CP x TP = 8, all longer than the window (16).
SHAPES = ((9, 28, 14), (0, 23, 41), (17, 30, 21), (5, 44, 33))


def make_pairs(vocab: int) -> datasets.Dataset:
    return datasets.Dataset.from_list(random_pairs(SHAPES, vocab, seed=3, low=3))


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


def batch_layout(batching: str, vocab: int, tp: int = 1, sp: bool = False, pp: int = 1, cp: int = 1,
                 cp_rank: int = 0) -> BatchLayout:
    """The training's layout of micro-batches for this rank (packed rows or padded pairs)."""
    return BatchLayout.for_run(DataConfig(packing=batching == "packed"), 0, tp, sp, pp, None, vocab, cp, cp_rank)


# ----------------------------------------------------------------------------------------- the CP 1 reference


def reference(ckpt: str, arch, pairs: datasets.Dataset, head: TokenLogpsContext, options) -> dict:
    """Per sequence (sum, avg) and HF-named gradients of J over all pairs at CP 1, per batching."""
    layout = init_distributed(ParallelConfig(device=options.device), seed=0)  # CP 1, TP 1, PP 1 (DP unused)
    (model,) = build_model(arch, ModelOptions(spec=options.ref_spec, precision=options.ref_precision,
                                              cuda=options.device == "cuda"))
    load_model_weights([model], ckpt)
    everything = list(range(len(pairs)))
    out = {}
    for batching in ("padded", "packed"):
        model.zero_grad(set_to_none=True)
        (batch,) = collate(pairs, [everything], batch_layout(batching, arch.vocab_size))
        batch = batch.to(layout.device)
        sum_logps, _, avg_logps = batch_sequence_logps(batch, token_logps_forward(model, batch, head))
        objective(sum_logps, avg_logps, everything).backward()
        seen: dict = {}
        record(seen, everything, sum_logps, avg_logps)
        grads = {}
        for name, p in model.named_parameters():
            grads.update(to_hf(model, name, p.grad.detach().float().cpu(), arch))
        out[batching] = (seen, grads)
    return out


# ------------------------------------------------------------------------------------- split micro-batches


def cp_micro_batches(pairs: datasets.Dataset, layout, batching: str, sp: bool, vocab: int) -> list:
    """This rank's two micro-batches (of its replica's pairs, split over DP), as the training collates them."""
    per_replica = len(pairs) // layout.dp
    mine = list(range(layout.dp_rank * per_replica, (layout.dp_rank + 1) * per_replica))
    groups = [mine[:len(mine) // 2], mine[len(mine) // 2:]]
    rows = batch_layout(batching, vocab, layout.tp, sp, layout.pp, layout.cp, layout.cp_rank)
    # The split's code path at CP 1 too (a layout of CP 1 checks that it changes nothing).
    rows = dataclasses.replace(rows, split_multiple=cp_multiple(layout.cp, layout.tp, sp))
    return collate(pairs, groups, rows)


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
        batches = cp_micro_batches(pairs, layout, batching, bool(sp), arch.vocab_size)
        assert all(b.cp == cp for b in batches)
        seen: dict = {}
        forward_step = cp_forward_step(head, seen, len(batches) * layout.dp, layout.device)
        for c in ddp:
            c.zero_grad_buffer()
        run_schedule(ddp, forward_step, batches, forward_only=False)
        grads = gather_hf_tensors(ddp, arch, "grad")
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, seen)
        merged = {}
        for part in gathered:
            for i, value in part.items():
                assert i not in merged or merged[i] == value, (i, merged[i], value)  # CP ranks agree exactly
                merged[i] = value
        out[batching] = (merged, grads, [b.tokens.shape[1] for b in batches])
    return out


def cp_forward_step(head: TokenLogpsContext, seen: dict, scale: int, device):
    """A ``forward_step`` over this rank's ready micro-batches; its loss records each sequence's reduced (sum, avg)
    in ``seen`` and returns J x ``scale`` (micro-batches x dp: the schedule divides by the first and multiplies by
    cp, DDP averages over dp x cp ranks, so the gradients are those of J over every pair)."""

    def forward_step(it, model):
        batch = next(it).to(device)
        output = token_logps_forward(model, batch, head)

        def loss_func(token_logps):
            sum_logps, _, avg_logps = batch_sequence_logps(batch, token_logps)
            row_index = batch.row_index.tolist()
            record(seen, row_index, sum_logps, avg_logps)
            return objective(sum_logps, avg_logps, row_index) * scale, {}

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
