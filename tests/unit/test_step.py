"""``simpo_mcore.step``: the labels are checked once, on the host, before the batch goes to the device, and
the head is told so (its own check would be a device sync in mid-step); a packed row reaches the model as
megatron's THD ``PackedSeqParams``; and the loss of any batching of a step (padded micro-batches, packed rows
of any number of pairs, any number of micro-batches per rank) is the global batch's mean."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from simpo_mcore.config import LossConfig
from simpo_mcore.data.batching import collate_pairs
from simpo_mcore.data.packing import collate_packed_row
from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.step import LossScale, SequenceTargets, loss_func, token_logps_forward

HEAD = TokenLogpsContext(vocab_size=10, chunk_tokens=4)


class _RecordingModel:
    def __init__(self):
        self.calls = []

    def __call__(self, tokens, position_ids, attention_mask, labels, output_processor, output_processor_context,
                 packed_seq_params=None):
        self.calls.append(dict(tokens=tokens, position_ids=position_ids, labels=labels,
                               context=output_processor_context, packed=packed_seq_params))
        return torch.zeros(labels.shape)


def _batch(labels):
    labels = torch.tensor(labels)
    return {"tokens": labels.clamp(min=0), "labels": labels}


def _pair(prompt: int, chosen: int, rejected: int, vocab: int = 10, rng=None) -> dict:
    rng = rng or random.Random(0)
    out = {}
    for side, n in (("chosen", chosen), ("rejected", rejected)):
        ids = [rng.randrange(vocab) for _ in range(prompt + n)]
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, [-100] * prompt + ids[prompt:]
    return out


def _columns(pairs):
    return {name: [p[name] for p in pairs] for name in pairs[0]}


def test_packed_row_reaches_the_model_as_thd():
    pairs = [_pair(2, 3, 1), _pair(0, 2, 4)]  # the second has no prompt: its first token is labelled
    batch = collate_packed_row(_columns(pairs), [0, 1], 16, pad_id=0)
    model = _RecordingModel()
    _, targets = token_logps_forward(model, batch, HEAD, torch.device("cpu"))
    (call,) = model.calls
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
    # Per sequence, the same targets as the padded collation of the same pairs.
    padded = collate_pairs(_columns(pairs), [0, 1], seq_len=5, pad_id=0)
    model_padded = _RecordingModel()
    _, padded_targets = token_logps_forward(model_padded, padded, HEAD, torch.device("cpu"))
    assert torch.equal(targets.labels, padded_targets.labels)
    assert targets.sequence_index.tolist() == [[0, 1, 2, 3, 4], [8, 9, 16, 16, 16],
                                               [5, 6, 7, 16, 16], [10, 11, 12, 13, 16]]


def test_packed_sequence_without_a_label_stops_the_step():
    pairs = [_pair(2, 3, 1), _pair(0, 2, 4)]
    pairs[0]["rejected_labels"] = [-100] * 3  # nothing to average
    batch = collate_packed_row(_columns(pairs), [0, 1], 16, pad_id=0)
    model = _RecordingModel()
    with pytest.raises(ValueError, match=r"sequences \[2\] have no token with a label"):
        token_logps_forward(model, batch, HEAD, torch.device("cpu"))
    assert model.calls == []


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
    pairs = [_pair(rng.randint(0, 4), rng.randint(1, 6), rng.randint(1, 6), rng=rng) for _ in range(6)]
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
        cols = _columns([pairs[i] for i in index])
        if packed:
            batch = collate_packed_row(cols, index, 96, pad_id=0)
        else:
            batch = collate_pairs(cols, index, seq_len=12, pad_id=0)
        model = _RecordingModel()
        _, targets = token_logps_forward(model, batch, TokenLogpsContext(vocab_size=10), torch.device("cpu"))
        row_targets = model.calls[0]["labels"]  # [b, s]: what the head computes a log-prob for
        token_logps = torch.zeros(row_targets.shape)
        flat_positions = torch.nonzero(row_targets.reshape(-1) != -100).squeeze(1).tolist()
        # The head's order: sequence by sequence, chosen rows first when padded, row order when packed.
        order = ([(i, side) for i in index for side in ("chosen", "rejected")] if packed else
                 [(i, side) for side in ("chosen", "rejected") for i in index])
        values = torch.cat([leaves[key] for key in order])
        token_logps = token_logps.reshape(-1).index_put((torch.tensor(flat_positions),), values).view(row_targets.shape)
        return targets, (batch["tokens_real"], batch["tokens"].numel()), token_logps

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
                targets, sizes, token_logps = micro_batch(index, packed)
                loss, _ = loss_func(LOSS, scale, SequenceTargets(targets.labels, targets.sequence_index), None, sizes,
                                    token_logps)
                total = total + loss / len(micro_batches)  # the schedule's division
        total = total / len(ranks)  # DDP's average over data-parallel ranks
        grads = torch.autograd.grad(total, list(leaves.values()))
        # fp32 rounding only: a wrong normaliser (a mean of micro-batch means, a count of micro-batches
        # instead of pairs) moves the loss by percents here.
        assert total.item() == pytest.approx(ref_loss.item(), rel=1e-6), name
        for got, want in zip(grads, ref_grads):
            assert torch.allclose(got, want, atol=1e-8, rtol=1e-5), name


def test_checked_labels_reach_the_head_shifted():
    model = _RecordingModel()
    _, targets = token_logps_forward(model, _batch([[-100, 3, 4, 5], [-100, -100, 9, 1]]), HEAD, torch.device("cpu"))
    labels = targets.labels
    assert targets.sequence_index is None
    (call,) = model.calls
    assert call["packed"] is None
    assert call["context"].labels_checked and not HEAD.labels_checked  # a per-call copy; the shared one unchanged
    assert call["context"].vocab_size == 10 and call["context"].chunk_tokens == 4
    assert labels.tolist() == [[3, 4, 5, -100], [-100, 9, 1, -100]] and call["labels"] is labels
    assert call["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    # The labelled tokens in the head's flat order (position t of sequence i at t * 2 + i): the head skips the rest.
    assert call["context"].token_index.tolist() == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("labels, message", [
    ([[-100, 3, 10, 5], [-100, -100, 9, 1]], r"labels must be -100 or in \[0, 10\); found \[10\]"),
    # Only the first position is labelled, and it is no token's target once shifted.
    ([[-100, 3, 4, 5], [7, -100, -100, -100]], r"sequences \[1\] have no token with a label"),
])
def test_bad_labels_stop_the_step_before_the_model(labels, message):
    model = _RecordingModel()
    with pytest.raises(ValueError, match=message):
        token_logps_forward(model, _batch(labels), HEAD, torch.device("cpu"))
    assert model.calls == []
