"""bf16 + sequence parallelism + selective recompute, full recompute, kept head logits, HF export, clear FP8
errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run_ranks
from train_utils import read_metrics, write_config


def run(tmp_path, tiny, name, nproc, log=None, **sections):
    """Train; ``(output dir, metrics by step)``. ``log``: a list that receives the ranks' stdout + stderr."""
    out = tmp_path / name
    proc = run_ranks("train_entry.py", nproc,
                     write_config(tmp_path / f"{name}.yaml", *tiny, output_dir=str(out), **sections))
    if log is not None:
        log.append(proc.stdout + proc.stderr)
    return out, read_metrics(out)


@pytest.mark.slow
def test_recompute_bf16_sp_and_hf_export(tmp_path, tiny, straight):
    fp32 = straight("tp1")
    # Full recomputation redoes the same fp32 arithmetic: identical losses.
    _, full = run(tmp_path, tiny, "full", 1, model={"recompute": "full", "recompute_num_layers": 2})
    assert [full[s]["loss"] for s in full] == [fp32[s]["loss"] for s in fp32]

    out, bf16 = run(tmp_path, tiny, "bf16", 2, parallel={"device": "cpu", "tp": 2, "sequence_parallel": True},
                    model={"recompute": "selective"}, train={"precision": "bf16"}, checkpoint={"export_hf": True})
    for step in range(1, 7):  # bf16 parameters and activations: close to fp32, not equal
        assert bf16[step]["loss"] == pytest.approx(fp32[step]["loss"], rel=3e-2), step
    assert bf16[1]["loss"] != fp32[1]["loss"]
    assert bf16[20]["loss"] < 0.7 * bf16[1]["loss"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    assert model.config.vocab_size == len(tokenizer) == 104
    assert model.lm_head.weight.shape == (104, 64) and model.dtype == torch.float32
    ids = tokenizer("sort 3 1 2 up", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
def test_kept_head_logits_train_like_recomputed_ones(tmp_path, tiny, straight):
    """model.logprob_recompute: false reaches the head (the run says so) and trains like the default (same
    forward; a backward that can differ by fp32 rounding only): 20 fp32 steps within 1e-5.

    The same run has data.max_length 300 on a model of 256 positions (no sequence comes near either):
    the run warns about it once."""
    fp32 = straight("tp1")
    log = []
    _, kept = run(tmp_path, tiny, "kept", 1, log=log, model={"logprob_recompute": False}, data={"max_length": 300})
    assert re.search(r"\| head: fused, chunks of \d+ tokens, logits kept, auto kernels", log[0]), log[0][-3000:]
    assert log[0].count("data.max_length (300) exceeds the model's max_position_embeddings (256)") == 1
    assert "final held-out reward accuracy" not in log[0]  # no held-out data: the training metrics were shown so
    assert kept[1]["loss"] == fp32[1]["loss"]  # the first forward is bit for bit the same
    assert list(kept) == list(fp32)
    for step in kept:
        assert kept[step]["loss"] == pytest.approx(fp32[step]["loss"], rel=1e-5, abs=1e-7), step


@pytest.mark.slow  # launches simpo-train
def test_fp8_without_gpu_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simpo_mcore.cli", "simpo-train", "configs/tiny_cpu.yaml",
                           "parallel.tp=1", "train.precision=fp8", f"output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "train.precision: fp8 needs a GPU" in proc.stderr


@pytest.mark.slow  # launches simpo-train on ranks
def test_batch_mismatch_is_explained(tmp_path, tiny):
    """DP=2 cannot split 7 pairs (packed rows: any multiple of DP would do): the error says what would work.
    The padded layout's rule (micro x accumulation x DP) is tests/unit/test_train_checks.py's."""
    cfg = write_config(tmp_path / "c.yaml", *tiny, output_dir=str(tmp_path / "o"),
                       train={"global_batch_pairs": 7, "micro_batch_pairs": 1, "max_steps": 2})
    with pytest.raises(AssertionError, match=r"train.global_batch_pairs \(7\) must be a multiple of the "
                                             r"data-parallel size \(2\)\. Try global_batch_pairs = 6"):
        run_ranks("train_entry.py", 2, cfg)
