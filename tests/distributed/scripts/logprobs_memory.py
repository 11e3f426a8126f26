"""Peak host memory of one log-prob head, forward + backward, in a fresh process (single rank, TP=1).

    python tests/distributed/scripts/logprobs_memory.py --head fused --tokens 8192 --hidden 64

Heads: ``naive`` (logits -> .float() -> log_softmax -> gather), ``unfused`` (logits ->
:func:`vocab_parallel_token_logps`), ``fused`` (:func:`fused_token_logps`). The inputs (hidden states,
weight, labels) are allocated first; then the head's forward and backward run once and two numbers are
reported, both counting every tensor the head and its backward allocate (logits, temporaries, the hidden
and weight gradients):

* ``rss_rise_mib``: the peak resident set size (``ru_maxrss``) minus the resident size just before;
* ``alloc_peak_mib``: the peak of live bytes in torch's CPU allocator, integrated from the profiler's
  memory events (exact, independent of malloc and of the process's earlier high-water mark).

Prints one JSON line. Not a test: docs/logprobs.md records its numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.distributed as dist

from simpo_mcore.logprobs import fused_token_logps, vocab_parallel_token_logps
from simpo_mcore.parallel import ensure_process_group

SEQS = 4  # 2 pairs x chosen/rejected


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def naive_head(hidden, weight, labels, vocab_size):
    logits = hidden @ weight.t()  # [s, b, v_pad]
    if vocab_size < logits.shape[-1]:  # (not the case at TP=1 for Llama-3: 128256 = 1002 x 128)
        logits = logits[..., :vocab_size]  # [s, b, v]
    logps = logits.float().log_softmax(dim=-1)  # [s, b, v] fp32
    valid = labels.t() != -100  # [s, b]
    token = logps.gather(-1, torch.where(valid, labels.t(), 0)[..., None]).squeeze(-1)  # [s, b]
    return torch.where(valid, token, 0.0).t()  # [b, s]


def run_head(head, hidden, weight, labels, vocab_size, group, chunk_tokens, coef):
    """Forward + backward of one head under a SimPO-like objective (per-sequence averages, mixed)."""
    if head == "naive":
        token_logps = naive_head(hidden, weight, labels, vocab_size)
    elif head == "unfused":
        logits = hidden @ weight.t()  # [s, b, v]
        token_logps = vocab_parallel_token_logps(logits, labels, vocab_size, group, chunk_tokens=chunk_tokens)
        del logits  # held by the head's autograd graph, not by us
    else:  # fused, or fused_keep: the forward's logits kept for the backward
        token_logps = fused_token_logps(hidden, weight, labels, vocab_size, group, chunk_tokens=chunk_tokens,
                                        recompute=head == "fused")
    mask = labels != -100
    avg_logps = (token_logps * mask).sum(-1) / mask.sum(-1)
    (coef * avg_logps).sum().backward()


def allocator_peak_bytes(prof) -> int:
    """Peak live bytes over the profiled region: the running sum of allocations (+) and frees (-)."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--head", choices=["naive", "unfused", "fused", "fused_keep"], required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ensure_process_group()
    group = dist.new_group([0])

    seq_len = args.tokens // SEQS
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(seq_len, SEQS, args.hidden, generator=g).to(dtype).requires_grad_()  # [s, b, h]
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.3).to(dtype).requires_grad_()  # [v, h]
    labels = torch.randint(0, args.vocab, (SEQS, seq_len), generator=g)  # [b, s]
    labels[:, : seq_len // 2] = -100  # the prompt half
    coef = torch.randn(SEQS, generator=g)

    # A warm-up on a few tokens so that one-off allocations (thread pools, gloo) are not counted.
    _ = fused_token_logps(hidden[:2].detach(), weight.detach(), labels[:, :2], args.vocab, group, chunk_tokens=4)

    before, max_before = rss_mib(), max_rss_mib()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run_head(args.head, hidden, weight, labels, args.vocab, group, args.chunk_tokens, coef)
    seconds = time.perf_counter() - start
    peak = max_rss_mib()
    print(json.dumps(dict(
        head=args.head, dtype=args.dtype, tokens=args.tokens, vocab=args.vocab, hidden=args.hidden,
        chunk_tokens=args.chunk_tokens if args.head != "naive" else None, threads=args.threads,
        alloc_peak_mib=round(allocator_peak_bytes(prof) / 2**20, 1),
        rss_rise_mib=round(peak - before, 1), new_rss_high=peak > max_before, cpu_seconds=round(seconds, 1),
        grad_norms=[round(hidden.grad.float().norm().item(), 4), round(weight.grad.float().norm().item(), 4)],
    )))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
