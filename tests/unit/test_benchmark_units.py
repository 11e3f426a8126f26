"""Pieces of the benchmark that need no model: the performance targets (docs/performance.md) as
``benchmarks/bench_report.py`` checks them on hand-made results, and how ``bench_common.measure`` times a
step and records failures."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
bench_report = importlib.import_module("bench_report")
bench_common = importlib.import_module("bench_common")


def _run(shape="1b", seq=2048, pairs=2, **variants):
    return {"shape": shape, "seq": seq, "pairs": pairs, "variants": variants,
            "head": {"tokens": 2 * pairs * seq, "vocab": 128256, "time_vs_naive": 0.9, "peak_vs_naive": 0.35}}


def _ok(speedup, peak=None):
    return {"status": "ok", "speedup_vs_hf": speedup, "peak_vs_hf": peak}


def test_targets_1b():
    """TE bf16 1.5x and 0.45x memory meet 1.45x / 0.5x; the best FP8 recipe counts (1.8 > 1.7, although
    the other recipe misses); SDPA 1.05x misses 1.1x; the head meets time (0.9 <= 1) and misses memory."""
    run = _run(mcore_te_bf16=_ok(1.5, 0.45), mcore_te_fp8_delayed=_ok(1.8), mcore_te_fp8_tensorwise=_ok(1.6),
               mcore_sdpa_bf16=_ok(1.05))
    got = {t["target"]: (t["variant"], t["value"], t["met"]) for t in bench_report.targets(run)}
    assert got == {
        "TE bf16 step speed vs HF": ("mcore_te_bf16", 1.5, True),
        "TE bf16 peak memory vs HF": ("mcore_te_bf16", 0.45, True),
        "TE FP8 step speed vs HF (best recipe)": ("mcore_te_fp8_delayed", 1.8, True),
        "SDPA (no TE) step speed vs HF": ("mcore_sdpa_bf16", 1.05, False),
        "fused head peak memory vs naive": ("head", 0.35, False),
        "fused head time vs naive": ("head", 0.9, True),
    }


def test_te_bf16_speed_and_memory_come_from_one_variant():
    """Keeping the head's logits can be faster and bigger: the memory target reads the variant the speed
    target chose, so two configurations never meet one target pair between them."""
    run = _run(mcore_te_bf16=_ok(1.40, 0.46), **{"mcore_te_bf16+keep_logits": _ok(1.46, 0.53)})
    got = {t["target"]: (t["variant"], t["value"], t["met"]) for t in bench_report.targets(run)}
    assert got["TE bf16 step speed vs HF"] == ("mcore_te_bf16+keep_logits", 1.46, True)
    assert got["TE bf16 peak memory vs HF"] == ("mcore_te_bf16+keep_logits", 0.53, False)
    run = _run(mcore_te_bf16=_ok(1.47, 0.46), **{"mcore_te_bf16+keep_logits": _ok(1.46, 0.53)})
    got = {t["target"]: (t["variant"], t["met"]) for t in bench_report.targets(run)}
    assert got["TE bf16 peak memory vs HF"] == ("mcore_te_bf16", True)


def test_targets_not_run_and_not_applicable():
    """A variant that did not run leaves its target unjudged (None), never met; a recompute suffix still
    matches; another batch size has no step targets; 8b4 has only the FP8 one."""
    run = _run(mcore_te_bf16={"status": "oom"}, **{"mcore_sdpa_bf16+recompute_full": _ok(1.2)})
    got = {t["target"]: t["met"] for t in bench_report.targets(run)}
    assert got["TE bf16 step speed vs HF"] is None and got["TE FP8 step speed vs HF (best recipe)"] is None
    assert got["SDPA (no TE) step speed vs HF"] is True
    assert [t["target"] for t in bench_report.targets(_run(seq=1024))] == []  # 4096 tokens: no head target either
    assert [t["target"] for t in bench_report.targets(_run(shape="8b4", mcore_te_fp8_delayed=_ok(1.5)))][0] == \
        "TE FP8 step speed vs HF (best recipe)"


def test_finite_keeps_json_strict():
    assert json.dumps(bench_report.finite({"loss": math.nan, "x": [math.inf, 1.0]}), allow_nan=False) == \
        '{"loss": "nan", "x": ["inf", 1.0]}'


def test_measure_times_and_reports():
    """Median of the timed steps, TFLOP/s = FLOPs / median, the first warm-up step's loss, the report merged."""
    calls = []

    def build():
        return bench_common.Workload(step=lambda: calls.append(1) or torch.tensor(float(len(calls))),
                                     report=lambda: {"extra": 7})

    r = bench_common.measure(build, flop=2e12, steps=3, warmup=2, cuda=False)
    assert len(calls) == 5 and r["status"] == "ok" and len(r["times_s"]) == 3
    assert r["loss"] == 1.0 and r["extra"] == 7 and r["peak_gib"] is None
    assert r["tflops"] == pytest.approx(2.0 / r["s_per_step"])


def test_measure_records_failures_and_goes_on():
    """Out of memory and any other error become a result (the other variants of a GPU run still run)."""

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    def broken():
        return bench_common.Workload(step=lambda: 1 / 0)

    r = bench_common.measure(oom, flop=1.0, steps=1, warmup=0, cuda=False)
    assert r["status"] == "oom" and "Tried to allocate" in r["error"]
    r = bench_common.measure(broken, flop=1.0, steps=1, warmup=0, cuda=False)
    assert r["status"] == "error" and "ZeroDivisionError" in r["error"]


def test_profile_summary_by_hand():
    """Device intervals [0, 10) and [5, 20) overlap: busy 20; [30, 40) adds 10 -> 30 of a 50 ns wall, idle
    0.4. One stream sync on the host (a stream-to-stream wait is none); kernels summed by name, longest first."""
    events = [("gemm", "CUDA", 0, 10), ("gemm", "CUDA", 5, 15), ("softmax", "CUDA", 30, 10),
              ("cudaLaunchKernel", "CPU", 0, 1), ("cudaStreamSynchronize", "CPU", 20, 25), ("aten::mm", "CPU", 0, 2),
              ("cudaStreamWaitEvent", "CPU", 3, 1)]  # a device-side wait between streams: not a host sync
    got = bench_common.summarize_profile(events, wall_ns=50, top=1)
    assert got["device_busy_ms"] == pytest.approx(30e-6)
    assert got["device_idle_fraction"] == pytest.approx(0.4)
    assert got["device_events"] == 3 and got["host_ops"] == 4
    assert got["host_syncs"] == {"cudaStreamSynchronize": 1}
    assert got["top_kernels_ms"] == [["gemm", pytest.approx(25e-6)]]
    cpu_only = bench_common.summarize_profile([("aten::mm", "CPU", 0, 2)], wall_ns=5)
    assert cpu_only["device_busy_ms"] is None and cpu_only["device_idle_fraction"] is None


def test_packing_benchmark_lengths_and_fractions():
    """``bench_packing``'s synthetic lengths have exactly the UltraFeedback sample's prompt + chosen median / p90 /
    max, and its real-token fractions are what the training step's own micro-batches hold and allocate over
    the epoch on every rank (here 257 pairs: two steps of 128, DP 4); the busiest-rank fraction is never above
    the fraction."""
    from simpo_mcore.config import TrainConfig
    from simpo_mcore.data.pipeline import TokenizedSplit, TrainBatches
    from simpo_mcore.data.preview import length_stats

    bench_packing = importlib.import_module("bench_packing")
    pairs = bench_packing.synthetic_pairs()
    stats = length_stats([c for c, _ in bench_packing.pair_lengths(pairs)])
    assert (stats.median, stats.p90, stats.max) == bench_packing.TARGET_STATS
    assert pairs == bench_packing.synthetic_pairs()
    assert all(p >= 1 and c >= 1 and r >= 1 and p + r <= 2048 for p, c, r in pairs)

    small = bench_packing.synthetic_pairs(n=257, seed=1)
    lengths = bench_packing.pair_lengths(small)
    fractions = bench_packing.fractions(lengths, dp=4)
    busiest = bench_packing.busiest_rank_fractions(lengths, dp=4)
    dataset = bench_packing.pairs_dataset(small, vocab=64)
    train = TrainConfig(global_batch_pairs=128, micro_batch_pairs=2, seed=bench_packing.SEED)
    for name in bench_packing.LAYOUTS:
        real = allocated = 0
        for rank in range(4):
            layout = dataclasses.replace(bench_packing.layout_of(name), vocab_size=64)
            batches = TrainBatches(train, TokenizedSplit(dataset, None), layout, rank, 4)
            for step in range(2):
                micro = batches.step_batches(step * 128).micro_batches
                real += sum(b.tokens_real for b in micro)
                allocated += sum(b.tokens_computed for b in micro)
        assert fractions[name] == pytest.approx(real / allocated, abs=1e-12), name
        assert busiest[name] <= fractions[name] + 1e-12, name
    assert fractions["step_wide"] < fractions["micro"] < 0.7 < 0.99 < fractions["packed_8192"]
