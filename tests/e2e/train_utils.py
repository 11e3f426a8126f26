"""Shared by the end-to-end training tests: a tiny checkpoint, a tiny config, reading metrics."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TINY_TRAIN = {
    "model": {"checkpoint": None, "logprob_chunk_tokens": 64},
    "data": {"train_path": "synthetic", "max_length": 48, "max_prompt_length": 30, "synthetic_pairs": 256},
    "loss": {"type": "simpo", "beta": 2.5, "gamma_beta_ratio": 0.5, "sft_weight": 0.2},
    "parallel": {"device": "cpu"},
    "optim": {"lr": 2.0e-3, "warmup_ratio": 0.1, "weight_decay": 0.01, "clip_grad": 1.0},
    "train": {"micro_batch_pairs": 2, "global_batch_pairs": 8, "max_steps": 20, "precision": "fp32",
              "progress_bar": False, "tensorboard": False, "seed": 7},
    "checkpoint": {"save_interval": 0, "keep_last": 2},
}


def make_tiny(root: Path) -> Path:
    """A tiny random Llama (4 layers, hidden 64) over the synthetic tokenizer, converted."""
    from simpo_mcore.convert.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(root, seed=3, hidden_size=64, intermediate_size=160, num_hidden_layers=4)


TINY_MOE = dict(family="qwen3_moe", hidden_size=64, intermediate_size=160, num_layers=4, heads=4, kv_heads=2,
                head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                mlp_only_layers=[0])
"""A tiny Qwen3-MoE: 8 experts of FFN 48, top-2 renormalised, layer 0 dense (a dense / MoE mix)."""


def make_tiny_moe(root: Path, seed: int = 3) -> Path:
    """:data:`TINY_MOE` with random weights (decisive routers, ``helpers.make_tiny_hf_model``) over the synthetic
    tokenizer, in ``root/hf``, converted to ``root/mcore``; returns the latter."""
    from helpers import QUIET, make_tiny_hf_model

    from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
    from simpo_mcore.data.synthetic import build_tokenizer
    from simpo_mcore.parallel import ensure_process_group

    tokenizer = build_tokenizer()
    make_tiny_hf_model(root / "hf", vocab_size=len(tokenizer), seed=seed, **TINY_MOE)
    tokenizer.save_pretrained(root / "hf")
    ensure_process_group()
    convert_hf_to_mcore(root / "hf", root / "mcore", **QUIET)
    return root / "mcore"


def write_config(path: Path, model_ckpt: Path, cache: Path, **sections) -> Path:
    tree = json.loads(json.dumps(TINY_TRAIN))
    tree["model"]["checkpoint"] = str(model_ckpt)
    tree["data"]["cache_dir"] = str(cache)
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    path.write_text(yaml.safe_dump(tree))
    return path


def read_metrics(output_dir: Path) -> dict[int, dict]:
    """Training records of metrics.jsonl by step (the last record of a step wins, as after a resume)."""
    out = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record
    return out


def relative_deviation(a: dict, b: dict, key: str) -> dict[int, float]:
    """Per step of ``a``, ``|a - b| / |a|`` of a metric of two runs' records."""
    return {step: abs(a[step][key] - b[step][key]) / abs(a[step][key]) for step in a}


def assert_grad_norm_tracks(base: dict, run: dict, exact: dict, steps) -> dict[int, float]:
    """``run``'s gradient norm within 1e-5 relative of ``base``'s at every step of ``steps``, or, where this
    trajectory's own fp32 noise is larger, within twice the deviation of ``exact`` (a layout whose gradients are
    the same sums in another order, e.g. DP 2 against DP 1) at that step. Adam turns rounding differences of 1e-7
    into parameter differences that some steps' gradient norms feel more (DP 2 deviates 2.3e-5 from DP 1 at step 17
    of the tiny run); a gradient scaled or assembled wrongly is off by far more. Returns the deviations."""
    got, noise = relative_deviation(base, run, "grad_norm"), relative_deviation(base, exact, "grad_norm")
    for step in steps:
        assert got[step] <= max(1e-5, 2 * noise[step]), (step, got[step], noise[step])
    return got
