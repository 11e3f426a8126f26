"""The loss functions against hand-derived values (derivations in each docstring)."""

from __future__ import annotations

import math

import pytest
import torch

from simpo_mcore.logprobs import sequence_logps
from simpo_mcore.losses import dpo_loss, pair_terms, sft_nll_sum, simpo_hinge_loss, simpo_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("beta,ratio", [(2.0, 0.5), (2.5, 0.55), (10.0, 0.3), (0.5, 0.0)])
def test_simpo_equal_pair_is_softplus_of_margin(beta, ratio):
    """chosen == rejected => logits = -ratio, loss = -logsigmoid(-beta*ratio) = softplus(beta*ratio)."""
    avg = torch.tensor([-1.7, -0.2, -3.0], dtype=torch.float64)
    losses = simpo_loss(avg, avg.clone(), beta, ratio)
    assert torch.allclose(losses, torch.full_like(avg, softplus(beta * ratio)), atol=1e-12)


def test_simpo_label_smoothing_hand_value():
    """avg_c - avg_r = 0.3, ratio 0.5 => logits = -0.2; beta 2 => z = -0.4.
    loss = (1-ls) * softplus(0.4) + ls * softplus(-0.4) with ls = 0.1."""
    losses = simpo_loss(torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-1.3], dtype=torch.float64),
                        beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1)
    expected = 0.9 * softplus(0.4) + 0.1 * softplus(-0.4)
    assert losses.item() == pytest.approx(expected, abs=1e-12)


def test_simpo_uses_difference_of_averages():
    """Shifting both averages by the same constant leaves the loss unchanged; it depends on the
    difference only, through beta * (d - ratio)."""
    a, b = torch.tensor([-2.0, -0.5]), torch.tensor([-2.5, -0.1])
    assert torch.allclose(simpo_loss(a, b, 2.0, 0.5), simpo_loss(a + 7, b + 7, 2.0, 0.5))
    d = (a - b).double()
    assert torch.allclose(simpo_loss(a.double(), b.double(), 2.0, 0.5), torch.log1p(torch.exp(-2.0 * (d - 0.5))))


def test_simpo_hinge_hand_values():
    """hinge = relu(1 - beta * (d - ratio)). d = 0.3, ratio 0.5, beta 2 => relu(1.4) = 1.4;
    d = 2.0 => relu(1 - 3) = 0; chosen == rejected => 1 + beta * ratio = 2."""
    c = torch.tensor([-1.0, 0.0, -4.0], dtype=torch.float64)
    r = torch.tensor([-1.3, -2.0, -4.0], dtype=torch.float64)
    assert torch.allclose(simpo_hinge_loss(c, r, 2.0, 0.5), torch.tensor([1.4, 0.0, 2.0], dtype=torch.float64))


def test_dpo_at_reference_is_log2_and_hand_value():
    """policy == reference => logits 0 => loss = log 2 whatever beta. Otherwise
    logits = (sc - sr) - (rc - rr) = (-10 - -14) - (-11 - -12) = 3; beta 0.1 => softplus(-0.3)."""
    s = torch.tensor([-10.0, -50.0], dtype=torch.float64)
    assert torch.allclose(dpo_loss(s, s - 3, s, s - 3, beta=0.01), torch.full((2,), math.log(2), dtype=torch.float64))
    loss = dpo_loss(torch.tensor([-10.0]).double(), torch.tensor([-14.0]).double(),
                    torch.tensor([-11.0]).double(), torch.tensor([-12.0]).double(), beta=0.1)
    assert loss.item() == pytest.approx(softplus(-0.3), abs=1e-12)


def test_pair_terms_layout_and_rewards():
    """[c0, c1, r0, r1] layout; SimPO rewards beta*avg; DPO rewards beta*(sum - ref_sum)."""
    avg = torch.tensor([-1.0, -2.0, -1.5, -1.0])
    sums = torch.tensor([-10.0, -20.0, -12.0, -11.0])
    t = pair_terms("simpo", 2.0, 0.5, 0.0, avg, sums)
    assert torch.allclose(t.rewards_chosen, torch.tensor([-2.0, -4.0]))
    assert torch.allclose(t.rewards_rejected, torch.tensor([-3.0, -2.0]))
    assert torch.allclose(t.losses, simpo_loss(avg[:2], avg[2:], 2.0, 0.5))
    ref = torch.tensor([-9.0, -21.0, -12.0, -10.0])
    d = pair_terms("dpo", 0.1, 0.5, 0.0, avg, sums, ref)
    assert torch.allclose(d.rewards_chosen, torch.tensor([-0.1, 0.1]))
    assert torch.allclose(d.rewards_rejected, torch.tensor([0.0, -0.1]))
    assert torch.allclose(d.logps_chosen, sums[:2])
    with pytest.raises(ValueError, match="reference"):
        pair_terms("dpo", 0.1, 0.5, 0.0, avg, sums, None)


def test_sft_nll_is_token_sum_over_response():
    """The chosen sequences' summed log-probs and counts (masked positions already left out by
    ``sequence_logps``) give the NLL summed over every response token and the number of those tokens."""
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]])
    labels = torch.tensor([[-100, 5, 6], [7, -100, -100]])
    sum_logps, num_tokens, _ = sequence_logps(token_logps, labels)
    nll, n = sft_nll_sum(sum_logps, num_tokens)
    assert nll.item() == pytest.approx(2.0 + 3.0 + 0.5)
    assert n.item() == 3
