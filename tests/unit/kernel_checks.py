"""The fused head's elementwise passes (plain and with final logit soft-capping): Triton kernels against the
torch implementation and float64.

Run by ``test_logprobs_kernels.py`` in a fresh process with ``TRITON_INTERPRET=1`` (Triton reads it when it
is imported), so the Triton kernels run on a CPU: the same kernel source, executed with numpy. That proves
the indexing, masking and arithmetic; speed needs a GPU (``benchmarks/``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers import SOFTCAP, abs_err, check_fused_head_against_reference

from simpo_mcore import logprobs_kernels as kernels
from simpo_mcore.parallel import ensure_process_group


@pytest.fixture
def interpreted():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("run with TRITON_INTERPRET=1 set before Triton is imported (test_logprobs_kernels.py does)")


@pytest.fixture(scope="module")
def tp_group():
    ensure_process_group()
    return dist.new_group([dist.get_rank()])


def logits(rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 4).to(dtype)


def capped_fp64(z, softcap):
    z = z.double()
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def sum_exp_fp64(z, row_max, softcap=None):
    return (capped_fp64(z, softcap) - row_max.double()[:, None]).exp().sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols, softcap", [(1, None), (100, None), (5000, None), (100, SOFTCAP), (5000, SOFTCAP)],
                         ids=["1", "100", "5000", "100-softcap", "5000-softcap"])  # below, near, above a block
def test_sum_exp_triton_equals_torch_and_fp64(interpreted, dtype, cols, softcap):
    wide = logits(9, cols + 3, dtype)
    z = wide[:, 2:cols + 2]  # a strided view, as the fused head's chunks of a wider tensor can be
    row_max = capped_fp64(z, softcap).max(-1).values.float()
    before = z.clone()
    out = {k: kernels.sum_exp(z, row_max, k, softcap=softcap) for k in ("torch", "triton")}
    assert torch.equal(z, before)
    ref = sum_exp_fp64(z, row_max, softcap)
    for k, v in out.items():
        assert v.dtype == torch.float32 and v.shape == (9,)
        assert ((v.double() - ref) / ref).abs().max() < 2e-6, k


def test_no_columns(interpreted):
    """A TP rank whose vocabulary shard is all padding has no real column: its share of the sum is 0, and
    the gradient pass has nothing to write."""
    z = torch.empty(3, 0, dtype=torch.bfloat16)
    row_max = torch.full((3,), float("-inf"))
    for kernel in ("torch", "triton"):
        assert torch.equal(kernels.sum_exp(z, row_max, kernel), torch.zeros(3)), kernel
        out = kernels.softmax_grad_(z, torch.zeros(3), torch.ones(3), torch.tensor([-1, 0, 5]), kernel)
        assert out is z and out.shape == (3, 0), kernel


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_grad_triton_equals_torch(interpreted, dtype, softcap):
    rows, cols = 11, 5000
    z = logits(rows, cols, dtype)
    y = capped_fp64(z, softcap)  # the logits the softmax is over
    lse = torch.logsumexp(y, -1).float()
    scale = torch.randn(rows, generator=torch.Generator().manual_seed(3))
    target = torch.randint(0, cols, (rows,), generator=torch.Generator().manual_seed(4))
    target[2] = -1  # target on another rank or slice
    target[5] = cols + 9  # likewise, beyond this slice
    target[7] = cols - 1  # the last column
    p = (y - lse.double()[:, None]).exp()
    onehot = torch.zeros_like(p)
    has = (target >= 0) & (target < cols)
    onehot[has.nonzero().squeeze(1), target[has]] = 1.0
    ref = scale.double()[:, None] * (p - onehot)
    if softcap is not None:  # d y / d z
        ref = ref * (1 - torch.tanh(z.double() / softcap) ** 2)
    got = {k: kernels.softmax_grad_(z.clone(), lse, scale, target, k, softcap) for k in ("torch", "triton")}
    if dtype == torch.float32:
        for k, v in got.items():
            assert abs_err(v, ref) < 1e-6, k
    else:
        # One rounding to bf16 from fp32 values that agree to a few ulps: equal, or one bf16 ulp apart.
        ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp(min=1e-30)
        for k, v in got.items():
            assert ((v.double() - ref).abs() <= ulp).all(), k
        assert (got["torch"] != got["triton"]).float().mean() < 0.01


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunk_tokens", [7, 1000])
def test_fused_head_with_triton_kernels_matches_full_log_softmax(interpreted, tp_group, chunk_tokens, recompute,
                                                                 softcap):
    check_fused_head_against_reference(tp_group, chunk_tokens, kernel="triton", recompute=recompute,
                                       softcap=softcap)


def test_kernel_choice():
    cpu = torch.zeros(1)
    assert kernels.resolve("auto", cpu) == "torch"  # Triton only for CUDA tensors
    assert kernels.resolve("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="head kernel must be one of"):
        kernels.resolve("cuda", cpu)
