"""A tiny Qwen3-MoE (8 experts, top-2, layer 0 dense; ``train_utils.TINY_MOE``) through ``simpo-train``,
``simpo-eval`` and DPO on 2 CPU ranks with expert parallelism (fp32, the synthetic sorting task).

* EP 2 tracks EP 1 on the same 2 ranks (DP 2 both: only where the experts live differs) within 1e-5 relative
  per step, every routing decision the same (the expert load, from integer counts, equal at every step);
* it learns: the held-out reward accuracy rises from step 0 to step 20; the exported HF model reloads in
  transformers with the logits of the trained checkpoint, bit for bit; ``simpo-eval`` at EP 2 reproduces the
  run's final held-out metrics;
* with the load-balancing loss on, SimPO's metrics before the first update are those without it (the term
  adds gradient only), the term is logged every step and the experts' load evens out;
* resumed at another layout (EP 1 / DP 2 with the experts' optimizer state sharded over two replicas, then
  TP 2 + SP with EP 2 over the TP ranks) it reproduces the straight EP 2 run within the resharding tolerance;
* DPO at EP 2: the reference pass (forward-only micro-batches aligned over the expert groups) gives log 2 at
  step 1.

The objective itself (EP 2 against the HF model, the load-balancing term against its definition) is
``tests/distributed/test_objective_parity.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import load_hf_model, run_ranks
from train_utils import read_metrics, write_config

STEPS = 20
SIMPO = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected", "sft_loss")


def assert_tracks(a: dict, b: dict, steps, rel: float = 1e-5):
    """Loss and gradient norm within ``rel`` at every step, margins (small differences of rewards) as the dense
    layouts' test compares them (``test_train_layouts``)."""
    for step in steps:
        for field in ("loss", "grad_norm"):
            x, y = a[step][field], b[step][field]
            assert abs(x - y) <= rel * abs(x), f"step {step} {field}: {x} vs {y}"
        assert a[step]["rewards/margins"] == pytest.approx(b[step]["rewards/margins"], rel=1e-4, abs=1e-6)
        # Integer expert counts: equal unless some token went to another expert.
        assert a[step]["moe/load_imbalance_max"] == b[step]["moe/load_imbalance_max"], step


@pytest.mark.slow
def test_ep2_tracks_ep1_on_the_same_ranks(straight):
    ep1, ep2 = straight("moe_ep1"), straight("moe_ep2")
    assert sorted(ep1) == sorted(ep2) == list(range(1, STEPS + 1))
    assert_tracks(ep1, ep2, range(1, STEPS + 1))
    worst = max(abs(ep1[s]["loss"] - ep2[s]["loss"]) / ep1[s]["loss"] for s in ep1)
    print(f"[moe] EP 2 vs EP 1 (DP 2 both): loss max relative difference {worst:.2g} over {STEPS} steps")
    assert all("moe/aux_loss" not in r for r in ep2.values())  # off by default
    assert all(1.0 <= r["moe/load_imbalance"] <= r["moe/load_imbalance_max"] <= 8 for r in ep2.values())


@pytest.mark.slow
def test_tiny_qwen3_moe_learns_exports_and_reloads(straight, tiny_moe, tmp_path):
    """Held-out reward accuracy rises; the exported model's logits (transformers, the experts' eager loop) equal
    the trained checkpoint's computed by simpo_mcore in one process (EP 1: bit for bit, as the parity tests
    show for converted models); simpo-eval at EP 2 on the checkpoint gives the run's final held-out metrics."""
    from simpo_mcore.config import ParallelConfig
    from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
    from simpo_mcore.convert.mcore_io import load_model_weights
    from simpo_mcore.data.synthetic import build_tokenizer
    from simpo_mcore.model.builder import ModelOptions, build_model
    from simpo_mcore.model.forward import forward_logits
    from simpo_mcore.parallel import distributed

    metrics = straight("moe_ep2")
    out = straight.root / "moe_ep2"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval/loss" in line]
    assert [e["step"] for e in evals] == [0, STEPS]
    before, after = evals[0]["eval/rewards/accuracies"], evals[-1]["eval/rewards/accuracies"]
    print(f"[moe] held-out reward accuracy {before:.3f} -> {after:.3f}; loss {metrics[1]['loss']:.4f} -> "
          f"{metrics[STEPS]['loss']:.4f}")
    assert after >= before + 0.2 and evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"]

    checkpoint = out / "checkpoints" / f"step_{STEPS:07d}"
    arch = CheckpointMeta.read(checkpoint).arch
    ids = torch.tensor([build_tokenizer()("sort 3 1 2 up then 9 7 down")["input_ids"]])  # [1, s]
    with distributed(ParallelConfig(device="cpu"), seed=0):
        chunks = build_model(arch, ModelOptions())
        load_model_weights(chunks, checkpoint)
        ours = forward_logits(chunks, ids, arch.vocab_size)
    exported = load_hf_model(out / "hf")
    assert type(exported).__name__ == "Qwen3MoeForCausalLM" and exported.config.mlp_only_layers == [0]
    with torch.no_grad():
        theirs = exported(ids).logits
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()

    cfg = write_config(tmp_path / "eval.yaml", checkpoint, tiny_moe[1], output_dir=str(tmp_path / "eval"),
                       parallel={"device": "cpu", "ep": 2},
                       data={"train_path": None, "eval_path": "synthetic", "max_eval_pairs": 64})
    run_ranks("eval_entry.py", 2, cfg)
    evaluated = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    for key, value in evals[-1].items():
        if key.startswith("eval/"):
            assert evaluated[key.removeprefix("eval/")] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.slow
def test_load_balancing_loss_adds_gradient_and_evens_the_load(straight):
    """Before the first update (lr 0 at step 1, so steps 1 and 2 see the starting weights) every SimPO metric
    equals the run without the term, bit for bit, and the gradient does not; the term is logged at every step
    and falls, and the experts' load evens out against the run without it (coefficient 0.1)."""
    off, on = straight("moe_ep2"), straight("moe_ep2_aux")
    for step in (1, 2):
        assert {k: on[step][k] for k in SIMPO} == {k: off[step][k] for k in SIMPO}
        assert on[step]["moe/load_imbalance"] == off[step]["moe/load_imbalance"]
    assert on[1]["grad_norm"] > off[1]["grad_norm"]
    aux = [on[s]["moe/aux_loss"] for s in range(1, STEPS + 1)]
    assert all(a > 0 for a in aux) and sum(aux[-5:]) < 0.9 * sum(aux[:5])
    late = range(STEPS - 9, STEPS + 1)
    assert sum(on[s]["moe/load_imbalance"] for s in late) < 0.8 * sum(off[s]["moe/load_imbalance"] for s in late)


@pytest.mark.slow
def test_resume_at_other_expert_and_tensor_layouts(straight, tiny_moe, tmp_path):
    """Steps 1-10 at EP 1 (DP 2: the distributed optimizer shards the experts' state over the two replicas),
    resumed at TP 2 + SP with EP 2 over the TP ranks (expert TP 1, DP 1): the straight EP 2 run's numbers within
    the resharding tolerance (1e-5, as a dense TP 1 -> TP 2 resume), every step of both halves."""
    out = tmp_path / "run"

    def train(name, parallel, **train_section):
        cfg = write_config(tmp_path / f"{name}.yaml", *tiny_moe, output_dir=str(out),
                           parallel={"device": "cpu", **parallel}, train=train_section)
        run_ranks("train_entry.py", 2, cfg)

    train("first", {}, exit_interval=10)
    assert sorted(read_metrics(out)) == list(range(1, 11))
    train("second", {"tp": 2, "sequence_parallel": True, "ep": 2, "etp": 1})
    resumed = read_metrics(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert_tracks(straight("moe_ep2"), resumed, range(1, STEPS + 1))


@pytest.mark.slow
def test_dpo_at_ep2_starts_at_log2(tiny_moe, tmp_path):
    out = tmp_path / "dpo"
    cfg = write_config(tmp_path / "dpo.yaml", *tiny_moe, output_dir=str(out), parallel={"device": "cpu", "ep": 2},
                       loss={"type": "dpo", "beta": 0.1, "sft_weight": 0.0}, train={"max_steps": 3})
    run_ranks("train_entry.py", 2, cfg)
    m = read_metrics(out)
    assert m[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(m[1]["rewards/chosen"]) < 1e-6 and abs(m[1]["rewards/rejected"]) < 1e-6
    assert m[3]["rewards/chosen"] != 0.0  # the policy moved away from its reference
