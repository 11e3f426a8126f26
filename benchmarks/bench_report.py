"""The performance targets (read from docs/performance.md) checked against a :mod:`bench_step` result, and
the table it prints last."""

from __future__ import annotations

import math
import re
from pathlib import Path

TARGETS_DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
_TABLE = re.compile(r"<!-- benchmark targets:.*?-->\n(.*?)<!-- end benchmark targets -->", re.S)


def load_targets(doc: Path = TARGETS_DOC) -> tuple:
    """``(shape or None for any, what, (variant, key), comparison, threshold)`` per row of the targets table
    in ``doc``. Step targets hold at 2 pairs x 2048 tokens; head targets at 8192 tokens x 128256 vocabulary."""
    match = _TABLE.search(doc.read_text())
    if match is None:
        raise ValueError(f"{doc}: no benchmark targets table")
    rows = []
    for line in match.group(1).strip().splitlines()[2:]:  # after the header and its rule
        what, shape, variant, key, op, threshold = (c.strip() for c in line.strip().strip("|").split("|"))
        if op not in (">=", "<="):
            raise ValueError(f"{doc}: target {what!r} has comparison {op!r} (>= or <=)")
        rows.append((None if shape == "any" else shape, what, (variant, key), op, float(threshold)))
    return tuple(rows)


TARGETS = load_targets()


def finite(obj):
    """JSON has no NaN or infinity: write them as strings, so that a diverged variant stays visible."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def _variant_value(variants: dict, prefix: str, key: str, higher_is_better: bool):
    """The value of ``key`` for the variant ``prefix`` (any recompute suffix); for a prefix ending in ``_``
    (all FP8 recipes), the best one. Returns (variant name, value) or (None, None)."""
    found = [(name, v[key]) for name, v in variants.items()
             if v.get("status") == "ok" and v.get(key) is not None
             and (name.startswith(prefix) if prefix.endswith("_") else name.split("+")[0] == prefix)]
    if not found:
        return None, None
    return (max if higher_is_better else min)(found, key=lambda nv: nv[1])


def targets(rec: dict) -> list[dict]:
    """Each target that applies to this run, with the measured value and whether it is met (None: not run)."""
    out = []
    step_batch = rec["seq"] == 2048 and rec["pairs"] == 2
    head = rec.get("head")
    head_size = head is not None and head["tokens"] == 8192 and head["vocab"] == 128256
    fastest = {}  # prefix -> the variant its speed target picked
    for shape, what, (where, key), op, threshold in TARGETS:
        if where == "head":
            if not head_size:
                continue
            name, value = "head", head.get(key)
        else:
            if shape != rec["shape"] or not step_batch:
                continue
            if key == "peak_vs_hf" and fastest.get(where):
                # Speed and memory are one configuration's: the memory of the variant the speed target chose
                # (a +keep_logits variant can be faster and bigger than the default).
                name = fastest[where]
                value = rec["variants"][name].get(key)
            else:
                name, value = _variant_value(rec["variants"], where, key, higher_is_better=op == ">=")
            if key == "speedup_vs_hf":
                fastest[where] = name
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"target": what, "variant": name, "value": value, "op": op, "threshold": threshold, "met": met})
    return out


def _fmt(value, spec: str) -> str:
    """``format(value, spec)``, or a dash as wide as the spec's width where there is no number."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return ("-" if value is None or isinstance(value, str) else format(value, spec)).rjust(width)


def print_summary(result: dict) -> None:
    env = result["env"]
    print(f"\n== {env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
          f"megatron-core {env['megatron_core']} | TE {env['transformer_engine'] or '-'}")
    if result["ceilings"]:
        c = result["ceilings"]
        print(f"ceilings: bf16 matmul {c['bf16_matmul_tflops']} TFLOP/s, copy {c['copy_tbps']} TB/s")
    for rec in result["runs"]:
        if "variants" not in rec:
            continue
        a = rec["arch"]
        print(f"\n[{rec['shape']}] {a['num_layers']} layers, hidden {a['hidden_size']}, heads "
              f"{a['num_attention_heads']}/{a['num_key_value_heads']}, FFN {a['intermediate_size']}, vocab "
              f"{a['vocab_size']}, {rec['params'] / 1e9:.2f} B params | {rec['sequences']} x {rec['seq']} tokens "
              f"(prompt {rec['prompt']}) | {rec['model_tflop_per_step']:.1f} TFLOP/step | chunk "
              f"{rec['chunk_tokens']} | recompute {rec['recompute']}")
        print(f"{'variant':34} {'s/step':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'vs HF':>6} "
              f"{'peak/HF':>8} {'loss':>8}  status")
        for name, v in rec["variants"].items():
            print(f"{name:34} {_fmt(v.get('s_per_step'), '8.4f')} {_fmt(v.get('tflops'), '8.3g')} "
                  f"{_fmt(v.get('mfu'), '6.3f')} {_fmt(v.get('peak_gib'), '9.2f')} "
                  f"{_fmt(v.get('speedup_vs_hf'), '6.2f')} {_fmt(v.get('peak_vs_hf'), '8.2f')} "
                  f"{_fmt(v.get('loss'), '8.4f')}  {v['status']} {v.get('reason', '')}")
        head = rec.get("head")
        if head:
            ag = head["agreement"]
            print(f"head alone, {head['tokens']} tokens x {head['vocab']} vocab x {head['hidden']} hidden, chunk "
                  f"{head['chunk_tokens']}:")
            for kind, v in head["variants"].items():
                print(f"  {kind:11} {_fmt(v.get('s_per_step'), '.5f')} s  {_fmt(v.get('tflops'), '.3g')} TFLOP/s  "
                      f"head peak {_fmt(v.get('head_peak_gib'), '.3f')} GiB  {v['status']}")
            if "error" in ag:
                print(f"  agreement check failed: {ag['error'].strip().splitlines()[-1]}")
            else:
                print(f"  max |token logp - fp64|: naive {ag['max_abs_err_naive_vs_fp64']:.2e}")
            for kind in (k for k in head["variants"] if k != "naive"):
                suffix = kind.removeprefix("fused")  # as bench_step names the ratios
                line = (f"  {kind}/naive: time {_fmt(head.get('time_vs_naive' + suffix), '.3f')}, peak "
                        f"{_fmt(head.get('peak_vs_naive' + suffix), '.3f')}")
                if "error" not in ag:
                    line += (f" | max |{kind} - naive| {ag[f'max_abs_diff_{kind}_vs_naive']:.2e}, vs fp64 "
                             f"{ag[f'max_abs_err_{kind}_vs_fp64']:.2e} | grad rel diff: hidden "
                             f"{ag[f'grad_hidden_rel_diff_{kind}_vs_naive']:.2e} weight "
                             f"{ag[f'grad_weight_rel_diff_{kind}_vs_naive']:.2e}")
                print(line)
        for t in rec.get("targets", []):
            verdict = {True: "MET", False: "MISSED", None: "not run"}[t["met"]]
            print(f"  target {t['target']} {t['op']} {t['threshold']}: {_fmt(t['value'], '.3f')} "
                  f"({t['variant'] or '-'}) {verdict}")
    sweep = result.get("sweep")
    if sweep:
        print(f"\nsweep [{sweep['shape']}], {2 * sweep['pairs']} sequences:")
        print(f"{'seq':>6} {'variant':22} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'peak GiB':>9}  status")
        for p in sweep["points"]:
            print(f"{p['seq']:6d} {p['variant']:22} {_fmt(p['s_per_step'], '8.4f')} {_fmt(p['tokens_per_s'], '10.0f')} "
                  f"{_fmt(p['tflops'], '8.3g')} {_fmt(p['peak_gib'], '9.2f')}  {p['status']}")
