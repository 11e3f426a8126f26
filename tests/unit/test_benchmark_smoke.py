"""``benchmarks/bench_step.py`` runs on a CPU at ``--shape tiny`` and writes well-formed JSON, and
``benchmarks/plot_scaling.py`` draws its sequence-length sweep.

Nothing about speed is asserted: CPU timings of a 2-layer model say nothing about a GPU. What is asserted
is the shape of the result the GPU run will fill in (every field the docs and the plot read), that the
arithmetic between its fields holds, and that the head-alone variant's fused and naive log-prob heads agree.

The FLOP count at the tiny shape, by hand (docs/performance.md's formula): layers L = 2, hidden h = 64,
heads 4 x head_dim 16 (q = 64), 2 KV heads (kv = 32), FFN f = 160, vocab V = 1000, 2 sequences x 64 tokens.
Per layer: h (q + 2 kv) + q h + 3 h f + 2 h = 8192 + 4096 + 30720 + 128 = 43136. Non-embedding parameters +
output layer: 2 x 43136 + 64 (final norm) + 64000 = 150336. Per token: 6 x 150336 + 6 L q s = 902016 + 49152
= 951168; x 128 tokens = 121749504 FLOP per step.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
TINY_FLOP = 121749504

pytestmark = pytest.mark.slow  # the benchmark runs in a process of its own


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, str(BENCH / "bench_step.py"), "--shape", "tiny", "--steps", "2", "--warmup", "1",
           "--chunk-tokens", "48", "--sweep-seq", "32,64", "--head-logits", "recompute,keep", "--profile",
           "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert "target" not in proc.stdout and proc.stdout.rstrip().endswith(f"wrote {out}")
    return json.loads(out.read_text()), out


def test_result_header(bench):
    result, _ = bench
    assert result["schema"] == 1
    assert "6 x (non-embedding parameters + output-layer parameters)" in result["flops_formula"]
    assert "6 x layers x (heads x head_dim) x seq" in result["flops_formula"]
    env = result["env"]
    assert env["device"] == "cpu" and env["torch"] and env["megatron_core"] and env["transformers"]
    assert result["ceilings"] is None  # GPU only
    assert [r["shape"] for r in result["runs"]] == ["tiny"]


MCORE = ["mcore_sdpa_bf16", "mcore_te_bf16", "mcore_te_fp8_delayed", "mcore_te_fp8_tensorwise"]


def test_every_cpu_variant_is_timed_with_its_ratios(bench):
    run = bench[0]["runs"][0]
    assert (run["seq"], run["pairs"], run["prompt"], run["tokens"]) == (64, 1, 16, 128)
    assert run["model_tflop_per_step"] * 1e12 == pytest.approx(TINY_FLOP, rel=1e-12)
    variants = run["variants"]
    assert list(variants) == ["hf_sdpa_bf16", *[n + k for n in MCORE for k in ("", "+keep_logits")],
                              "hf_sdpa_bf16_again"]
    hf = variants["hf_sdpa_bf16"]
    for name in ("hf_sdpa_bf16", "mcore_sdpa_bf16", "mcore_sdpa_bf16+keep_logits", "hf_sdpa_bf16_again"):
        v = variants[name]
        assert v["status"] == "ok", v
        assert v["s_per_step"] > 0 and len(v["times_s"]) == 2
        assert v["tflops"] == pytest.approx(run["model_tflop_per_step"] / v["s_per_step"])
        assert "peak_gib" in v and v["peak_gib"] is None  # torch.cuda's allocator only; null on a CPU
        assert v["mfu"] is None
        assert v["speedup_vs_hf"] == pytest.approx(hf["s_per_step"] / v["s_per_step"])
        assert "peak_vs_hf" in v
        assert math.isfinite(v["loss"]) and v["grad_norm"] > 0
        assert v["host_s_per_step"] == pytest.approx(v["s_per_step"])  # on a CPU the host time is the time
        # One profiled step: host operators only on a CPU (the device columns are for a GPU).
        assert v["profile"]["host_ops"] > 10 and v["profile"]["wall_ms"] > 0
        assert v["profile"]["device_busy_ms"] is None and v["profile"]["host_syncs"] == {}


def test_hf_and_mcore_losses_are_simpo_of_alike_scores(bench):
    """Both losses are SimPO on random weights: chosen and rejected score alike, so close to
    softplus(beta * gamma/beta) = softplus(2.0 * 0.5)."""
    variants = bench[0]["runs"][0]["variants"]
    for name in ("hf_sdpa_bf16", "mcore_sdpa_bf16"):
        assert variants[name]["loss"] == pytest.approx(math.log1p(math.exp(2.0 * 0.5)), abs=0.3)


def test_keeping_the_head_logits_changes_the_backward_only(bench):
    """The same weights give the same first loss, and gradients that differ by bf16 rounding."""
    variants = bench[0]["runs"][0]["variants"]
    keep, recompute = variants["mcore_sdpa_bf16+keep_logits"], variants["mcore_sdpa_bf16"]
    assert keep["loss"] == recompute["loss"]
    assert keep["grad_norm"] == pytest.approx(recompute["grad_norm"], rel=1e-2)


def test_gpu_variants_and_targets_are_skipped_on_a_cpu(bench):
    run = bench[0]["runs"][0]
    for name in MCORE[1:]:
        for v in (run["variants"][name], run["variants"][name + "+keep_logits"]):
            assert v["status"] == "skipped" and v["reason"]
    assert run["targets"] == []  # the targets are for the 1b / 8b4 shapes at 2 x 2 x 2048 tokens


def test_head_alone_agrees(bench):
    """Fused (chunked over 48 tokens and ~376-row vocabulary slices, so several chunks each way) and naive
    heads on the same bf16 inputs: token log-probs from the same bf16 logits agree far below bf16's
    resolution of the logits (~4e-3 relative); gradients differ by the bf16 rounding of partial products."""
    head = bench[0]["runs"][0]["head"]
    assert (head["tokens"], head["vocab"], head["hidden"], head["chunk_tokens"]) == (128, 1000, 64, 48)
    ag = head["agreement"]
    assert ag["max_abs_err_naive_vs_fp64"] < 2e-2
    for kind in ("fused", "fused_torch", "fused_keep"):  # on a CPU all run the torch passes
        assert ag[f"max_abs_diff_{kind}_vs_naive"] < 1e-2
        assert ag[f"max_abs_err_{kind}_vs_fp64"] < 2e-2
        assert ag[f"grad_hidden_rel_diff_{kind}_vs_naive"] < 2e-2
        assert ag[f"grad_weight_rel_diff_{kind}_vs_naive"] < 2e-2
    for kind in ("naive", "fused", "fused_torch", "fused_keep"):
        v = head["variants"][kind]
        assert v["status"] == "ok" and v["s_per_step"] > 0 and v["tflops"] > 0 and "peak_gib" in v
    assert head["time_vs_naive"] == pytest.approx(head["variants"]["fused"]["s_per_step"]
                                                  / head["variants"]["naive"]["s_per_step"])
    for kind in ("torch", "keep"):
        assert head[f"time_vs_naive_{kind}"] == pytest.approx(head["variants"][f"fused_{kind}"]["s_per_step"]
                                                              / head["variants"]["naive"]["s_per_step"])


def test_sweep_and_plot(bench, tmp_path):
    result, path = bench
    sweep = result["sweep"]
    assert sweep["mcore_variant"] == "mcore_sdpa_bf16"
    assert [(p["seq"], p["variant"]) for p in sweep["points"]] == [
        (32, "hf_sdpa_bf16"), (32, "mcore_sdpa_bf16"), (64, "hf_sdpa_bf16"), (64, "mcore_sdpa_bf16")]
    for p in sweep["points"]:
        assert p["status"] == "ok" and p["tokens_per_s"] == pytest.approx(p["tokens"] / p["s_per_step"])
    plot_scaling = _load("plot_scaling")
    png = tmp_path / "scaling.png"
    assert plot_scaling.main([str(path), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The MoE step benchmark at --tiny, by hand: layers 2, hidden 64, q 64, kv 32, head_dim 16, 8 experts of FFN 32,
# top-2, vocab 1000, 2 sequences x 64 tokens. Per layer: attention h (q + 2 kv) + q h + 2 h + 2 d = 8192 + 4096
# + 128 + 32 = 12448; MLP a token passes through: router 8 x 64 + 2 x 3 x 64 x 32 = 12800. Per token:
# 6 x (2 x 25248 + 64 + 64000) + 6 x 2 x 64 x 64 = 687360 + 49152 = 736512; x 128 tokens = 94273536.
TINY_MOE_FLOP = 94273536


@pytest.fixture(scope="module")
def moe_bench(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_moe") / "moe.json"
    cmd = [sys.executable, str(BENCH / "bench_moe.py"), "--tiny", "--steps", "2", "--warmup", "1",
           "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert proc.stdout.rstrip().endswith(f"wrote {out}")
    return json.loads(out.read_text())


def test_moe_benchmark_smoke(moe_bench):
    """The MoE benchmark's result at the CPU shape: HF (default and eager experts) and simpo_mcore's
    SequentialMLP run, the TE variants say why they cannot, the FLOP count is the hand count above."""
    r = moe_bench
    assert r["schema"] == 1 and r["measured_on_gpu"] is False and r["env"]["device"] == "cpu"
    assert (r["seq"], r["pairs"], r["tokens"]) == (64, 1, 128)
    assert r["model_tflop_per_step"] * 1e12 == pytest.approx(TINY_MOE_FLOP, rel=1e-12)
    assert (r["arch"]["num_experts"], r["arch"]["num_experts_per_tok"], r["arch"]["model_type"]) == (8, 2, "qwen3_moe")
    v = r["variants"]
    assert list(v) == ["hf_sdpa_bf16", "hf_sdpa_bf16_eager_experts", "mcore_sdpa_bf16_sequential",
                       "mcore_te_bf16_sequential", "mcore_te_bf16_grouped", "hf_sdpa_bf16_again"]
    for name in ("hf_sdpa_bf16", "hf_sdpa_bf16_eager_experts", "mcore_sdpa_bf16_sequential", "hf_sdpa_bf16_again"):
        assert v[name]["status"] == "ok", v[name]
        assert len(v[name]["times_s"]) == 2 and v[name]["grad_norm"] > 0 and v[name]["peak_gib"] is None
        assert v[name]["tflops"] == pytest.approx(r["model_tflop_per_step"] / v[name]["s_per_step"])
        assert v[name]["speedup_vs_hf"] == pytest.approx(v["hf_sdpa_bf16"]["s_per_step"] / v[name]["s_per_step"])
        # SimPO on random weights: chosen and rejected score alike, so close to softplus(beta * gamma/beta).
        assert v[name]["loss"] == pytest.approx(math.log1p(math.exp(2.0 * 0.5)), abs=0.3)
    assert v["hf_sdpa_bf16_eager_experts"]["experts"] == "eager"
    # The same weights through HF's default experts and its eager loop: the same first loss.
    assert v["hf_sdpa_bf16_eager_experts"]["loss"] == pytest.approx(v["hf_sdpa_bf16"]["loss"], rel=1e-2)
    for name in ("mcore_te_bf16_sequential", "mcore_te_bf16_grouped"):
        assert v[name] == {"status": "skipped", "reason": "needs a GPU and Transformer Engine"}
