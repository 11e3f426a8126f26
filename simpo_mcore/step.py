"""``forward_step`` / ``loss_func`` for megatron's pipeline schedules, and metric reduction.

The contract (megatron ``get_forward_backward_func``): ``forward_step(data_iterator, model)``
returns the model output and a ``loss_func``; on the last pipeline stage the schedule calls
``loss_func(output)`` which returns ``(loss, report)``; the schedule divides ``loss`` *in place*
by the number of micro-batches it was given before backward, and megatron's DDP averages gradients over
data-parallel ranks.

Normalisation. SimPO's batch loss is a mean over the *global* batch of G pairs, and the optional SFT term a
mean over all C chosen response tokens of the global batch. A micro-batch holds any number of pairs (packed
rows hold as many as fit; padded micro-batches hold ``train.micro_batch_pairs``) and any number of response
tokens, so a mean of micro-batch means would be wrong. Micro-batch m of data-parallel rank r, holding pairs
P_m with pair losses l_p and chosen tokens C_m with NLLs nll_t, returns::

    loss_m = ( sum_{p in P_m} l_p / G  +  sft_weight * sum_{t in C_m} nll_t / C ) * n_r * dp

where n_r is the number of micro-batches rank r gives the schedule in this step. The schedule divides by
n_r and DDP averages over dp, so the gradient summed over all micro-batches of all ranks is exactly the
gradient of ``sum_p l_p / G + sft_weight * sum_t nll_t / C``: the global means, whatever the number of pairs
in each micro-batch and the number of micro-batches on each rank (:class:`LossScale` holds G, C, n_r, dp;
G and C are all-reduced over data-parallel ranks before the step).

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
from simpo_mcore.data.batching import shift_labels
from simpo_mcore.data.packing import is_packed, sequence_targets, shift_packed_labels
from simpo_mcore.logprobs import (
    TokenLogpsContext,
    check_labels,
    labelled_positions,
    sequence_logps,
    token_logps_output_processor,
    unpack_token_logps,
)
from simpo_mcore.losses import pair_terms, sft_nll_sum
from simpo_mcore.model.forward import packed_row_params, position_ids_like

# Per-micro-batch sums; the metrics are ratios of their totals over the global batch.
REPORT_FIELDS = (
    "pairs", "loss_sum", "rewards_chosen_sum", "rewards_rejected_sum", "accuracies_sum",
    "margins_sum", "logps_chosen_sum", "logps_rejected_sum", "sft_nll_sum", "sft_tokens",
    "response_tokens", "tokens_real", "tokens_computed",
)
"""``tokens_real``: positions holding a token of a sequence (prompt included); ``tokens_computed``: positions
the model ran on (padding included). Their ratio is the real-token fraction."""


@dataclass(frozen=True)
class LossScale:
    """The normalisers of one optimizer step (see the module docstring)."""

    num_microbatches: int
    """Micro-batches this rank gives the schedule in this step (n_r: what the schedule divides by)."""
    dp: int
    global_pairs: int
    """Pairs of the global batch (G), summed over data-parallel ranks."""
    global_chosen_tokens: int
    """Chosen response tokens of the global batch (C), summed over data-parallel ranks."""


@dataclass(frozen=True)
class SequenceTargets:
    """A micro-batch's targets per sequence: ``labels [2k, L]`` shifted (chosen rows first), and for a packed
    row the ``sequence_index [2k, L]`` that lays the row's token log-probs out the same way."""

    labels: torch.Tensor
    sequence_index: torch.Tensor | None = None

    def token_logps(self, token_logps: torch.Tensor) -> torch.Tensor:
        """``[2k, L]`` token log-probs per sequence from the model's output (``[2k, L]`` already, or a packed
        row ``[1, T]``)."""
        if self.sequence_index is None:
            return token_logps
        return unpack_token_logps(token_logps, self.sequence_index)


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
    return _to_head(targets, head, device)


def _to_head(targets: torch.Tensor, head: TokenLogpsContext, device: torch.device
             ) -> tuple[torch.Tensor, TokenLogpsContext]:
    index = labelled_positions(targets)  # [n]
    targets, index = to_device(targets, device), to_device(index, device)
    return targets, dataclasses.replace(head, labels_checked=True, token_index=index)


def token_logps_forward(model, batch: dict, head: TokenLogpsContext, device: torch.device
                        ) -> tuple[torch.Tensor, SequenceTargets]:
    """Run one micro-batch: ``(output, its targets per sequence)``. On the last pipeline stage the output is
    the token log-probs (the fused head replaces the logits): ``[2k, s]`` for padded pairs, ``[1, T]`` for a
    packed row; on the other stages it is the hidden states the schedule sends on. See
    :func:`checked_targets`.

    A packed row (``data/packing.py``) goes through ``GPTModel`` with megatron's ``PackedSeqParams``
    (``qkv_format="thd"``): attention stays within each sequence and RoPE restarts at each; its labels are
    shifted within each sequence, so the last token of one never predicts the first of the next, and checked
    per sequence (each needs a labelled token), as padded pairs are."""
    tokens = to_device(batch["tokens"], device)  # [2k, s] or [1, T]
    if not is_packed(batch):
        labels, context = checked_targets(batch["labels"], head, device)  # [2k, s]
        output = model(tokens, position_ids_like(tokens), None, labels=labels,
                       output_processor=token_logps_output_processor, output_processor_context=context)
        return output, SequenceTargets(labels)
    row_targets = shift_packed_labels(batch["labels"], batch["cu_seqlens"])  # [1, T]
    targets = sequence_targets(row_targets, batch["sequence_index"])  # [2k, L]
    check_labels(targets, head.vocab_size)
    row_targets, context = _to_head(row_targets, head, device)
    output = model(tokens, to_device(batch["position_ids"], device), None, labels=row_targets,
                   packed_seq_params=packed_row_params(batch["cu_seqlens"], device),
                   output_processor=token_logps_output_processor, output_processor_context=context)
    return output, SequenceTargets(to_device(targets, device), to_device(batch["sequence_index"], device))


def make_forward_step(loss_cfg: LossConfig, head: TokenLogpsContext, device: torch.device,
                      scale: LossScale | None = None):
    """A megatron ``forward_step``. ``scale=None`` for forward-only evaluation."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output, targets = token_logps_forward(model, batch, head, device)
        ref = batch.get("ref_sum_logps")
        sizes = (batch["tokens_real"], batch["tokens"].numel())
        return output, partial(loss_func, loss_cfg, scale, targets,
                               to_device(ref, device) if ref is not None else None, sizes)

    return forward_step


def loss_func(loss_cfg: LossConfig, scale: LossScale | None, targets: SequenceTargets,
              ref_sum_logps: torch.Tensor | None, sizes: tuple[int, int], output: torch.Tensor):
    """Loss of one micro-batch from the model's token log-probs (``[2k, s]``, or a packed row's ``[1, T]``;
    chosen sequences first once laid out per sequence); ``targets`` passed :func:`check_labels` in
    :func:`token_logps_forward`; ``sizes``: its (real, computed) token positions, host counts."""
    labels = targets.labels  # [2k, L]
    token_logps = targets.token_logps(output)  # [2k, L]
    sum_logps, num_tokens, avg_logps = sequence_logps(token_logps, labels, check=False)  # each [2k]
    k = labels.shape[0] // 2
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
    device = output.device

    def fill(value: float) -> torch.Tensor:  # a fill: torch.tensor would copy from the host
        return torch.full((), float(value), device=device)

    # Fresh tensors: the schedule divides `loss` in place, which must not leak into the report.
    report = torch.stack([
        fill(k),
        pref_sum.detach().float(),
        rc.sum().float(), rr.sum().float(),
        (rc > rr).float().sum(),
        (rc - rr).sum().float(),
        terms.logps_chosen.sum().float(), terms.logps_rejected.sum().float(),
        nll_sum.detach().float(), nll_tokens.float(),
        num_tokens.sum().float(),
        fill(sizes[0]), fill(sizes[1]),
    ])
    return loss, {"report": report}


def run_schedule(chunks: list, forward_step, micro_batches: list[dict], forward_only: bool) -> list[dict]:
    """One pass of megatron's schedule over ``micro_batches`` (of one shape under pipeline parallelism, which
    sends the first one's ``[s, b, h]`` between stages); the last pipeline stage gets the ``loss_func`` reports
    back, one per micro-batch."""
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
        "tokens_real": t["tokens_real"],
        "tokens_computed": t["tokens_computed"],
    }
    if sft_weight > 0:
        out["sft_loss"] = sft
    return out
