"""Context parallelism's split (``data/context_parallel.py``) against megatron's and Transformer Engine's, written
plainly here; its configuration and layout errors.

The references:

* megatron's padded split (``megatron/core/utils.py: _get_batch_on_this_cp_rank_per_sequence_balancing``): view the
  sequence dimension as ``2cp`` chunks, ``index_select`` chunks ``[r, 2cp - 1 - r]``, view back;
* TE's packed split (``thd_get_partitioned_indices``, the CUDA kernel megatron's per-document split calls): local
  token ``t`` of sequence ``i`` (padded length ``p``, local share ``p / cp``) reads padded-row position
  ``cu_padded[i] + t + (r if t < p / 2cp else 2cp - 2 - r) * p / 2cp``, the kernel's index arithmetic as it is;
* megatron's RoPE positions per CP rank (``_get_thd_freqs_on_this_cp_rank``, a pure function: called as it is).
"""

from __future__ import annotations

import re

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

from simpo_mcore.config import ConfigError, ParallelConfig, load_config
from simpo_mcore.data.context_parallel import (
    chunk_positions,
    cp_multiple,
    padded_row_length,
    split_packed_row,
    split_rows,
)
from simpo_mcore.parallel import distributed


def megatron_padded_split(x: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """megatron's per-sequence balancing, one tensor, sequence dimension 1."""
    if cp == 1:
        return x
    x = x.view(x.shape[0], 2 * cp, x.shape[1] // (2 * cp), *x.shape[2:])
    x = x.index_select(1, torch.tensor([rank, 2 * cp - rank - 1]))
    return x.view(x.shape[0], -1, *x.shape[3:])


def te_thd_indices(cu_padded: list[int], cp: int, rank: int) -> list[int]:
    """TE's ``thd_partition_indices_kernel`` in Python: padded-row positions of this rank's tokens, in order."""
    local_cu = [c // cp for c in cu_padded]
    out = []
    for token in range(local_cu[-1]):
        seq = max(i for i in range(len(local_cu) - 1) if local_cu[i] <= token)
        seq_len = local_cu[seq + 1] - local_cu[seq]
        index = token - local_cu[seq]
        offset = rank if index < seq_len // 2 else (cp - 1) * 2 - rank
        out.append(index + local_cu[seq] * cp + seq_len // 2 * offset)
    return out


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_padded_rows_split_as_megatron_splits_them(cp):
    g = torch.Generator().manual_seed(cp)
    x = torch.randint(0, 1000, (3, 8 * cp, 5), generator=g)  # [b, s, extra]
    pieces = [split_rows(x, cp, r) for r in range(cp)]
    for r, piece in enumerate(pieces):
        assert torch.equal(piece, megatron_padded_split(x, cp, r))
        assert piece.shape == (3, 8, 5)
    # Every position of every row is on exactly one rank.
    held = sorted(torch.cat([chunk_positions(8 * cp, cp, r) for r in range(cp)]).tolist())
    assert held == list(range(8 * cp))


@pytest.mark.parametrize("cp,length", [(1, 6), (2, 12), (3, 18), (4, 40)])
def test_chunk_positions_are_the_positions_megatron_gives_rope(cp, length):
    """``_get_thd_freqs_on_this_cp_rank`` slices a table of frequencies per position; a table holding its own
    position reads back the positions megatron rotates each local token by."""
    table = torch.arange(length)
    for r in range(cp):
        local = torch.empty(length // cp)  # only its length is read
        assert torch.equal(chunk_positions(length, cp, r), _get_thd_freqs_on_this_cp_rank(r, cp, local, table))


def test_chunk_positions_refuse_what_cannot_be_split():
    with pytest.raises(ValueError, match="multiple of 2 x 2"):
        chunk_positions(10, 2, 0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        chunk_positions(8, 2, 2)


def test_the_multiple_counts_sequence_parallel_ranks():
    assert cp_multiple(2) == 4 and cp_multiple(2, tp=2) == 4 and cp_multiple(2, tp=2, sequence_parallel=True) == 8
    assert cp_multiple(1) == 2


def packed_row():
    """A collated row (T = 44): sequences of 9, 14, 5, 11 tokens and a tail of 5 padding positions."""
    lengths = [9, 14, 5, 11, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    tokens = torch.arange(100, 100 + 44).unsqueeze(0)  # [1, T]: each position's own id
    sequence_index = torch.full((4, 14), 44)  # [n, L]: the four sequences (not the tail)
    for i, (start, n) in enumerate(zip(cu[:-2].tolist(), lengths[:4])):
        sequence_index[i, :n] = torch.arange(start, start + n)
    return cu, tokens, sequence_index, lengths


@pytest.mark.parametrize("cp,multiple", [(2, 4), (2, 8), (3, 6), (4, 8)])
def test_packed_rows_split_as_transformer_engine_splits_them(cp, multiple):
    """Each segment padded to the multiple; TE's indices into that padded row, mapped back to the collated row
    (padding -> -1), are the split's ``source``; the positions within each segment are megatron's RoPE ones."""
    cu, tokens, _, lengths = packed_row()
    padded = [-(-n // multiple) * multiple for n in lengths]
    cu_padded = [0, *torch.tensor(padded).cumsum(0).tolist()]
    for r in range(cp):
        split = split_packed_row(cu, cp, r, multiple)
        assert split.padded_seqlens == tuple(padded) and split.seqlens == tuple(lengths)
        assert split.length == sum(padded) == padded_row_length(cu, multiple)
        assert split.local_length == sum(padded) // cp
        assert split.cu_seqlens(padded=True).tolist() == cu_padded
        assert split.cu_seqlens(padded=False).tolist() == cu.tolist()
        expected_source, expected_positions = [], []
        for index in te_thd_indices(cu_padded, cp, r):
            seq = max(i for i in range(len(padded)) if cu_padded[i] <= index)
            within = index - cu_padded[seq]
            expected_source.append(int(cu[seq]) + within if within < lengths[seq] else -1)
            expected_positions.append(within)
        assert split.source.tolist() == expected_source
        assert split.positions.tolist() == expected_positions
        local = split.take(tokens, fill=-7)  # [1, T_local]
        assert local.shape == (1, split.local_length)
        assert local[0].tolist() == [100 + s if s >= 0 else -7 for s in expected_source]
    with pytest.raises(ValueError, match="a row of 40 positions given to the split of a row of 44"):
        split.take(tokens[:, :40], fill=0)


def test_every_real_position_is_on_exactly_one_rank_and_sequences_map_back():
    """The union over ranks of each sequence's local tokens (through the local ``sequence_index``) is the
    sequence, in order, each token once; the tail and split padding belong to no sequence."""
    cu, tokens, sequence_index, lengths = packed_row()
    cp = 2
    seen: dict[int, list[tuple[int, int]]] = {i: [] for i in range(4)}
    for r in range(cp):
        split = split_packed_row(cu, cp, r, multiple=4)
        local_tokens = split.take(tokens, fill=-1)[0]  # [T_local]
        local_index = split.sequence_index(sequence_index)  # [n, L_local]
        assert local_index.shape[0] == 4
        assert (local_index <= split.local_length).all()
        for i in range(4):
            held = local_index[i][local_index[i] < split.local_length]
            assert held.tolist() == sorted(held.tolist())  # token order
            seen[i] += [(int(split.positions[j]), int(local_tokens[j])) for j in held]
    for i, n in enumerate(lengths[:4]):
        start = int(cu[i])
        assert sorted(seen[i]) == [(j, 100 + start + j) for j in range(n)]


def test_a_shared_row_length_pads_the_last_segment():
    cu, _, _, lengths = packed_row()
    need = padded_row_length(cu, 4)  # 12 + 16 + 8 + 12 + 8 = 56
    assert need == 56
    split = split_packed_row(cu, 2, 1, 4, length=64)
    assert split.padded_seqlens == (12, 16, 8, 12, 16) and split.local_length == 32
    assert (split.source[-8:] < 44).all()
    with pytest.raises(ValueError, match="at least 56"):
        split_packed_row(cu, 2, 0, 4, length=52)
    with pytest.raises(ValueError, match="multiple of 4"):
        split_packed_row(cu, 2, 0, 4, length=62)
    with pytest.raises(ValueError, match="multiple of 2 x cp"):
        split_packed_row(cu, 2, 0, 6)


# ------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize("overrides,message", [
    (["parallel.cp=0"], "parallel.cp must be >= 1"),
    (["parallel.cp=2", "model.spec=local", "data.packing=false"], "parallel.cp > 1 needs model.spec te or sdpa"),
    (["parallel.cp=4", "parallel.cp_comm_type=a2a+p2p"], "parallel.cp_a2a_size must be a divisor of parallel.cp"),
    (["parallel.cp=4", "parallel.cp_comm_type=a2a+p2p", "parallel.cp_a2a_size=3"], "between 2 and 2"),
    (["parallel.cp_a2a_size=2"], "parallel.cp_a2a_size is only used with parallel.cp_comm_type: a2a+p2p"),
    (["parallel.cp=2", "parallel.cp_comm_type=all_gather", "model.spec=te"],
     "parallel.cp_comm_type: all_gather takes no packed rows"),
    (["parallel.cp_comm_type=ring"], "parallel.cp_comm_type: 'ring' is not one of"),
    (["parallel.cp=2", "data.pack_tokens=8208"], "data.pack_tokens (8208) must be a multiple of 32 under "
                                                  "parallel.cp 2"),
    (["parallel.cp=2", "parallel.tp=8", "parallel.sequence_parallel=true", "data.max_length=33",
      "data.max_prompt_length=8", "data.pack_tokens=96"], "data.pack_tokens (96) must be at least 128 under "
                                                          "parallel.cp 2"),
])
def test_context_parallel_settings_that_cannot_run_name_their_keys(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_experts_under_context_parallelism_are_accepted():
    """EP 2 x CP 2 (the parity launches' layout): the expert groups lie within the CP ranks of a replica, so two
    ranks are the smallest world that runs it."""
    cfg = load_config(None, ["parallel.cp=2", "parallel.ep=2"])
    assert (cfg.parallel.cp, cfg.parallel.ep, cfg.parallel.min_world_size()) == (2, 2, 2)


def test_defaults_and_a_runnable_hierarchy():
    cfg = load_config(None, [])
    assert (cfg.parallel.cp, cfg.parallel.cp_comm_type, cfg.parallel.cp_a2a_size) == (1, "p2p", None)
    cfg = load_config(None, ["parallel.cp=4", "parallel.tp=2", "parallel.sequence_parallel=true",
                             "data.pack_tokens=65536", "data.max_length=32768", "parallel.cp_comm_type=a2a+p2p",
                             "parallel.cp_a2a_size=2"])
    assert (cfg.parallel.cp, cfg.parallel.cp_a2a_size) == (4, 2)
    from simpo_mcore.parallel import cp_hierarchy

    assert cp_hierarchy(8, "a2a+p2p", 2) == [2, 4]
    assert cp_hierarchy(8, "p2p", None) is None and cp_hierarchy(1, "a2a+p2p", 2) is None


def test_a_world_that_cp_does_not_divide_names_the_keys():
    with pytest.raises(ConfigError, match=r"world size 1 is not divisible by parallel.tp x parallel.pp x "
                                          r"parallel.cp = 1 x 1 x 2"):
        with distributed(ParallelConfig(cp=2, device="cpu"), seed=0):
            pass


def test_the_model_refuses_what_its_attention_cannot_do_under_cp():
    """megatron's local attention has no CP; TE's CP attention has no score cap and slides windows only when it
    all-gathers or all-to-alls, and the all-to-all exchanges need whole key / value heads per rank."""
    from simpo_mcore.model.specs import ExtendedTransformerConfig, _check_te_context_parallel, layer_spec

    def config(**kw):
        return ExtendedTransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                         context_parallel_size=2, **kw)

    with pytest.raises(ValueError, match="model.spec: local has no context parallelism"):
        layer_spec("local", config())
    with pytest.raises(ValueError, match="cannot soft-cap attention scores"):
        _check_te_context_parallel(config(attn_logit_softcapping=50.0, cp_comm_type="p2p"))
    with pytest.raises(ValueError, match="only with parallel.cp_comm_type a2a or all_gather"):
        _check_te_context_parallel(config(window_size=(15, 0), cp_comm_type="p2p"))
    _check_te_context_parallel(config(window_size=(15, 0), cp_comm_type="all_gather"))
    _check_te_context_parallel(config(cp_comm_type="a2a"))  # 2 key / value heads over 2 ranks
    with pytest.raises(ValueError, match="spreads heads over 4 ranks"):
        _check_te_context_parallel(ExtendedTransformerConfig(
            num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, context_parallel_size=4,
            cp_comm_type="a2a"))


def test_the_cpu_relaunch_starts_tp_x_pp_x_cp_ranks(monkeypatch):
    """``simpo-train CONFIG`` outside torchrun on a CPU launches one rank per position of the layout: TP 2 x CP 2
    is 4 ranks (DP 1), not the 2 of TP alone."""
    import argparse
    import logging

    import torch.distributed.run

    from simpo_mcore import cli

    commands = []

    def torchrun(cmd):
        commands.append(cmd)
        raise SystemExit(0)

    monkeypatch.setattr(torch.distributed.run, "main", torchrun)
    monkeypatch.setattr(cli, "_forward_signals", lambda: None)
    monkeypatch.delenv("RANK", raising=False)
    for name in (cli.LAUNCHER_PID, "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    elastic = logging.getLogger("torch.distributed.elastic")
    monkeypatch.setattr(elastic, "level", elastic.level)
    cfg = load_config(None, ["parallel.tp=2", "parallel.cp=2", "parallel.device=cpu"])
    args = argparse.Namespace(nproc=None, config="run.yaml", overrides=[])
    assert cli._relaunch_if_needed("simpo-train", cfg, args) == 0
    assert commands[0][0] == "--nproc-per-node=4"
