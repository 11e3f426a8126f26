"""Tokenised pairs -> padded micro-batches (``data.packing: false``).

A micro-batch of k pairs is ``tokens [2k, S]`` (int64): rows 0..k-1 are the chosen sequences and rows k..2k-1 the
rejected ones, so rows i and i + k are one pair (as the reference concatenates them). Sequences are right-padded
with the pad id; the targets are the labels shifted left by one (the logits at t predict the label at t + 1),
``LABEL_PAD`` on the prompt, on padding and at each sequence's last position. S is a multiple of
``pad_to_multiple_of`` (sequence parallelism needs S % tp == 0; FP8 GEMMs want multiples of 16).

With pipeline parallelism all micro-batches of one schedule call share S (the stages exchange fixed shapes,
``same_shape``), so :func:`padded_micro_batches` pads them to the step's longest sequence; without, each
micro-batch is padded to its own longest. Packed rows are :mod:`simpo_mcore.data.packing`.
"""

from __future__ import annotations

from collections.abc import Iterable

import datasets
import torch

from simpo_mcore.data.collate import (
    PAD_TO_MULTIPLE_OF,
    read_pairs,
    ready_micro_batch,
    round_up,
    shift_labels,
    split_pairs,
)
from simpo_mcore.microbatch import LABEL_PAD, MicroBatch


def collate_pairs(rows: dict[str, list], row_index: list[int], seq_len: int, pad_id: int,
                  vocab_size: int) -> MicroBatch:
    """k pairs (``rows``: column -> k values) -> a ready micro-batch of ``[2k, seq_len]`` (see the module
    docstring), its targets checked against ``vocab_size``."""
    sequences = rows["chosen_input_ids"] + rows["rejected_input_ids"]
    labels = rows["chosen_labels"] + rows["rejected_labels"]
    tokens_out = torch.full((len(sequences), seq_len), pad_id, dtype=torch.int64)  # [2k, S]
    labels_out = torch.full((len(sequences), seq_len), LABEL_PAD, dtype=torch.int64)  # [2k, S]
    padding = torch.ones((len(sequences), seq_len), dtype=torch.bool)  # [2k, S]
    for i, (ids, labs) in enumerate(zip(sequences, labels)):
        if len(ids) > seq_len:
            raise ValueError(f"pair at dataset index {row_index[i % len(row_index)]} has a sequence "
                             f"of {len(ids)} tokens, longer than the batch length {seq_len}")
        tokens_out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        labels_out[i, :len(labs)] = torch.tensor(labs, dtype=torch.int64)
        padding[i, :len(ids)] = False
    targets = shift_labels(labels_out)  # [2k, S]
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(len(sequences), seq_len).contiguous()  # [2k, S]
    return ready_micro_batch(rows, row_index, vocab_size, tokens=tokens_out, position_ids=position_ids,
                             targets=targets, sequence_targets=targets, tokens_real=sum(map(len, sequences)),
                             padding_mask=padding)


def step_seq_len(lengths: Iterable[int], pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> int:
    """S of a step whose sequences have these lengths: the longest, rounded up."""
    return round_up(max(lengths), pad_to_multiple_of)


def step_padding(micro_batches: list[list[tuple[int, int]]],
                 pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, same_shape: bool = True) -> tuple[int, int]:
    """``(real tokens, token slots)`` of one rank's step laid out as :func:`padded_micro_batches`
    does: micro-batches of (chosen, rejected) sequence lengths, each ``[2k, S]``, S shared by the step's
    micro-batches or (``same_shape=False``) each micro-batch's own."""
    if not same_shape:
        real = slots = 0
        for micro in micro_batches:
            micro_real, micro_slots = step_padding([micro], pad_to_multiple_of)
            real, slots = real + micro_real, slots + micro_slots
        return real, slots
    lengths = [n for micro in micro_batches for pair in micro for n in pair]
    return sum(lengths), len(lengths) * step_seq_len(lengths, pad_to_multiple_of)


def padded_micro_batches(dataset: datasets.Dataset, micro_batches: list[list[int]], pad_id: int, vocab_size: int,
                         pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, seq_len: int | None = None,
                         same_shape: bool = True) -> list[MicroBatch]:
    """Collate one step's micro-batches (lists of dataset indices) to one shared S: the longest
    sequence of the step rounded up to ``pad_to_multiple_of``, or ``seq_len`` when given; with
    ``same_shape=False`` (no pipeline parallelism) each micro-batch to its own longest instead."""
    rows = read_pairs(dataset, [index for micro in micro_batches for index in micro])
    if seq_len is None and same_shape:
        seq_len = step_seq_len(map(len, rows["chosen_input_ids"] + rows["rejected_input_ids"]), pad_to_multiple_of)
    batches = []
    for micro, part in zip(micro_batches, split_pairs(rows, micro_batches)):
        length = seq_len or step_seq_len(map(len, part["chosen_input_ids"] + part["rejected_input_ids"]),
                                         pad_to_multiple_of)
        batches.append(collate_pairs(part, micro, length, pad_id, vocab_size))
    return batches
