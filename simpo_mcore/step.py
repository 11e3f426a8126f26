"""``forward_step`` / ``loss_func`` for megatron's pipeline schedules, and metric reduction.

The contract (megatron ``get_forward_backward_func``): ``forward_step(data_iterator, model)``
returns the model output and a ``loss_func``; on the last pipeline stage the schedule calls
``loss_func(output)`` which returns ``(loss, report)``; the schedule divides ``loss`` *in place*
by the number of micro-batches before backward, and megatron's DDP averages gradients over
data-parallel ranks.

SimPO's batch loss is a mean over the *global* batch of pairs (and the optional SFT term a mean
over all chosen response tokens of the global batch). Micro-batches may hold different numbers of
response tokens, so a mean of micro-batch means would be wrong. Each micro-batch therefore
contributes ``sum(pair losses) / global_pairs + sft_weight * nll_sum / global_chosen_tokens``,
multiplied by ``num_microbatches * dp`` to undo the schedule's division and DDP's average: the
gradient summed over micro-batches and ranks is then exactly the gradient of the global mean.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from simpo_mcore.config import LossConfig
from simpo_mcore.data.batching import shift_labels
from simpo_mcore.logprobs import (
    TokenLogpsContext,
    check_labels,
    labelled_positions,
    sequence_logps,
    token_logps_output_processor,
)
from simpo_mcore.losses import pair_terms, sft_nll_sum
from simpo_mcore.model.forward import position_ids_like

# Per-micro-batch sums; the metrics are ratios of their totals over the global batch.
REPORT_FIELDS = (
    "pairs", "loss_sum", "rewards_chosen_sum", "rewards_rejected_sum", "accuracies_sum",
    "margins_sum", "logps_chosen_sum", "logps_rejected_sum", "sft_nll_sum", "sft_tokens",
    "response_tokens", "tokens",
)


@dataclass(frozen=True)
class LossScale:
    """Global normalisers of one optimizer step (identical on every rank)."""

    num_microbatches: int
    dp: int
    global_pairs: int
    global_chosen_tokens: int


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without stopping the host: on a GPU through pinned memory, so the copy
    is queued behind the work already launched instead of waiting for it."""
    if device.type == "cuda" and not tensor.is_cuda:
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def checked_targets(labels: torch.Tensor, head: TokenLogpsContext, device: torch.device
                    ) -> tuple[torch.Tensor, TokenLogpsContext]:
    """``(shifted labels [2k, s] on device, this call's head context)`` from a micro-batch's labels.

    The labels are checked here, on the host copy, so that neither the head nor the loss needs a device
    sync to check them (the step runs from the first forward to the last backward without one); the
    positions of the labelled tokens are found here too, so that the head skips the prompt and padding."""
    targets = shift_labels(labels)  # [2k, s]
    check_labels(targets, head.vocab_size)
    index = labelled_positions(targets)  # [n]
    targets, index = to_device(targets, device), to_device(index, device)
    return targets, dataclasses.replace(head, labels_checked=True, token_index=index)


def token_logps_forward(model, batch: dict, head: TokenLogpsContext, device: torch.device):
    """Run one micro-batch: ``(output, shifted labels [2k, s])``. On the last pipeline stage the
    output is the token log-probs ``[2k, s]`` (the fused head replaces the logits); on the other
    stages it is the hidden states the schedule sends on. See :func:`checked_targets`."""
    labels, context = checked_targets(batch["labels"], head, device)  # [2k, s]
    tokens = to_device(batch["tokens"], device)  # [2k, s]
    output = model(tokens, position_ids_like(tokens), None, labels=labels,
                   output_processor=token_logps_output_processor, output_processor_context=context)
    return output, labels


def make_forward_step(loss_cfg: LossConfig, head: TokenLogpsContext, device: torch.device,
                      scale: LossScale | None = None):
    """A megatron ``forward_step``. ``scale=None`` for forward-only evaluation."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output, labels = token_logps_forward(model, batch, head, device)
        ref = batch.get("ref_sum_logps")
        return output, partial(loss_func, loss_cfg, scale, labels, to_device(ref, device) if ref is not None else None)

    return forward_step


def loss_func(loss_cfg: LossConfig, scale: LossScale | None, labels: torch.Tensor,
              ref_sum_logps: torch.Tensor | None, token_logps: torch.Tensor):
    """Loss of one micro-batch from its token log-probs ``[2k, s]`` (chosen rows first); ``labels`` passed
    :func:`check_labels` in :func:`token_logps_forward`."""
    sum_logps, num_tokens, avg_logps = sequence_logps(token_logps, labels, check=False)  # each [2k]
    k = token_logps.shape[0] // 2
    terms = pair_terms(loss_cfg.type, loss_cfg.beta, loss_cfg.gamma_beta_ratio,
                       loss_cfg.label_smoothing, avg_logps, sum_logps, ref_sum_logps)
    pref_sum = terms.losses.sum()
    nll_sum, nll_tokens = sft_nll_sum(token_logps[:k], labels[:k])

    if scale is not None:
        contribution = pref_sum / scale.global_pairs
        if loss_cfg.sft_weight > 0:
            contribution = contribution + loss_cfg.sft_weight * nll_sum / scale.global_chosen_tokens
        loss = contribution * (scale.num_microbatches * scale.dp)
    else:
        loss = pref_sum.detach()

    rc, rr = terms.rewards_chosen, terms.rewards_rejected
    # Fresh tensors: the schedule divides `loss` in place, which must not leak into the report.
    report = torch.stack([
        torch.full((), float(k), device=pref_sum.device),  # a fill: torch.tensor would copy from the host
        pref_sum.detach().float(),
        rc.sum().float(), rr.sum().float(),
        (rc > rr).float().sum(),
        (rc - rr).sum().float(),
        terms.logps_chosen.sum().float(), terms.logps_rejected.sum().float(),
        nll_sum.detach().float(), nll_tokens.float(),
        num_tokens.sum().float(),
        (labels.shape[1] * 2 * k) * torch.ones((), device=pref_sum.device),
    ])
    return loss, {"report": report}


def run_schedule(chunks: list, forward_step, micro_batches: list[dict], forward_only: bool) -> list[dict]:
    """One pass of megatron's schedule over ``micro_batches`` (all padded to the same length); the
    last pipeline stage gets the ``loss_func`` reports back, one per micro-batch."""
    if not micro_batches:
        return []
    tokens = micro_batches[0]["tokens"]
    many = len(chunks) > 1
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro_batches) for _ in chunks] if many else iter(micro_batches),
        model=chunks if many else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1],
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
    """The reference's metric names from summed report fields."""
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
        "tokens": t["tokens"],
    }
    if sft_weight > 0:
        out["sft_loss"] = sft
    return out
