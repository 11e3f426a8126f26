"""Tokenised pairs -> padded micro-batch tensors.

A micro-batch of k pairs is ``tokens [2k, S]`` and ``labels [2k, S]`` (int64): rows 0..k-1 are the
chosen sequences and rows k..2k-1 the rejected ones, so rows i and i + k are one pair (as the
reference concatenates them). Sequences are right-padded with the pad id; labels are -100 on the
prompt and on padding and are NOT shifted (logits at t predict labels[t + 1]). S is a multiple of
``pad_to_multiple_of`` (sequence parallelism needs S % tp == 0; FP8 GEMMs want multiples of 16).

With pipeline parallelism all micro-batches of one schedule call share S (the stages exchange fixed
shapes), so :func:`step_micro_batches` pads them to the step's longest sequence; without, each micro-batch
is padded to its own longest (``shared_length=False``). Packed rows are :mod:`simpo_mcore.data.packing`.
"""

from __future__ import annotations

from collections.abc import Iterable

import datasets
import pyarrow.compute as pc
import torch

from simpo_mcore.data.tokenize import LABEL_PAD

PAD_TO_MULTIPLE_OF = 16


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` labels aligned with the tokens -> targets of the logits at each position."""
    shifted = torch.full_like(labels, LABEL_PAD)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else 0 (padding never carries a label, so its value is free)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def float_columns(dataset: datasets.Dataset) -> dict[str, torch.dtype]:
    """Per-pair float columns (e.g. ``ref_chosen_sum_logps``) that ride along into the batch, with
    their dtype (float64 columns stay float64; other float widths become float32)."""
    return {name: torch.float64 if feature.dtype == "float64" else torch.float32
            for name, feature in dataset.features.items()
            if isinstance(feature, datasets.Value) and feature.dtype.startswith("float")}


def collate_pairs(rows: dict[str, list], row_index: list[int], seq_len: int, pad_id: int,
                  extra_columns: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """k pairs (``rows``: column -> k values) -> ``tokens``/``labels`` [2k, S], ``row_index`` [k]
    (int64), each of ``extra_columns`` (name -> dtype) as a [k] tensor, and the host counts ``tokens_real``
    (non-padding positions) and ``chosen_tokens`` (chosen response tokens, the SFT term's count)."""
    sequences = rows["chosen_input_ids"] + rows["rejected_input_ids"]
    labels = rows["chosen_labels"] + rows["rejected_labels"]
    tokens_out = torch.full((len(sequences), seq_len), pad_id, dtype=torch.int64)  # [2k, S]
    labels_out = torch.full((len(sequences), seq_len), LABEL_PAD, dtype=torch.int64)  # [2k, S]
    for i, (ids, labs) in enumerate(zip(sequences, labels)):
        if len(ids) > seq_len:
            raise ValueError(f"pair at dataset index {row_index[i % len(row_index)]} has a sequence "
                             f"of {len(ids)} tokens, longer than the batch length {seq_len}")
        tokens_out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        labels_out[i, :len(labs)] = torch.tensor(labs, dtype=torch.int64)
    batch = {"tokens": tokens_out, "labels": labels_out,
             "row_index": torch.tensor(row_index, dtype=torch.int64),  # [k]
             "tokens_real": sum(map(len, sequences)),
             "chosen_tokens": int(sum(label != LABEL_PAD for labs in rows["chosen_labels"] for label in labs[1:]))}
    for name, dtype in (extra_columns or {}).items():
        batch[name] = torch.tensor(rows[name], dtype=dtype)  # [k]
    return batch


def sequence_lengths(dataset: datasets.Dataset) -> list[tuple[int, int]]:
    """(chosen, rejected) token counts of every pair as batched (after truncation), read from the
    arrow columns without materialising the ids."""
    table = dataset.with_format("arrow")
    chosen = pc.list_value_length(table["chosen_input_ids"]).to_pylist()
    rejected = pc.list_value_length(table["rejected_input_ids"]).to_pylist()
    return list(zip(chosen, rejected))


def step_seq_len(lengths: Iterable[int], pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> int:
    """S of a step whose sequences have these lengths: the longest, rounded up."""
    return round_up(max(lengths), pad_to_multiple_of)


def step_padding(micro_batches: list[list[tuple[int, int]]],
                 pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, shared_length: bool = True) -> tuple[int, int]:
    """``(real tokens, token slots)`` of one rank's step laid out as :func:`step_micro_batches`
    does: micro-batches of (chosen, rejected) sequence lengths, each ``[2k, S]``, S shared by the step's
    micro-batches or (``shared_length=False``) each micro-batch's own."""
    if not shared_length:
        real = slots = 0
        for micro in micro_batches:
            micro_real, micro_slots = step_padding([micro], pad_to_multiple_of)
            real, slots = real + micro_real, slots + micro_slots
        return real, slots
    lengths = [n for micro in micro_batches for pair in micro for n in pair]
    return sum(lengths), len(lengths) * step_seq_len(lengths, pad_to_multiple_of)


def step_micro_batches(dataset: datasets.Dataset, micro_batches: list[list[int]], pad_id: int,
                       pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF,
                       seq_len: int | None = None, shared_length: bool = True) -> list[dict[str, torch.Tensor]]:
    """Collate one step's micro-batches (lists of dataset indices) to one shared S: the longest
    sequence of the step rounded up to ``pad_to_multiple_of``, or ``seq_len`` when given; with
    ``shared_length=False`` (no pipeline parallelism) each micro-batch to its own longest instead."""
    extra = float_columns(dataset)
    flat = [index for micro in micro_batches for index in micro]
    rows = dataset.select_columns(["chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                   "rejected_labels", *extra])[flat]
    if seq_len is None and shared_length:
        seq_len = step_seq_len(map(len, rows["chosen_input_ids"] + rows["rejected_input_ids"]), pad_to_multiple_of)
    batches, start = [], 0
    for micro in micro_batches:
        part = {name: values[start:start + len(micro)] for name, values in rows.items()}
        length = seq_len or step_seq_len(map(len, part["chosen_input_ids"] + part["rejected_input_ids"]),
                                         pad_to_multiple_of)
        batches.append(collate_pairs(part, micro, length, pad_id, extra))
        start += len(micro)
    return batches
