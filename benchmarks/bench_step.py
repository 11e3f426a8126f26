"""One SimPO training step (forward + backward, no optimizer step), HF transformers vs simpo_mcore, on
the GPU it finds (or the CPU: a smoke test at ``--shape tiny``), all in one process so ratios come from
one card. See benchmarks/README.md for the variants and docs/performance.md for the results.

    python3 benchmarks/bench_step.py --shape 1b,8b4 --sweep-seq 512,1024,2048,4096 --out $OUT/bench.json
    python benchmarks/bench_step.py --shape tiny --steps 2 --warmup 1 --out /tmp/bench.json      # CPU smoke

Writes the JSON after every variant (a run cut short keeps what it measured) and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import traceback
from functools import partial
from pathlib import Path

import torch
from bench_common import (
    DEFAULT_BATCH,
    FLOPS_FORMULA,
    GIB,
    SHAPES,
    device_ceilings,
    free_memory,
    head_flops,
    make_arch,
    measure,
    param_count,
    step_flops,
)
from bench_report import finite, print_summary, targets
from bench_variants import (
    FUSED_HEADS,
    HEAD_KINDS,
    head_agreement,
    head_workload,
    hf_workload,
    make_batch,
    make_head_inputs,
    mcore_workload,
)

from simpo_mcore.config import LossConfig, ParallelConfig
from simpo_mcore.metrics_log import peak_tflops
from simpo_mcore.model.builder import ModelOptions
from simpo_mcore.model.specs import te_available
from simpo_mcore.parallel import init_distributed, shutdown

VARIANT_GROUPS = ("hf", "local", "sdpa", "te", "fp8", "head")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
HEAD_LOGITS = ("recompute", "keep")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="1b", help=f"comma list of {', '.join(SHAPES)} (default 1b)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048; tiny: 64)")
    p.add_argument("--pairs", type=int, help="preference pairs = 2 x pairs sequences (default 2; tiny: 1)")
    p.add_argument("--prompt", type=int, help="prompt tokens per sequence, no loss on them (default seq / 4)")
    p.add_argument("--variants", default="hf,sdpa,te,fp8,head",
                   help=f"comma list of {', '.join(VARIANT_GROUPS)}; te and fp8 are skipped (and say why) "
                        "without a GPU or Transformer Engine")
    p.add_argument("--fp8-recipes", default="delayed,tensorwise", help=f"comma list of {', '.join(FP8_RECIPES)}")
    p.add_argument("--fp8-format", default="hybrid", choices=("hybrid", "e4m3"))
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"),
                   help="activation recomputation of the simpo_mcore variants (HF never recomputes)")
    p.add_argument("--chunk-tokens", type=int, default=4096,
                   help="tokens per chunk of the fused log-prob head; 0 = full logits + the unfused head")
    p.add_argument("--head-kernel", default="auto", choices=("auto", "torch", "triton"),
                   help="the fused head's elementwise passes in the simpo_mcore variants (auto: Triton on a GPU)")
    p.add_argument("--head-logits", default="recompute",
                   help="comma list of recompute, keep: each simpo_mcore variant runs once per mode; keep "
                        "(model.logprob_recompute: false) adds the suffix +keep_logits")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step per model variant: device busy and idle "
                        "time, host syncs, the kernels that take longest (a summary in the JSON)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--sweep-seq", default="", help="comma list of sequence lengths: HF and the best simpo_mcore "
                                                   "bf16 spec at each, for the first shape, same pairs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs/bench"), "bench.json"))
    args = p.parse_args(argv)
    args.shapes = _choices(args.shape, SHAPES, "--shape")
    args.groups = _choices(args.variants, VARIANT_GROUPS, "--variants")
    args.recipes = _choices(args.fp8_recipes, FP8_RECIPES, "--fp8-recipes") if args.fp8_recipes else []
    args.sweep = [int(s) for s in args.sweep_seq.split(",") if s]
    args.head_modes = _choices(args.head_logits, HEAD_LOGITS, "--head-logits")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def _choices(text: str, allowed, flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {', '.join(allowed)}")
    return items


def environment(cuda: bool) -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": version("transformers"), "megatron_core": version("megatron-core"),
        "transformer_engine": version("transformer_engine") or version("transformer-engine"),
        "te_importable": cuda and te_available(), "device": "cpu", "cpu_threads": torch.get_num_threads(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / GIB, 1),
                   cuda=torch.version.cuda, cudnn=_cudnn_version())
    return env


def _cudnn_version() -> int | str:
    """torch's cuDNN check raises when another library (Transformer Engine preloads the cuDNN of the
    nvidia pip packages) loaded a cuDNN older than the one torch was built against: record that instead."""
    try:
        return torch.backends.cudnn.version()
    except RuntimeError as exc:
        return f"unknown: {str(exc).split('.')[0]}"


def mcore_variants(args, cuda: bool) -> list[tuple[str, ModelOptions | str]]:
    """(name, options) per simpo_mcore variant asked for, or (name, reason) where it cannot run here."""
    have_te = cuda and te_available()
    fp8_ok = have_te and torch.cuda.get_device_capability() >= (8, 9)
    common = dict(recompute=args.recompute, cuda=cuda)
    out = []
    for spec in ("local", "sdpa", "te"):
        if spec in args.groups:
            name = f"mcore_{spec}_bf16"
            out.append((name, ModelOptions(spec=spec, precision="bf16", **common) if spec != "te" or have_te
                        else "needs a GPU and Transformer Engine"))
    if "fp8" in args.groups:
        for recipe in args.recipes:
            name = f"mcore_te_fp8_{recipe}"
            out.append((name, ModelOptions(spec="te", precision="fp8", fp8_recipe=recipe, fp8_format=args.fp8_format,
                                           **common) if fp8_ok
                        else "needs Transformer Engine and a GPU of compute capability >= 8.9"))
    if args.recompute != "none":
        out = [(f"{name}+recompute_{args.recompute}", o) for name, o in out]
    return out


def head_modes(args, name: str) -> list[tuple[str, bool]]:
    """``(variant name, keep_logits)`` for each ``--head-logits`` mode of a simpo_mcore variant."""
    return [(name if mode == "recompute" else f"{name}+keep_logits", mode == "keep") for mode in args.head_modes]


def run_shape(args, shape: str, cuda: bool, device: torch.device, rec: dict, save) -> None:
    """Fill ``rec`` (already in the saved result, so each variant is written as soon as it is measured)."""
    default_seq, default_pairs = DEFAULT_BATCH[shape]
    seq, pairs = args.seq or default_seq, args.pairs or default_pairs
    prompt = args.prompt if args.prompt is not None else seq // 4
    arch = make_arch(shape, max([seq, *args.sweep]))
    flop = step_flops(arch, seq, 2 * pairs)
    loss_cfg = LossConfig()
    batch = make_batch(arch.vocab_size, pairs, seq, prompt, device, args.seed)
    rec.update(shape=shape, arch={k: v for k, v in arch.to_json().items() if k != "extra"},
               params=param_count(arch), seq=seq, pairs=pairs, prompt=prompt, sequences=2 * pairs,
               tokens=2 * pairs * seq, model_tflop_per_step=flop / 1e12, chunk_tokens=args.chunk_tokens,
               recompute=args.recompute, variants={})
    run = partial(measure, flop=flop, steps=args.steps, warmup=args.warmup, cuda=cuda, profile=args.profile)

    def record(name: str, result: dict) -> None:
        rec["variants"][name] = result
        shown = {k: result.get(k) for k in ("status", "s_per_step", "host_s_per_step", "tflops", "peak_gib", "loss",
                                             "reason", "error")}
        if result.get("profile"):
            shown["profile"] = {k: v for k, v in result["profile"].items() if k != "top_kernels_ms"}
        print(f"[{shape}] {name}: {json.dumps({k: v for k, v in shown.items() if v is not None})}", flush=True)
        save()

    dtype = torch.bfloat16
    if "hf" in args.groups:
        record("hf_sdpa_bf16", run(partial(hf_workload, arch, batch, loss_cfg, dtype, device, args.seed)))
    for base, opts in mcore_variants(args, cuda):
        for name, keep_logits in head_modes(args, base):
            if isinstance(opts, str):
                record(name, {"status": "skipped", "reason": opts})
            else:
                record(name, run(partial(mcore_workload, arch, batch, loss_cfg, opts, args.chunk_tokens, args.seed,
                                         args.head_kernel, keep_logits)))
    if "hf" in args.groups:  # the baseline again, last: its drift bounds the noise of every ratio above
        record("hf_sdpa_bf16_again", run(partial(hf_workload, arch, batch, loss_cfg, dtype, device, args.seed)))
    if "head" in args.groups:
        rec["head"] = run_head(args, arch, batch, loss_cfg, dtype, cuda)
        save()
    add_ratios(rec, cuda)
    rec["targets"] = targets(rec)


def run_head(args, arch, batch, loss_cfg, dtype, cuda: bool) -> dict:
    """The log-prob head alone at this batch's tokens: naive vs fused, forward + backward."""
    chunk = args.chunk_tokens or 4096
    make_inputs = partial(make_head_inputs, batch, arch.hidden_size, arch.vocab_size, dtype, args.seed)
    tokens = batch.tokens.numel()
    rec = {"tokens": tokens, "vocab": arch.vocab_size, "hidden": arch.hidden_size, "chunk_tokens": chunk,
           "model_tflop_per_step": head_flops(tokens, arch.vocab_size, arch.hidden_size) / 1e12}
    try:
        rec["agreement"] = head_agreement(make_inputs(), loss_cfg, chunk)
    except Exception:  # noqa: BLE001 - out of memory included: the timings below still run
        rec["agreement"] = {"error": traceback.format_exc(limit=-2)}
    free_memory(cuda)
    flop = head_flops(tokens, arch.vocab_size, arch.hidden_size)
    rec["variants"] = {kind: measure(partial(head_workload, kind, make_inputs, loss_cfg, chunk), flop=flop,
                                     steps=args.steps, warmup=args.warmup, cuda=cuda) for kind in HEAD_KINDS}
    for r in rec["variants"].values():
        if r.get("peak_gib") is not None:  # the head's own allocations, gradients included; not its inputs
            r["head_peak_gib"] = round(r["peak_gib"] - r["static_gib"], 3)
    naive = rec["variants"]["naive"]
    for kind in FUSED_HEADS:
        fused, suffix = rec["variants"][kind], kind.removeprefix("fused")
        if naive["status"] == fused["status"] == "ok":
            rec[f"time_vs_naive{suffix}"] = fused["s_per_step"] / naive["s_per_step"]
            if fused.get("head_peak_gib") is not None:
                rec[f"peak_vs_naive{suffix}"] = fused["head_peak_gib"] / naive["head_peak_gib"]
    print(f"head: {json.dumps({k: v for k, v in rec.items() if k != 'variants'})}", flush=True)
    return rec


def add_ratios(rec: dict, cuda: bool) -> None:
    """Speed and peak memory of each variant against HF's first run, MFU, and FP8 against bf16."""
    variants = rec["variants"]
    hf = variants.get("hf_sdpa_bf16", {})
    peak = peak_tflops(cuda)
    bf16 = next((v for k, v in variants.items() if k.startswith("mcore_te_bf16") and v["status"] == "ok"), None)
    for name, v in variants.items():
        if v["status"] != "ok":
            continue
        v["mfu"] = v["tflops"] / peak if peak else None
        if hf.get("status") == "ok":
            v["speedup_vs_hf"] = hf["s_per_step"] / v["s_per_step"]
            v["peak_vs_hf"] = v["peak_gib"] / hf["peak_gib"] if v["peak_gib"] is not None else None
        if "_fp8_" in name and bf16 is not None:
            # Same initial weights and batch (one seed per spec): how far FP8 moves the loss and gradients.
            v["loss_diff_vs_te_bf16"] = v["loss"] - bf16["loss"]
            v["grad_norm_rel_diff_vs_te_bf16"] = (v["grad_norm"] - bf16["grad_norm"]) / bf16["grad_norm"]


def run_sweep(args, cuda: bool, device: torch.device, save) -> dict:
    """HF and simpo_mcore (te bf16 where TE runs, else sdpa) at each sequence length of the first shape."""
    shape = args.shapes[0]
    pairs = args.pairs or DEFAULT_BATCH[shape][1]
    arch = make_arch(shape, max(args.sweep))
    spec = "te" if cuda and te_available() else "sdpa"
    opts = ModelOptions(spec=spec, precision="bf16", recompute=args.recompute, cuda=cuda)
    loss_cfg, dtype = LossConfig(), torch.bfloat16
    sweep = {"shape": shape, "pairs": pairs, "mcore_variant": f"mcore_{spec}_bf16", "points": []}
    for seq in args.sweep:
        batch = make_batch(arch.vocab_size, pairs, seq, seq // 4, device, args.seed)
        builders = {
            "hf_sdpa_bf16": partial(hf_workload, arch, batch, loss_cfg, dtype, device, args.seed),
            sweep["mcore_variant"]: partial(mcore_workload, arch, batch, loss_cfg, opts, args.chunk_tokens, args.seed,
                                            args.head_kernel),
        }
        for name, build in builders.items():
            r = measure(build, flop=step_flops(arch, seq, 2 * pairs), steps=args.steps, warmup=args.warmup, cuda=cuda)
            point = {"seq": seq, "variant": name, "tokens": 2 * pairs * seq, "status": r["status"],
                     "s_per_step": r.get("s_per_step"), "tflops": r.get("tflops"), "peak_gib": r.get("peak_gib"),
                     "tokens_per_s": 2 * pairs * seq / r["s_per_step"] if r["status"] == "ok" else None}
            sweep["points"].append(point)
            print(f"[sweep] {json.dumps(point)}", flush=True)
            save()
    return sweep


def main(argv=None) -> int:
    args = parse_args(argv)
    layout = init_distributed(ParallelConfig(device=args.device), args.seed)
    cuda = layout.device.type == "cuda"
    result = {"schema": 1, "flops_formula": FLOPS_FORMULA, "env": environment(cuda),
              "args": {k: v for k, v in vars(args).items()
                       if k not in ("shapes", "groups", "recipes", "sweep", "head_modes")},
              "ceilings": None, "runs": [], "sweep": None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(finite(result), indent=1, allow_nan=False))

    print(json.dumps(result["env"]), flush=True)
    result["ceilings"] = device_ceilings(cuda)
    try:
        for shape in args.shapes:
            result["runs"].append({})
            run_shape(args, shape, cuda, layout.device, result["runs"][-1], save)
            save()
        if args.sweep:
            result["sweep"] = run_sweep(args, cuda, layout.device, save)
            save()
    finally:
        save()
        shutdown()
    print_summary(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
