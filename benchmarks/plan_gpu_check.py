"""simpo-plan's memory prediction against a GPU's allocator, at the benchmark shapes (docs/planning.md).

**Not yet measured on a GPU**: prepared without one; ``benchmarks/gpu_session.sh`` runs it (phase ``plan-check``).

For each case (shape ``1b`` / ``8b4`` of ``bench_common``, spec ``te`` / ``sdpa``, packed row or padded pairs,
recomputation) on one GPU: build the model with the project's builders (bf16, ``wrap_ddp``, ``build_optimizer``
with the distributed optimizer at DP 1), run one training step of two micro-batches of 2 pairs x 2048 tokens
(prompt 512: the benchmark's batch) and an optimizer step (so that every buffer and the optimizer state exist),
then a second step measured:

* ``static``: ``torch.cuda.memory_allocated()`` before it, against the predicted weights + grads + optimizer,
  and :func:`simpo_mcore.plan.measure.held_bytes` against the same, term by term;
* ``activations``: what autograd saves during the first micro-batch's forward (``saved_tensors_hooks``), against
  the predicted activations (this checks the TE formulas, which the CPU tests cannot);
* ``peak``: ``torch.cuda.max_memory_allocated()`` over the step (reset after the first), against the predicted
  total (without the reserve, which covers what the allocator does not see).

    python3 benchmarks/plan_gpu_check.py --out $OUT/plan_check.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
from bench_common import GIB, make_arch

from simpo_mcore.config import LossConfig, OptimConfig, ParallelConfig
from simpo_mcore.data.packing import collate_packed_row
from simpo_mcore.data.padded import collate_pairs
from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.microbatch import LossScale, MicroBatch
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.objective import make_forward_step, run_schedule
from simpo_mcore.optim import build_optimizer, wrap_ddp, zero_grad
from simpo_mcore.parallel import init_distributed, shutdown
from simpo_mcore.plan import Implementation, Layout, MicroBatchShape, ModelShape, Numerics, Setup, rank_memory
from simpo_mcore.plan.measure import SavedBytes, held_bytes, model_storages

GPU_CASES = [("1b", "te", True, "none"), ("1b", "te", False, "none"), ("1b", "te", True, "full"),
             ("8b4", "te", True, "none"), ("8b4", "te", True, "selective"), ("1b", "sdpa", True, "none"),
             ("1b", "sdpa", False, "selective")]
CPU_CASES = [("tiny", "sdpa", True, "none"), ("tiny", "sdpa", False, "selective")]
"""On a CPU (a smoke test of this script, ``tests/unit/test_benchmark_smoke.py``): the tiny shape."""
BATCH = {"1b": (2048, 2, 512), "8b4": (2048, 2, 512), "tiny": (64, 1, 16)}
"""Per shape (tokens per sequence, pairs per micro-batch, prompt tokens): the benchmark's batch."""


def micro_batches(vocab: int, packed: bool, seq: int, pairs: int,
                  prompt: int) -> tuple[list[MicroBatch], MicroBatchShape]:
    batches = []
    for m in range(2):
        g = torch.Generator().manual_seed(m)
        rows = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
        for _ in range(pairs):
            for side in ("chosen", "rejected"):
                ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
                rows[f"{side}_input_ids"].append(ids)
                rows[f"{side}_labels"].append([-100] * prompt + ids[prompt:])
        collate = collate_packed_row if packed else collate_pairs
        batches.append(collate(rows, list(range(pairs)), 2 * pairs * seq if packed else seq, 0, vocab))
    first = batches[0]
    return batches, MicroBatchShape(tokens=first.tokens.numel(), rows=first.tokens.shape[0],
                                    labelled=first.token_index.numel(), sequences=2 * pairs, longest=seq)


def run_case(shape: str, spec: str, packed: bool, recompute: str, cuda: bool) -> dict:
    seq, pairs, prompt = BATCH[shape]
    arch = make_arch(shape, seq)
    layout = init_distributed(ParallelConfig(device="cuda" if cuda else "cpu"), seed=0)
    chunks = build_model(arch, ModelOptions(spec=spec, precision="bf16", recompute=recompute, cuda=cuda))
    ddp = wrap_ddp(chunks, True, cpu=not cuda)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-6), "bf16", True, cpu=not cuda)
    batches, mb = micro_batches(arch.vocab_size, packed, seq, pairs, prompt)
    head = TokenLogpsContext(vocab_size=arch.vocab_size)
    scale = LossScale(num_microbatches=2, dp=1, global_pairs=2 * pairs, global_chosen_tokens=1)
    forward_step = make_forward_step(LossConfig(), head, layout.device, scale)
    run_schedule(ddp, forward_step, batches, forward_only=False)
    optimizer.step()
    zero_grad(ddp, optimizer)
    static = _allocated(cuda, reset=True)
    saved = SavedBytes(model_storages(ddp))
    with saved.hooks():
        run_schedule(ddp, saved.forward_step(forward_step, batches), batches, forward_only=False)
    optimizer.step()
    measured = {**held_bytes(ddp, optimizer, True), "activations": saved.of(0), "static_allocated": static,
                "peak_allocated": _allocated(cuda, peak=True)}
    inner = type(optimizer.optimizer)
    setup = Setup(ModelShape.from_arch(arch), Implementation(spec=spec, cuda=cuda, act_bytes=2),
                  Numerics.for_precision("bf16", torch_adam=inner.__module__.startswith("torch")))
    memory = rank_memory(setup, Layout(recompute=recompute), mb, microbatches=2)
    predicted = {"weights": memory.weights, "grads": memory.grads, "optimizer": memory.optimizer,
                 "activations": memory.activations, "head": memory.head, "buffers": memory.buffers,
                 "static": memory.weights + memory.grads + memory.optimizer, "peak": memory.total}
    del ddp, chunks, optimizer, saved
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    ratio = {k: predicted[k] / measured[k] for k in ("weights", "grads", "optimizer", "activations")}
    if cuda:
        ratio.update(static=predicted["static"] / static, peak=memory.total / measured["peak_allocated"])
    return {"shape": shape, "spec": spec, "packed": packed, "recompute": recompute,
            "optimizer_class": f"{inner.__module__}.{inner.__qualname__}",
            "measured_gib": {k: None if v is None else v / GIB for k, v in measured.items()},
            "predicted_gib": {k: v / GIB for k, v in predicted.items()}, "predicted_over_measured": ratio}


def _allocated(cuda: bool, reset: bool = False, peak: bool = False) -> int | None:
    """The CUDA caching allocator's bytes in use (or its peak since the last reset); ``None`` on a CPU."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    value = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs/bench"), "plan_check.json"))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="cpu: the tiny shape only, a smoke test of this script (auto: cuda when present)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    results = []
    try:
        for case in GPU_CASES if cuda else CPU_CASES:
            try:
                results.append(run_case(*case, cuda=cuda))
            except Exception as exc:  # noqa: BLE001 - one failed case must not cost the others their numbers
                results.append({"case": list(case), "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutdown()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "cases": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
