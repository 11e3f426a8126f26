"""Mixture-of-experts layers: megatron-core's ``MoELayer`` with the routing and expert weighting HF computes.

What megatron's own pieces would change, and what replaces them here:

* **Routing.** HF's MoE blocks take the softmax over all experts in fp32, pick the top k, renormalise the k
  weights iff ``norm_topk_prob`` (Mixtral always) and multiply by them; Qwen MoE rounds them to the model's
  dtype first, Mixtral keeps them in fp32. megatron's ``TopKRouter`` either skips the renormalisation
  (``moe_router_pre_softmax=True``) or takes the softmax over the top-k logits (the same numbers in exact
  arithmetic, not in floating point). :class:`HFTopKRouter` computes HF's numbers and keeps everything else of
  megatron's router: its gating linear, z-loss, the auxiliary load-balancing losses (attached to the weights by
  ``MoEAuxLossAutoScaler``) and its checkpoint key.
* **Expert weighting.** megatron's ``SequentialMLP`` multiplies each token's activation by its routing weight
  before the down projection; HF multiplies the down projection's output. :class:`HFOrderSequentialMLP` weighs
  the output. On a GPU with Transformer Engine the experts are megatron's ``TEGroupedMLP`` (grouped GEMM,
  weights applied before ``linear_fc2``): the same function within rounding; not yet measured on a GPU.
* **Row order.** A GEMM's result for one row can depend on where the row sits in the matrix (a CPU kernel
  treats the last rows of a block differently). HF hands each expert its tokens ordered by top-k slot, then by
  batch-major position; megatron's permutation orders them by sequence-major position. Where this rank's
  experts see exactly its own tokens (EP, TP and expert TP all 1) :class:`HFMoELayer` hands
  :class:`HFOrderSequentialMLP` HF's order, so that the logits of such a model equal HF's bit for bit.

Per-expert token counts (the expert load a run reports) and the load-balancing losses (coefficient included)
are accumulated by each router over the training forwards of a step, padding left out (megatron's
``padding_mask``), and read with :func:`router_step_sums` (:func:`simpo_mcore.objective.reduce_moe_stats`
reduces them over the ranks).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter


def hf_topk_routing(logits: torch.Tensor, topk: int, renormalise: bool,
                    weights_fp32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's routing of ``logits [t, E]``: ``(probs [t, E], routing_map [t, E] bool, index [t, k])``, ``probs``
    holding each token's top-k weights at its experts (0 elsewhere), fp32 when ``weights_fp32`` else
    ``logits``' dtype; ``index`` the chosen experts, heaviest first."""
    scores = torch.softmax(logits.float(), dim=-1)  # [t, E]
    top, index = torch.topk(scores, topk, dim=-1)  # [t, k]
    if renormalise:
        top = top / top.sum(dim=-1, keepdim=True)
    if not weights_fp32:
        top = top.to(logits.dtype)
    probs = torch.zeros(logits.shape, dtype=top.dtype, device=logits.device).scatter(1, index, top)  # [t, E]
    routing_map = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(1, index, True)
    return probs, routing_map, index


def hf_row_order(routing_map: torch.Tensor, index: torch.Tensor, seq_len: int, batch: int) -> torch.Tensor:
    """The order HF's experts see their tokens in, as positions in megatron's permuted rows.

    megatron permutes a layer's ``[s * b]`` tokens (sequence-major) expert by expert, each expert's in token
    order; HF takes, expert by expert, the tokens that chose it as their first, then second, ... expert, each
    slot's in batch-major order (``torch.where`` over its ``[k, b * s]`` mask). ``routing_map [s * b, E]``,
    ``index [s * b, k]`` (the router's choices, slot by slot); returns ``[s * b * k]``."""
    experts, tokens = routing_map.T.nonzero(as_tuple=True)  # megatron's rows: by expert, then token
    t, k = index.shape
    slots = torch.zeros(routing_map.shape, dtype=torch.long, device=index.device)  # [t, E]
    slots.scatter_(1, index, torch.arange(k, device=index.device).expand(t, k))
    hf_token = (tokens % batch) * seq_len + tokens // batch  # sequence-major -> batch-major position
    return torch.argsort((experts * k + slots[tokens, experts]) * t + hf_token)


class HFTopKRouter(TopKRouter):
    """megatron's ``TopKRouter`` routing as HF does (:func:`hf_topk_routing`, from
    ``config.moe_norm_topk_prob`` and ``config.moe_route_weights_fp32``), with megatron's auxiliary losses.
    ``topk_index`` holds the last routing's choices ``[tokens, k]``. Over the training forwards since the last
    :func:`router_step_sums`, ``tokens_per_expert [E]`` counts the real tokens routed to each expert and
    ``aux_loss_sum`` sums the load-balancing losses this rank injected (coefficient included)."""

    topk_index: torch.Tensor | None = None

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        # Integer counts: a cast of the model to bf16 leaves them exact.
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_moe_experts, dtype=torch.long),
                             persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)  # [s * b, E]
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)  # [s * b]
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        probs, routing_map, self.topk_index = hf_topk_routing(
            logits, self.topk, self.config.moe_norm_topk_prob, self.config.moe_route_weights_fp32)
        # Once per micro-batch: a recomputed layer's first forward runs without gradients.
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                real = routing_map if padding_mask is None else routing_map & ~padding_mask.unsqueeze(-1)  # [t, E]
                self.tokens_per_expert += real.sum(dim=0).to(self.tokens_per_expert.device)
            if self.is_aux_loss_enabled():
                aux_map, aux_scores = compute_routing_scores_for_aux_loss(
                    logits, self.topk, self.score_function, fused=False, padding_mask=padding_mask)
                masked = padding_mask is not None
                probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
                probs = self._apply_seq_aux_loss(probs, aux_scores, aux_map, seq_length, bsz, with_padding_mask=masked)
                probs = self._apply_global_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
        return probs, routing_map

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                           reduce_group, needs_dp_avg=True, valid_token_count=None):
        """megatron's attachment of a load-balancing loss to ``activation`` (its gradient enters the backward
        through ``MoEAuxLossAutoScaler``, scaled as the schedule sets), the loss also summed into
        ``aux_loss_sum``: megatron's metrics tracker is read and cleared by megatron's own training loop only."""
        with torch.no_grad():
            self.aux_loss_sum += aux_loss.detach().to(self.aux_loss_sum.dtype)
        return super().attach_and_log_load_balancing_loss(activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                                          reduce_group, needs_dp_avg, valid_token_count)


class HFOrderSequentialMLP(SequentialMLP):
    """megatron's ``SequentialMLP`` with each token's routing weight applied to the expert's output (HF's
    order) instead of to its activation before ``linear_fc2``, and the rows in ``row_order`` when the layer
    sets one (:func:`hf_row_order`) for the next call."""

    row_order: torch.Tensor | None = None

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        order, self.row_order = self.row_order, None
        if order is not None:  # the rows stay within their expert: tokens_per_expert holds
            permuted_local_hidden_states = permuted_local_hidden_states[order]
            permuted_probs = permuted_probs[order]
        # A weight of exactly 1 inside the expert leaves its activation unchanged, bit for bit.
        output, bias = super().forward(permuted_local_hidden_states, tokens_per_expert,
                                       torch.ones_like(permuted_probs))
        weighted = (output * permuted_probs.unsqueeze(-1)).to(output.dtype)  # [rows, h]; Mixtral's weights fp32
        if order is not None:
            weighted = torch.empty_like(weighted).index_copy(0, order, weighted)  # back to megatron's rows
        return weighted, bias


class HFMoELayer(MoELayer):
    """megatron's ``MoELayer`` that, where its experts see exactly this rank's tokens (expert-parallel,
    tensor-parallel and expert-tensor-parallel sizes 1), hands them in HF's order (:func:`hf_row_order`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local_tokens = (isinstance(self.experts, HFOrderSequentialMLP) and self.ep_group.size() == 1
                             and self.attn_tp_group.size() == 1 and self.experts.tp_group.size() == 1)

    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        if self.local_tokens:
            seq_len, batch = hidden_states.shape[:2]  # [s, b, h] (a packed row: [t, 1, h])
            self.experts.row_order = hf_row_order(routing_map, self.router.topk_index, seq_len, batch)
        return probs, routing_map


def moe_mlp(spec: str, num_experts: int, grouped: bool):
    """The ``mlp`` submodule builder of an MoE layer for layer spec ``spec``: megatron's ``MoELayer`` with
    :class:`HFTopKRouter`, the shared expert (with its gate when the config has one) and the experts: with
    ``grouped`` (spec ``te``) TE's grouped GEMM ``TEGroupedMLP``, wired as megatron's TE spec does (not yet
    measured on a GPU); else :class:`HFOrderSequentialMLP` (megatron's local linears, one GEMM pair per
    expert)."""
    if grouped:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        builder = get_moe_module_spec_for_backend(TESpecProvider(), num_experts=num_experts, moe_grouped_gemm=True)
        experts = builder.keywords["submodules"].experts
    else:
        builder = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=num_experts,
                                                  moe_grouped_gemm=False)
        experts = builder.keywords["submodules"].experts  # partial(SequentialMLP, submodules=...)
        experts = functools.partial(HFOrderSequentialMLP, *experts.args, **experts.keywords)
    submodules = replace(builder.keywords["submodules"], experts=experts, router=HFTopKRouter)
    return functools.partial(HFMoELayer, submodules=submodules)


def routers(chunks: list) -> list[HFTopKRouter]:
    """The routers of the MoE layers this rank holds, in layer order."""
    found = []
    for chunk in chunks:
        found.extend(m for m in getattr(chunk, "module", chunk).modules() if isinstance(m, HFTopKRouter))
    return found


def reduce_experts_over_expert_groups(chunks: list) -> None:
    """Mark every routed expert's parameter as megatron marks them at EP > 1 (``allreduce = False``): DDP keeps
    them in its expert buffers, reduced over the expert data-parallel group, and the optimizer is a chain of a
    dense and an expert optimizer. At EP 1 with expert TP = TP megatron leaves them with the dense parameters
    (the groups are the same ones); marked at every layout, a checkpoint's optimizer state has one structure
    whatever the EP it was written or is resumed at."""
    for chunk in chunks:
        for layer in getattr(chunk, "module", chunk).modules():
            if isinstance(layer, MoELayer):
                for param in layer.experts.parameters():
                    param.allreduce = False


def freeze_routers(chunks: list) -> int:
    """Take the router weights out of training (``requires_grad=False``: megatron's DDP and optimizer then
    leave them alone); returns how many were frozen."""
    found = routers(chunks)
    for router in found:
        router.weight.requires_grad_(False)
    return len(found)


@torch.no_grad()
def router_step_sums(chunks: list, reset: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer_number (1-based): (real tokens routed to each expert [E], load-balancing losses injected [])}``
    of this rank's MoE layers since the last reset, over the training forwards (each token once per chosen
    expert; each micro-batch's loss once, coefficient included). They cover this rank's tokens: the step's
    totals are their sums over the tensor-, context- and data-parallel ranks (a sequence-parallel router sees its
    rank's share of the sequence, and its loss is that share's part), and pipeline stages hold different
    layers."""
    sums = {}
    for router in routers(chunks):
        sums[router.layer_number] = (router.tokens_per_expert.clone(), router.aux_loss_sum.clone())
        if reset:
            router.tokens_per_expert.zero_()
            router.aux_loss_sum.zero_()
    return sums


def expert_token_counts(chunks: list, reset: bool = True) -> dict[int, torch.Tensor]:
    """``{layer_number: real tokens routed to each expert [E]}`` of :func:`router_step_sums`."""
    return {layer: counts for layer, (counts, _) in router_step_sums(chunks, reset).items()}


def load_imbalance(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Max over mean tokens per expert along the last dim of ``[..., E]`` counts (1 = perfectly balanced, E =
    every token to one expert; 0 where there is no token), in fp32."""
    counts = tokens_per_expert.float()
    mean = counts.mean(dim=-1)
    return torch.where(mean > 0, counts.amax(dim=-1) / mean.clamp_min(1.0 / counts.shape[-1]), 0.0)
