"""The data-parallel pair sampler: deterministic, DP-invariant global batches, exact resume."""

from __future__ import annotations

import pytest

from simpo_mcore.data.sampler import PairSampler, eval_micro_batches

N, G, K = 100, 16, 2  # 100 pairs -> 6 steps per epoch, 4 pairs dropped each epoch


def sampler(dp_rank=0, dp_size=1, seed=7, k=K):
    return PairSampler(num_pairs=N, global_batch_pairs=G, micro_batch_pairs=k, dp_rank=dp_rank,
                       dp_size=dp_size, seed=seed)


def test_deterministic_and_seeded():
    assert sampler().global_batch(3) == sampler().global_batch(3)
    assert sampler(seed=8).global_batch(0) != sampler(seed=7).global_batch(0)


def test_epochs_cover_distinct_pairs_and_reshuffle():
    s = sampler()
    assert s.steps_per_epoch == 6
    epoch0 = [i for step in range(6) for i in s.global_batch(step)]
    epoch1 = [i for step in range(6, 12) for i in s.global_batch(step)]
    for epoch in (epoch0, epoch1):
        assert len(epoch) == len(set(epoch)) == 96 and set(epoch) <= set(range(N))
    assert epoch0 != epoch1 and set(epoch0) != set(epoch1)  # new order, other dropped tail


@pytest.mark.parametrize("dp_size, k", [(2, 2), (4, 1), (4, 4), (8, 2)])
def test_dp_shards_are_disjoint_and_union_is_the_dp1_batch(dp_size, k):
    for step in (0, 5, 6, 13):
        dp1 = sampler(k=k).global_batch(step)
        shards = []
        for rank in range(dp_size):
            micro = sampler(rank, dp_size, k=k).micro_batches(step)
            assert len(micro) == G // (k * dp_size) and all(len(m) == k for m in micro)
            shards.append([i for m in micro for i in m])
        assert [i for shard in shards for i in shard] == dp1  # rank r holds the r-th slice, in order
        assert len(set(dp1)) == G


def test_resume_from_consumed_pairs_is_exact():
    """The data position is the number of pairs consumed; a fresh sampler continues from it exactly."""
    s = sampler(1, 2)
    straight = [s.micro_batches(s.step_at(i * G)) for i in range(20)]
    for step in (0, 5, 6, 7, 19):
        fresh = sampler(1, 2)
        resumed = [fresh.micro_batches(fresh.step_at(c * G)) for c in range(step, 20)]
        assert resumed == straight[step:]
    with pytest.raises(ValueError, match="not a whole number"):
        s.step_at(G + 1)


def test_invalid_settings_name_the_field():
    with pytest.raises(ValueError, match="global_batch_pairs"):
        PairSampler(num_pairs=N, global_batch_pairs=12, micro_batch_pairs=4, dp_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PairSampler(num_pairs=10, global_batch_pairs=16, micro_batch_pairs=2)
    with pytest.raises(ValueError, match="dp_rank"):
        PairSampler(num_pairs=N, global_batch_pairs=16, micro_batch_pairs=2, dp_rank=2, dp_size=2)


def test_eval_covers_all_pairs_in_order():
    assert eval_micro_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    shards = [eval_micro_batches(11, 2, rank, 3) for rank in range(3)]
    assert shards == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10]]]
    assert eval_micro_batches(1, 2, 1, 2) == []  # more ranks than pairs: an empty shard
