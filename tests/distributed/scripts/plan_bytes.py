"""Per rank, what a built run holds against what ``simpo_mcore.plan`` predicts for it.

Usage (under torchrun, CPU): ``plan_bytes.py OUT.json LAYOUT [LAYOUT ...]``, each layout a dot-separated list:
``tp2``, ``pp2``, ``vpp2``, ``cp2``, ``sp``, ``do`` (distributed optimizer), ``none`` / ``selective`` / ``full``
(recompute), ``packed`` / ``padded``, ``bf16`` / ``fp32``, ``tied``, ``long`` (one pair of two long sequences per
micro-batch instead of three short pairs). Under ``cp2`` the micro-batches are split for this rank by the
training's own functions (``data.context_parallel``). Every layout is built with the project's own
builders (``build_model``, ``optim.wrap_ddp``, ``optim.build_optimizer``) on a tiny Llama-shaped model and runs
one training step of two real micro-batches (the objective's forward step and loss through megatron's schedule)
and an optimizer step; :mod:`simpo_mcore.plan.measure` then counts what the rank holds (weights, grads,
optimizer) and what autograd saved during the first micro-batch's forward (activations; the backward's
recomputation under ``recompute: full`` is not a forward and is not counted).

Rank 0 writes ``{layout: [{rank, pp_rank, dp_rank, measured: {...}, predicted: {...}}, ...]}``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from simpo_mcore.config import LossConfig, OptimConfig, ParallelConfig
from simpo_mcore.data.context_parallel import cp_multiple, split_packed_rows, split_padded_pairs
from simpo_mcore.data.packing import collate_packed_row
from simpo_mcore.data.padded import collate_pairs
from simpo_mcore.data.pipeline import pad_multiple
from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.microbatch import LossScale, MicroBatch
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.objective import make_forward_step, run_schedule
from simpo_mcore.optim import build_optimizer, wrap_ddp
from simpo_mcore.parallel import init_distributed, shutdown
from simpo_mcore.plan import Implementation, Layout, MicroBatchShape, ModelShape, Numerics, Setup, rank_memory
from simpo_mcore.plan.measure import SavedBytes, held_bytes, model_storages

VOCAB = 250
ARCH = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)
PAIRS = 3
"""Pairs per micro-batch: prompt 10 + response 30, 40, 50 tokens (labelled: the responses)."""
LONG = 1000
"""``long``: one pair per micro-batch, prompt 10 + responses of 991 and 999 tokens (sequences of 1001 and 1009)."""
MICRO_BATCHES = 2
CHUNK_TOKENS = 64


def parse(name: str) -> dict:
    parts = name.split(".")
    opts = dict(tp=1, pp=1, cp=1, vpp=None, sp=False, do=False, recompute="none", packed=True, precision="fp32",
                tied=False, long=False)
    for part in parts:
        if part[:2] in ("tp", "pp", "cp") and part[2:].isdigit():
            opts[part[:2]] = int(part[2:])
        elif part.startswith("vpp"):
            opts["vpp"] = int(part[3:])
        elif part in ("none", "selective", "full"):
            opts["recompute"] = part
        elif part in ("packed", "padded"):
            opts["packed"] = part == "packed"
        elif part in ("bf16", "fp32"):
            opts["precision"] = part
        else:
            opts[{"sp": "sp", "do": "do", "tied": "tied", "long": "long"}[part]] = True
    return opts


def pairs(seed: int, long: bool) -> dict[str, list]:
    g = torch.Generator().manual_seed(seed)
    rows = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": []}
    for j in range(1 if long else PAIRS):
        for side, extra in (("chosen", 0), ("rejected", 4)):
            n = LONG + 1 + 2 * extra if long else 40 + 10 * j + extra
            ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
            rows[f"{side}_input_ids"].append(ids)
            rows[f"{side}_labels"].append([-100] * 10 + ids[10:])
    return rows


def micro_batches(opts: dict, layout) -> tuple[list[MicroBatch], MicroBatchShape]:
    """Two micro-batches of the same shape (pipelines exchange fixed shapes), this CP rank's share of each, and the
    planner's description of the whole micro-batch (its labelled tokens: this rank's, see below)."""
    tp_sp = opts["tp"] if opts["sp"] else 1
    multiple = 16 * tp_sp if opts["cp"] == 1 else pad_multiple(opts["tp"], opts["sp"], opts["cp"])
    split = cp_multiple(opts["cp"], opts["tp"], opts["sp"]) if opts["cp"] > 1 else 1
    whole = []
    for m in range(MICRO_BATCHES):
        rows = pairs(m, opts["long"])
        k = len(rows["chosen_input_ids"])
        lengths = [len(x) for x in rows["chosen_input_ids"] + rows["rejected_input_ids"]]
        if opts["packed"]:
            # Under CP rows of the pairs alone: the split pads each sequence, then the row.
            length = sum(lengths) if split > 1 else -(-sum(lengths) // multiple) * multiple
            whole.append(collate_packed_row(rows, list(range(k)), length, 0, VOCAB))
        else:
            length = -(-max(lengths) // multiple) * multiple
            whole.append(collate_pairs(rows, list(range(k)), length, 0, VOCAB))
    batches = whole
    if split > 1:
        batches = (split_packed_rows(whole, opts["cp"], layout.cp_rank, split, multiple, same_shape=True, pad_id=0)
                   if opts["packed"] else [split_padded_pairs(b, opts["cp"], layout.cp_rank) for b in whole])
    first = batches[0]
    longest = max(first.padded_seqlens or first.seqlens) if first.packed else first.tokens.shape[1] * first.cp
    # The planner's head takes labelled / cp tokens, the average CP rank's; the ranks differ (the prompts lie in
    # the first chunks, rank 0's), so each rank's prediction is given its own labelled positions, times cp.
    labelled = first.token_index.numel() * first.cp
    return batches, MicroBatchShape(tokens=first.tokens_computed, rows=first.tokens.shape[0], labelled=labelled,
                                    sequences=2 * whole[0].num_pairs, longest=longest)


def measure(opts: dict) -> dict:
    tp, pp = opts["tp"], opts["pp"]
    par = ParallelConfig(tp=tp, pp=pp, vpp=opts["vpp"], cp=opts["cp"], sequence_parallel=opts["sp"],
                         distributed_optimizer=opts["do"], device="cpu")
    layout = init_distributed(par, seed=0)
    arch = ModelArch(**ARCH, tie_word_embeddings=opts["tied"])
    chunks = build_model(arch, ModelOptions(spec="sdpa", precision=opts["precision"], tp=tp, pp=pp, vpp=opts["vpp"],
                                            cp=opts["cp"], sequence_parallel=opts["sp"],
                                            recompute=opts["recompute"]))
    ddp = wrap_ddp(chunks, opts["do"], cpu=True)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3), opts["precision"], opts["do"], cpu=True)
    batches, mb = micro_batches(opts, layout)
    head = TokenLogpsContext(vocab_size=VOCAB, chunk_tokens=CHUNK_TOKENS)
    scale = LossScale(num_microbatches=len(batches), dp=layout.dp,
                      global_pairs=batches[0].num_pairs * len(batches) * layout.dp,
                      global_chosen_tokens=1)
    saved = SavedBytes(model_storages(ddp))
    forward_step = saved.forward_step(make_forward_step(LossConfig(), head, layout.device, scale), batches)
    with saved.hooks():
        run_schedule(ddp, forward_step, batches, forward_only=False)
    optimizer.step()
    measured = {**held_bytes(ddp, optimizer, opts["do"]), "activations": saved.of(0)}
    predicted = predict(opts, layout, mb, arch)
    record = dict(rank=layout.rank, pp_rank=layout.pp_rank, dp_rank=layout.dp_rank, tp_rank=layout.tp_rank,
                  cp_rank=layout.cp_rank, tokens=batches[0].tokens.numel(), measured=measured, predicted=predicted)
    records = [None] * layout.world_size
    dist.all_gather_object(records, record)
    return records


def predict(opts: dict, layout, mb: MicroBatchShape, arch: ModelArch) -> dict:
    setup = Setup(shape=ModelShape.from_arch(arch),
                  impl=Implementation(spec="sdpa", cuda=False, act_bytes=2 if opts["precision"] == "bf16" else 4),
                  numerics=Numerics.for_precision(opts["precision"], torch_adam=True), chunk_tokens=CHUNK_TOKENS)
    plan_layout = Layout(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, dp=layout.dp, cp=layout.cp,
                         sequence_parallel=opts["sp"], distributed_optimizer=opts["do"], recompute=opts["recompute"])
    memory = rank_memory(setup, plan_layout, mb, pp_rank=layout.pp_rank, dp_rank=layout.dp_rank)
    return dict(weights=memory.weights, grads=memory.grads, optimizer=memory.optimizer,
                activations=memory.activations)


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    # One process group for every layout (init_distributed rebuilds megatron's groups for each).
    results = {name: measure(parse(name)) for name in names}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
