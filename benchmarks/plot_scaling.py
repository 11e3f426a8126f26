"""Throughput and peak memory against sequence length, from the ``sweep`` of a bench_step.py JSON.

    python3 benchmarks/plot_scaling.py $OUT/bench.json --out $OUT/scaling.png

Left: tokens per second of one SimPO step (forward + backward) per variant; right: peak GPU memory.
Points that ran out of memory are marked on the axis. A CPU run is stamped as a smoke test in the
figure itself, so that its picture cannot pass for a GPU measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend


def series(points: list[dict], variant: str, key: str) -> tuple[list[int], list[float], list[int]]:
    """(sequence lengths, values) of the points that ran, and the lengths that ran out of memory."""
    ok = [(p["seq"], p[key]) for p in points if p["variant"] == variant and p["status"] == "ok" and p[key] is not None]
    oom = [p["seq"] for p in points if p["variant"] == variant and p["status"] == "oom"]
    return [s for s, _ in ok], [v for _, v in ok], oom


def plot(result: dict, out: Path) -> Path:
    sweep = result.get("sweep")
    if not sweep or not sweep.get("points"):
        raise ValueError("the JSON has no sweep: run bench_step.py with --sweep-seq")
    points, env = sweep["points"], result["env"]
    variants = list(dict.fromkeys(p["variant"] for p in points))
    seqs = sorted({p["seq"] for p in points})
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in variants:
        x, y, oom = series(points, variant, "tokens_per_s")
        line, = ax_speed.plot(x, y, marker="o", label=variant)
        x_mem, y_mem, _ = series(points, variant, "peak_gib")
        if y_mem:
            ax_mem.plot(x_mem, y_mem, marker="o", color=line.get_color(), label=variant)
        for ax in (ax_speed, ax_mem):
            for s in oom:
                ax.annotate("OOM", (s, 0), xycoords=("data", "axes fraction"), color=line.get_color(),
                            ha="center", va="bottom")
    for ax, ylabel in ((ax_speed, "tokens / s (forward + backward)"), (ax_mem, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(seqs) / 1.25, max(seqs) * 1.25)
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    ax_speed.legend()
    if not any(p["peak_gib"] is not None for p in points):
        ax_mem.text(0.5, 0.5, "peak memory is measured on a GPU only", transform=ax_mem.transAxes, ha="center")
    title = (f"SimPO step, shape {sweep['shape']}, {2 * sweep['pairs']} sequences | {env['device']} | "
             f"torch {env['torch']}, megatron-core {env['megatron_core']}, TE {env['transformer_engine'] or '-'}")
    if env["device"] == "cpu":
        title += "\nCPU SMOKE TEST: not a performance measurement"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot the sequence-length sweep of a bench_step.py JSON.")
    p.add_argument("bench_json", type=Path)
    p.add_argument("--out", type=Path, help="PNG to write (default: scaling.png beside the JSON)")
    args = p.parse_args(argv)
    result = json.loads(args.bench_json.read_text())
    out = plot(result, args.out or args.bench_json.with_name("scaling.png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
