"""Mixture-of-experts layers at the model level (one CPU process, fp32): the load-balancing loss megatron adds
with ``model.moe_aux_loss_coeff > 0`` against its formula written plainly and against transformers'
``load_balancing_loss_func``, its gradient, the expert-load counts a run reports, a frozen router through
megatron's DDP and optimizer, and cpu_mode's all-to-all split sizes.

The formula (megatron's ``switch_load_balancing_loss_func`` at one layer, T tokens, E experts, top-k)::

    aux = E / (k T^2) * sum_e (sum_t p[t, e]) * n_e     p = softmax(router logits) in fp32,
                                                        n_e = tokens whose top k hold e

transformers' ``load_balancing_loss_func`` on the same logits computes ``E / T^2 * sum_e (sum_t p) * n_e``:
k times megatron's per layer; over several layers HF takes the statistics of all layers' tokens together,
megatron sums the per-layer losses (docs/moe.md).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from megatron.core.transformer.moe import moe_utils, token_dispatcher
from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker, get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from simpo_mcore import cpu_mode
from simpo_mcore.config import OptimConfig, ParallelConfig
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.model.forward import position_ids_like
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.model.moe import expert_token_counts, load_imbalance, routers
from simpo_mcore.optim import build_optimizer, wrap_ddp
from simpo_mcore.parallel import distributed

E, K = 6, 2
ARCH = ModelArch(vocab_size=100, hidden_size=32, intermediate_size=48, num_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=64, model_type="qwen3_moe", qk_norm=True, num_experts=E,
                 num_experts_per_tok=K, moe_intermediate_size=24, moe_layers=(False, True, True),
                 norm_topk_prob=True)
COEFF = 0.01


@pytest.fixture
def cpu_job():
    destroy_moe_metrics_tracker()  # megatron's per-process tracker: what a test reads is its own
    with distributed(ParallelConfig(device="cpu"), seed=0):
        yield
    destroy_moe_metrics_tracker()


def tokens() -> torch.Tensor:
    return torch.randint(0, ARCH.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))  # [b, s]


def capture_router_inputs(chunks) -> dict[int, torch.Tensor]:
    """``{layer_number: the router's input [s * b, h]}``, filled by forward hooks."""
    seen = {}
    for router in routers(chunks):
        router.register_forward_hook(
            lambda module, args, _out: seen.__setitem__(module.layer_number, args[0].detach().reshape(-1, 32)))
    return seen


def plain_aux_loss(logits: torch.Tensor) -> torch.Tensor:
    """megatron's per-layer load-balancing loss, written out (``logits [T, E]``)."""
    t = logits.shape[0]
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    counts = torch.zeros(E).scatter_add_(0, probs.topk(K, dim=-1).indices.flatten(), torch.ones(t * K))  # [E]
    return E / (K * t * t) * (probs.sum(dim=0) * counts).sum()


def test_aux_loss_is_megatrons_formula_and_k_times_smaller_than_hfs(cpu_job):
    (model,) = build_model(ARCH, ModelOptions(moe_aux_loss_coeff=COEFF))
    model.train()
    inputs = capture_router_inputs([model])
    tracker = get_moe_metrics_tracker()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    batch = tokens()
    output = model(batch, position_ids_like(batch), attention_mask=None)  # [b, s, v]
    (output.sum() * 0.0).backward()  # only the injected load-balancing gradients remain
    recorded = tracker.metrics["load_balancing_loss"].values  # [layers]: aux / coeff per layer
    assert recorded[0] == 0.0 and sorted(inputs) == [2, 3]  # the dense layer 1 records nothing
    for router in routers([model]):
        x = inputs[router.layer_number]  # [T, h]
        weight = router.weight.detach().clone().requires_grad_(True)
        logits = x @ weight.T  # [T, E]
        mine = plain_aux_loss(logits)
        torch.testing.assert_close(recorded[router.layer_number - 1], mine.detach(), rtol=1e-6, atol=0)
        hf = load_balancing_loss_func((logits.detach(),), E, K)
        torch.testing.assert_close(hf, K * mine.detach(), rtol=1e-6, atol=0)
    # The gradient megatron injects (schedule scale 1): coeff x d aux / d W. The last MoE layer's router gets
    # exactly its own layer's (an earlier router also gets the later layers' through the hidden states).
    (COEFF * mine).backward()
    torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-5, atol=1e-12)
    assert weight.grad.abs().max() > 0


def test_no_aux_loss_by_default_and_expert_counts(cpu_job):
    """coeff 0 (the default): no load-balancing loss recorded, the router's gradient is the main loss's alone;
    the expert load counts each token once per chosen expert, as the top-k of the router's softmax says."""
    (model,) = build_model(ARCH, ModelOptions())
    model.train()
    inputs = capture_router_inputs([model])
    batch = tokens()
    model(batch, position_ids_like(batch), attention_mask=None).sum().backward()
    assert "load_balancing_loss" not in get_moe_metrics_tracker().metrics
    counts = expert_token_counts([model])
    assert sorted(counts) == [2, 3]
    for router in routers([model]):
        chosen = (inputs[router.layer_number] @ router.weight.detach().T).softmax(-1).topk(K, dim=-1).indices
        expected = torch.bincount(chosen.flatten(), minlength=E)
        assert torch.equal(counts[router.layer_number], expected) and expected.sum() == batch.numel() * K
        assert load_imbalance(counts[router.layer_number]) == (expected.max() / expected.float().mean()).item()
    assert all((c == 0).all() for c in expert_token_counts([model]).values())  # reset by the first read
    with torch.no_grad():  # forward-only passes (evaluation) are not counted
        model(batch, position_ids_like(batch), attention_mask=None)
    assert all((c == 0).all() for c in expert_token_counts([model]).values())


def test_load_imbalance_by_hand():
    assert load_imbalance(torch.tensor([2.0, 2.0, 2.0])) == 1.0
    assert load_imbalance(torch.tensor([6.0, 0.0, 0.0])) == 3.0
    assert load_imbalance(torch.zeros(4)) == 0.0


def test_frozen_router_is_not_trained(cpu_job):
    """``model.moe_freeze_router``: megatron's DDP and optimizer leave the routers alone; the experts move."""
    chunks = build_model(ARCH, ModelOptions(moe_freeze_router=True))
    ddp = wrap_ddp(chunks, distributed_optimizer=False, cpu=True)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-2), "fp32", distributed_optimizer=False, cpu=True)
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    batch = tokens()
    ddp[0](batch, position_ids_like(batch), attention_mask=None).square().mean().backward()
    chunks[0].config.finalize_model_grads_func(ddp)
    assert optimizer.step()[0]
    after = dict(chunks[0].named_parameters())
    frozen = [n for n in before if n.endswith("mlp.router.weight")]
    assert len(frozen) == 2 and all(not after[n].requires_grad for n in frozen)
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    expert = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
    assert not torch.equal(after[expert], before[expert])


def test_cpu_mode_hands_the_all_to_all_split_sizes_over_as_numpy():
    """megatron's ``maybe_move_tensor_to_cpu`` converts only CUDA tensors; inside cpu_mode a CPU tensor asked
    for ``as_numpy`` becomes the NumPy array megatron hands ``all_to_all_single`` on a GPU, in both modules that
    hold the function; outside the scope megatron's own function is back."""
    original = moe_utils.maybe_move_tensor_to_cpu
    splits = torch.tensor([3, 5])
    assert torch.is_tensor(token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True))
    with cpu_mode.redirect():
        for module in (moe_utils, token_dispatcher):
            got = module.maybe_move_tensor_to_cpu(splits, as_numpy=True)
            assert isinstance(got, np.ndarray) and got.tolist() == [3, 5]
            assert module.maybe_move_tensor_to_cpu(splits) is splits
    assert moe_utils.maybe_move_tensor_to_cpu is original is token_dispatcher.maybe_move_tensor_to_cpu


@pytest.mark.parametrize("name, hub", [("qwen3_30b_a3b", "Qwen__Qwen3-30B-A3B"),
                                       ("mixtral_8x7b_instruct", "mistralai__Mixtral-8x7B-Instruct-v0.1")])
def test_shipped_moe_configs_fit_their_models(name, hub):
    """The shipped SimPO / DPO configs of each MoE model (one node, several nodes) load, and their layout is one
    the model builder takes for the hub's config.json shipped beside them (configs/hf/): EP divides the experts;
    8 GPUs (the one-node world) divide by EP."""
    from pathlib import Path

    from simpo_mcore.config import load_config
    from simpo_mcore.model.builder import check_moe_layout

    root = Path(__file__).resolve().parents[2]
    arch = ModelArch.from_hf_dir(root / "configs" / "hf" / hub)
    assert arch.is_moe and all(arch.moe_layers)
    paths = [root / "configs" / kind / f"{name}{suffix}.yaml" for kind, suffix in
             [("simpo", "_8gpu"), ("simpo", "_multinode"), ("dpo", "_beta0.01_8gpu"), ("dpo", "_beta0.01_multinode")]]
    for path in paths:
        cfg = load_config(path)
        p = cfg.parallel
        assert p.ep == 8 and 8 % (p.ep * p.tp * p.pp) == 0 and cfg.model.recompute == "full", path
        check_moe_layout(arch, ModelOptions(tp=p.tp, pp=p.pp, ep=p.ep, sequence_parallel=p.sequence_parallel))
        assert cfg.model.moe_aux_loss_coeff == 0.0  # TRL's default for these configs (output_router_logits false)


@pytest.mark.parametrize("opts, arch, message", [
    (ModelOptions(ep=4), ARCH, "parallel.ep=4 must divide the model's 6 experts"),
    (ModelOptions(ep=2), replace(ARCH, model_type="qwen3", num_experts=None, num_experts_per_tok=None,
                                 moe_intermediate_size=None, moe_layers=None),
     "parallel.ep=2 needs a mixture-of-experts model"),
    (ModelOptions(tp=2), ARCH, "needs parallel.sequence_parallel: true"),
    (ModelOptions(tp=2, sequence_parallel=True, moe_dispatcher="alltoall"), ARCH,
     "model.moe_token_dispatcher: alltoall with expert tensor parallelism (2)"),
    (ModelOptions(spec="sdpa", moe_grouped_gemm=True), ARCH, "grouped-GEMM experts need the Transformer Engine spec"),
], ids=["ep_not_dividing_experts", "ep_on_dense", "tp_without_sp", "cpu_alltoall_with_etp", "grouped_without_te"])
def test_moe_layouts_are_refused_naming_the_keys(opts, arch, message):
    from simpo_mcore.model.builder import check_moe_layout

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_moe_layout(arch, opts)


def test_expert_groups_under_context_parallelism():
    """megatron lays an expert group over the tensor- then context-parallel ranks first: EP 2 over the two CP ranks
    of a replica shares its micro-batches (no aligned evaluation needed, any dispatcher), EP 4 over CP 2 reaches
    into a second replica; the layout itself is accepted."""
    from simpo_mcore.model.builder import check_moe_layout, experts_span_replicas

    for opts in (ModelOptions(cp=2), ModelOptions(cp=2, ep=2), ModelOptions(cp=2, tp=2, sequence_parallel=True, ep=2)):
        check_moe_layout(ARCH, opts)
    assert not experts_span_replicas(ModelOptions(cp=2, ep=2))
    assert experts_span_replicas(ModelOptions(cp=2, ep=4)) and experts_span_replicas(ModelOptions(ep=2))


def test_expert_groups_must_fit_the_world():
    """A world of one cannot split experts over 2 ranks: refused before any group exists, naming the keys."""
    from simpo_mcore.config import ConfigError

    with pytest.raises(ConfigError, match=r"parallel.ep x parallel.etp = 2 x 1 must divide the 1 ranks"):
        with distributed(ParallelConfig(device="cpu", ep=2), seed=0):
            pass


@pytest.mark.parametrize("override, message", [
    ("parallel.ep=0", "parallel.ep must be >= 1"),
    ("parallel.etp=0", "parallel.etp must be >= 1 or null"),
    ("model.moe_aux_loss_coeff=-0.1", "model.moe_aux_loss_coeff must be a number >= 0"),
    ("model.moe_aux_loss_coeff=.inf", "model.moe_aux_loss_coeff must be a finite number"),
    ("model.moe_load_balancing_type=sinkhorn", "model.moe_load_balancing_type: 'sinkhorn' is not one of"),
    ("model.moe_token_dispatcher=flex", "model.moe_token_dispatcher: 'flex' is not one of"),
], ids=["ep", "etp", "negative_coeff", "infinite_coeff", "sinkhorn", "flex_dispatcher"])
def test_moe_config_values_are_refused_naming_the_key(override, message):
    from simpo_mcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_aux_coefficient_without_a_loss_is_refused():
    from simpo_mcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="has no effect with model.moe_load_balancing_type: none"):
        load_config(None, ["model.moe_aux_loss_coeff=0.01", "model.moe_load_balancing_type=none"])
    cfg = load_config(None, ["model.moe_aux_loss_coeff=0.01", "model.moe_load_balancing_type=seq_aux_loss"])
    assert (cfg.model.moe_aux_loss_coeff, cfg.model.moe_load_balancing_type) == (0.01, "seq_aux_loss")
