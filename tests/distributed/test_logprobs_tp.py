"""The log-prob head on 2 TP ranks (gloo, CPU) against the single-process full-vocabulary reference, and
inside a real GPTModel at TP=1 and TP=2 (+ sequence parallelism), plain and with final logit soft-capping.

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
    # the logits recomputed in the backward and kept from the forward, on all tokens and the labelled ones;
    # with final logit soft-capping (against the capped float64 reference) chunked, kept and in one chunk.
    assert len([c for c in errors if c.startswith("fused")]) == 28
    assert len([c for c in errors if "recompute=False" in c]) == 8
    assert len([c for c in errors if "labelled=True" in c]) == 4
    assert len([c for c in errors if c.startswith("fused") and c.endswith("softcap=2.0")]) == 12
    assert len([c for c in errors if c.startswith("unfused")]) == 6
    assert len([c for c in errors if c.startswith("unfused") and c.endswith("softcap=2.0")]) == 2
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
    # sp x (untied, tied, Gemma-2) x chunk (0 = unfused through the output layer, 5 = many fused chunks,
    # 4096 = one).
    assert len(errors) == (2 if tp > 1 else 1) * 3 * 3
    assert len([c for c in errors if "gemma2" in c]) == (2 if tp > 1 else 1) * 3
    for case, err in errors.items():
        assert err["value"] < VALUE_TOL, (case, err)
        assert err["grad_params"] < GRAD_TOL, (case, err)
