"""Context parallelism's split of a micro-batch: which positions each rank of a context-parallel (CP) group keeps.

megatron's split (``megatron/core/utils.py: get_batch_on_this_cp_rank``, and Transformer Engine's
``thd_get_partitioned_indices`` for packed rows): a sequence of length ``L`` (a multiple of ``2 x cp``) is cut into
``2 x cp`` equal chunks and CP rank ``r`` keeps chunks ``r`` and ``2cp - 1 - r``, in that order. Under causal
attention a chunk costs more the later it sits, so every rank gets one cheap and one dear chunk: the same work
everywhere. megatron's RoPE (``get_pos_emb_on_this_cp_rank``, ``_get_thd_freqs_on_this_cp_rank``) and TE's CP
attention assume exactly this layout.

* Padded micro-batches ``[b, S]`` (:func:`split_rows`): each row is one sequence, right-padded to ``S``, a multiple
  of :func:`cp_multiple`; rank ``r`` keeps ``[b, S / cp]``.
* Packed rows ``[1, T]`` (:func:`split_packed_row` -> :class:`PackedSplit`): every segment of the row
  (``cu_seqlens``) is padded at its end to a multiple of :func:`cp_multiple` and split on its own; rank ``r``'s
  row holds, segment after segment, its two chunks of each. The padding is computed like any position
  (:attr:`PackedSplit.length` is what ``tokens_computed`` counts) and never seen by a real token: it sits after
  its sequence's last token, and attention is causal.

The order of work for a micro-batch: shift the labels on the whole row (a token's target is the next token, which
may sit on another rank), check them (every sequence needs a labelled token somewhere, not on every rank), then
split tokens, targets and positions with the same index. Collation does the first two (a ready
:class:`~simpo_mcore.microbatch.MicroBatch`); :func:`split_padded_pairs` and :func:`split_packed_rows` then make
this rank's MicroBatch of it, still on the data side: the objective receives it ready. Everything here is a function
of lengths, ``cp`` and ``rank``: no process group. :func:`split_rows` takes tensors on any device; a packed row's
split is made on the host.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from simpo_mcore.data.collate import round_up
from simpo_mcore.data.packing import per_sequence
from simpo_mcore.microbatch import LABEL_PAD, MicroBatch, labelled_positions


def cp_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What a split length must be a multiple of: ``2 x cp`` chunks, and under sequence parallelism each rank's
    share split again over the ``tp`` ranks (``2 x cp x tp``, megatron's rule)."""
    return 2 * cp * (tp if sequence_parallel else 1)


def chunk_positions(length: int, cp: int, rank: int) -> torch.Tensor:
    """``[length / cp]`` int64: the positions ``0 .. length - 1`` of one sequence that CP rank ``rank`` of ``cp``
    keeps, in its order: chunk ``rank`` then chunk ``2cp - 1 - rank`` of ``2 x cp`` equal chunks."""
    if not 0 <= rank < cp:
        raise ValueError(f"context-parallel rank {rank} is not in [0, {cp})")
    if length % (2 * cp):
        raise ValueError(f"a sequence of {length} positions cannot be split over {cp} context-parallel ranks: "
                         f"its length must be a multiple of 2 x {cp}")
    chunk = length // (2 * cp)
    late = 2 * cp - 1 - rank
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk), torch.arange(late * chunk, (late + 1) * chunk)])


def split_rows(x: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """``[b, s, ...]`` -> ``[b, s / cp, ...]``: CP rank ``rank``'s chunks of every row of a padded micro-batch
    (tokens, shifted targets, positions alike; ``s`` a multiple of :func:`cp_multiple`)."""
    if cp == 1:
        return x
    return x.index_select(1, chunk_positions(x.shape[1], cp, rank).to(x.device))  # [b, s / cp, ...]


@dataclass(frozen=True)
class PackedSplit:
    """One packed row laid out for CP rank ``rank`` of ``cp`` (:func:`split_packed_row`).

    Global quantities (``seqlens``, ``padded_seqlens``, :meth:`cu_seqlens`) are those of the whole row, as
    megatron's ``PackedSeqParams`` and TE's CP attention take them; ``source`` and ``positions`` are this rank's.
    """

    cp: int
    rank: int
    row_length: int
    """Positions of the row as collated (``T``, the last ``cu_seqlens``)."""
    seqlens: tuple[int, ...]
    """Positions of each segment of the collated row (its sequences, then a padding tail if it has one)."""
    padded_seqlens: tuple[int, ...]
    """Each segment padded at its end for the split (a multiple of the split's multiple)."""
    source: torch.Tensor
    """``[T_local]`` int64: for each local position, its position in the collated row; -1 at split padding."""
    positions: torch.Tensor
    """``[T_local]`` int64: each local position's position within its segment (RoPE, attention masks)."""

    @property
    def length(self) -> int:
        """Positions the CP group computes for the row (``T_local x cp``): what ``tokens_computed`` counts."""
        return sum(self.padded_seqlens)

    @property
    def local_length(self) -> int:
        """``T_local``: positions of this rank's row."""
        return self.source.numel()

    def cu_seqlens(self, padded: bool) -> torch.Tensor:
        """``[m + 1]`` int32 global segment boundaries: of the real positions (``padded=False``, megatron's
        ``cu_seqlens_q``) or of the padded segments (``cu_seqlens_q_padded``, which splits the local row)."""
        lengths = torch.tensor(self.padded_seqlens if padded else self.seqlens, dtype=torch.int32)
        return torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0, dtype=torch.int32)])

    def take(self, row: torch.Tensor, fill: int) -> torch.Tensor:
        """``[1, T]`` (or ``[T]``) collated values -> ``[1, T_local]``: this rank's, ``fill`` at split padding
        (the pad id for tokens, -100 for targets)."""
        if row.numel() != self.row_length:
            raise ValueError(f"a row of {row.numel()} positions given to the split of a row of {self.row_length}")
        flat = torch.cat([row.reshape(-1), row.new_full((1,), fill)])  # [T + 1]: position T reads fill
        return flat[torch.where(self.source < 0, self.row_length, self.source)].unsqueeze(0)  # [1, T_local]

    def sequence_index(self, sequence_index: torch.Tensor) -> torch.Tensor:
        """The collated row's ``sequence_index [n, L]`` (row position of token j of sequence i, ``T`` beyond its
        end) -> ``[n, L_local]``: this rank's local positions of each sequence's tokens, in token order,
        ``T_local`` beyond them. With the local token log-probs and targets it lays them out per sequence
        (``logprobs.unpack_token_logps``, ``packing.sequence_targets``) for the per-sequence sums over CP."""
        held = self.source >= 0
        local_of = torch.full((self.row_length + 1,), -1, dtype=torch.int64)  # [T + 1]: T (beyond) -> -1
        local_of[self.source[held]] = torch.arange(self.local_length)[held]
        local = local_of[sequence_index]  # [n, L]: -1 where the token is elsewhere or beyond the end
        here = local >= 0
        counts = here.sum(dim=1)  # [n]
        width = max(1, int(counts.max()) if counts.numel() else 1)
        # Stable: this rank's tokens first, in token order.
        order = torch.argsort((~here).to(torch.int8), dim=1, stable=True)  # [n, L]
        compact = local.gather(1, order)[:, :width]  # [n, L_local]
        return torch.where(torch.arange(width) < counts[:, None], compact, self.local_length)


def split_packed_row(cu_seqlens: torch.Tensor, cp: int, rank: int, multiple: int,
                     length: int | None = None) -> PackedSplit:
    """CP rank ``rank``'s part of a packed row whose segments end at the host tensor ``cu_seqlens`` ([m + 1], from
    0 to the row's length T): each segment padded at its end to a multiple of ``multiple``
    (:func:`cp_multiple`), then split as megatron splits a sequence. ``length`` (a multiple of ``multiple``, at
    least :func:`padded_row_length`): the padded row's length when a step's rows must share one shape (pipeline
    parallelism); the extra positions pad the last segment."""
    if multiple % (2 * cp):
        raise ValueError(f"the split's multiple {multiple} must be a multiple of 2 x cp = {2 * cp}")
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    padded = [round_up(n, multiple) for n in seqlens]
    if length is not None:
        if length < sum(padded) or length % multiple:
            raise ValueError(f"a split row of {length} positions must be a multiple of {multiple} and at least "
                             f"{sum(padded)}, its segments padded")
        padded[-1] += length - sum(padded)
    sources, positions = [], []
    for start, n, p in zip(cu_seqlens[:-1].tolist(), seqlens, padded):
        mine = chunk_positions(p, cp, rank)  # [p / cp]
        sources.append(torch.where(mine < n, start + mine, -1))
        positions.append(mine)
    return PackedSplit(cp=cp, rank=rank, row_length=int(cu_seqlens[-1]), seqlens=tuple(seqlens),
                       padded_seqlens=tuple(padded), source=torch.cat(sources), positions=torch.cat(positions))


def padded_row_length(cu_seqlens: torch.Tensor, multiple: int) -> int:
    """Positions of a packed row once each segment is padded to ``multiple``: the CP group's computed positions
    (``tokens_computed``); under pipeline parallelism the longest of a step's rows is every row's ``length``."""
    return sum(round_up(n, multiple) for n in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist())


def split_padded_pairs(batch: MicroBatch, cp: int, rank: int) -> MicroBatch:
    """CP rank ``rank``'s share of a ready micro-batch of padded pairs ``[2k, S]`` (``S`` a multiple of
    :func:`cp_multiple`): its chunks of every row, ``[2k, S / cp]``, and the head's labelled positions among them."""
    targets = split_rows(batch.targets, cp, rank)  # [2k, S / cp]
    padding = None if batch.padding_mask is None else split_rows(batch.padding_mask, cp, rank)  # [2k, S / cp]
    return dataclasses.replace(batch, tokens=split_rows(batch.tokens, cp, rank),
                               position_ids=split_rows(batch.position_ids, cp, rank), targets=targets,
                               sequence_targets=targets, token_index=labelled_positions(targets),
                               padding_mask=padding, cp=cp)


def split_packed_rows(rows: list[MicroBatch], cp: int, rank: int, multiple: int, row_multiple: int,
                      same_shape: bool, pad_id: int) -> list[MicroBatch]:
    """CP rank ``rank``'s share of a step's ready packed rows (collated without a padding tail): every sequence
    padded to ``multiple`` (:func:`cp_multiple`) and split, each row's padded length rounded up to
    ``row_multiple`` (so that each rank's share of it is a multiple of the GEMMs' 16) and, with ``same_shape``
    (pipeline parallelism), to the step's longest."""
    lengths = [round_up(padded_row_length(row.cu_seqlens, multiple), row_multiple) for row in rows]
    if same_shape:
        lengths = [max(lengths)] * len(rows)
    return [split_packed_row_batch(row, split_packed_row(row.cu_seqlens, cp, rank, multiple, length), pad_id)
            for row, length in zip(rows, lengths)]


def split_packed_row_batch(row: MicroBatch, split: PackedSplit, pad_id: int) -> MicroBatch:
    """A ready packed row laid out by ``split`` (:func:`split_packed_row` of its ``cu_seqlens``): this rank's
    ``[1, T_local]`` tokens (``pad_id`` at split padding), positions within each sequence and targets, the head's
    labelled positions, the local per-sequence layout, and the whole row's real and padded boundaries."""
    targets = split.take(row.targets, LABEL_PAD)  # [1, T_local]
    index = split.sequence_index(row.sequence_index)  # [2k, L_local]
    padding = None if row.padding_mask is None else split.take(row.padding_mask, True)  # [1, T_local]
    return dataclasses.replace(
        row, tokens=split.take(row.tokens, pad_id), position_ids=split.positions.unsqueeze(0), targets=targets,
        padding_mask=padding,
        token_index=labelled_positions(targets), sequence_index=index, sequence_targets=per_sequence(targets, index),
        cu_seqlens=split.cu_seqlens(padded=False), seqlens=split.seqlens,
        cu_seqlens_padded=split.cu_seqlens(padded=True), padded_seqlens=split.padded_seqlens, cp=split.cp)
