"""Packed micro-batches: whole preference pairs laid end to end in rows, so that almost no position is padding.

Which pairs share a row (:func:`pack_rows`). A step's global batch of G pairs (the sampler's: the same at any
data-parallel size) is split into ``dp x n`` rows, longest pair first, each pair into the row that holds the
fewest tokens so far (ties: the lowest row); ``n`` is the fewest rows per rank whose fullest row holds at most
``pack_tokens`` tokens (a multiple of PP under the interleaved schedule). The rows come out nearly equal, so
data-parallel rank r takes rows ``r*n .. r*n + n - 1`` and every rank runs the same number of micro-batches
with nearly the same number of tokens. The split is a function of the step's pairs and lengths only:
deterministic, recomputed exactly on resume, and the same on every rank of a pipeline.

What a row is (:func:`collate_packed_row`, a :class:`~simpo_mcore.microbatch.MicroBatch`), ``k`` pairs::

    tokens, targets   [1, T]   chosen_0 rejected_0 chosen_1 rejected_1 ... chosen_{k-1} rejected_{k-1} [tail]
    position_ids      [1, T]   0..len-1 per sequence (RoPE restarts at every sequence)
    cu_seqlens        [m + 1]  int32 boundaries of the m segments: the 2k sequences, then the tail of padding
                               (a segment of its own, so that the segments cover the row)
    sequence_index    [2k, L]  position in the row of token j of sequence i, chosen 0..k-1 then rejected
                               0..k-1 (the unpacked order); T (one past the row) beyond a sequence's end
    sequence_targets  [2k, L]  the targets laid out per sequence through sequence_index

T is the fullest row of the rank's step rounded up to the pad multiple when the step's micro-batches must
share one shape (pipeline parallelism), else this row's own length rounded up: at most ``pack_tokens``.
The targets are shifted within each sequence (:func:`shift_packed_labels`): the last token of a sequence
never predicts the first of the next.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import datasets
import torch

from simpo_mcore.data.collate import read_pairs, ready_micro_batch, round_up, shift_labels, split_pairs
from simpo_mcore.microbatch import LABEL_PAD, MicroBatch


def pack_rows(sizes: Sequence[int], capacity: int, groups: int = 1, multiple_of: int = 1) -> list[list[list[int]]]:
    """``groups`` lists of ``n`` rows, each row the indices (ascending) of the ``sizes`` it holds, no row over
    ``capacity``: longest-processing-time first into ``groups x n`` rows, ``n`` the fewest that fit (a multiple
    of ``multiple_of``). A row is empty only when there are fewer items than rows."""
    if not sizes:
        return [[[] for _ in range(multiple_of)] for _ in range(groups)]
    too_long = [i for i, size in enumerate(sizes) if size > capacity]
    if too_long:
        raise ValueError(f"pair {too_long[0]} of the batch has {sizes[too_long[0]]} tokens, more than the "
                         f"{capacity} of a packed row (data.pack_tokens)")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    n = round_up(max(1, math.ceil(sum(sizes) / (groups * capacity))), multiple_of)
    while True:
        rows, fullest = _longest_first(order, sizes, groups * n)
        # Terminates: once groups x n >= len(sizes) every row holds at most one item, and every item fits.
        if fullest <= capacity:
            return [rows[g * n:(g + 1) * n] for g in range(groups)]
        n += multiple_of


def _longest_first(order: list[int], sizes: Sequence[int], num_rows: int) -> tuple[list[list[int]], int]:
    """Items in ``order`` each into the least-filled row (ties: the lowest); (rows, fullest row's size)."""
    heap = [(0, row) for row in range(num_rows)]  # (fill, row): a heap of that order is a valid heap already
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    for i in order:
        fill, row = heapq.heappop(heap)
        rows[row].append(i)
        heapq.heappush(heap, (fill + sizes[i], row))
    return [sorted(r) for r in rows], max(fill for fill, _ in heap)


def step_rows(pair_sizes: Sequence[int], capacity: int, dp: int, rows_multiple: int = 1) -> list[list[list[int]]]:
    """Per data-parallel rank, the rows of a step: lists of positions in the global batch (``pair_sizes`` are
    chosen + rejected tokens of each pair in the sampler's order)."""
    return pack_rows(pair_sizes, capacity, groups=dp, multiple_of=rows_multiple)


def pair_positions(lengths: Sequence[int], split_multiple: int = 1) -> int:
    """Positions a pair of (chosen, rejected) ``lengths`` takes in a packed row: under context parallelism each
    sequence padded to a multiple of ``split_multiple`` for the split (``context_parallel.cp_multiple``)."""
    return sum(round_up(n, split_multiple) for n in lengths)


def row_length(fills: Sequence[int], multiple: int) -> int:
    """Positions of a row holding ``fills`` tokens at most: rounded up to ``multiple`` (at least one multiple)."""
    return round_up(max(1, max(fills, default=0)), multiple)


def collate_packed_row(rows: dict[str, list], row_index: list[int], length: int, pad_id: int,
                       vocab_size: int) -> MicroBatch:
    """k pairs (``rows``: column -> k values, as :func:`padded.collate_pairs` takes them) -> one ready packed row
    of ``length`` positions (see the module docstring), its targets checked against ``vocab_size``."""
    k = len(row_index)
    sequences = [(side, j) for j in range(k) for side in ("chosen", "rejected")]
    lengths = [len(rows[f"{side}_input_ids"][j]) for side, j in sequences]
    used = sum(lengths)
    if used > length:
        raise ValueError(f"pairs at dataset indices {row_index} hold {used} tokens, more than the row's {length}")
    tokens = torch.full((1, length), pad_id, dtype=torch.int64)  # [1, T]
    labels = torch.full((1, length), LABEL_PAD, dtype=torch.int64)  # [1, T]
    sequence_index = torch.full((2 * k, max(lengths, default=1)), length, dtype=torch.int64)  # [2k, L]
    start = 0
    for (side, j), n in zip(sequences, lengths):
        tokens[0, start:start + n] = torch.tensor(rows[f"{side}_input_ids"][j], dtype=torch.int64)
        labels[0, start:start + n] = torch.tensor(rows[f"{side}_labels"][j], dtype=torch.int64)
        sequence_index[j if side == "chosen" else k + j, :n] = torch.arange(start, start + n)
        start += n
    segments = lengths + ([length - used] if used < length else [])  # the tail: a segment of its own
    cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32)  # [m + 1]
    cu_seqlens[1:] = torch.tensor(segments).cumsum(0)
    position_ids = torch.cat([torch.arange(n) for n in segments]).unsqueeze(0)  # [1, T]
    targets = shift_packed_labels(labels, cu_seqlens)  # [1, T]
    padding = (torch.arange(length) >= used).unsqueeze(0)  # [1, T]: the tail
    return ready_micro_batch(rows, row_index, vocab_size, tokens=tokens, position_ids=position_ids, targets=targets,
                             sequence_targets=per_sequence(targets, sequence_index), tokens_real=used,
                             padding_mask=padding, sequence_index=sequence_index, cu_seqlens=cu_seqlens)


def packed_micro_batches(dataset: datasets.Dataset, rows: list[list[int]], pad_id: int, vocab_size: int,
                         multiple: int, same_shape: bool) -> list[MicroBatch]:
    """Collate rows (lists of dataset indices) into packed micro-batches, each of its own length rounded up to
    ``multiple``, or (``same_shape``) all of the longest one's."""
    data = read_pairs(dataset, [index for row in rows for index in row])
    parts = list(split_pairs(data, rows))
    fills = [sum(map(len, part["chosen_input_ids"] + part["rejected_input_ids"])) for part in parts]
    shared = row_length(fills, multiple)
    return [collate_packed_row(part, row, shared if same_shape else row_length([fill], multiple), pad_id, vocab_size)
            for row, part, fill in zip(rows, parts, fills)]


def shift_packed_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[1, T]`` labels of a packed row -> the targets of the logits at each position: as
    :func:`collate.shift_labels`, and ``LABEL_PAD`` at the last position of every sequence, whose next token
    belongs to the next sequence (in an unpacked row that position's target is padding or nothing)."""
    targets = shift_labels(labels)  # [1, T]
    targets[0, cu_seqlens[1:].long() - 1] = LABEL_PAD
    return targets


def per_sequence(targets: torch.Tensor, sequence_index: torch.Tensor) -> torch.Tensor:
    """``[2k, L]`` per-sequence targets from a packed row's ``[1, T]`` targets: the unpacked layout's rows
    (``LABEL_PAD`` beyond each sequence's end)."""
    padded = torch.cat([targets.reshape(-1), targets.new_full((1,), LABEL_PAD)])  # [T + 1]: T -> LABEL_PAD
    return padded[sequence_index]  # [2k, L]


def packed_padding(pair_sizes: list[list[int]], capacity: int, dp: int, multiple: int, same_shape: bool,
                   rows_multiple: int = 1, split_multiple: int = 1) -> tuple[int, int]:
    """``(real tokens, positions computed)`` of one global batch packed as :func:`step_rows` and
    :func:`collate_packed_row` do: ``pair_sizes`` are its pairs' ``[chosen, rejected]`` lengths. Under context
    parallelism (``split_multiple`` > 1) each sequence is padded to a multiple of it for the split, as
    ``pipeline.BatchLayout.pair_sizes`` packs them."""
    real = sum(sum(pair) for pair in pair_sizes)
    sizes = [pair_positions(pair, split_multiple) for pair in pair_sizes]
    slots = 0
    for rank_rows in step_rows(sizes, capacity, dp, rows_multiple):
        fills = [sum(sizes[i] for i in row) for row in rank_rows]
        slots += len(fills) * row_length(fills, multiple) if same_shape else \
            sum(row_length([f], multiple) for f in fills)
    return real, slots
