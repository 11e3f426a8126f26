"""Micro-batch layout: chosen rows then rejected rows, right padding, one S per step, extras."""

from __future__ import annotations

import datasets
import pytest
import torch

from simpo_mcore.data.batching import collate_pairs, pad_token_id, round_up, step_micro_batches

M, PAD = -100, 0


def make_pair(index: int, prompt_len: int, chosen_len: int, rejected_len: int) -> dict:
    """Ids encode (pair, side, position) so a misplaced token is visible: 1000*i + 100*side + t."""
    out = {}
    for side, (name, length) in enumerate((("chosen", chosen_len), ("rejected", rejected_len))):
        ids = [1000 * index + 100 * side + t + 1 for t in range(prompt_len + length)]
        out[f"{name}_input_ids"] = ids
        out[f"{name}_labels"] = [M] * prompt_len + ids[prompt_len:]
    return out


@pytest.fixture
def dataset():
    rows = [make_pair(0, 2, 3, 1), make_pair(1, 3, 2, 4), make_pair(2, 1, 9, 2), make_pair(3, 2, 2, 2)]
    for i, row in enumerate(rows):
        row["row_id"] = f"r{i}"
    return datasets.Dataset.from_list(rows)


def test_collate_layout_and_padding(dataset):
    rows = dataset[[1, 0]]
    batch = collate_pairs(rows, [1, 0], seq_len=8, pad_id=PAD)
    assert batch["tokens"].shape == batch["labels"].shape == (4, 8)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
    p1, p0 = make_pair(1, 3, 2, 4), make_pair(0, 2, 3, 1)
    order = [p1["chosen_input_ids"], p0["chosen_input_ids"], p1["rejected_input_ids"],
             p0["rejected_input_ids"]]
    for row, ids in enumerate(order):  # chosen of both pairs, then rejected: row i and i+k pair up
        assert batch["tokens"][row].tolist() == ids + [PAD] * (8 - len(ids))
    assert batch["labels"][0].tolist() == [M, M, M, 1004, 1005, M, M, M]
    assert batch["labels"][3].tolist() == [M, M, 103, M, M, M, M, M]
    assert batch["row_index"].tolist() == [1, 0]


def test_step_shares_one_length_rounded_up(dataset):
    # Pair 2 has a 10-token chosen sequence: every micro-batch of the step is padded to 16.
    batches = step_micro_batches(dataset, [[0, 1], [2, 3]], pad_id=PAD, pad_to_multiple_of=8)
    assert [b["tokens"].shape for b in batches] == [(4, 16), (4, 16)]
    assert batches[1]["tokens"][0, :10].tolist() == make_pair(2, 1, 9, 2)["chosen_input_ids"]
    assert batches[1]["tokens"][0, 10:].eq(PAD).all() and batches[1]["labels"][0, 10:].eq(M).all()
    # Without pair 2 the longest sequence has 7 tokens -> 8.
    assert step_micro_batches(dataset, [[0], [1], [3]], pad_id=PAD, pad_to_multiple_of=8)[0][
        "tokens"].shape == (2, 8)
    assert round_up(7, 8) == 8 and round_up(8, 8) == 8 and round_up(9, 8) == 16


def test_response_tokens_count_matches_labels(dataset):
    batch = step_micro_batches(dataset, [[0, 1, 2, 3]], pad_id=7)[0]
    counts = (batch["labels"] != M).sum(-1).tolist()
    assert counts == [3, 2, 9, 2, 1, 4, 2, 2]
    assert batch["tokens"].shape[1] == 16
    assert (batch["tokens"][batch["labels"] == M] != 7).sum() == 2 + 3 + 1 + 2 + 2 + 3 + 1 + 2  # prompts


def test_extra_float_columns_ride_along(dataset):
    precise = [-1.1234567891, -2.5, -3.5, -4.1234567891]  # not representable in float32
    dataset = dataset.add_column("ref_chosen_sum_logps", precise)  # float64 column
    dataset = dataset.add_column("ref_rejected_sum_logps", [-10.0, -20.0, -30.0, -40.0],
                                 feature=datasets.Value("float32"))
    batch = step_micro_batches(dataset, [[3, 1]], pad_id=PAD)[0]
    assert batch["ref_chosen_sum_logps"].dtype == torch.float64  # no silent rounding
    assert batch["ref_chosen_sum_logps"].tolist() == [precise[3], precise[1]]
    assert batch["ref_rejected_sum_logps"].dtype == torch.float32
    assert batch["ref_rejected_sum_logps"].tolist() == [-40.0, -20.0]
    assert batch["row_index"].tolist() == [3, 1]
    assert "row_id" not in batch


def test_pad_id_falls_back_to_zero():
    class Tok:
        pad_token_id = None
    assert pad_token_id(Tok()) == 0
    Tok.pad_token_id = 5
    assert pad_token_id(Tok()) == 5
