"""``simpo_mcore.objective``: a ready micro-batch reaches the model as collated (shifted targets, positions, the
head's labelled positions, and for a packed row megatron's THD ``PackedSeqParams``) with the head told its targets
are checked (its own check would be a device sync in mid-step); and the loss of any batching of a step (padded
micro-batches, packed rows of any number of pairs, any number of micro-batches per rank) is the global batch's
mean."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import pair_columns, random_pair

from simpo_mcore.config import LossConfig
from simpo_mcore.data.packing import collate_packed_row
from simpo_mcore.data.padded import collate_pairs
from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.microbatch import LossScale
from simpo_mcore.objective import REPORT_FIELDS, loss_func, make_forward_step

VOCAB = 10
HEAD = TokenLogpsContext(vocab_size=VOCAB, chunk_tokens=4)
CPU = torch.device("cpu")


class _RecordingModel:
    def __init__(self, experts: int | None = None):
        self.calls = []
        self.config = SimpleNamespace(num_moe_experts=experts)

    def __call__(self, tokens, position_ids, attention_mask, labels, packed_seq_params, padding_mask,
                 output_processor, output_processor_context):
        self.calls.append(dict(tokens=tokens, position_ids=position_ids, labels=labels,
                               context=output_processor_context, packed=packed_seq_params, padding=padding_mask))
        return torch.zeros(labels.shape)


def _pair(prompt: int, chosen: int, rejected: int, rng=None) -> dict:
    return random_pair(prompt, chosen, rejected, VOCAB, rng or random.Random(0))


def _forward(batch, experts: int | None = None):
    """One ``forward_step`` call as megatron's schedule makes it: ``(model calls, loss_func)``."""
    model = _RecordingModel(experts)
    _, loss = make_forward_step(LossConfig(), HEAD, CPU)(iter([batch]), model)
    return model.calls, loss


def test_packed_row_reaches_the_model_as_thd():
    pairs = [_pair(2, 3, 1), _pair(0, 2, 4)]  # the second has no prompt: its first token is labelled
    batch = collate_packed_row(pair_columns(pairs), [0, 1], 16, pad_id=0, vocab_size=VOCAB)
    (call,), _ = _forward(batch)
    params = call["packed"]
    assert params.qkv_format == "thd" and params.seqlens == (5, 3, 2, 4, 2)  # c0 r0 c1 r1, tail
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 5, 8, 10, 14, 16]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == params.max_seqlen_kv == 5
    assert call["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]]
    ids = [t for side in ("chosen", "rejected") for p in pairs[:1] for t in p[f"{side}_input_ids"]]
    c1, r1 = pairs[1]["chosen_input_ids"], pairs[1]["rejected_input_ids"]
    # Targets shifted within each sequence; the last position of each predicts nothing (not the next's first).
    assert call["labels"].tolist() == [[-100, ids[2], ids[3], ids[4], -100, -100, ids[7], -100,
                                        c1[1], -100, r1[1], r1[2], r1[3], -100, -100, -100]]
    assert call["context"].token_index.tolist() == [1, 2, 3, 6, 8, 10, 11, 12]
    assert call["context"].labels_checked and not HEAD.labels_checked  # a per-call copy; the shared one unchanged


def test_padded_pairs_reach_the_model_with_their_targets_and_positions():
    pairs = [{"chosen_input_ids": [1, 3, 4, 5], "chosen_labels": [-100, 3, 4, 5],
              "rejected_input_ids": [1, 2, 9, 1], "rejected_labels": [-100, -100, 9, 1]}]
    batch = collate_pairs(pair_columns(pairs), [0], seq_len=4, pad_id=0, vocab_size=VOCAB)
    (call,), _ = _forward(batch)
    assert call["packed"] is None
    assert call["labels"].tolist() == [[3, 4, 5, -100], [-100, 9, 1, -100]]
    assert call["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert call["context"].labels_checked and call["context"].vocab_size == 10 and call["context"].chunk_tokens == 4
    # The labelled targets in the head's flat order (position t of sequence i at t * 2 + i): the head skips the rest.
    assert call["context"].token_index.tolist() == [0, 2, 3, 4, 5]


def test_padding_reaches_a_mixture_of_experts_as_its_padding_mask():
    """megatron's ``padding_mask`` (True = no token of a sequence: the routers leave those positions out of the
    load-balancing loss and the expert counts) for padded pairs and a packed row's tail; a dense model gets none."""
    pairs = [{"chosen_input_ids": [1, 3, 4], "chosen_labels": [-100, 3, 4],
              "rejected_input_ids": [1, 2, 9, 1, 5], "rejected_labels": [-100, -100, 9, 1, 5]}]
    padded = collate_pairs(pair_columns(pairs), [0], seq_len=6, pad_id=0, vocab_size=VOCAB)
    packed = collate_packed_row(pair_columns(pairs), [0], 10, pad_id=0, vocab_size=VOCAB)
    (call,), _ = _forward(padded, experts=4)
    assert call["padding"].tolist() == [[False] * 3 + [True] * 3, [False] * 5 + [True]]
    (call,), _ = _forward(packed, experts=4)
    assert call["padding"].tolist() == [[False] * 8 + [True] * 2]
    (call,), _ = _forward(packed)
    assert call["padding"] is None


def test_moving_a_micro_batch_moves_its_tensors_once_and_keeps_its_counts():
    pairs = [_pair(2, 3, 1), _pair(0, 2, 4)]
    for batch in (collate_pairs(pair_columns(pairs), [4, 5], 8, 0, VOCAB),
                  collate_packed_row(pair_columns(pairs), [4, 5], 16, 0, VOCAB)):
        moved = batch.to(torch.device("meta"))
        tensors = [v for v in vars(moved).values() if isinstance(v, torch.Tensor)]
        assert len(tensors) >= 6 and all(t.is_meta for t in tensors)
        assert (moved.targets is moved.sequence_targets) == (not batch.packed)  # padded: one tensor, copied once
        assert (moved.tokens_real, moved.chosen_tokens, moved.seqlens) == (batch.tokens_real, batch.chosen_tokens,
                                                                           batch.seqlens)
        assert moved.num_pairs == 2 and moved.tokens_computed == batch.tokens_computed


def test_report_fields_are_the_loss_funcs_sums():
    """A micro-batch of two identical pairs (chosen == rejected) whose token log-probs are all -1: every reward
    is -beta x 1, so margins and accuracies are 0 and the loss is softplus(beta x gamma_beta_ratio) per pair."""
    pair = {"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3],
            "rejected_input_ids": [1, 2, 3], "rejected_labels": [-100, 2, 3]}
    batch = collate_pairs(pair_columns([pair, pair]), [0, 1], 4, 0, VOCAB)
    cfg = LossConfig(beta=2.0, gamma_beta_ratio=0.5)
    _, out = loss_func(cfg, None, batch, torch.where(batch.targets != -100, -1.0, 0.0))
    report = dict(zip(REPORT_FIELDS, out["report"].tolist()))
    assert report["pairs"] == 2 and report["tokens_real"] == 12 and report["tokens_computed"] == 16
    assert report["response_tokens"] == 8 and report["sft_tokens"] == 4 and report["sft_nll_sum"] == 4.0
    assert report["rewards_chosen_sum"] == report["rewards_rejected_sum"] == -4.0
    assert report["margins_sum"] == report["accuracies_sum"] == 0.0
    assert report["loss_sum"] == pytest.approx(2 * F.softplus(torch.tensor(2.0 * 0.5)).item())


LOSS = LossConfig(type="simpo", beta=2.5, gamma_beta_ratio=0.4, label_smoothing=0.1, sft_weight=0.3)


def test_loss_is_the_global_mean_whatever_the_batching():
    """Six pairs with leaf token log-probs. Reference, written plainly: the mean over the six pairs of SimPO's
    sigmoid loss with label smoothing on average log-probs, plus sft_weight x the mean NLL over every chosen
    response token. simpo_mcore's ``loss_func`` over three batchings of the same step, each run as megatron
    runs it (each micro-batch's loss divided by its rank's micro-batch count; gradients summed over micro-batches
    and averaged over the data-parallel ranks): one rank with one packed row of all six pairs; two ranks, one
    with packed rows of one and two pairs, the other with one padded micro-batch of three; and three ranks with
    padded micro-batches of one pair and one row of two. The loss and every leaf gradient match the reference."""
    rng = random.Random(3)
    pairs = [_pair(rng.randint(0, 4), rng.randint(2, 6), rng.randint(2, 6), rng=rng) for _ in range(6)]
    generator = torch.Generator().manual_seed(0)
    # One leaf per sequence: the log-probs of its labelled targets (its labels after the first position).
    # fp32, as the head gives them; the reference adds them up in fp64.
    leaves = {(i, side): (-3 * torch.rand(sum(x != -100 for x in p[f"{side}_labels"][1:]), generator=generator)
                          ).requires_grad_()
              for i, p in enumerate(pairs) for side in ("chosen", "rejected")}

    def reference():
        avg = {key: leaf.double().mean() for key, leaf in leaves.items()}
        z = LOSS.beta * torch.stack([avg[i, "chosen"] - avg[i, "rejected"] - LOSS.gamma_beta_ratio for i in range(6)])
        pref = (-F.logsigmoid(z) * (1 - LOSS.label_smoothing) - F.logsigmoid(-z) * LOSS.label_smoothing).mean()
        chosen = torch.cat([leaves[i, "chosen"] for i in range(6)]).double()
        return pref + LOSS.sft_weight * -chosen.mean(), chosen.numel()

    ref_loss, chosen_tokens = reference()
    ref_grads = torch.autograd.grad(ref_loss, list(leaves.values()))

    def micro_batch(index: list[int], packed: bool):
        cols = pair_columns([pairs[i] for i in index])
        batch = (collate_packed_row(cols, index, 96, pad_id=0, vocab_size=VOCAB) if packed
                 else collate_pairs(cols, index, seq_len=12, pad_id=0, vocab_size=VOCAB))
        targets = batch.targets  # [b, s]: what the head computes a log-prob for
        flat_positions = torch.nonzero(targets.reshape(-1) != -100).squeeze(1)
        # The head's order: sequence by sequence, chosen rows first when padded, row order when packed.
        order = ([(i, side) for i in index for side in ("chosen", "rejected")] if packed else
                 [(i, side) for side in ("chosen", "rejected") for i in index])
        values = torch.cat([leaves[key] for key in order])
        token_logps = torch.zeros(targets.numel()).index_put((flat_positions,), values).view(targets.shape)
        return batch, token_logps

    batchings = {
        "one row": [[([0, 1, 2, 3, 4, 5], True)]],
        "two ranks": [[([4], True), ([0, 2], True)], [([1, 3, 5], False)]],
        "three ranks": [[([3], False), ([1], False)], [([0, 5], True)], [([2], False), ([4], False)]],
    }
    for name, ranks in batchings.items():
        total = 0.0
        for micro_batches in ranks:
            scale = LossScale(num_microbatches=len(micro_batches), dp=len(ranks), global_pairs=6,
                              global_chosen_tokens=chosen_tokens)
            for index, packed in micro_batches:
                batch, token_logps = micro_batch(index, packed)
                loss, _ = loss_func(LOSS, scale, batch, token_logps)
                total = total + loss / len(micro_batches)  # the schedule's division
        total = total / len(ranks)  # DDP's average over data-parallel ranks
        grads = torch.autograd.grad(total, list(leaves.values()))
        # fp32 rounding only: a wrong normaliser (a mean of micro-batch means, a count of micro-batches
        # instead of pairs) moves the loss by percents here.
        assert total.item() == pytest.approx(ref_loss.item(), rel=1e-6), name
        for got, want in zip(grads, ref_grads):
            assert torch.allclose(got, want, atol=1e-8, rtol=1e-5), name
