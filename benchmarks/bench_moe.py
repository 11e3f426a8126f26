"""One SimPO training step of a mixture-of-experts model (forward + backward, no optimizer step): HF
transformers' ``Qwen3MoeForCausalLM`` against simpo_mcore's MoE layers, in one process on the GPU it finds;
megatron's experts as Transformer Engine's grouped GEMM (``TEGroupedMLP``) against one GEMM pair per expert
(``SequentialMLP``). Not yet measured on a GPU: nothing in the docs comes from it until it has run on one.

    python3 benchmarks/bench_moe.py --out $OUT/moe.json          # Qwen3-30B-A3B layers (4), 128 experts, top-8
    python benchmarks/bench_moe.py --tiny --out /tmp/moe.json     # CPU smoke (2 layers, 8 experts)

Variants (skipped, saying why, where they cannot run): ``hf_sdpa_bf16`` (transformers' default experts, grouped_mm
where it runs), ``hf_sdpa_bf16_eager_experts`` (HF's per-expert loop), ``mcore_sdpa_bf16_sequential`` (SDPA spec,
SequentialMLP), ``mcore_te_bf16_sequential`` (TE spec, SequentialMLP), ``mcore_te_bf16_grouped`` (TE spec,
TEGroupedMLP), ``hf_sdpa_bf16_again``. Expert parallelism 1 (one GPU); random weights and token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from bench_common import measure
from bench_report import finite
from bench_step import environment
from bench_variants import hf_workload, make_batch, mcore_workload

from simpo_mcore.config import LossConfig, ParallelConfig
from simpo_mcore.metrics_log import peak_tflops
from simpo_mcore.model.builder import ModelOptions
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.model.specs import te_available
from simpo_mcore.parallel import init_distributed, shutdown

QWEN3_30B_A3B_LAYERS = ModelArch(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=4, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
    model_type="qwen3_moe", qk_norm=True, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    moe_layers=(True,) * 4, norm_topk_prob=True)
"""Qwen3-30B-A3B's layer (configs/hf/Qwen__Qwen3-30B-A3B) at 4 of its 48 layers."""
TINY = replace(QWEN3_30B_A3B_LAYERS, vocab_size=1000, hidden_size=64, intermediate_size=160, num_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_layers=(True, True))

FLOPS_FORMULA = (
    "model FLOPs per step = tokens x [6 x (attention, norm and output-layer parameters + the MLP parameters a "
    "token passes through: router, its top-k experts, a shared expert) + 6 x layers x (heads x head_dim) x seq] "
    "(ModelArch.mlp_params_per_token); the experts a token skips are not counted.")


def moe_step_flops(arch: ModelArch, seq: int, sequences: int) -> float:
    h, q = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    attention = h * (q + 2 * kv) + q * h + 2 * h + (2 * arch.head_dim if arch.qk_norm else 0)
    per_token = sum(attention + arch.mlp_params_per_token(i) for i in range(arch.num_layers))
    per_token += h + arch.vocab_size * h  # final norm, output layer
    return (6 * per_token + 6 * arch.num_layers * q * seq) * seq * sequences


def variants(cuda: bool) -> list[tuple[str, str, dict | str]]:
    """``(name, kind, keywords or the reason it is skipped)``."""
    te = cuda and te_available()
    no_te = "needs a GPU and Transformer Engine"
    opts = dict(precision="bf16", cuda=cuda)
    return [
        ("hf_sdpa_bf16", "hf", {}),
        ("hf_sdpa_bf16_eager_experts", "hf", {"experts": "eager"}),
        ("mcore_sdpa_bf16_sequential", "mcore", ModelOptions(spec="sdpa", **opts)),
        ("mcore_te_bf16_sequential", "mcore", ModelOptions(spec="te", moe_grouped_gemm=False, **opts) if te else no_te),
        ("mcore_te_bf16_grouped", "mcore", ModelOptions(spec="te", moe_grouped_gemm=True, **opts) if te else no_te),
        ("hf_sdpa_bf16_again", "hf", {}),
    ]


def run(args, cuda: bool, device: torch.device, result: dict, save) -> None:
    arch = TINY if args.tiny else QWEN3_30B_A3B_LAYERS
    seq, pairs = (64, 1) if args.tiny else (args.seq, args.pairs)
    batch = make_batch(arch.vocab_size, pairs, seq, seq // 4, device, args.seed)
    flop = moe_step_flops(arch, seq, 2 * pairs)
    loss_cfg = LossConfig()
    result.update(arch={k: v for k, v in arch.to_json().items() if k != "extra"}, seq=seq, pairs=pairs,
                  tokens=2 * pairs * seq, model_tflop_per_step=flop / 1e12, variants={})
    timed = partial(measure, flop=flop, steps=args.steps, warmup=args.warmup, cuda=cuda)
    for name, kind, how in variants(cuda):
        if isinstance(how, str):
            out = {"status": "skipped", "reason": how}
        elif kind == "hf":
            out = timed(partial(hf_workload, arch, batch, loss_cfg, torch.bfloat16, device, args.seed, **how))
        else:
            out = timed(partial(mcore_workload, arch, batch, loss_cfg, how, args.chunk_tokens, args.seed))
        result["variants"][name] = out
        shown = {k: out.get(k) for k in ("status", "s_per_step", "peak_gib", "loss", "reason", "error")}
        print(f"[moe] {name}: {json.dumps({k: v for k, v in shown.items() if v is not None})}", flush=True)
        save()
    add_ratios(result["variants"], cuda)


def add_ratios(found: dict, cuda: bool) -> None:
    """Speed and peak memory against HF's first run (its default experts), MFU; grouped GEMM against
    SequentialMLP on the TE spec."""
    hf, peak = found.get("hf_sdpa_bf16", {}), peak_tflops(cuda)
    for v in found.values():
        if v.get("status") != "ok":
            continue
        v["mfu"] = v["tflops"] / peak if peak else None
        if hf.get("status") == "ok":
            v["speedup_vs_hf"] = hf["s_per_step"] / v["s_per_step"]
            v["peak_vs_hf"] = v["peak_gib"] / hf["peak_gib"] if v["peak_gib"] is not None else None
    grouped, sequential = found.get("mcore_te_bf16_grouped", {}), found.get("mcore_te_bf16_sequential", {})
    if grouped.get("status") == sequential.get("status") == "ok":
        grouped["speedup_vs_sequential"] = sequential["s_per_step"] / grouped["s_per_step"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the CPU smoke shape: 2 layers, hidden 64, 8 experts, top-2")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs (2 x pairs sequences; default 2)")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per chunk of the fused log-prob head")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs/bench"), "moe.json"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    layout = init_distributed(ParallelConfig(device=args.device), args.seed)
    cuda = layout.device.type == "cuda"
    result = {"schema": 1, "measured_on_gpu": cuda, "flops_formula": FLOPS_FORMULA, "env": environment(cuda),
              "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(finite(result), indent=1, allow_nan=False))

    try:
        run(args, cuda, layout.device, result, save)
    finally:
        save()
        shutdown()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
