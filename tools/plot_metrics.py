"""Plot a run's metrics.jsonl: loss, rewards, margins and reward accuracy (train and eval).

    python tools/plot_metrics.py RUN_DIR_or_metrics.jsonl [--out PNG]

Reads ``<output_dir>/metrics.jsonl`` (written by simpo-train on rank 0: training records with
``loss``, ``rewards/*``, ... and evaluation records with ``eval/loss``, ...) and writes a PNG,
by default ``<run_dir>/metrics.png``. After a resume a step can appear twice: the later record
wins. Non-finite values (written as "nan" / "inf") leave gaps in the lines.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PANELS = (  # (title, [(metric key without the "eval/" prefix, label)])
    ("loss", [("loss", "loss")]),
    ("rewards", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")]),
    ("reward margin", [("rewards/margins", "chosen - rejected")]),
    ("reward accuracy", [("rewards/accuracies", "accuracy")]),
)


def read_series(path: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value}; a later line overwrites an earlier one for the same step."""
    lines = path.read_text().splitlines()
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # a run killed mid-write leaves half a last line
                print(f"warning: {path} line {number} is incomplete; ignored", file=sys.stderr)
                continue
            raise ValueError(f"{path} line {number} is not JSON: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path} line {number} has no integer 'step'")
        for key, value in record.items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool) and key not in ("step", "time"):
                try:
                    series.setdefault(key, {})[record["step"]] = float(value)  # "nan" -> nan
                except ValueError:
                    pass
    return series


def plot(series: dict[str, dict[int, float]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    styles = (("", "train", dict(lw=1, alpha=0.8)), ("eval/", "eval", dict(ls="--", marker="o", ms=4)))
    for ax, (name, keys) in zip(axes.flat, PANELS):
        for i, (key, label) in enumerate(keys):
            for prefix, split, style in styles:
                if values := series.get(prefix + key):
                    steps = sorted(values)
                    ax.plot(steps, [values[s] for s in steps], color=f"C{i}", label=f"{split} {label}", **style)
        if name == "reward accuracy":
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="a run's output_dir, or its metrics.jsonl")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: <run_dir>/metrics.png)")
    args = p.parse_args(argv)
    path = args.path / "metrics.jsonl" if args.path.is_dir() else args.path
    try:
        if not path.is_file():
            raise ValueError(f"{path} does not exist (expected a run's output_dir or its metrics.jsonl)")
        series = read_series(path)
        if not series:
            raise ValueError(f"{path} is empty: no metric records (has the run logged a step yet?)")
        keys = [name for _, panel in PANELS for key, _ in panel for name in (key, f"eval/{key}")]
        if not any(math.isfinite(v) for k in keys for v in series.get(k, {}).values()):
            raise ValueError(f"{path} has no finite value of {', '.join(keys)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or path.parent / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(series, str(path.parent.resolve().name), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
