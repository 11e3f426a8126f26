"""Context parallelism in the micro-batch contract: the training's collation (``data.pipeline.collate`` with a
``BatchLayout`` of ``cp`` > 1) gives each context-parallel rank its share of the micro-batch, ready.

Checked against the whole micro-batch (collated without the split) and megatron's rules written out here: each
sequence's tokens, positions and targets, gathered over the ranks, are the whole sequence's, each once; the
counts and pair indices are the whole micro-batch's on every rank; the positions computed (``tokens_computed``)
are each sequence padded to 2 x cp (x tp under sequence parallelism), the row to a multiple of 16 x cp; the
targets are checked on the whole sequences, before the split (a rank may hold none of a sequence's); and packed
steps still fit ``pack_tokens`` with their padding.
"""

from __future__ import annotations

import math
import random

import datasets
import pytest
import torch
from helpers import make_pair

from simpo_mcore.config import DataConfig, TrainConfig
from simpo_mcore.data.packing import pack_rows, packed_micro_batches, packed_padding
from simpo_mcore.data.padded import padded_micro_batches
from simpo_mcore.data.pipeline import BatchLayout, TokenizedSplit, TrainBatches, collate
from simpo_mcore.microbatch import LABEL_PAD, labelled_positions

PAD = 0
VOCAB = 100_000  # make_pair's ids stay below it


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@pytest.fixture(scope="module")
def dataset() -> datasets.Dataset:
    rng = random.Random(2)
    # Responses of 2 tokens or more: with no prompt, a 1-token response has no target.
    return datasets.Dataset.from_list([make_pair(i, rng.randint(0, 6), rng.randint(2, 15), rng.randint(2, 15))
                                       for i in range(24)])


def layout(packed: bool, cp: int, rank: int = 0, tp: int = 1, sp: bool = False, pp: int = 1) -> BatchLayout:
    return BatchLayout.for_run(DataConfig(packing=packed, pack_tokens=256), PAD, tp, sp, pp, None, VOCAB, cp, rank)


def whole_sequences(batch) -> list[list[tuple[int, int, int]]]:
    """Per sequence (chosen first), its ``(position, token, target)`` of each real position of the collated
    micro-batch, from the whole (unsplit) one."""
    out = []
    for i in range(batch.sequence_targets.shape[0]):
        if batch.packed:
            index = batch.sequence_index[i][batch.sequence_index[i] < batch.tokens.shape[1]]  # [n]
            out.append([(j, int(batch.tokens[0, p]), int(batch.targets[0, p])) for j, p in enumerate(index)])
        else:
            n = int((batch.tokens[i] != PAD).sum())  # make_pair's ids are never the pad id
            out.append([(j, int(batch.tokens[i, j]), int(batch.targets[i, j])) for j in range(n)])
    return out


def local_sequences(batch) -> list[list[tuple[int, int, int]]]:
    """The same from one CP rank's micro-batch: its ``(position, token, target)`` of each sequence, through its
    local ``sequence_index`` (packed) or its rows (padded; the split padding left out)."""
    out = []
    for i in range(batch.sequence_targets.shape[0]):
        if batch.packed:
            index = batch.sequence_index[i][batch.sequence_index[i] < batch.tokens.shape[1]]
            out.append([(int(batch.position_ids[0, p]), int(batch.tokens[0, p]), int(batch.targets[0, p]))
                        for p in index])
        else:
            out.append([(int(batch.position_ids[i, p]), int(batch.tokens[i, p]), int(batch.targets[i, p]))
                        for p in range(batch.tokens.shape[1]) if batch.tokens[i, p] != PAD])
    return out


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("cp,tp,sp", [(2, 1, False), (4, 1, False), (2, 2, True)])
def test_each_rank_gets_its_share_of_the_whole_micro_batch(dataset, packed, cp, tp, sp):
    micro = [[0, 1, 2], [3, 4, 5, 6], [7]]
    split = 2 * cp * (tp if sp else 1)
    multiple = math.lcm(16 * cp, split)
    whole = (packed_micro_batches(dataset, micro, PAD, VOCAB, 1, same_shape=False) if packed
             else padded_micro_batches(dataset, micro, PAD, VOCAB, multiple, same_shape=False))
    ranks = [collate(dataset, micro, layout(packed, cp, r, tp, sp)) for r in range(cp)]
    for m, full in enumerate(whole):
        shares = [rank[m] for rank in ranks]
        if packed:  # each sequence padded to the split's multiple, the row to 16 x cp
            lengths = full.seqlens
            assert shares[0].padded_seqlens[:-1] == tuple(round_up(n, split) for n in lengths[:-1])
            computed = round_up(sum(round_up(n, split) for n in lengths), multiple)
        else:
            computed = full.tokens.numel()  # [2k, S], S already a multiple of 16 x cp and of the split
        for local in shares:
            assert local.cp == cp and local.tokens_computed == local.tokens.numel() * cp == computed
            assert local.tokens.shape[1] * cp in (computed, computed // local.tokens.shape[0])
            assert local.tokens.shape[1] % 16 == 0  # each rank's share: a multiple of the GEMMs' 16
            assert (local.tokens_real, local.chosen_tokens) == (full.tokens_real, full.chosen_tokens)
            assert torch.equal(local.row_index, full.row_index)
            assert torch.equal(local.token_index, labelled_positions(local.targets))
            for got, target_row in zip(local_sequences(local), local.sequence_targets):
                labelled = sorted(t for _, _, t in got if t != LABEL_PAD)
                assert labelled == sorted(target_row[target_row != LABEL_PAD].tolist())
        # Over the ranks, every real position of every sequence exactly once, with its token and target.
        for i, expected in enumerate(whole_sequences(full)):
            gathered = sorted(p for local in shares for p in local_sequences(local)[i])
            assert gathered == expected, (m, i)


def test_targets_are_checked_on_the_whole_sequence_before_the_split():
    """A chosen sequence whose only target sits at position 5: packed (padded to 8, chunks of 2) on CP rank 1,
    padded (to 32, chunks of 8) on rank 0; the other rank's share of it holds no target, and collation accepts it.
    A sequence with no target at all is refused by its dataset index on every rank, as without the split."""
    pair = make_pair(0, 6, 1, 3)  # chosen: 6 prompt positions, then 1 token: the target of position 5
    data = datasets.Dataset.from_list([pair])
    for packed, holder in ((True, 1), (False, 0)):
        shares = [collate(data, [[0]], layout(packed, 2, r))[0] for r in range(2)]
        counts = [int((share.sequence_targets[0] != LABEL_PAD).sum()) for share in shares]
        assert counts == [int(r == holder) for r in range(2)], (packed, counts)
    pair["chosen_labels"] = [LABEL_PAD] * 7
    data = datasets.Dataset.from_list([pair])
    for packed in (True, False):
        for r in range(2):
            with pytest.raises(ValueError, match=r"dataset indices \[0\]: sequences \[0\] have no token"):
                collate(data, [[0]], layout(packed, 2, r))


def test_layout_from_config_under_context_parallelism():
    got = BatchLayout.for_run(DataConfig(), pad_id=3, tp=2, sequence_parallel=True, pp=1, vpp=None, vocab_size=50,
                              cp=4, cp_rank=3)
    # Rows a multiple of lcm(16 x 4, 2 x 4 x 2); each sequence of a packed row split in multiples of 2 x 4 x 2.
    assert got == BatchLayout(3, 64, 8192, vocab_size=50, cp=4, cp_rank=3, split_multiple=16)
    assert got.pair_sizes([(5, 17), (16, 1)]) == [16 + 32, 16 + 16]
    assert BatchLayout.for_run(DataConfig(), 3, 2, True, 1, None).pair_sizes([(5, 17)]) == [22]


def test_packed_steps_fit_their_rows_with_the_split_padding(dataset):
    """Packed at CP 2 (rows of at most 64 positions, the padding for the split included): every pair of the
    step once, on both CP ranks alike, each rank's row at most 32 positions; the step's normalisers are those of
    CP 1 (the same pairs and chosen tokens), and ``packed_padding`` counts what the collation computes."""
    cfg = TrainConfig(global_batch_pairs=8, micro_batch_pairs=2, seed=5)
    split = TokenizedSplit(dataset, report=None)
    for dp in (1, 2):
        for step in range(2):
            plain = [TrainBatches(cfg, split, _packed(1, 0), r, dp).step_batches(8 * step) for r in range(dp)]
            seen = []
            for r in range(dp):
                shares = [TrainBatches(cfg, split, _packed(2, c), r, dp).step_batches(8 * step) for c in range(2)]
                assert shares[0].scale == shares[1].scale
                scale = shares[0].scale
                assert (scale.dp, scale.global_pairs, scale.global_chosen_tokens) == (
                    dp, plain[r].scale.global_pairs, plain[r].scale.global_chosen_tokens)
                for a, b in zip(shares[0].micro_batches, shares[1].micro_batches):
                    assert torch.equal(a.row_index, b.row_index) and a.tokens.shape == b.tokens.shape
                    assert a.tokens.shape[1] <= 32 and a.tokens_computed <= 64
                    seen += a.row_index.tolist()
            assert sorted(seen) == sorted(TrainBatches(cfg, split, _packed(2, 0), 0, dp).sampler.global_batch(step))
    lengths = list(zip(map(len, dataset["chosen_input_ids"]), map(len, dataset["rejected_input_ids"])))
    batch = list(range(8))
    rows_layout = _packed(2, 0)
    for dp in (1, 2):
        real, slots = packed_padding([list(lengths[i]) for i in batch], 64, dp, 32, False, split_multiple=4)
        assert real == sum(c + r for c, r in lengths[:8])
        rows = pack_rows(rows_layout.pair_sizes([lengths[i] for i in batch]), 64, dp)
        assert slots == sum(b.tokens_computed for rank in rows for b in collate(dataset, rank, rows_layout))


def _packed(cp: int, rank: int) -> BatchLayout:
    return BatchLayout.for_run(DataConfig(pack_tokens=64), PAD, 1, False, 1, None, VOCAB, cp, rank)
