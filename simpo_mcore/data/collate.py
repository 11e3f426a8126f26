"""What both micro-batch layouts (padded pairs: :mod:`~simpo_mcore.data.padded`; packed rows:
:mod:`~simpo_mcore.data.packing`) share: reading the pairs' columns, their lengths and counts, the shift of labels
to targets, and the last step of collation, :func:`ready_micro_batch`, which checks the targets once on the host
and completes the :class:`~simpo_mcore.microbatch.MicroBatch` the objective receives.
"""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from simpo_mcore.data.preference import PAIR_COLUMNS
from simpo_mcore.microbatch import LABEL_PAD, MicroBatch, check_targets, labelled_positions

PAD_TO_MULTIPLE_OF = 16
"""Sequence lengths (padded) and row lengths (packed) are a multiple of this: FP8 GEMMs want multiples of 16,
and sequence parallelism a multiple of TP (``pipeline.pad_multiple``)."""

REF_COLUMNS = ("ref_chosen_sum_logps", "ref_rejected_sum_logps")
"""DPO's per-pair reference log-probs (``reference.attach_reference_logps`` adds them), collated into
``MicroBatch.ref_sum_logps``."""


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else 0 (padding never carries a label, so its value is free)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def sequence_lengths(dataset: datasets.Dataset) -> list[tuple[int, int]]:
    """(chosen, rejected) token counts of every pair as batched (after truncation), read from the
    arrow columns without materialising the ids."""
    table = dataset.with_format("arrow")
    chosen = pc.list_value_length(table["chosen_input_ids"]).to_pylist()
    rejected = pc.list_value_length(table["rejected_input_ids"]).to_pylist()
    return list(zip(chosen, rejected))


def chosen_response_tokens(dataset: datasets.Dataset) -> list[int]:
    """Per pair, the labelled tokens of its chosen sequence after the first position (the first is no token's
    target): what :attr:`MicroBatch.chosen_tokens` counts, read from the arrow column in one pass."""
    column = dataset.with_format("arrow")["chosen_labels"].combine_chunks()  # list<int> per pair
    labelled = np.asarray(pc.not_equal(column.flatten(), LABEL_PAD), dtype=np.int64)  # [all tokens]
    ends = np.cumsum(np.asarray(pc.list_value_length(column), dtype=np.int64))  # [pairs]
    starts = ends - np.asarray(pc.list_value_length(column), dtype=np.int64)
    running = np.concatenate([[0], np.cumsum(labelled)])  # [all tokens + 1]
    after_first = np.minimum(starts + 1, ends)
    return (running[ends] - running[after_first]).tolist()


def read_pairs(dataset: datasets.Dataset, indices: list[int]) -> dict[str, list]:
    """Column -> values of the pairs at ``indices`` (in that order): the four pair columns, and DPO's reference
    columns when the dataset has them."""
    names = [*PAIR_COLUMNS, *(name for name in REF_COLUMNS if name in dataset.column_names)]
    if not indices:
        return {name: [] for name in names}
    return dataset.select_columns(names)[indices]


def split_pairs(rows: dict[str, list], groups: list[list[int]]) -> Iterator[dict[str, list]]:
    """``rows`` read for the concatenation of ``groups`` -> one column dict per group."""
    start = 0
    for group in groups:
        yield {name: values[start:start + len(group)] for name, values in rows.items()}
        start += len(group)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` labels aligned with the tokens -> targets of the logits at each position."""
    shifted = torch.full_like(labels, LABEL_PAD)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def ready_micro_batch(rows: dict[str, list], row_index: list[int], vocab_size: int, *, tokens: torch.Tensor,
                      position_ids: torch.Tensor, targets: torch.Tensor, sequence_targets: torch.Tensor,
                      tokens_real: int, padding_mask: torch.Tensor, sequence_index: torch.Tensor | None = None,
                      cu_seqlens: torch.Tensor | None = None) -> MicroBatch:
    """The :class:`MicroBatch` of the pairs ``rows`` (at dataset indices ``row_index``) laid out as ``tokens`` /
    ``targets``: its targets checked against the vocabulary (every sequence with a labelled target), the head's
    labelled positions, the counts, and DPO's reference sums when the rows carry them."""
    try:
        check_targets(sequence_targets, vocab_size)
    except ValueError as exc:
        raise ValueError(f"the pairs at dataset indices {row_index}: {exc}") from None
    k = len(row_index)
    ref = None
    if REF_COLUMNS[0] in rows:
        ref = torch.tensor(rows[REF_COLUMNS[0]] + rows[REF_COLUMNS[1]], dtype=torch.float64)  # [2k], chosen first
    return MicroBatch(
        tokens=tokens, position_ids=position_ids, targets=targets, token_index=labelled_positions(targets),
        sequence_targets=sequence_targets, row_index=torch.tensor(row_index, dtype=torch.int64),  # [k]
        tokens_real=tokens_real, chosen_tokens=int((sequence_targets[:k] != LABEL_PAD).sum()),
        padding_mask=padding_mask, sequence_index=sequence_index, cu_seqlens=cu_seqlens,
        seqlens=None if cu_seqlens is None else tuple((cu_seqlens[1:] - cu_seqlens[:-1]).tolist()),
        ref_sum_logps=ref)
