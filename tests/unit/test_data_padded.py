"""Padded micro-batches: chosen rows then rejected rows, right padding, one S per step, targets shifted, ready
for the objective (positions, the head's labelled positions, counts, DPO's reference sums)."""

from __future__ import annotations

import datasets
import pytest
import torch
from helpers import make_pair

from simpo_mcore.data.collate import pad_token_id, round_up
from simpo_mcore.data.padded import collate_pairs, padded_micro_batches

M, PAD = -100, 0
VOCAB = 10_000  # make_pair's ids stay below it


@pytest.fixture
def dataset():
    rows = [make_pair(0, 2, 3, 1), make_pair(1, 3, 2, 4), make_pair(2, 1, 9, 2), make_pair(3, 2, 2, 2)]
    for i, row in enumerate(rows):
        row["row_id"] = f"r{i}"
    return datasets.Dataset.from_list(rows)


def test_chosen_rows_come_first_and_are_right_padded(dataset):
    batch = collate_pairs(dataset[[1, 0]], [1, 0], seq_len=8, pad_id=PAD, vocab_size=VOCAB)
    assert batch.tokens.shape == batch.targets.shape == batch.position_ids.shape == (4, 8)
    assert batch.tokens.dtype == batch.targets.dtype == torch.int64
    p1, p0 = make_pair(1, 3, 2, 4), make_pair(0, 2, 3, 1)
    order = [p1["chosen_input_ids"], p0["chosen_input_ids"], p1["rejected_input_ids"],
             p0["rejected_input_ids"]]
    for row, ids in enumerate(order):  # chosen of both pairs, then rejected: row i and i+k pair up
        assert batch.tokens[row].tolist() == ids + [PAD] * (8 - len(ids))
    assert batch.row_index.tolist() == [1, 0] and batch.num_pairs == 2
    assert batch.position_ids.tolist() == [list(range(8))] * 4
    assert not batch.packed and batch.sequence_index is None and batch.cu_seqlens is None


def test_targets_are_the_labels_shifted_left(dataset):
    """The logits at t predict the label at t + 1: pair 1's chosen row labels positions 3, 4 (ids 1004, 1005),
    so its targets are at 2, 3; the last position of a sequence predicts nothing."""
    batch = collate_pairs(dataset[[1, 0]], [1, 0], seq_len=8, pad_id=PAD, vocab_size=VOCAB)
    assert batch.targets[0].tolist() == [M, M, 1004, 1005, M, M, M, M]
    assert batch.targets[3].tolist() == [M, 103, M, M, M, M, M, M]
    assert batch.sequence_targets is batch.targets  # padded pairs are laid out per sequence already
    # The head's labelled positions, in its flat order (position t of row i at t * 4 + i).
    assert batch.token_index.tolist() == [(t * 4 + i) for t in range(8) for i in range(4)
                                          if batch.targets[i, t] != M]


def test_counts_real_computed_and_chosen_tokens(dataset):
    batch = padded_micro_batches(dataset, [[0, 1, 2, 3]], pad_id=7, vocab_size=VOCAB)[0]
    assert batch.tokens.shape == (8, 16)
    assert (batch.targets != M).sum(-1).tolist() == [3, 2, 9, 2, 1, 4, 2, 2]
    assert batch.tokens_real == 5 + 5 + 10 + 4 + 3 + 7 + 3 + 4 and batch.tokens_computed == 8 * 16
    assert batch.chosen_tokens == 3 + 2 + 9 + 2


def test_step_shares_one_length_rounded_up(dataset):
    # Pair 2 has a 10-token chosen sequence: every micro-batch of the step is padded to 16.
    batches = padded_micro_batches(dataset, [[0, 1], [2, 3]], pad_id=PAD, vocab_size=VOCAB, pad_to_multiple_of=8)
    assert [b.tokens.shape for b in batches] == [(4, 16), (4, 16)]
    assert batches[1].tokens[0, :10].tolist() == make_pair(2, 1, 9, 2)["chosen_input_ids"]
    assert batches[1].tokens[0, 10:].eq(PAD).all() and batches[1].targets[0, 9:].eq(M).all()
    # Without pair 2 the longest sequence has 7 tokens -> 8.
    assert padded_micro_batches(dataset, [[0], [1], [3]], pad_id=PAD, vocab_size=VOCAB,
                                pad_to_multiple_of=8)[0].tokens.shape == (2, 8)
    assert round_up(7, 8) == 8 and round_up(8, 8) == 8 and round_up(9, 8) == 16


def test_each_micro_batch_its_own_length_without_same_shape(dataset):
    batches = padded_micro_batches(dataset, [[0, 1], [2, 3]], pad_id=PAD, vocab_size=VOCAB, pad_to_multiple_of=8,
                                   same_shape=False)
    assert [b.tokens.shape for b in batches] == [(4, 8), (4, 16)]


def test_reference_sums_keep_their_float64_bits(dataset):
    precise = [-1.1234567891, -2.5, -3.5, -4.1234567891]  # not representable in float32
    dataset = dataset.add_column("ref_chosen_sum_logps", precise)  # float64 column
    dataset = dataset.add_column("ref_rejected_sum_logps", [-10.0, -20.0, -30.0, -40.0])
    batch = padded_micro_batches(dataset, [[3, 1]], pad_id=PAD, vocab_size=VOCAB)[0]
    assert batch.ref_sum_logps.dtype == torch.float64  # no silent rounding
    assert batch.ref_sum_logps.tolist() == [precise[3], precise[1], -40.0, -20.0]  # chosen first
    assert padded_micro_batches(dataset.remove_columns(["ref_chosen_sum_logps", "ref_rejected_sum_logps"]),
                                [[3, 1]], pad_id=PAD, vocab_size=VOCAB)[0].ref_sum_logps is None


@pytest.mark.parametrize("change, message", [
    (lambda p: p["chosen_labels"].__setitem__(-1, 50), r"dataset indices \[0\]: labels must be -100 or in "
                                                       r"\[0, 20\); found \[50\]"),
    # Only the first position is labelled, and it is no token's target once shifted.
    (lambda p: p.update(rejected_labels=[7, M, M]), r"dataset indices \[0\]: sequences \[1\] have no token with a "
                                                    r"label"),
])
def test_bad_targets_are_refused_at_collation_naming_the_pairs(change, message):
    pair = {"chosen_input_ids": [1, 2, 3], "chosen_labels": [M, 2, 3],
            "rejected_input_ids": [1, 4, 5], "rejected_labels": [M, 4, 5]}
    change(pair)
    with pytest.raises(ValueError, match=message):
        collate_pairs({k: [v] for k, v in pair.items()}, [0], seq_len=4, pad_id=PAD, vocab_size=20)


def test_pad_id_falls_back_to_zero():
    class Tok:
        pad_token_id = None
    assert pad_token_id(Tok()) == 0
    Tok.pad_token_id = 5
    assert pad_token_id(Tok()) == 5
