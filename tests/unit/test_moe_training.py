"""What training a mixture of experts adds around the model (one CPU process): padding left out of the routers'
load-balancing loss and expert counts, the step's MoE metrics from the routers' sums, the step line, MFU from the
active parameters, the ranks an expert-parallel layout needs, the dispatcher the data can take, and evaluation
micro-batches aligned over data-parallel ranks whose experts exchange tokens.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from test_moe import ARCH, COEFF, E, K, capture_router_inputs, cpu_job, plain_aux_loss, tokens  # noqa: F401

from simpo_mcore.config import ParallelConfig
from simpo_mcore.data.pipeline import BatchLayout, TokenizedSplit, eval_batch_groups
from simpo_mcore.metrics_log import format_step_line, model_flops_per_token
from simpo_mcore.microbatch import LossScale
from simpo_mcore.model.builder import ModelOptions, build_model, check_dispatcher_for_data, token_dispatcher
from simpo_mcore.model.forward import position_ids_like
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.model.moe import router_step_sums, routers
from simpo_mcore.objective import reduce_moe_stats
from simpo_mcore.parallel import Layout

ROOT = Path(__file__).resolve().parents[2]


def test_padding_is_left_out_of_the_load_balancing_loss_and_the_counts(cpu_job):  # noqa: F811
    """With megatron's ``padding_mask`` (True = padding) a router counts the real tokens only, and its loss (the
    sum kept per step, coefficient included) is the formula over the real tokens only."""
    (model,) = build_model(ARCH, ModelOptions(moe_aux_loss_coeff=COEFF))
    model.train()
    inputs = capture_router_inputs([model])
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    batch = tokens()  # [2, 24]
    padding = torch.zeros(batch.shape, dtype=torch.bool)
    padding[1, 17:] = True  # the second row's last 7 positions hold no token
    model(batch, position_ids_like(batch), attention_mask=None, padding_mask=padding).sum().backward()
    real = ~padding.t().reshape(-1)  # the routers' token order: sequence-major [s * b]
    sums = router_step_sums([model])
    assert sorted(sums) == [2, 3]
    for router in routers([model]):
        logits = inputs[router.layer_number][real] @ router.weight.detach().T  # [real tokens, E]
        chosen = logits.softmax(-1).topk(K, dim=-1).indices
        counts, aux = sums[router.layer_number]
        assert torch.equal(counts, torch.bincount(chosen.flatten(), minlength=E)) and counts.sum() == 41 * K
        torch.testing.assert_close(aux, COEFF * plain_aux_loss(logits).double(), rtol=1e-6, atol=0)
    assert all(c.sum() == 0 and a == 0 for c, a in router_step_sums([model]).values())  # reset by the read


def test_step_metrics_of_a_mixture_of_experts(cpu_job):  # noqa: F811
    """``reduce_moe_stats``: the load imbalance of each MoE layer's counts over the step (mean over layers and the
    worst), and the load-balancing term as the step's gradient weighs it: the losses summed over the rank's
    micro-batches, divided by their number (the schedule's scale) and by DP (DDP's average); nothing for a dense
    model, and no term with the loss off."""
    (model,) = build_model(ARCH, ModelOptions(moe_aux_loss_coeff=COEFF))
    model.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    batch = tokens()
    for _ in range(2):  # two micro-batches of one step
        model(batch, position_ids_like(batch), attention_mask=None).sum().backward()
    sums = router_step_sums([model], reset=False)
    scale = LossScale(num_microbatches=2, dp=1, global_pairs=1, global_chosen_tokens=1)
    got = reduce_moe_stats([model], scale, torch.device("cpu"))
    imbalance = [(c.max() / c.float().mean()).item() for c, _ in sums.values()]
    assert got["moe/load_imbalance"] == pytest.approx(sum(imbalance) / 2, rel=1e-6)
    assert got["moe/load_imbalance_max"] == pytest.approx(max(imbalance), rel=1e-6)
    assert got["moe/aux_loss"] == pytest.approx(sum(a.item() for _, a in sums.values()) / 2, rel=1e-12)
    assert got["moe/aux_loss"] > COEFF  # each layer's loss is about 1 (balanced) or more: two layers
    (off,) = build_model(ARCH, ModelOptions())
    off.train()
    off(batch, position_ids_like(batch), attention_mask=None).sum().backward()
    assert sorted(reduce_moe_stats([off], scale, torch.device("cpu"))) == ["moe/load_imbalance",
                                                                           "moe/load_imbalance_max"]
    dense = replace(ARCH, model_type="qwen3", num_experts=None, num_experts_per_tok=None, moe_intermediate_size=None,
                    moe_layers=None)
    assert reduce_moe_stats(build_model(dense, ModelOptions()), scale, torch.device("cpu")) == {}


def test_step_line_shows_the_worst_layers_imbalance_and_the_term():
    record = {"loss": 0.69312, "rewards/accuracies": 0.625, "rewards/margins": 0.1534, "lr": 9.8e-4,
              "grad_norm": 1.0234, "tokens": 4096.0, "step_time_s": 2.0, "tokens_per_s": 2048.0,
              "moe/load_imbalance": 1.2, "moe/load_imbalance_max": 1.874}
    assert " | grad 1.02 | moe imb 1.87 | 2.05k tok/s | " in format_step_line(1, 2, record, 1.0, 1.0)
    record["moe/aux_loss"] = 0.0123
    assert " | grad 1.02 | moe imb 1.87 aux 1.23e-02 | 2.05k tok/s | " in format_step_line(1, 2, record, 1.0, 1.0)


def test_flops_count_the_parameters_a_token_passes_through():
    """MFU's FLOPs per token: for a dense model every weight (the count docs/performance.md states, written out
    here); for Qwen3-30B-A3B the active parameters, which its model card puts at 3.3B with both embeddings
    (151936 x 2048 each; the count takes the output layer, not the input embedding)."""
    llama = ModelArch.from_hf_dict({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                                    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                    "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                                    "rope_theta": 500000.0})
    h, q, kv = 4096, 4096, 1024
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * 14336 + 2 * h
    assert model_flops_per_token(llama, 2048) == 6 * (32 * per_layer + h + 128256 * h) + 6 * 32 * q * 2048
    qwen = ModelArch.from_hf_dir(ROOT / "configs" / "hf" / "Qwen__Qwen3-30B-A3B")
    active = (model_flops_per_token(qwen, 2048) - 6 * 48 * 4096 * 2048) / 6  # [params]
    assert active + 151936 * 2048 == pytest.approx(3.3e9, rel=0.02)
    h, f = 2048, 768
    by_hand = 48 * (h * (4096 + 2 * 512) + 4096 * h + 2 * h + 128 * h + 8 * 3 * h * f) + h + 151936 * h
    assert active == by_hand


@pytest.mark.parametrize("parallel, ranks", [
    (ParallelConfig(tp=2, pp=2), 4), (ParallelConfig(ep=2), 2), (ParallelConfig(tp=2, ep=2), 4),
    (ParallelConfig(tp=2, ep=2, etp=1), 2), (ParallelConfig(tp=2, pp=2, ep=4, etp=1), 8),
    (ParallelConfig(ep=4, pp=2), 8)])
def test_cpu_relaunch_counts_the_ranks_expert_parallelism_needs(parallel, ranks):
    """Experts are split inside the data-parallel group: a stage needs whole TP groups and whole ``ep x etp``
    expert groups."""
    assert parallel.min_world_size() == ranks


def test_dispatcher_for_the_data():
    """``auto`` picks all-to-all wherever gloo can run it; all-gather needs as many tokens on every rank of an
    expert group, which replicas' micro-batches do not have, so it is refused where expert groups span them."""
    assert token_dispatcher(ModelOptions(ep=2)) == "alltoall"
    assert token_dispatcher(ModelOptions(tp=2, sequence_parallel=True)) == "allgather"  # CPU, expert TP 2
    assert token_dispatcher(ModelOptions(tp=2, sequence_parallel=True, cuda=True)) == "alltoall"
    check_dispatcher_for_data(ModelOptions(tp=2, sequence_parallel=True))  # experts within the TP group
    check_dispatcher_for_data(ModelOptions(tp=2, ep=2, etp=1, sequence_parallel=True, moe_dispatcher="allgather"))
    with pytest.raises(ValueError, match="model.moe_token_dispatcher: allgather with parallel.ep=2: the expert groups"):
        check_dispatcher_for_data(ModelOptions(ep=2, moe_dispatcher="allgather"))
    with pytest.raises(ValueError, match=r"parallel.ep=2 with expert tensor parallelism \(parallel.etp=2\) on a CPU"):
        check_dispatcher_for_data(ModelOptions(tp=2, ep=2, sequence_parallel=True))


def _split(lengths: list[tuple[int, int]]) -> TokenizedSplit:
    columns = {f"{side}_{kind}": [[5] * n for n in (c if side == "chosen" else r for c, r in lengths)]
               for side in ("chosen", "rejected") for kind in ("input_ids", "labels")}
    return TokenizedSplit(datasets.Dataset.from_dict(columns), report=None)


def _layout(dp_rank: int, dp: int) -> Layout:
    return Layout(device=torch.device("cpu"), world_size=dp, rank=dp_rank, tp=1, pp=1, dp=dp, vpp=None, tp_rank=0,
                  pp_rank=0, dp_rank=dp_rank, ep=dp)


@pytest.mark.parametrize("pack_tokens", [None, 24])
def test_evaluation_micro_batches_aligned_over_replicas(pack_tokens):
    """5 pairs over 2 data-parallel ranks (shards of 3 and 2): aligned, the rank with fewer micro-batches runs
    copies of its last one marked ``filler`` after its own, so both run as many forwards; every pair is
    evaluated once among the real ones. Unaligned, each rank runs its own."""
    split = _split([(4, 6), (3, 3), (8, 2), (5, 5), (2, 9)])
    batch_layout = BatchLayout(pad_id=0, pack_tokens=pack_tokens, vocab_size=10)
    runs = {}
    for aligned in (False, True):
        runs[aligned] = [[b for group in eval_batch_groups(split, 1, batch_layout, _layout(r, 2), aligned=aligned)
                          for b in group] for r in range(2)]
    assert [len(r) for r in runs[False]] == ([3, 2] if pack_tokens is None else [2, 1])
    assert len(runs[True][0]) == len(runs[True][1]) == len(runs[False][0])
    assert runs[True][1][-1].filler and not any(b.filler for b in runs[True][0])
    real = sorted(i for rank in runs[True] for b in rank if not b.filler for i in b.row_index.tolist())
    assert real == [0, 1, 2, 3, 4]


def test_runtime_names_the_expert_layout():
    from simpo_mcore.runtime import _describe_expert_layout, _describe_experts

    layout = replace(_layout(0, 2), tp=2, dp=1, etp=1)
    assert _describe_experts(ARCH) == ", 6 experts top-2 on 2 layers"
    assert _describe_expert_layout(ARCH, layout) == " EP 2 ETP 1"
    assert _describe_expert_layout(ARCH, replace(layout, etp=2)) == " EP 2"
