"""DPO baseline: reference log-probs from the starting weights, loss log 2 at step 1, and it learns; at TP 2, and
at CP 2 the same reference and steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import run_ranks
from train_utils import read_metrics, write_config


@pytest.mark.slow
def test_dpo_starts_at_log2_and_falls(tmp_path, tiny):
    out = tmp_path / "dpo"
    sections = dict(output_dir=str(out), parallel={"device": "cpu", "tp": 2},
                    loss={"type": "dpo", "beta": 0.1, "sft_weight": 0.0},
                    train={"max_steps": 30}, optim={"lr": 2.0e-3})
    cfg = write_config(tmp_path / "dpo.yaml", *tiny, **sections)
    run_ranks("train_entry.py", 2, cfg)
    m = read_metrics(out)
    # Before the first update the policy is the reference: every reward is 0 and the loss log 2.
    assert m[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(m[1]["rewards/chosen"]) < 1e-6 and abs(m[1]["rewards/rejected"]) < 1e-6
    # logps/* are the policy's summed log-probs (DPO's reduction), not averages.
    assert m[1]["logps/chosen"] < -10
    late = np.mean([m[s]["loss"] for s in range(26, 31)])
    assert late < 0.8 * math.log(2), late  # 0.69 -> ~0.46 in this setting
    assert np.mean([m[s]["rewards/accuracies"] for s in range(26, 31)]) > 0.8

    stored = np.load(out / "reference_logps" / "train.npz")
    assert stored["logps"].shape == (256, 2) and np.isfinite(stored["logps"]).all()
    assert json.loads(str(stored["fingerprint"]))["rows"] == 256

    # At CP 2 (every sequence split over two ranks, in the reference pass too): the same reference log-probs and,
    # step after step, the same run (its first 5 steps of the same 30-step schedule).
    cp_out = tmp_path / "dpo_cp2"
    run_ranks("train_entry.py", 2, write_config(
        tmp_path / "dpo_cp2.yaml", *tiny, **{**sections, "output_dir": str(cp_out), "parallel": {"device": "cpu",
                                                                                                  "cp": 2},
                                             "train": {"max_steps": 30, "exit_interval": 5}}))
    cp_ref = np.load(cp_out / "reference_logps" / "train.npz")["logps"]
    assert np.allclose(cp_ref, stored["logps"], rtol=1e-5, atol=0), np.abs(cp_ref / stored["logps"] - 1).max()
    cp_m = read_metrics(cp_out)
    assert sorted(cp_m) == list(range(1, 6))
    for step in cp_m:
        for key in ("loss", "grad_norm", "logps/chosen", "rewards/margins"):
            assert cp_m[step][key] == pytest.approx(m[step][key], rel=1e-5, abs=1e-6), (step, key)

    # The stored reference belongs to this data: changing the tokenisation makes it stale (the resume
    # allows the change, and a step is left to train, so that the reference's own check is what refuses it).
    more = {**sections, "train": {"max_steps": 31}}
    stale = write_config(tmp_path / "stale.yaml", *tiny, **{**more, "data": {"max_length": 40},
                                                           "checkpoint": {"allow_changes": ["data.max_length"]}})
    with pytest.raises(AssertionError, match="reference log-probs .* are stale: .* different data"):
        run_ranks("train_entry.py", 2, stale)

    # A damaged file is an error naming it, on every rank (rank 0 reads it and tells the others).
    (out / "reference_logps" / "train.npz").write_bytes(b"not an npz")
    with pytest.raises(AssertionError, match="reference log-probs .*train.npz cannot be read"):
        run_ranks("train_entry.py", 2, write_config(tmp_path / "more.yaml", *tiny, **more))
