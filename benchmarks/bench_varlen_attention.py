"""Causal attention over one packed row on the CPU: which varlen path the SDPA spec should take.

    python benchmarks/bench_varlen_attention.py            # one thread, as the test ranks run

One row of about 8k tokens packed with whole pairs of real lengths (``bench_packing``'s: the shared UltraFeedback
sample, else its synthetic twin), 4 query heads / 2 key-value heads of 64, fp32, forward + backward:

* ``per_sequence``: ``F.scaled_dot_product_attention(is_causal=True)`` on each segment (what
  ``simpo_mcore.model.specs.SDPAttention`` does with a packed row);
* ``block_mask``: one call over the row with a block-diagonal causal boolean mask built from per-token
  sequence ids and positions;
* ``flex``: ``torch.nn.attention.flex_attention`` with the same mask as a block mask (compiled).

Prints the best of 3 timed calls of each and the largest difference of their outputs from ``per_sequence``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
import torch.nn.functional as F
from bench_packing import pair_lengths, shared_pairs, synthetic_pairs


def packed_row(capacity: int, seed: int) -> list[int]:
    pairs = shared_pairs() or synthetic_pairs()
    lengths = pair_lengths(pairs)
    rng = random.Random(seed)
    row, used = [], 0
    while True:
        chosen, rejected = lengths[rng.randrange(len(lengths))]
        if used + chosen + rejected > capacity:
            return row
        row += [chosen, rejected]
        used += chosen + rejected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="row capacity (default 8192)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seqlens = packed_row(args.tokens, seed=0)
    t = sum(seqlens)
    print(f"row: {t} tokens, {len(seqlens)} sequences (longest {max(seqlens)}), {args.threads} thread(s)")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, t, 64, generator=g).requires_grad_()  # [1, np, t, hn]
    k = torch.randn(1, 2, t, 64, generator=g).requires_grad_()  # [1, ng, t, hn]
    v = torch.randn(1, 2, t, 64, generator=g).requires_grad_()  # [1, ng, t, hn]
    seq_id = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))  # [t]
    position = torch.cat([torch.arange(n) for n in seqlens])  # [t]

    def per_sequence():
        outs, start = [], 0
        for n in seqlens:
            s = slice(start, start + n)
            outs.append(F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True,
                                                       enable_gqa=True))
            start += n
        return torch.cat(outs, dim=2)

    def block_mask():
        mask = (seq_id[:, None] == seq_id[None, :]) & (position[:, None] >= position[None, :])  # [t, t]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def causal_within(b, h, qi, ki):
            return (seq_id[qi] == seq_id[ki]) & (qi >= ki)

        mask = create_block_mask(causal_within, 1, 1, t, t, device="cpu")
        return torch.compile(flex_attention)(q, k, v, block_mask=mask, enable_gqa=True)

    reference = per_sequence().detach()
    for name, fn in (("per_sequence", per_sequence), ("block_mask", block_mask), ("flex", flex)):
        try:
            out = fn()
            out.sum().backward()  # warm-up (and, for flex, the compilation)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                fn().sum().backward()
                best = min(best, time.perf_counter() - t0)
            diff = (out.detach() - reference).abs().max().item()
            print(f"  {name:<13} {best:7.3f} s forward + backward   max |out - per_sequence| {diff:.1e}")
        except Exception as exc:  # noqa: BLE001 - a path that does not run here is a result too
            print(f"  {name:<13} does not run: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
