"""Activation memory per GPU against sequence length and context parallelism, on paper (docs/long_context.md).

    python tools/long_context_sizing.py [--models meta-llama__Llama-3.1-8B-Instruct,Qwen__Qwen2.5-7B-Instruct]
        [--lengths 4096,8192,16384,32768] [--cp 1,2,4,8] [--tp 2] [--recompute none,selective,full]

For each shipped architecture (``configs/hf/<org>__<name>/config.json``) and each sequence length ``S``: one packed
row holding one pair of two ``S``-token sequences (``2 S`` positions, every position labelled: the head's upper
bound), on one GPU of a TE / bf16 run at ``--tp`` (sequence parallelism on when TP > 1), no pipeline. Each cell
is ``saved / peak`` GiB: what autograd saves for the micro-batch (``RankMemory.activations``), and that plus the
transient memory of the backward (the log-prob head's working memory, one layer's backward, a recomputed block:
``head + buffers``). The weights, gradients and optimizer state come on top (``simpo-plan`` adds them).
"""

from __future__ import annotations

import argparse

from simpo_mcore.config import ModelConfig
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.plan import (
    Implementation,
    Layout,
    MicroBatchShape,
    ModelShape,
    Numerics,
    Setup,
    find_architecture,
    rank_memory,
)
from simpo_mcore.plan.inputs import SHIPPED_HF

GIB = 2**30
MODELS = ("meta-llama__Llama-3.1-8B-Instruct", "Qwen__Qwen2.5-7B-Instruct")


def sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def cell(setup: Setup, length: int, cp: int, tp: int, recompute: str) -> tuple[float, float]:
    """(saved, peak) GiB of one GPU for a row of one pair of two ``length``-token sequences."""
    split = 2 * cp * tp  # megatron's split multiple under sequence parallelism: each sequence padded to it
    padded = -(-length // split) * split
    mb = MicroBatchShape(tokens=2 * padded, rows=1, labelled=2 * padded, sequences=2, longest=padded)
    layout = Layout(tp=tp, cp=cp, sequence_parallel=tp > 1, recompute=recompute)
    memory = rank_memory(setup, layout, mb)
    return memory.activations / GIB, (memory.activations + memory.head + memory.buffers) / GIB


def table(arch: ModelArch, name: str, lengths: list[int], cps: list[int], tp: int, recomputes: list[str]) -> str:
    shape = ModelShape.from_arch(arch)
    setup = Setup(shape=shape, impl=Implementation(spec="te", cuda=True, act_bytes=2),
                  numerics=Numerics.for_precision("bf16"))
    lines = [f"{name}: {shape.parameters() / 1e9:.2f}B, {shape.num_layers} layers, hidden {shape.hidden_size}, "
             f"{shape.num_attention_heads}/{shape.num_query_groups} heads; TP {tp}"
             f"{' + SP' if tp > 1 else ''}, GiB per GPU (saved / peak)", "",
             "| recompute | sequence | " + " | ".join(f"CP {c}" for c in cps) + " |",
             "|---|---:|" + "---:|" * len(cps)]
    for recompute in recomputes:
        for length in lengths:
            cells = [cell(setup, length, c, tp, recompute) for c in cps]
            lines.append(f"| {recompute} | {length // 1024}k | "
                         + " | ".join(f"{s:.1f} / {p:.1f}" for s, p in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="configs/hf/ folder names, comma-separated")
    parser.add_argument("--lengths", default="4096,8192,16384,32768", help="tokens per sequence")
    parser.add_argument("--cp", default="1,2,4,8", help="context-parallel sizes")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (sequence parallelism when > 1)")
    parser.add_argument("--recompute", default="none,selective,full", help="model.recompute values")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        arch = find_architecture(ModelConfig(), None, hf_config=SHIPPED_HF / name).arch
        print(table(arch, name, sizes(args.lengths), sizes(args.cp), args.tp, args.recompute.split(",")))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
