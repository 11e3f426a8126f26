"""The contract between the data side and the objective: a :class:`MicroBatch`, ready when it leaves collation.

``data/`` collates pairs into micro-batches (padded pairs ``[2k, S]`` or a packed row ``[1, T]``) and hands the
objective (:mod:`simpo_mcore.objective`) everything a forward and a loss need, on the host: the tokens, the
targets already shifted, the positions of the labelled targets the log-prob head computes, position ids, the
packed boundaries, the per-sequence layout, and the counts the loss and the metrics use. Its targets were checked
once, on the host, when it was made (ids in the vocabulary, a labelled token in every sequence): nothing at
forward time inspects them again, so a step runs from its first forward to its last backward without a device
sync. :class:`LossScale` holds the step's normalisers, made with the step's micro-batches (:class:`StepBatches`).

Order of sequences: pair ``i`` of a micro-batch of ``k`` pairs is sequence ``i`` (chosen) and sequence ``k + i``
(rejected) in every per-sequence tensor, as the reference concatenates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

LABEL_PAD = -100
"""The label of a position that is not a target: the prompt, padding, a sequence's last position once shifted
(megatron's and PyTorch's ``ignore_index``)."""


@dataclass(frozen=True, eq=False)  # tensors do not compare to one bool
class MicroBatch:
    """One micro-batch of ``k`` whole pairs, laid out as padded pairs (``b = 2k`` rows of ``s = S`` positions,
    chosen rows first) or as one packed row (``b = 1``, ``s = T``: the sequences end to end, then a tail of
    padding; ``data/packing.py``). Made by the collators in ``data/``; see the module docstring."""

    tokens: torch.Tensor
    """``[b, s]`` int64: token ids, the pad id on padding positions."""
    position_ids: torch.Tensor
    """``[b, s]`` int64: 0, 1, ... along each padded row; restarting at every sequence (and at the tail) of a
    packed row, so that RoPE sees each sequence from position 0."""
    targets: torch.Tensor
    """``[b, s]`` int64: the token the logits at each position predict (the labels shifted left by one; in a packed
    row within each sequence, so that a sequence's last token never predicts the next one's first), ``LABEL_PAD``
    where there is nothing to predict (prompt, padding, the last position of a sequence)."""
    token_index: torch.Tensor
    """``[n]`` int64: :func:`labelled_positions` of ``targets``, the positions the fused head computes a log-prob
    for (in its flat order: position ``t * b + i`` is position ``t`` of row ``i``)."""
    sequence_targets: torch.Tensor
    """``[2k, L]`` int64: ``targets`` per sequence, chosen sequences first, ``LABEL_PAD`` beyond each one's end.
    Padded pairs: the same tensor as ``targets`` (``L = S``); a packed row: ``targets`` gathered through
    ``sequence_index``. What the per-sequence sums and averages are taken over."""
    row_index: torch.Tensor
    """``[k]`` int64: the dataset index of each pair (the pairs' ids: where DPO's reference log-probs are stored)."""
    tokens_real: int
    """Positions holding a token of a sequence (prompt included)."""
    chosen_tokens: int
    """Labelled targets of the chosen sequences: the chosen response tokens the SFT term averages over."""
    sequence_index: torch.Tensor | None = None
    """Packed row only: ``[2k, L]`` int64, the row position of token ``j`` of sequence ``i`` (chosen first), ``T``
    (one past the row) beyond the sequence's end; lays the row's token log-probs out per sequence."""
    cu_seqlens: torch.Tensor | None = None
    """Packed row only: ``[m + 1]`` int32 boundaries of the row's ``m`` segments (the ``2k`` sequences in row order,
    then the tail of padding when there is one), from 0 to ``T``: megatron's THD ``cu_seqlens``."""
    seqlens: tuple[int, ...] | None = None
    """Packed row only: the ``m`` segment lengths on the host (``cu_seqlens``' differences), so that no length
    is read back from the device."""
    padding_mask: torch.Tensor | None = None
    """``[b, s]`` bool: True at the positions holding no token of a sequence (the right padding of padded pairs,
    the tail of a packed row). Given to the model as megatron's ``padding_mask``: the routers of a
    mixture-of-experts model leave those positions out of the load-balancing loss and the expert counts."""
    ref_sum_logps: torch.Tensor | None = None
    """DPO only: ``[2k]`` float64 summed log-probs of each sequence under the reference model (chosen first)."""
    cp: int = 1
    """Context-parallel ranks sharing these sequences (``data/context_parallel.py``). Above 1, the tensors hold this
    rank's share: its two chunks of every sequence (``tokens``, ``position_ids``, ``targets``, ``token_index``,
    ``padding_mask``, ``sequence_index``, ``sequence_targets``: the local ``L``), while the counts (``tokens_real``,
    ``chosen_tokens``), ``row_index``, ``ref_sum_logps`` and a packed row's boundaries are the whole sequences'.
    The targets were checked on the whole sequences, before the split: a rank may hold none of a sequence's."""
    cu_seqlens_padded: torch.Tensor | None = None
    """Packed row under context parallelism: ``[m + 1]`` int32 boundaries of the segments each padded for the
    split (megatron's ``cu_seqlens_q_padded``, global); ``cu_seqlens`` then holds the real lengths."""
    padded_seqlens: tuple[int, ...] | None = None
    """``cu_seqlens_padded``'s segment lengths on the host."""
    filler: bool = False
    """A copy that only tops up a forward-only schedule call to a multiple of PP micro-batches (the interleaved
    pipeline needs one): its report is dropped."""

    @property
    def num_pairs(self) -> int:
        return self.row_index.shape[0]

    @property
    def tokens_computed(self) -> int:
        """Positions the model runs on (padding included), over the context-parallel ranks that share them."""
        return self.tokens.numel() * self.cp

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def to(self, device: torch.device) -> MicroBatch:
        """This micro-batch with its tensors on ``device`` (host counts and lengths stay on the host). A tensor
        two fields share (``targets`` and ``sequence_targets`` of padded pairs) is copied once."""
        moved: dict[int, torch.Tensor] = {}
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                if id(value) not in moved:
                    moved[id(value)] = to_device(value, device)
                changes[f.name] = moved[id(value)]
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LossScale:
    """The normalisers of one optimizer step (the derivation is :mod:`simpo_mcore.objective`'s docstring)."""

    num_microbatches: int
    """Micro-batches this rank gives the schedule in this step (n_r: what the schedule divides by)."""
    dp: int
    global_pairs: int
    """Pairs of the global batch (G), over every data-parallel rank."""
    global_chosen_tokens: int
    """Chosen response tokens of the global batch (C), over every data-parallel rank."""


@dataclass(frozen=True)
class StepBatches:
    """One rank's share of an optimizer step: its micro-batches and the step's normalisers."""

    micro_batches: list[MicroBatch]
    scale: LossScale


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without stopping the host: on a GPU through pinned memory, so the copy
    is queued behind the work already launched instead of waiting for it."""
    if device.type == "cuda" and not tensor.is_cuda:
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def labelled_positions(targets: torch.Tensor) -> torch.Tensor:
    """``[n]`` int64: the positions of the labelled targets (not ``LABEL_PAD``) of ``[b, s]`` targets in the fused
    head's flat token order (``s`` major: position ``t * b + i`` is token ``t`` of row ``i``).

    Computed on the host copy it costs nothing; on a device, ``nonzero`` would wait for it. Passed to the head
    (``TokenLogpsContext.token_index``, ``fused_token_logps(token_index=)``), it lets the head skip the prompt and
    padding tokens, whose log-probs are 0 by definition."""
    return torch.nonzero(targets.t().reshape(-1) != LABEL_PAD).squeeze(1)


def check_label_values(labels: torch.Tensor, vocab_size: int) -> None:
    """Every label ``LABEL_PAD`` or a real token id, int64. A label on a padded vocabulary row would silently get
    a log-prob of -inf (unfused head) or of a token that has no logit (fused)."""
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    bad = (labels != LABEL_PAD) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"labels must be {LABEL_PAD} or in [0, {vocab_size}); found {labels[bad][:8].tolist()}")


def check_every_sequence_labelled(labels: torch.Tensor) -> None:
    """A labelled token in every row of ``[b, s]`` labels: a sequence's average log-prob would be 0/0 otherwise."""
    check_sequence_counts((labels != LABEL_PAD).sum(dim=-1))


def check_sequence_counts(num_tokens: torch.Tensor) -> None:
    """:func:`check_every_sequence_labelled` from the ``[b]`` labelled-token counts (under context parallelism the
    counts of the whole sequences, which no rank's labels show)."""
    empty = num_tokens == 0  # [b]
    if bool(empty.any()):
        raise ValueError(f"sequences {torch.nonzero(empty).flatten().tolist()} have no token with a label "
                         f"(all {LABEL_PAD}): the average is undefined")


def check_targets(sequence_targets: torch.Tensor, vocab_size: int) -> None:
    """What the head and the per-sequence sums need of ``[2k, L]`` targets per sequence: int64, every target
    ``LABEL_PAD`` or a real token id, and at least one labelled target per sequence. Run on the host copy, at
    collation: on a device each check would stop the host until the device has caught up."""
    check_label_values(sequence_targets, vocab_size)
    check_every_sequence_labelled(sequence_targets)
