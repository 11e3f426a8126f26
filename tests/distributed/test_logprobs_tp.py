"""The log-prob head on 2 TP ranks (gloo, CPU) against the single-process full-vocabulary reference, and
inside a real GPTModel at TP=1 and TP=2 (+ sequence parallelism).

Each launch writes the worst error over ranks per case (see the scripts in ``scripts/``); fp32 throughout,
so everything must agree to fp32 rounding.
"""

from __future__ import annotations

import pytest
from helpers import read_json, run_ranks

pytestmark = pytest.mark.slow

VALUE_TOL = 1e-5  # absolute, on log-probs of magnitude ~5
GRAD_TOL = 1e-5  # max |error| / max |reference|, per tensor


def test_tp2_fused_and_unfused_match_full_vocab_reference(tmp_path):
    out = tmp_path / "errors.json"
    run_ranks("logprobs_tp.py", 2, out)
    errors = read_json(out)
    # Two vocabularies: padding at the end of the last rank's shard (50 of 64), and a last rank that holds
    # nothing but padding (30 of 64); fused with and without sequence parallelism, two chunk sizes, with
    # the logits recomputed in the backward and kept from the forward, on all tokens and the labelled ones.
    assert len([c for c in errors if c.startswith("fused")]) == 16
    assert len([c for c in errors if "recompute=False" in c]) == 4
    assert len([c for c in errors if c.endswith("labelled=True")]) == 4
    assert len([c for c in errors if c.startswith("unfused")]) == 4
    for case, err in errors.items():
        assert err["value"] < VALUE_TOL, (case, err)
        if case.startswith("fused"):
            assert err["grad_hidden"] < GRAD_TOL, (case, err)
            assert err["grad_weight"] < GRAD_TOL, (case, err)
            assert err["grad_padded_rows"] == 0.0, (case, err)
        else:
            assert err["grad_logits"] < GRAD_TOL, (case, err)
            assert err["grad_padded_columns"] == 0.0, (case, err)
            assert err["logits_changed"] == 0.0, (case, err)


@pytest.mark.parametrize("tp", [1, 2])
def test_gpt_model_output_processor_matches_its_logits(tmp_path, tp):
    out = tmp_path / "errors.json"
    run_ranks("logprobs_model.py", tp, out, tp)
    errors = read_json(out)
    # sp x tie x chunk (0 = unfused through the output layer, 5 = many fused chunks, 4096 = one).
    assert len(errors) == (2 if tp > 1 else 1) * 2 * 3
    for case, err in errors.items():
        assert err["value"] < VALUE_TOL, (case, err)
        assert err["grad_params"] < GRAD_TOL, (case, err)
