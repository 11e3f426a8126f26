"""Batch-size arithmetic of a run, checked before any process group exists."""

from __future__ import annotations

import pytest

from simpo_mcore.config import ConfigError, load_config
from simpo_mcore.schedule import total_steps
from simpo_mcore.train import check_batch_sizes


def cfg(*overrides):
    return load_config(None, list(overrides))


def test_accumulation_steps():
    c = cfg("train.global_batch_pairs=128", "train.micro_batch_pairs=2", "data.packing=false")
    assert check_batch_sizes(c, dp=4) == 16
    assert check_batch_sizes(c, dp=16) == 4
    # Packed, the number of rows follows the step's lengths.
    assert check_batch_sizes(cfg("train.global_batch_pairs=128", "train.micro_batch_pairs=3"), dp=4) is None


def test_global_batch_must_be_a_multiple_of_the_micro_batch():
    """One rule, checked where the data-parallel size is known; at DP 1 it is global % micro."""
    c = cfg("train.global_batch_pairs=10", "train.micro_batch_pairs=4", "data.packing=false")
    with pytest.raises(ConfigError, match=r"train\.global_batch_pairs \(10\) must equal train\.micro_batch_pairs "
                                          r"\(4\) x accumulation steps x data-parallel size \(1\)"):
        check_batch_sizes(c, dp=1)
    # Packed, a micro-batch is a row of pack_tokens: micro_batch_pairs is unused and need not divide.
    assert check_batch_sizes(cfg("train.global_batch_pairs=10", "train.micro_batch_pairs=4"), dp=1) is None


def test_global_batch_not_divisible_by_dp_is_explained():
    c = cfg("train.global_batch_pairs=128", "train.micro_batch_pairs=2", "data.packing=false")
    with pytest.raises(ConfigError, match=r"not a multiple of 6\. Try global_batch_pairs = 126"):
        check_batch_sizes(c, dp=3)
    with pytest.raises(ConfigError, match=r"\(128\) must be a multiple of the data-parallel size \(3\)\. "
                                          r"Try global_batch_pairs = 126"):
        check_batch_sizes(cfg("train.global_batch_pairs=128"), dp=3)


def test_interleaved_pipeline_needs_pp_microbatches():
    c = cfg("train.global_batch_pairs=8", "train.micro_batch_pairs=4", "parallel.pp=4", "parallel.vpp=2",
            "data.packing=false")
    with pytest.raises(ConfigError, match=r"needs at least parallel.pp=4 micro-batches per step.* = 2"):
        check_batch_sizes(c, dp=1)
    assert check_batch_sizes(cfg("train.global_batch_pairs=16", "train.micro_batch_pairs=4", "parallel.pp=4",
                                 "parallel.vpp=2", "data.packing=false"), dp=1) == 4
    # Packed: at least PP rows per rank, each holding a pair.
    with pytest.raises(ConfigError, match=r"needs at least parallel.pp=4 micro-batches per step, each with a pair, "
                                          r"but train.global_batch_pairs \(8\) / DP 4 = 2 pairs per rank"):
        check_batch_sizes(cfg("train.global_batch_pairs=8", "parallel.pp=4", "parallel.vpp=2"), dp=4)
    assert check_batch_sizes(cfg("train.global_batch_pairs=8", "parallel.pp=4", "parallel.vpp=2"), dp=2) is None


def test_total_steps_from_epochs_or_max_steps():
    assert total_steps(cfg("train.global_batch_pairs=128", "train.epochs=1").train, 61135) == 477
    assert total_steps(cfg("train.global_batch_pairs=128", "train.epochs=2.5").train, 61135) == 1192  # floor(477 x 2.5)
    assert total_steps(cfg("train.global_batch_pairs=128", "train.max_steps=10").train, 61135) == 10
    with pytest.raises(ConfigError, match="exceeds the 100 training pairs"):
        total_steps(cfg("train.global_batch_pairs=128").train, 100)
