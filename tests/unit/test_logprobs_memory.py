"""Memory of the heads, forward + backward, counted exactly as the peak of live bytes in torch's CPU
allocator (profiler memory events), bf16 as on a GPU.

Sizes: T = 1024 tokens, V = 32000, h = 32; L = T x V x 4 bytes = 125 MiB (one fp32 [T, V] tensor).

* naive (bf16 logits -> .float() -> log_softmax -> gather): backward holds log_softmax's output, the
  scattered gradient and log_softmax's input gradient, 3 L = 375 MiB;
* unfused, chunk c = 256 tokens: bf16 logits (L/2) + their bf16 gradient (L/2) + one fp32 chunk
  (c x V x 4 = L/4) = 1.25 L;
* fused, chunk c = 256: one chunk of bf16 logits (c x V x 2) + a quarter of it in fp32 (c x V x 4 / 4),
  twice on a CPU, where ``bf16 - fp32`` first casts the bf16 block to a temporary (CUDA casts inside the
  kernel): c x V x 4 = 31.25 MiB, plus the bf16 weight gradient (V x h x 2 = 2 MiB) and the fp32
  hidden-gradient accumulator (T x h x 4 = 0.1 MiB): 33.4 MiB, about 0.09 of naive;
* fused with the logits kept (``recompute=False``): all bf16 logits (L/2) + the same two fp32 row blocks
  + the bf16 weight gradient + the bf16 hidden gradient (T x h x 2): 80.2 MiB, about 0.21 of naive.

A head that kept an extra full [T, V] tensor, or a doubled chunk, would break these bounds.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist
from helpers import SCRIPTS

from simpo_mcore.parallel import ensure_process_group

T, V, H, CHUNK = 1024, 32000, 32, 256
MIB = 2**20
L = T * V * 4


def _script():
    spec = importlib.util.spec_from_file_location("logprobs_memory", SCRIPTS / "logprobs_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peaks():
    ensure_process_group()
    group = dist.new_group([dist.get_rank()])
    script = _script()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T // 4, 4, H, generator=g).to(torch.bfloat16).requires_grad_()  # [s, b, h]
    weight = (torch.randn(V, H, generator=g) * 0.3).to(torch.bfloat16).requires_grad_()  # [v, h]
    labels = torch.randint(0, V, (4, T // 4), generator=g)  # [b, s]
    labels[:, :16] = -100
    coef = torch.randn(4, generator=g)
    out = {}
    for head in ("naive", "unfused", "fused", "fused_keep"):
        hidden.grad = weight.grad = None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            script.run_head(head, hidden, weight, labels, V, group, CHUNK, coef)
        out[head] = script.allocator_peak_bytes(prof)
    return out


def test_naive_head_holds_three_fp32_logits(peaks):
    # The baseline the others are compared with: if it were smaller, the ratios below would flatter us.
    assert 3 * L <= peaks["naive"] <= 3 * L + 8 * MIB


def test_unfused_head_holds_bf16_logits_their_grad_and_one_fp32_chunk(peaks):
    assert peaks["unfused"] <= L + CHUNK * V * 4 + 8 * MIB


def test_fused_head_holds_one_chunk(peaks):
    bound = CHUNK * V * 2 + 2 * (CHUNK // 4) * V * 4 + V * H * 2 + T * H * 4
    assert peaks["fused"] <= 1.02 * bound + 1 * MIB, (peaks["fused"] / MIB, bound / MIB)
    assert peaks["fused"] <= 0.1 * peaks["naive"]


def test_fused_head_keeping_its_logits_holds_them_once(peaks):
    bound = L // 2 + 2 * (CHUNK // 4) * V * 4 + V * H * 2 + T * H * 2
    assert peaks["fused_keep"] <= 1.02 * bound + 1 * MIB, (peaks["fused_keep"] / MIB, bound / MIB)
    assert peaks["fused_keep"] >= L // 2  # it does keep them: the memory it trades for a GEMM
