"""A Gemma-2 trains through ``simpo-train`` and exports as a Gemma-2: the most involved family end to end.

A tiny random Gemma-2 (every Gemma-2 feature: soft-capped attention and logits, a 16-token window on every
other layer, sandwich norms, scaled embeddings, tied) over the synthetic tokenizer, converted, trained 20
steps at TP=2 with sequence parallelism on the synthetic sorting task (rows of up to 48 tokens: past the
window), and exported at the end of the run. The per-step objective itself is checked against the reference
formulas in ``tests/distributed/test_objective_parity.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILY_MODELS, QUIET, make_tiny_hf_model, run_ranks
from safetensors.torch import load_file
from train_utils import read_metrics, write_config


@pytest.mark.slow
def test_gemma2_trains_at_tp2_and_exports_as_gemma2(tmp_path):
    from transformers import AutoModelForCausalLM

    from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
    from simpo_mcore.data.synthetic import build_tokenizer
    from simpo_mcore.parallel import ensure_process_group

    tokenizer = build_tokenizer()
    src = tmp_path / "hf"
    make_tiny_hf_model(src, vocab_size=len(tokenizer), seed=3, **FAMILY_MODELS["gemma2"])
    tokenizer.save_pretrained(src)
    ensure_process_group()
    convert_hf_to_mcore(src, tmp_path / "mcore", **QUIET)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "gemma2.yaml", tmp_path / "mcore", tmp_path / "cache", output_dir=str(out),
                       parallel={"device": "cpu", "tp": 2, "sequence_parallel": True},
                       checkpoint={"export_hf": True, "save_interval": 0})
    run_ranks("train_entry.py", 2, cfg)

    losses = read_metrics(out)
    assert sorted(losses) == list(range(1, 21))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses.values())
    assert losses[20]["loss"] < 0.7 * losses[1]["loss"], (losses[1]["loss"], losses[20]["loss"])
    print(f"[gemma2] loss step 1: {losses[1]['loss']:.4f}, step 20: {losses[20]['loss']:.4f}")

    exported = AutoModelForCausalLM.from_pretrained(out / "hf", attn_implementation="eager")
    config = json.loads((out / "hf" / "config.json").read_text())
    assert type(exported).__name__ == "Gemma2ForCausalLM"
    assert (config["model_type"], config["final_logit_softcapping"], config["sliding_window"]) == ("gemma2", 3.0, 16)
    before, after = load_file(src / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert sorted(before) == sorted(after)  # the same tensors (tied: no lm_head) ...
    assert all(not torch.equal(before[k], after[k]) for k in before)  # ... every one of them trained
    ids = tokenizer("sort 3 1 2 up", return_tensors="pt").input_ids
    assert torch.isfinite(exported(ids).logits).all()
