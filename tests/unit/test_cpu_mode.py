"""``cpu_mode`` is a scope: inside it megatron's CUDA entry points run on the CPU, outside it nothing is
patched; ``init_distributed`` opens it for a CPU layout and ``shutdown`` closes it."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import random as mpu_random

from simpo_mcore import cpu_mode
from simpo_mcore.config import ParallelConfig
from simpo_mcore.parallel import distributed

PATCHED = [(torch.cuda, "current_device"), (torch.cuda, "manual_seed"), (torch.cuda, "synchronize"),
           (torch.cuda, "current_stream"), (torch.cuda, "Stream"), (torch.cuda.random, "get_rng_state"),
           (mpu_random, "_get_cuda_rng_state"), (mpu_random, "_set_cuda_rng_state")]


def originals():
    return [getattr(owner, name) for owner, name in PATCHED]


def test_redirect_patches_inside_and_restores_outside():
    before = originals()
    assert not cpu_mode.active()
    with cpu_mode.redirect():
        assert cpu_mode.active()
        assert torch.cuda.current_device() == "cpu"
        assert torch.zeros(2, device="cuda").device.type == "cpu"  # the function mode
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"  # megatron's assertion passes
        torch.cuda.manual_seed(5)
        a = torch.rand(3)
        torch.cuda.manual_seed(5)
        assert torch.equal(a, torch.rand(3))  # seeds the CPU generator
        with cpu_mode.redirect():  # re-entrant: the inner exit leaves the outer scope in force
            pass
        assert cpu_mode.active() and torch.cuda.current_device() == "cpu"
        assert [getattr(o, n) for o, n in PATCHED] != before
    assert not cpu_mode.active()
    assert originals() == before
    assert torch.ones(1).type() == "torch.FloatTensor"  # the function mode is gone
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")


def test_pinned_memory_is_plain_memory_inside_the_scope_only():
    """megatron's RoPE under context parallelism (``get_pos_emb_on_this_cp_rank``) builds its chunk index with
    ``torch.tensor(..., pin_memory=True).cuda()``: inside the scope that runs (unpinned) and picks the chunks
    rank r keeps, r and 2cp - 1 - r; outside it pinning still needs a GPU."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    emb = torch.arange(8.0).reshape(8, 1, 1, 1)  # [s, 1, 1, d]: position p holds p
    with cpu_mode.redirect():
        index = torch.tensor([1, 2], pin_memory=True)
        assert not index.is_pinned() and index.tolist() == [1, 2]
        rank1_of_2 = SimpleNamespace(size=lambda: 2, rank=lambda: 1)
        assert get_pos_emb_on_this_cp_rank(emb, 0, rank1_of_2).flatten().tolist() == [2, 3, 4, 5]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.tensor([1, 2], pin_memory=True)


def test_redirect_restores_after_an_exception():
    before = originals()
    with pytest.raises(KeyError), cpu_mode.redirect():
        raise KeyError("boom")
    assert not cpu_mode.active() and originals() == before


def test_without_gpu_wraps_a_call():
    seen = []

    @cpu_mode.without_gpu
    def save():
        seen.append(cpu_mode.active())

    save()
    assert seen == [not torch.cuda.is_available()] and not cpu_mode.active()


def test_a_cpu_job_is_scoped_by_the_process_groups():
    """``distributed(ParallelConfig(device='cpu'))``: CPU mode for the block, the layout's device is the
    CPU, and nothing is left patched afterwards."""
    before = originals()
    with distributed(ParallelConfig(device="cpu"), seed=0) as layout:
        assert layout.device == torch.device("cpu") and cpu_mode.active()
    assert not cpu_mode.active() and originals() == before
