"""simpo-train gives the same per-step losses at every parallel layout (fp32, 20 steps)."""

from __future__ import annotations

import pytest
from helpers import run_ranks
from train_utils import make_tiny, read_metrics, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny(root / "model"), root / "cache"


def run(tmp_path, tiny, name, nproc, **sections):
    ckpt, cache = tiny
    out = tmp_path / name
    cfg = write_config(tmp_path / f"{name}.yaml", ckpt, cache, output_dir=str(out), **sections)
    run_ranks("train_entry.py", nproc, cfg)
    return read_metrics(out)


def assert_same_losses(a: dict, b: dict, rel: float = 1e-5):
    assert sorted(a) == sorted(b) == list(range(1, len(a) + 1))
    for step in a:
        x, y = a[step]["loss"], b[step]["loss"]
        assert abs(x - y) <= rel * abs(x), f"step {step}: {x} vs {y}"
        assert a[step]["rewards/margins"] == pytest.approx(b[step]["rewards/margins"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_tp2_pp2_and_dp2_match_single_rank(tmp_path, tiny):
    base = run(tmp_path, tiny, "tp1", 1)
    assert len(base) == 20
    assert base[20]["loss"] < base[1]["loss"]  # it trains
    tp2pp2 = run(tmp_path, tiny, "tp2pp2", 4, parallel={"tp": 2, "pp": 2, "device": "cpu"})
    assert_same_losses(base, tp2pp2)
    dp2 = run(tmp_path, tiny, "dp2", 2)
    assert_same_losses(base, dp2)
