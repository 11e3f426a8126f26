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
