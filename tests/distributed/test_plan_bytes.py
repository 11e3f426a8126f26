"""The planner's bytes per rank against the tensors a built run holds (``scripts/plan_bytes.py``).

One torchrun launch of 2 CPU ranks builds a tiny Llama-shaped model (4 layers, hidden 64, 4 / 2 heads, FFN 160,
vocab 250 padded to 256) with the project's own builders at each layout below, runs a training step of two real
micro-batches (3 pairs each: packed rows, or padded ``[6, S]``) and an optimizer step, and compares on every rank:

* weights, DDP gradient buffers and optimizer state: **equal to the byte** (megatron's padding of the
  distributed optimizer's buffers, the shard of each data-parallel rank, fp32 master copies, torch AdamW's step
  tensors, the tied embedding's own bucket at PP 2);
* the activations autograd saves for one micro-batch (``saved_tensors_hooks``, each storage once): within
  ``ACTIVATION_RTOL``. The issue asks for 10%; measured (2 CPU cores, torch 2.14.1, megatron-core 0.19.2) the
  largest difference is 1.18% (full recomputation on padded pairs at TP 2: the predicted RoPE frequencies are a
  rounded length), every other layout within 0.3%.

Context parallelism (CP 2 on the 2 ranks): a long micro-batch (sequences of 1001 and 1009 tokens, no multiple of
4: each padded for the split) saves about half the bytes per rank of CP 1 (measured 0.471 on both ranks: the
gathered keys and values are kept, the RoPE'd keys and the QKV output are not), and the planner's formula says
so within ``ACTIVATION_RTOL`` (measured: its ratio 0.471, each rank's bytes within 0.02%; selective and full
recomputation at CP 2 within 0.4%). The CP ranks' head tokens differ (the prompts lie in rank 0's first chunks),
so each rank's prediction is given its own labelled positions.
"""

from __future__ import annotations

import pytest
from helpers import read_json, run_ranks

pytestmark = pytest.mark.slow

LAYOUTS = [
    "tp2.sp.do.none.packed.bf16",   # TP 2 + sequence parallelism, distributed optimizer, no recomputation
    "tp2.full.padded",              # TP 2 without SP, plain optimizer, full recomputation, padded pairs, fp32
    "pp2.do.selective.packed",      # PP 2, selective recomputation, fp32
    "pp2.vpp2.tied.do.full.packed.bf16",  # interleaved PP, tied embeddings (a bucket of their own), full recompute
    "do.none.packed.bf16",          # DP 2: each rank's shard of the distributed optimizer
    "selective.padded",             # DP 2, plain optimizer, fp32
    "long.packed",                  # DP 2, one pair of sequences of 1001 and 1009 tokens per micro-batch
    "cp2.long.packed",              # the same at CP 2: each rank half of every sequence
    "cp2.long.padded.selective",    # CP 2, padded pairs, selective recomputation (the attention's inputs kept)
    "cp2.packed.bf16.full",         # CP 2, full recomputation (RoPE frequencies of each local position)
]
ACTIVATION_RTOL = 0.02


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plan_bytes") / "bytes.json"
    run_ranks("plan_bytes.py", 2, out, *LAYOUTS, timeout=1500)
    return read_json(out)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_predicted_bytes_match_the_built_run(records, layout):
    ranks = records[layout]
    assert len(ranks) == 2
    for rank in ranks:
        measured, predicted = rank["measured"], rank["predicted"]
        for name in ("weights", "grads", "optimizer"):
            assert predicted[name] == measured[name], (layout, rank["rank"], name, predicted[name], measured[name])
        error = abs(predicted["activations"] / measured["activations"] - 1)
        assert error <= ACTIVATION_RTOL, (layout, rank["rank"], predicted["activations"], measured["activations"])


def test_the_layouts_differ_where_they_should(records):
    """The data-parallel ranks of the distributed optimizer hold different shards (what the exact comparison
    above is sensitive to), and the pipeline stages different parameters."""
    shards = {r["measured"]["optimizer"] for r in records["do.none.packed.bf16"]}
    assert len(shards) == 2
    stages = {r["measured"]["weights"] for r in records["pp2.vpp2.tied.do.full.packed.bf16"]}
    assert len(stages) == 2


def test_context_parallel_halves_the_activations_per_rank(records):
    """CP 2 against CP 1 on the same long micro-batch: each rank saves about half (between 0.4 and 0.6 of CP 1's),
    and the planner's ratio is the measured one within ``ACTIVATION_RTOL``."""
    cp1, cp2 = records["long.packed"], records["cp2.long.packed"]
    for a, b in zip(cp1, cp2):
        measured = b["measured"]["activations"] / a["measured"]["activations"]
        predicted = b["predicted"]["activations"] / a["predicted"]["activations"]
        assert 0.4 <= measured <= 0.6, measured
        assert abs(predicted / measured - 1) <= ACTIVATION_RTOL, (predicted, measured)
        print(f"[plan] CP 2 / CP 1 activation bytes per rank: measured {measured:.3f}, the formula {predicted:.3f}")
