"""Preference losses as pure functions of per-sequence log-probabilities.

Every input is one value per pair (shape ``[k]``); every output is one loss per pair. Names say
which reduction of the token log-probs a function needs: SimPO takes *averages* over response
tokens, DPO takes *sums*. Feeding one where the other belongs is the classic silent bug
(torchtune #1291), so the argument names carry it.

SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, Eq. 6), as princeton-nlp/SimPO's
``simpo_trainer.py`` computes it::

    logits = (avg_logps_chosen - avg_logps_rejected) - gamma_beta_ratio      # gamma = beta * ratio
    sigmoid: loss = -logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls
    hinge:   loss = relu(1 - beta * logits)                                   # ls ignored

DPO (Rafailov et al. 2023), on summed log-probs against a frozen reference::

    logits = (sum_logps_chosen - sum_logps_rejected) - (ref_sum_logps_chosen - ref_sum_logps_rejected)
    loss   = -logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls

Rewards (logged): SimPO ``beta * avg_logps``; DPO ``beta * (sum_logps - ref_sum_logps)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing)


def simpo_loss(avg_logps_chosen: torch.Tensor, avg_logps_rejected: torch.Tensor, beta: float,
               gamma_beta_ratio: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO sigmoid loss per pair, ``[k]``."""
    logits = (avg_logps_chosen - avg_logps_rejected) - gamma_beta_ratio
    return _sigmoid_loss(logits, beta, label_smoothing)


def simpo_hinge_loss(avg_logps_chosen: torch.Tensor, avg_logps_rejected: torch.Tensor, beta: float,
                     gamma_beta_ratio: float) -> torch.Tensor:
    """SimPO hinge loss per pair, ``[k]``."""
    logits = (avg_logps_chosen - avg_logps_rejected) - gamma_beta_ratio
    return torch.relu(1 - beta * logits)


def dpo_loss(sum_logps_chosen: torch.Tensor, sum_logps_rejected: torch.Tensor,
             ref_sum_logps_chosen: torch.Tensor, ref_sum_logps_rejected: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO sigmoid loss per pair, ``[k]``, from summed log-probs of the policy and the reference."""
    logits = (sum_logps_chosen - sum_logps_rejected) - (ref_sum_logps_chosen - ref_sum_logps_rejected)
    return _sigmoid_loss(logits, beta, label_smoothing)


@dataclass
class PairTerms:
    """Per-pair quantities of one micro-batch, for the loss and the metrics (all ``[k]``)."""

    losses: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    logps_chosen: torch.Tensor
    """What the reference logs as ``logps/chosen``: the average log-prob for SimPO, the sum for DPO."""
    logps_rejected: torch.Tensor


def pair_terms(loss_type: str, beta: float, gamma_beta_ratio: float, label_smoothing: float,
               avg_logps: torch.Tensor, sum_logps: torch.Tensor,
               ref_sum_logps: torch.Tensor | None = None) -> PairTerms:
    """Losses and rewards for ``k`` pairs given per-sequence log-probs of ``[2k]`` sequences laid
    out chosen-first (``[c_0..c_{k-1}, r_0..r_{k-1}]``), as a micro-batch holds them."""
    k = avg_logps.shape[0] // 2
    if loss_type in ("simpo", "simpo_hinge"):
        avg_c, avg_r = avg_logps[:k], avg_logps[k:]
        if loss_type == "simpo":
            losses = simpo_loss(avg_c, avg_r, beta, gamma_beta_ratio, label_smoothing)
        else:
            losses = simpo_hinge_loss(avg_c, avg_r, beta, gamma_beta_ratio)
        return PairTerms(losses, beta * avg_c.detach(), beta * avg_r.detach(), avg_c.detach(), avg_r.detach())
    if loss_type == "dpo":
        if ref_sum_logps is None:
            raise ValueError("loss.type dpo needs reference log-probs for every pair")
        sum_c, sum_r = sum_logps[:k], sum_logps[k:]
        ref_c, ref_r = ref_sum_logps[:k], ref_sum_logps[k:]
        losses = dpo_loss(sum_c, sum_r, ref_c, ref_r, beta, label_smoothing)
        return PairTerms(losses, beta * (sum_c - ref_c).detach(), beta * (sum_r - ref_r).detach(),
                         sum_c.detach(), sum_r.detach())
    raise ValueError(f"unknown loss.type {loss_type!r}")


def sft_nll_sum(sum_logps_chosen: torch.Tensor, num_tokens_chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood and token count over the response tokens of chosen sequences, from their
    per-sequence ``sum_logps`` and ``num_tokens`` ``[k]`` (whole sequences under context parallelism).

    The SFT term is ``nll_sum / num_tokens`` over the whole batch (a token mean, as the reference's
    ``nn.CrossEntropyLoss()`` over the concatenated chosen logits), so it is returned unreduced
    and normalised once the global token count is known.
    """
    return -sum_logps_chosen.sum(), num_tokens_chosen.sum()
