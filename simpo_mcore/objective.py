"""The preference objective as megatron's pipeline schedules run it: ``forward_step`` / ``loss_func``, and the
reduction of the micro-batches' reports into the step's metrics.

The contract (megatron ``get_forward_backward_func``): ``forward_step(data_iterator, model)`` returns the model
output and a ``loss_func``; on the last pipeline stage the schedule calls ``loss_func(output)`` which returns
``(loss, report)``; the schedule divides ``loss`` *in place* by the number of micro-batches it was given before
backward, and megatron's DDP averages gradients over data-parallel ranks. The data iterator yields ready
:class:`~simpo_mcore.microbatch.MicroBatch` es: ``forward_step`` moves one to the device and calls the model;
nothing here prepares data.

Normalisation. SimPO's batch loss is a mean over the *global* batch of G pairs, and the optional SFT term a
mean over all C chosen response tokens of the global batch. A micro-batch holds any number of pairs (packed
rows hold as many as fit; padded micro-batches hold ``train.micro_batch_pairs``) and any number of response
tokens, so a mean of micro-batch means would be wrong. Micro-batch m of data-parallel rank r, holding pairs
P_m with pair losses l_p and chosen tokens C_m with NLLs nll_t, returns::

    loss_m = ( sum_{p in P_m} l_p / G  +  sft_weight * sum_{t in C_m} nll_t / C ) * n_r * dp

where n_r is the number of micro-batches rank r gives the schedule in this step. The schedule divides by
n_r and DDP averages over dp, so the gradient summed over all micro-batches of all ranks is exactly the
gradient of ``sum_p l_p / G + sft_weight * sum_t nll_t / C``: the global means, whatever the number of pairs
in each micro-batch and the number of micro-batches on each rank (:class:`~simpo_mcore.microbatch.LossScale`
holds G, C, n_r, dp; every rank knows G and C from the sampler's global batch).

n_r is per rank because that is what the schedule divides by. Within one data-parallel replica every
pipeline stage reads the same micro-batches (the packing is a function of the step's pairs), so the stages
agree on n_r as they must: they exchange activations micro-batch by micro-batch. Replicas could differ (they
meet only in DDP's all-reduce after the schedule), but packing gives every replica the same n (the global
batch is split into dp x n rows) and padded micro-batches are the same count by construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from simpo_mcore.config import LossConfig
from simpo_mcore.logprobs import TokenLogpsContext, sequence_logps, token_logps_output_processor, unpack_token_logps
from simpo_mcore.losses import pair_terms, sft_nll_sum
from simpo_mcore.microbatch import LossScale, MicroBatch
from simpo_mcore.model.forward import packed_row_params
from simpo_mcore.model.moe import load_imbalance, router_step_sums


@dataclass(frozen=True)
class MicroBatchReport:
    """What one micro-batch reports: sums (0-d fp32 tensors on the output's device) whose totals over the global
    batch the step's metrics are ratios of (:func:`metrics_from_totals`). A new metric is a new field here, its
    value in :func:`loss_func` and its ratio in :func:`metrics_from_totals`."""

    pairs: torch.Tensor
    loss_sum: torch.Tensor
    """The preference loss summed over the pairs (no SFT term, no scaling)."""
    rewards_chosen_sum: torch.Tensor
    rewards_rejected_sum: torch.Tensor
    accuracies_sum: torch.Tensor
    margins_sum: torch.Tensor
    logps_chosen_sum: torch.Tensor
    logps_rejected_sum: torch.Tensor
    sft_nll_sum: torch.Tensor
    sft_tokens: torch.Tensor
    response_tokens: torch.Tensor
    """Labelled targets of every sequence."""
    tokens_real: torch.Tensor
    """Positions holding a token of a sequence (prompt included)."""
    tokens_computed: torch.Tensor
    """Positions the model ran on (padding included): with ``tokens_real``, the real-token fraction."""

    def stack(self) -> torch.Tensor:
        """``[len(REPORT_FIELDS)]`` in field order: what megatron's schedule collects per micro-batch."""
        return torch.stack([getattr(self, name) for name in REPORT_FIELDS])


REPORT_FIELDS = tuple(f.name for f in dataclasses.fields(MicroBatchReport))


def token_logps_forward(model, batch: MicroBatch, context: TokenLogpsContext) -> torch.Tensor:
    """Run one micro-batch (on the model's device): on the last pipeline stage its token log-probs, ``[2k, s]``
    for padded pairs, ``[1, T]`` for a packed row (the fused head replaces the logits); on the other stages the
    hidden states the schedule sends on. The head computes the labelled targets only (``batch.token_index``) and
    does not check them again (collation did). A packed row goes through ``GPTModel`` with megatron's
    ``PackedSeqParams`` (``qkv_format="thd"``): attention stays within each sequence and RoPE restarts at each."""
    context = dataclasses.replace(context, labels_checked=True, token_index=batch.token_index)
    packed = None
    if batch.packed:
        packed = packed_row_params(batch.cu_seqlens, batch.seqlens, batch.cu_seqlens_padded, batch.padded_seqlens)
    # Only the routers of a mixture of experts read it (padding stays out of their loss and counts).
    padding = batch.padding_mask if model.config.num_moe_experts else None
    return model(batch.tokens, batch.position_ids, None, labels=batch.targets, packed_seq_params=packed,
                 padding_mask=padding, output_processor=token_logps_output_processor,
                 output_processor_context=context)


def sequence_token_logps(batch: MicroBatch, token_logps: torch.Tensor) -> torch.Tensor:
    """``[2k, L]`` token log-probs per sequence (chosen first) from the model's output for ``batch``
    (``[2k, L]`` already, or a packed row's ``[1, T]``); under context parallelism this rank's tokens of each."""
    if batch.sequence_index is None:
        return token_logps
    return unpack_token_logps(token_logps, batch.sequence_index)


def batch_sequence_logps(batch: MicroBatch, token_logps: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_logps, num_tokens, avg_logps)``, each ``[2k]`` (chosen first), of the whole sequences of ``batch``
    from the model's output for it (``[2k, L]``, or a packed row's ``[1, T]``): under context parallelism reduced
    over the CP group, the same on each of its ranks. Collation checked the targets: no check (a device sync)."""
    cp_group = ps.get_context_parallel_group() if batch.cp > 1 else None
    return sequence_logps(sequence_token_logps(batch, token_logps), batch.sequence_targets, check=False,
                          cp_group=cp_group)


def make_forward_step(loss_cfg: LossConfig, context: TokenLogpsContext, device: torch.device,
                      scale: LossScale | None = None):
    """A megatron ``forward_step`` over an iterator of host :class:`MicroBatch` es. ``scale=None`` for forward-only
    evaluation."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(device)
        output = token_logps_forward(model, batch, context)
        return output, partial(loss_func, loss_cfg, scale, batch)

    return forward_step


def loss_func(loss_cfg: LossConfig, scale: LossScale | None, batch: MicroBatch, output: torch.Tensor):
    """``(loss, {"report": [len(REPORT_FIELDS)]})`` of one micro-batch (on the device) from the model's token
    log-probs ``output``; the loss scaled by ``scale`` as the module docstring derives (``None``: the unscaled
    preference sum, for forward-only passes)."""
    sum_logps, num_tokens, avg_logps = batch_sequence_logps(batch, output)  # each [2k]
    k = batch.num_pairs
    terms = pair_terms(loss_cfg.type, loss_cfg.beta, loss_cfg.gamma_beta_ratio,
                       loss_cfg.label_smoothing, avg_logps, sum_logps, batch.ref_sum_logps)
    pref_sum = terms.losses.sum()
    # From the whole chosen sequences' sums: under context parallelism a rank's own tokens are a part of them.
    nll_sum, nll_tokens = sft_nll_sum(sum_logps[:k], num_tokens[:k])

    if scale is not None:
        contribution = pref_sum / scale.global_pairs
        if loss_cfg.sft_weight > 0:
            contribution = contribution + loss_cfg.sft_weight * nll_sum / scale.global_chosen_tokens
        loss = contribution * (scale.num_microbatches * scale.dp)
    else:
        loss = pref_sum.detach()

    rc, rr = terms.rewards_chosen, terms.rewards_rejected

    def fill(value: float) -> torch.Tensor:  # a fill: torch.tensor would copy from the host
        return torch.full((), float(value), device=output.device)

    # Fresh tensors: the schedule divides `loss` in place, which must not leak into the report.
    report = MicroBatchReport(
        pairs=fill(k), loss_sum=pref_sum.detach().float(),
        rewards_chosen_sum=rc.sum().float(), rewards_rejected_sum=rr.sum().float(),
        accuracies_sum=(rc > rr).float().sum(), margins_sum=(rc - rr).sum().float(),
        logps_chosen_sum=terms.logps_chosen.sum().float(), logps_rejected_sum=terms.logps_rejected.sum().float(),
        sft_nll_sum=nll_sum.detach().float(), sft_tokens=nll_tokens.float(),
        response_tokens=num_tokens.sum().float(),
        tokens_real=fill(batch.tokens_real), tokens_computed=fill(batch.tokens_computed))
    return loss, {"report": report.stack()}


def run_schedule(chunks: list, forward_step, micro_batches: list[MicroBatch], forward_only: bool) -> list[dict]:
    """One pass of megatron's schedule over ``micro_batches`` (of one shape under pipeline parallelism, which
    sends the first one's ``[s, b, h]`` between stages); the last pipeline stage gets the ``loss_func`` reports
    back, one per micro-batch. megatron divides ``seq_length`` by the context-parallel size for those shapes: it
    is given the length before the split."""
    if not micro_batches:
        return []
    tokens = micro_batches[0].tokens
    many = len(chunks) > 1
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro_batches) for _ in chunks] if many else iter(micro_batches),
        model=chunks if many else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1] * micro_batches[0].cp,
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


def reduce_reports(reports: list[dict], sft_weight: float, device: torch.device) -> dict[str, float]:
    """Sum micro-batch reports on the last stage, all-reduce over data-parallel ranks, broadcast
    along the pipeline so every rank returns the same metrics (weighted by pairs). ``device``: the
    run's (a rank with no micro-batch still takes part in the collectives)."""
    total = torch.zeros(len(REPORT_FIELDS), dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():
        for r in reports:
            total += r["report"].double()
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return metrics_from_totals(dict(zip(REPORT_FIELDS, total.tolist())), sft_weight)


def metrics_from_totals(t: dict[str, float], sft_weight: float) -> dict[str, float]:
    """The reference's metric names from the summed report fields."""
    pairs = max(t["pairs"], 1.0)
    sft = t["sft_nll_sum"] / max(t["sft_tokens"], 1.0)
    pref = t["loss_sum"] / pairs
    out = {
        "loss": pref + (sft_weight * sft if sft_weight > 0 else 0.0),
        "rewards/chosen": t["rewards_chosen_sum"] / pairs,
        "rewards/rejected": t["rewards_rejected_sum"] / pairs,
        "rewards/accuracies": t["accuracies_sum"] / pairs,
        "rewards/margins": t["margins_sum"] / pairs,
        "logps/chosen": t["logps_chosen_sum"] / pairs,
        "logps/rejected": t["logps_rejected_sum"] / pairs,
        "num_pairs": t["pairs"],
        "response_tokens": t["response_tokens"],
        "tokens_real": t["tokens_real"],
        "tokens_computed": t["tokens_computed"],
    }
    if sft_weight > 0:
        out["sft_loss"] = sft
    return out


def reduce_moe_stats(chunks: list, scale: LossScale, device: torch.device) -> dict[str, float]:
    """A mixture of experts' step metrics (every rank; ``{}`` for a dense model), from the routers' sums since
    the last call (:func:`~simpo_mcore.model.moe.router_step_sums`, reset here):

    - ``moe/load_imbalance``, ``moe/load_imbalance_max``: max / mean real tokens per expert of each MoE layer
      over the step's global batch (1 = balanced, E = all to one expert), averaged over the MoE layers / the
      worst layer;
    - ``moe/aux_loss`` (with ``moe_aux_loss_coeff > 0``): the load-balancing term whose gradient the step
      injected, ``c x (1 / dp) x sum over data-parallel ranks r of (1 / n_r) x sum over r's micro-batches m and
      MoE layers l of aux_l(m)``: megatron's schedule scales it by ``1 / n_r`` and DDP averages over ``dp``
      (the module docstring's derivation; docs/moe.md defines ``aux_l(m)``).

    One all-reduce over every rank: the tensor-, context- and data-parallel ranks hold shares of the tokens (a
    sequence-parallel router's loss is its share's part) and the pipeline stages hold different layers."""
    config = chunks[0].config
    if not config.num_moe_experts:
        return {}
    experts = config.num_moe_experts
    table = torch.zeros(config.num_layers, experts + 2, dtype=torch.float64, device=device)  # [L, E + 2]
    for layer, (counts, aux_sum) in router_step_sums(chunks).items():
        table[layer - 1, :experts] = counts.to(device)
        table[layer - 1, experts] = aux_sum.to(device) / scale.num_microbatches
        table[layer - 1, experts + 1] = 1.0  # marks an MoE layer
    torch.distributed.all_reduce(table)
    counts = table[table[:, experts + 1] > 0, :experts]  # [MoE layers, E]
    imbalance = load_imbalance(counts)  # [MoE layers]
    out = {"moe/load_imbalance": imbalance.mean().item(), "moe/load_imbalance_max": imbalance.max().item()}
    if config.moe_aux_loss_coeff:
        out["moe/aux_loss"] = (table[:, experts].sum() / scale.dp).item()
    return out
