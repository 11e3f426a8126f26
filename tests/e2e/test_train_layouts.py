"""simpo-train gives the same per-step losses at every parallel layout (fp32, 20 steps), packed or padded, with
context parallelism too."""

from __future__ import annotations

import pytest
from train_utils import assert_grad_norm_tracks, relative_deviation

STEPS = 20


def assert_same_losses(a: dict, b: dict, rel: float = 1e-5):
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        x, y = a[step]["loss"], b[step]["loss"]
        assert abs(x - y) <= rel * abs(x), f"step {step}: {x} vs {y}"
        assert a[step]["rewards/margins"] == pytest.approx(b[step]["rewards/margins"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_tp2_pp2_and_dp2_match_single_rank(straight):
    base = straight("tp1")
    assert base[STEPS]["loss"] < 0.8 * base[1]["loss"]  # it trains (2.47 -> 1.68 in this setting)
    assert_same_losses(base, straight("tp2pp2"))  # 4 ranks
    assert_same_losses(base, straight("dp2"))  # the same global batches, split over 2 replicas
    assert_same_losses(base, straight("pp2vpp2"))  # interleaved pipeline (unbatched p2p on gloo)


@pytest.mark.slow
def test_packed_run_tracks_the_padded_run(straight):
    """The same 20 global batches packed into rows (the default) and as padded micro-batches of 2 pairs: the
    same losses to 1e-5 relative at every step, the same real tokens (prompt included) in metrics.jsonl, and
    fewer positions computed."""
    packed, padded = straight("tp1"), straight("tp1_padded")
    assert_same_losses(packed, padded)
    for step in packed:
        assert packed[step]["tokens_real"] == padded[step]["tokens_real"] > 0
        assert packed[step]["tokens_real"] <= packed[step]["tokens_computed"] < padded[step]["tokens_computed"]
        assert packed[step]["real_tokens_per_s"] == pytest.approx(
            packed[step]["tokens_real"] / packed[step]["step_time_s"], rel=1e-6)
    fraction = sum(r["tokens_real"] for r in packed.values()) / sum(r["tokens_computed"] for r in packed.values())
    assert fraction > 0.95  # rows cut to their content, rounded up to 16


@pytest.mark.slow
def test_context_parallel_run_tracks_cp1(straight):
    """The 20 packed steps at CP 2 (every sequence split over 2 ranks, each padded to a multiple of 4 for the split,
    the SFT term on) against CP 1: the loss and the SFT term within 1e-5 relative at every step, the gradient norm
    as ``assert_grad_norm_tracks`` bounds it (``LossScale`` as at CP 1: megatron's schedule multiplies each loss by
    cp, DDP averages over dp x cp; a gradient scaled wrongly by cp would be off by a factor of 2), the same real
    tokens, and the padding for the split counted in the positions computed (rows a multiple of 16 x cp)."""
    base, cp2, dp2 = straight("tp1"), straight("cp2"), straight("dp2")
    assert_same_losses(base, cp2)
    sft = relative_deviation(base, cp2, "sft_loss")
    grad = assert_grad_norm_tracks(base, cp2, dp2, base)
    for step in base:
        assert sft[step] <= 1e-5, (step, sft[step])
        assert cp2[step]["tokens_real"] == base[step]["tokens_real"]
        assert cp2[step]["tokens_real"] < cp2[step]["tokens_computed"] and cp2[step]["tokens_computed"] % 32 == 0
    loss, noise = relative_deviation(base, cp2, "loss"), relative_deviation(base, dp2, "grad_norm")
    print(f"[cp] 20 packed steps, CP 2 vs CP 1: largest relative deviation: loss {max(loss.values()):.1e}, "
          f"grad norm {max(grad.values()):.1e} (DP 2 vs CP 1: {max(noise.values()):.1e}), steps over 1e-5: "
          f"{[s for s in grad if grad[s] > 1e-5]}")
