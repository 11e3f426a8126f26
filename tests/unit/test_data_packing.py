"""Packed micro-batches: which pairs share a row, what a row holds, and what a step gives each rank.

Checked against what is written out here: every pair exactly once, whole (chosen and rejected in one row),
no row over its capacity, ranks with equal row counts, a row that reads back as the unpacked collation of the
same pairs, targets that never reach across a sequence boundary, and steps that are recomputed identically with
the step's normalisers known on every rank without a collective.
"""

from __future__ import annotations

import math
import random

import datasets
import pytest
import torch
from helpers import make_pair, pair_columns

from simpo_mcore.config import DataConfig, TrainConfig
from simpo_mcore.data.collate import shift_labels
from simpo_mcore.data.packing import (
    collate_packed_row,
    pack_rows,
    packed_micro_batches,
    packed_padding,
    shift_packed_labels,
)
from simpo_mcore.data.padded import collate_pairs
from simpo_mcore.data.pipeline import BatchLayout, TokenizedSplit, TrainBatches

M, PAD = -100, 0
VOCAB = 100_000  # make_pair's ids stay below it


def test_pack_rows_keeps_every_item_once_within_capacity_and_balanced():
    rng = random.Random(0)
    sizes = [rng.randint(20, 400) for _ in range(61)]
    for groups, capacity, multiple in ((1, 1000, 1), (4, 1000, 1), (4, 800, 2), (3, 4096, 1)):
        ranks = pack_rows(sizes, capacity, groups, multiple)
        assert len(ranks) == groups and len({len(rows) for rows in ranks}) == 1  # every group the same count
        n = len(ranks[0])
        assert n % multiple == 0
        rows = [row for rank in ranks for row in rank]
        assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
        fills = [sum(sizes[i] for i in row) for row in rows]
        assert max(fills) <= capacity
        # Longest first into the least-filled row: the rows end within one item of each other.
        assert max(fills) - min(fills) <= max(sizes)
        # The fewest rows per group: one row fewer (in steps of `multiple`) cannot hold the total.
        fewest = math.ceil(sum(sizes) / (groups * capacity))
        assert n == -(-fewest // multiple) * multiple, (groups, capacity, n, fewest)
        assert all(row == sorted(row) for row in rows)
    assert pack_rows(sizes, 1000, 4) == pack_rows(list(sizes), 1000, 4)  # a function of the sizes only


def test_pack_rows_adds_rows_when_the_fewest_do_not_fit():
    # 3 x 60 tokens fit 2 rows of 100 by count (180 <= 200) but not by items: 3 rows.
    assert pack_rows([60, 60, 60], 100) == [[[0], [1], [2]]]
    # Fewer items than the rows a multiple asks for: the extra rows are empty.
    assert pack_rows([10], 100, groups=1, multiple_of=2) == [[[0], []]]
    with pytest.raises(ValueError, match=r"pair 1 of the batch has 101 tokens, more than the 100 of a packed row"):
        pack_rows([10, 101], 100)


def test_packed_row_reads_back_as_the_unpacked_collation():
    pairs = [make_pair(0, 2, 3, 1), make_pair(1, 3, 2, 4), make_pair(2, 0, 5, 2)]
    row = collate_packed_row(pair_columns(pairs), [7, 3, 9], 48, PAD, VOCAB)
    lengths = [5, 3, 5, 7, 5, 2]  # c0 r0 c1 r1 c2 r2
    assert row.tokens.shape == row.targets.shape == row.position_ids.shape == (1, 48)
    assert row.cu_seqlens.dtype == torch.int32
    assert row.cu_seqlens.tolist() == [0, 5, 8, 13, 20, 25, 27, 48]  # the tail is a segment of its own
    assert row.seqlens == (5, 3, 5, 7, 5, 2, 21) and row.tokens_real == 27 and row.tokens_computed == 48
    assert row.position_ids[0].tolist() == [t for n in lengths + [21] for t in range(n)]
    assert row.tokens[0, 27:].eq(PAD).all() and row.targets[0, 26:].eq(M).all()
    assert row.row_index.tolist() == [7, 3, 9] and row.num_pairs == 3 and row.packed
    assert row.chosen_tokens == (3 - 1 + 1) + 2 + (5 - 1)  # labelled chosen tokens after the first position
    # The sequence index lays the row out as collate_pairs lays the same pairs out (chosen rows first), and the
    # targets per sequence are the unpacked rows' targets.
    unpacked = collate_pairs(pair_columns(pairs), [7, 3, 9], seq_len=7, pad_id=PAD, vocab_size=VOCAB)
    index = row.sequence_index
    assert index.shape == (6, 7)
    flat_tokens = torch.cat([row.tokens[0], torch.tensor([PAD])])
    assert torch.equal(flat_tokens[index], unpacked.tokens)
    assert torch.equal(row.sequence_targets, unpacked.targets)
    with pytest.raises(ValueError, match=r"indices \[7, 3, 9\] hold 27 tokens, more than the row's 26"):
        collate_packed_row(pair_columns(pairs), [7, 3, 9], 26, PAD, VOCAB)


def test_packed_row_gives_the_head_its_labelled_positions_in_row_order():
    pairs = [make_pair(0, 2, 3, 1), make_pair(1, 0, 2, 2)]
    row = collate_packed_row(pair_columns(pairs), [0, 1], 16, PAD, VOCAB)
    # c0 (5 tokens, 3 targets) r0 (3, 1) c1 (2, no prompt: the second is a target) r1 (the same).
    assert row.token_index.tolist() == [1, 2, 3, 6, 8, 10]
    assert row.targets[0, row.token_index].tolist() == [3, 4, 5, 103, 1002, 1102]


def test_packed_sequence_without_a_target_is_refused_at_collation():
    pairs = [make_pair(0, 2, 3, 1), make_pair(1, 0, 2, 4)]
    pairs[0]["rejected_labels"] = [M] * 3  # nothing to average
    with pytest.raises(ValueError, match=r"dataset indices \[5, 6\]: sequences \[2\] have no token with a label"):
        collate_packed_row(pair_columns(pairs), [5, 6], 16, PAD, VOCAB)


def test_last_token_of_a_sequence_never_predicts_the_next_sequence():
    """Two sequences with no prompt (every token labelled, as a tokenizer without BOS can give): the plain
    shift would make token 2 (the end of sequence 0) predict token 3 (the start of sequence 1)."""
    labels = torch.tensor([[11, 12, 13, 21, 22, M, M, M]])
    cu_seqlens = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    assert shift_labels(labels)[0, 2].item() == 21
    assert shift_packed_labels(labels, cu_seqlens).tolist() == [[12, 13, M, 22, M, M, M, M]]


@pytest.fixture
def split():
    rng = random.Random(1)
    # Responses of 2 tokens or more: with no prompt, a 1-token response has no target (collation refuses it).
    pairs = [make_pair(i, rng.randint(0, 6), rng.randint(2, 12), rng.randint(2, 12)) for i in range(40)]
    return TokenizedSplit(datasets.Dataset.from_list(pairs), report=None)


def test_train_batches_packed_steps(split):
    """At DP 1 and 2 (and PP 2 x VPP: rows a multiple of 2): every pair of the global batch once, on the
    rank holding its rows, whole, in rows no longer than pack_tokens and rounded to the multiple; every rank
    the same number of micro-batches; the same step recomputed gives the same tensors (resume)."""
    cfg = TrainConfig(global_batch_pairs=16, micro_batch_pairs=3, seed=5)
    for dp, rows_multiple, same_shape in ((1, 1, False), (2, 1, False), (2, 2, True)):
        layout = BatchLayout(PAD, 16, pack_tokens=64, same_shape=same_shape, rows_multiple=rows_multiple,
                             vocab_size=VOCAB)
        ranks = [TrainBatches(cfg, split, layout, r, dp) for r in range(dp)]
        for step in range(2):
            seen, counts = [], set()
            for batches in ranks:
                micro = batches.step_batches(step * cfg.global_batch_pairs).micro_batches
                counts.add(len(micro))
                assert len(micro) % rows_multiple == 0
                lengths = {b.tokens.shape[1] for b in micro}
                assert all(n % 16 == 0 and n <= 64 for n in lengths) and (len(lengths) == 1 or not same_shape)
                for b in micro:
                    seen += b.row_index.tolist()
                    # Whole pairs: each pair's chosen and rejected sequences are in this row.
                    assert b.sequence_index.shape[0] == 2 * b.num_pairs
                    assert b.tokens_computed - b.tokens_real < 16 or same_shape
                again = batches.step_batches(step * cfg.global_batch_pairs).micro_batches
                assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.cu_seqlens, b.cu_seqlens)
                           for a, b in zip(micro, again))
            assert len(counts) == 1
            assert sorted(seen) == sorted(ranks[0].sampler.global_batch(step))


@pytest.mark.parametrize("packed", [True, False])
def test_every_rank_knows_the_step_totals_the_collective_would_give(split, packed):
    """The step's normalisers, computed on each rank from the sampler's global batch: its pairs and chosen
    response tokens equal the sums over every data-parallel rank's collated micro-batches (what an all-reduce of
    the ranks' own counts gives), and the micro-batch count is the rank's own."""
    cfg = TrainConfig(global_batch_pairs=16, micro_batch_pairs=2, seed=5)
    for dp in (1, 2, 4):
        layout = BatchLayout(PAD, 16, pack_tokens=64 if packed else None, vocab_size=VOCAB)
        steps = [TrainBatches(cfg, split, layout, r, dp).step_batches(16) for r in range(dp)]
        everything = [b for step in steps for b in step.micro_batches]
        for step in steps:
            assert step.scale.dp == dp and step.scale.num_microbatches == len(step.micro_batches)
            assert step.scale.global_pairs == sum(b.num_pairs for b in everything) == 16
            assert step.scale.global_chosen_tokens == sum(b.chosen_tokens for b in everything)
        # Counted by hand from the labels: every chosen label after the first position that is not -100.
        pairs = TrainBatches(cfg, split, layout, 0, dp).sampler.global_batch(1)
        by_hand = sum(sum(x != M for x in split.dataset[i]["chosen_labels"][1:]) for i in pairs)
        assert steps[0].scale.global_chosen_tokens == by_hand


def test_layout_from_config():
    layout = BatchLayout.for_run(DataConfig(), pad_id=3, tp=2, sequence_parallel=True, pp=2, vpp=2, vocab_size=50)
    assert layout == BatchLayout(3, 16, 8192, same_shape=True, rows_multiple=2, vocab_size=50)
    layout = BatchLayout.for_run(DataConfig(packing=False), pad_id=3, tp=1, sequence_parallel=False, pp=1, vpp=None)
    assert layout == BatchLayout(3, 16, None, same_shape=False, rows_multiple=1)


def test_packed_padding_is_what_the_collation_allocates(split):
    ds = split.dataset
    lengths = [(len(c), len(r)) for c, r in zip(ds["chosen_input_ids"], ds["rejected_input_ids"])]
    batch = list(range(16))
    for dp, same_shape in ((1, False), (2, True)):
        real, slots = packed_padding([list(lengths[i]) for i in batch], 64, dp, 16, same_shape)
        assert real == sum(c + r for c, r in lengths[:16])
        sizes = [sum(lengths[i]) for i in batch]
        allocated = sum(b.tokens_computed for rank in pack_rows(sizes, 64, dp)
                        for b in packed_micro_batches(ds, rank, PAD, VOCAB, 16, same_shape))
        assert slots == allocated
