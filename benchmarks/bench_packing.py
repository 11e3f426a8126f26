"""Real-data padding: the real-token fraction and real tokens/s of a training step at each batch layout.

    python benchmarks/bench_packing.py --out /tmp/packing.json                   # CPU: fractions, small shape timed
    python3 benchmarks/bench_packing.py --device cuda --shape 1b --out $OUT/packing.json    # GPU (gpu_session.sh)

The lengths: the UltraFeedback sample in ``../shared/data`` tokenised with the Llama-3 tokenizer and chat
template through simpo_mcore's data pipeline (max_length 2048 / max_prompt_length 1800) when it is there,
else a synthetic distribution generated here with the same prompt+chosen median / p90 / max (378 / 832 / 1960).

Layouts of a step (the shipped 8-GPU layout: 128 pairs per step, micro-batches of 2 pairs, DP 4, so 32 pairs
per rank; and DP 16, 8 pairs per rank), each computed by the functions the training step and ``simpo-data``
use (``data.preview.batch_efficiency``, ``data.pipeline.TrainBatches``):

    step_wide      padded micro-batches, each rank's step to its longest sequence (before packing, at any PP)
    micro          padded micro-batches, each to its own longest (unpacked at PP 1; the SimPO reference's
                   HF trainer pads the same way)
    packed_<P>     packed rows of at most P positions (``data.packing``, ``data.pack_tokens=P``)

Real-token fraction = positions holding a token of a sequence (prompt included) / positions computed, over one
epoch of steps on every rank; in brackets, real tokens / (DP x the busiest rank's positions): the fraction of
the step's time, when every rank waits for the one with the most positions.

Then one rank's step (rank 0 of DP 4, the first ``--steps`` steps) is run, forward and backward through
simpo_mcore's training step (``objective.make_forward_step`` under megatron's schedule), at every layout in one
process: real tokens/s side by side. On a CPU: a small model shape (``--shape small``, SDPA spec, fp32). On a
GPU: ``--shape 1b``, the TE spec in bf16, and HF ``LlamaForCausalLM`` (SDPA, bf16) on padded micro-batches of 2
pairs with the reference's loss (``hf_micro``), as the SimPO reference trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import statistics
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from bench_common import SHAPES, make_arch, time_steps
from bench_variants import pair_loss, reference_avg_logps

from simpo_mcore.config import DataConfig, LossConfig, ParallelConfig, TrainConfig
from simpo_mcore.data.packing import row_length, step_rows
from simpo_mcore.data.padded import step_padding
from simpo_mcore.data.pipeline import BatchLayout, TokenizedSplit, TrainBatches
from simpo_mcore.data.preview import BatchShape, batch_efficiency, batch_layout, epoch_steps, length_stats
from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.microbatch import LABEL_PAD, LossScale, MicroBatch
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.objective import make_forward_step, run_schedule
from simpo_mcore.parallel import distributed, seed_everything

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_LENGTH, MAX_PROMPT = 2048, 1800
TARGET_STATS = (378, 832, 1960)
"""prompt + chosen tokens of the UltraFeedback sample (Llama-3 template, max_length 2048): median, p90, max."""
GLOBAL_PAIRS, MICRO_PAIRS, SEED = 128, 2, 42  # configs/simpo/_common.yaml
LAYOUTS = ("step_wide", "micro", "packed_4096", "packed_8192", "packed_16384")
SMALL = dict(num_layers=4, hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=4096)
"""The CPU shape: small enough for a 32-pair step of real lengths in seconds, big enough that the transformer,
not the (layout-independent) log-prob head, is most of the step."""
LOSS = LossConfig(type="simpo", beta=2.0, gamma_beta_ratio=0.5)


# ------------------------------------------------------------------------------------------- lengths


def shared_pairs() -> list[tuple[int, int, int]] | None:
    """(prompt, chosen response, rejected response) tokens of the shared UltraFeedback sample, tokenised as a
    run would (``None`` without ``../shared/data``)."""
    data, tok_dir = SHARED / "ultrafeedback_binarized_sample" / "train_prefs.parquet", SHARED / "llama3_tokenizer"
    if not (data.is_file() and tok_dir.is_dir()):
        return None
    from transformers import AutoTokenizer

    from simpo_mcore.data.preference import build_preference_dataset

    cfg = DataConfig(train_path=str(data), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, num_proc=1)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    ds, _ = build_preference_dataset(cfg, tokenizer, "train", Path("/tmp/simpo_bench_packing_cache"), announce=False)
    out = []
    for c_ids, c_labels, r_ids in zip(ds["chosen_input_ids"], ds["chosen_labels"], ds["rejected_input_ids"]):
        prompt = c_labels.count(-100)
        out.append((prompt, len(c_ids) - prompt, len(r_ids) - prompt))
    return out


def synthetic_pairs(n: int = 1001, seed: int = 0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) with prompt + chosen at exactly ``TARGET_STATS`` (median, nearest-rank p90,
    max): log-normal draws mapped piecewise linearly (in log space) onto those three order statistics; a
    prompt share uniform in [0.1, 0.6] of each; the rejected response the chosen one times a log-normal
    factor (sigma 0.5), cut to max_length."""
    rng = np.random.default_rng(seed)
    median, p90, longest = TARGET_STATS
    sigma = (math.log(p90) - math.log(median)) / 1.2816  # the normal's 90% quantile
    x = np.sort(np.log(median) + sigma * rng.standard_normal(n))
    i_med, i_p90 = n // 2, math.ceil(0.9 * n) - 1
    knots_x = [x[0], x[i_med], x[i_p90], x[-1]]
    knots_y = [math.log(16), math.log(median), math.log(p90), math.log(longest)]
    totals = np.rint(np.exp(np.interp(x, knots_x, knots_y))).astype(int)
    rng.shuffle(totals)
    out = []
    for total in totals.tolist():
        prompt = max(1, min(MAX_PROMPT, round(total * rng.uniform(0.1, 0.6))))
        chosen = max(1, total - prompt)
        rejected = int(min(MAX_LENGTH - prompt, max(1, round(chosen * math.exp(0.5 * rng.standard_normal())))))
        out.append((prompt, chosen, rejected))
    return out


def pair_lengths(pairs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(p + c, p + r) for p, c, r in pairs]


# ------------------------------------------------------------------------------------------- layouts


def layout_of(name: str) -> BatchLayout:
    if name.startswith("packed_"):
        return BatchLayout(0, 16, int(name.removeprefix("packed_")))
    return BatchLayout(0, 16, None, same_shape=name == "step_wide")


def shape_of(name: str, dp: int) -> BatchShape:
    layout = layout_of(name)
    return BatchShape(MICRO_PAIRS, GLOBAL_PAIRS, dp, layout.multiple, SEED, layout.pack_tokens, layout.same_shape)


def fractions(lengths: list[tuple[int, int]], dp: int) -> dict[str, float]:
    """Real-token fraction of each layout over one epoch of steps, all ranks (as ``simpo-data`` reports it)."""
    return {name: batch_efficiency(lengths, epoch_steps(len(lengths), shape_of(name, dp)),
                                   batch_layout(shape_of(name, dp))) for name in LAYOUTS}


def busiest_rank_fractions(lengths: list[tuple[int, int]], dp: int) -> dict[str, float]:
    """Real tokens / (dp x the busiest rank's positions), summed over the epoch's steps: the real-token fraction
    of the step's time when every rank waits for the one with the most positions (the gradient all-reduce)."""
    out = {}
    for name in LAYOUTS:
        shape = shape_of(name, dp)
        steps = list(epoch_steps(len(lengths), shape))
        if shape.pack_tokens is None:  # each rank's micro-batches in turn: dp of them per step
            steps = [steps[i:i + dp] for i in range(0, len(steps), dp)]
        real = busiest = 0
        for step in steps:
            if shape.pack_tokens is not None:
                sizes = [sum(lengths[i]) for i in step[0]]
                positions = [sum(row_length([sum(sizes[i] for i in row)], shape.pad_to_multiple_of) for row in rows)
                             for rows in step_rows(sizes, shape.pack_tokens, dp)]
                real += sum(sizes)
            else:
                per_rank = [step_padding([[lengths[i] for i in m] for m in micro], shape.pad_to_multiple_of,
                                         shape.same_shape) for micro in step]
                positions = [slots for _, slots in per_rank]
                real += sum(r for r, _ in per_rank)
            busiest += dp * max(positions)
        out[name] = real / busiest
    return out


def pairs_dataset(pairs: list[tuple[int, int, int]], vocab: int, seed: int = 0) -> datasets.Dataset:
    """Random token ids (never zeros: padding) with these lengths; labels -100 on the prompt."""
    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                             "rejected_labels")}
    for prompt, chosen, rejected in pairs:
        prompt_ids = [rng.randrange(3, vocab) for _ in range(prompt)]
        for side, n in (("chosen", chosen), ("rejected", rejected)):
            response = [rng.randrange(3, vocab) for _ in range(n)]
            rows[f"{side}_input_ids"].append(prompt_ids + response)
            rows[f"{side}_labels"].append([-100] * prompt + response)
    return datasets.Dataset.from_dict(rows)


def rank_steps(dataset: datasets.Dataset, name: str, steps: int, vocab_size: int, dp: int = 4
               ) -> list[list[MicroBatch]]:
    """Rank 0's micro-batches of the first ``steps`` steps at layout ``name``, as training collates them."""
    layout = dataclasses.replace(layout_of(name), vocab_size=vocab_size)
    batches = TrainBatches(TrainConfig(global_batch_pairs=GLOBAL_PAIRS, micro_batch_pairs=MICRO_PAIRS, seed=SEED),
                           TokenizedSplit(dataset, report=None), layout, 0, dp)
    return [batches.step_batches(step * GLOBAL_PAIRS).micro_batches for step in range(steps)]


# ------------------------------------------------------------------------------------------- timing


def mcore_step(model, micro_batches: list[MicroBatch], vocab_size: int, device: torch.device):
    """One rank's step through simpo_mcore's training step under megatron's schedule (no optimizer)."""
    scale = LossScale(len(micro_batches), 1, sum(b.num_pairs for b in micro_batches),
                      sum(b.chosen_tokens for b in micro_batches))
    head = TokenLogpsContext(vocab_size=vocab_size, chunk_tokens=4096)
    forward_step = make_forward_step(LOSS, head, device, scale)

    def step():
        model.zero_grad(set_to_none=True)
        run_schedule([model], forward_step, micro_batches, forward_only=False)

    return step


def hf_step(model, micro_batches: list[MicroBatch], device: torch.device):
    """One rank's step as the SimPO reference's HF trainer runs it: micro-batches padded to their own longest,
    the reference's loss, gradients accumulated (each micro-batch's mean weighted by its share of the pairs)."""
    pairs = sum(b.num_pairs for b in micro_batches)

    def step():
        model.zero_grad(set_to_none=True)
        for b in micro_batches:
            # The reference shifts the labels itself: the targets shifted back (position 0 predicts nothing).
            labels = torch.nn.functional.pad(b.targets[:, :-1], (1, 0), value=LABEL_PAD)  # [2k, s]
            tokens, labels = b.tokens.to(device), labels.to(device)
            logits = model(input_ids=tokens, use_cache=False).logits  # [2k, s, v]
            loss = pair_loss(reference_avg_logps(logits, labels), LOSS) * (b.num_pairs / pairs)
            loss.backward()

    return step


def time_layouts(pairs, shape: str, device: torch.device, steps: int, repeats: int, variants: list[str]) -> dict:
    """Each variant's rank-0 step, timed round-robin (every variant once, ``repeats`` times over, after a
    warm-up micro-batch each) so that a change in the machine's load reaches every variant alike; the median.
    One model per kind (``sdpa`` / ``te``: simpo_mcore, ``hf``: transformers), shared by its variants."""
    cuda = device.type == "cuda"
    arch = make_arch(shape, MAX_LENGTH) if shape in SHAPES else small_arch()
    dataset = pairs_dataset(pairs, arch.vocab_size)
    results, steps_of, warmups = {}, {}, {}
    with distributed(ParallelConfig(device="cuda" if cuda else "cpu"), seed=SEED):
        models = {}
        for variant in variants:
            kind, _, name = variant.partition("_")
            if kind not in models:
                models[kind] = build_hf(arch, device) if kind == "hf" else build_mcore(arch, kind, device)
            micro = [b for step in rank_steps(dataset, name, steps, arch.vocab_size) for b in step]
            make = (lambda batches, model=models[kind]: hf_step(model, batches, device)) if kind == "hf" else \
                (lambda batches, model=models[kind]: mcore_step(model, batches, arch.vocab_size, device))
            steps_of[variant], warmups[variant] = make(micro), make(micro[:1])
            real = sum(b.tokens_real for b in micro)
            computed = sum(b.tokens_computed for b in micro)
            results[variant] = {"variant": variant, "micro_batches": len(micro), "tokens_real": real,
                                "tokens_computed": computed, "real_fraction": real / computed, "times_s": []}
        for variant in variants:
            time_steps(warmups[variant], steps=1, warmup=0, cuda=cuda)
        for _ in range(repeats):
            for variant in variants:
                results[variant]["times_s"] += time_steps(steps_of[variant], steps=1, warmup=0, cuda=cuda)[0]
    for r in results.values():
        r["s_per_step"] = statistics.median(r["times_s"])
        r["real_tokens_per_s"] = r["tokens_real"] / r["s_per_step"]
        print(f"  {r['variant']:<20}{r['micro_batches']:>4} micro-batches, real {r['tokens_real']:>6} / computed "
              f"{r['tokens_computed']:>6} = {r['real_fraction']:.3f}  {r['s_per_step']:8.2f} s "
              f"{r['real_tokens_per_s']:9.0f} real tokens/s", flush=True)
    return results


def build_mcore(arch, spec: str, device: torch.device):
    seed_everything(SEED)
    cuda = device.type == "cuda"
    (model,) = build_model(arch, ModelOptions(spec=spec, precision="bf16" if cuda else "fp32", cuda=cuda))
    return model.train()


def build_hf(arch, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(SEED)
    config = LlamaConfig(**arch.to_hf_dict(), attn_implementation="sdpa")
    default = torch.get_default_dtype()
    # Built on the device in the training dtype (bf16 on a GPU), as bench_variants.hf_workload does.
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def small_arch():
    from simpo_mcore.model.hf_config import ModelArch

    return ModelArch(head_dim=SMALL["hidden_size"] // SMALL["num_attention_heads"], rms_norm_eps=1e-5,
                     rope_theta=500000.0, max_position_embeddings=16384, tie_word_embeddings=False, **SMALL)


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["auto", "shared", "synthetic"], default="auto",
                        help="lengths: the shared UltraFeedback sample (auto: when present) or the synthetic ones")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", default=None, help="small (CPU default) or 1b (GPU default)")
    parser.add_argument("--variants", default=None,
                        help="timed variants, comma-separated: a layout (step_wide, micro, packed_<P>) with the "
                             "prefix sdpa_, te_ (simpo_mcore) or hf_ (transformers). Default: sdpa_ of every "
                             "layout on a CPU; hf_micro,te_step_wide,te_micro,te_packed_8192 on a GPU")
    parser.add_argument("--steps", type=int, default=1, help="steps of rank 0 per timed call (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (round-robin)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--no-timing", action="store_true", help="fractions only")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.shape or ("1b" if cuda else "small")
    variants = (args.variants.split(",") if args.variants else
                ["hf_micro", "te_step_wide", "te_micro", "te_packed_8192"] if cuda else [f"sdpa_{n}" for n in LAYOUTS])

    pairs = shared_pairs() if args.data in ("auto", "shared") else None
    if pairs is None and args.data == "shared":
        print(f"error: {SHARED} has no UltraFeedback sample and Llama-3 tokenizer", file=sys.stderr)
        return 2
    source = "shared UltraFeedback sample, Llama-3 tokenizer" if pairs is not None else "synthetic (generated here)"
    pairs = pairs if pairs is not None else synthetic_pairs()
    lengths = pair_lengths(pairs)
    stats = length_stats([c for c, _ in lengths])
    out: dict = {"lengths": {"source": source, "pairs": len(pairs), "prompt_plus_chosen": vars(stats),
                             "prompt_plus_rejected": vars(length_stats([r for _, r in lengths]))},
                 "layout": {"global_batch_pairs": GLOBAL_PAIRS, "micro_batch_pairs": MICRO_PAIRS, "seed": SEED},
                 "host": platform.node(), "torch": torch.__version__}
    print(f"lengths: {source}, {len(pairs)} pairs; prompt + chosen median {stats.median:g}, p90 {stats.p90}, "
          f"max {stats.max}")
    out["fractions"], out["busiest_rank_fractions"] = {}, {}
    for dp in (4, 16):
        got, busiest = fractions(lengths, dp), busiest_rank_fractions(lengths, dp)
        out["fractions"][f"dp{dp}"], out["busiest_rank_fractions"][f"dp{dp}"] = got, busiest
        print(f"DP {dp} ({GLOBAL_PAIRS // dp} pairs per rank, micro-batches of {MICRO_PAIRS}), real-token fraction "
              f"(of the busiest rank's positions):", flush=True)
        for name in LAYOUTS:
            print(f"  {name:<14}{got[name]:.3f} ({busiest[name]:.3f})")
    if not args.no_timing:
        device = torch.device("cuda" if cuda else "cpu")
        print(f"one rank's step (rank 0 of DP 4, {GLOBAL_PAIRS // 4} pairs, {args.steps} step(s)), shape {shape}, "
              f"{device.type}, {torch.get_num_threads()} thread(s), median of {args.repeats} round-robin:", flush=True)
        timed = time_layouts(pairs, shape, device, args.steps, args.repeats, variants)
        out["timing"] = {"shape": shape, "device": device.type, "steps": args.steps, "variants": timed}
        base = timed.get("sdpa_step_wide") or timed.get("hf_micro")
        if base:
            for r in timed.values():
                r["vs_" + base["variant"]] = r["real_tokens_per_s"] / base["real_tokens_per_s"]
            print(f"real tokens/s against {base['variant']}: " + ", ".join(
                f"{n} {r['vs_' + base['variant']]:.2f}x" for n, r in timed.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
