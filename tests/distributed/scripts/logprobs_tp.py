"""TP ranks vs the single-process full-vocabulary reference: fused (with and without sequence
parallelism) and unfused token log-probs and their gradients, plain and with final logit soft-capping.

Every rank builds the same full tensors from one seed, computes the float64 reference over the whole
unsharded vocabulary, then runs the head on its own shard. Errors are reduced with MAX over ranks and
rank 0 writes them as JSON to argv[1].
"""

from __future__ import annotations

import sys

import torch
from parity_common import write_worst_over_ranks

from simpo_mcore.config import ParallelConfig
from simpo_mcore.logprobs import fused_token_logps, vocab_parallel_token_logps
from simpo_mcore.microbatch import labelled_positions
from simpo_mcore.parallel import init_distributed, shutdown

S, B, H = 12, 3, 16  # s divisible by TP for sequence parallelism; 36 tokens
SOFTCAP = 2.0  # logits here have a standard deviation of about 2: the cap bends most of them


def make_inputs(vocab_size, v_pad, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g)
    weight = torch.randn(v_pad, H, generator=g) * 0.5
    weight[vocab_size:] = torch.randn(v_pad - vocab_size, H, generator=g) * 5.0  # loud padding
    labels = torch.randint(0, vocab_size, (B, S), generator=g)
    labels[0, :3] = -100
    labels[1, 9:] = -100
    labels[2, :5] = -100
    labels[0, 4], labels[0, 5], labels[1, 2] = 0, vocab_size - 1, v_pad // 2  # both ranks' edges
    if labels[1, 2] >= vocab_size:
        labels[1, 2] = vocab_size - 2
    return hidden, weight, labels


def reference(hidden, weight, labels, vocab_size, softcap=None):
    """float64 token log-probs [b, s] and grads of a SimPO-like objective wrt hidden, weight, logits."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logits = h @ w.t()  # [s, b, v_pad]
    logits.retain_grad()
    token = token_logps_of(logits, labels, vocab_size, softcap)
    objective(token, labels).backward()
    return token.detach(), h.grad, w.grad, logits.grad


def token_logps_of(logits, labels, vocab_size, softcap=None):
    logits = logits[..., :vocab_size]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logps = torch.log_softmax(logits, dim=-1)  # [s, b, v]
    valid = labels.t() != -100
    token = logps.gather(-1, torch.where(valid, labels.t(), 0)[..., None]).squeeze(-1)  # [s, b]
    return torch.where(valid, token, 0.0).t()  # [b, s]


def objective(token_logps, labels):
    mask = labels != -100
    avg = (token_logps.double() * mask).sum(-1) / mask.sum(-1)
    coef = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    return (coef * avg).sum()


def rel(x, ref):
    """max |x - ref| / max |ref|; the absolute error where ref is all zero (a rank holding only padding)."""
    scale = ref.double().abs().max().item()
    return (x.double() - ref.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def main(out_path):
    layout = init_distributed(ParallelConfig(tp=2), seed=0)
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    r, tp = layout.tp_rank, layout.tp
    results = {}
    # (vocab_size, v_pad): padding inside the last rank's shard; a last rank holding only padding.
    for vocab_size, v_pad in [(50, 64), (30, 64)]:
        hidden, weight, labels = make_inputs(vocab_size, v_pad, seed=vocab_size)
        refs = {cap: reference(hidden, weight, labels, vocab_size, cap) for cap in (None, SOFTCAP)}
        vl = v_pad // tp
        rows = slice(r * vl, (r + 1) * vl)
        for sp in (False, True):
            # chunk 5 with the logits recomputed and kept, and on the labelled tokens only; one chunk (1000);
            # soft-capped: chunk 5 recomputed and kept, one chunk
            for chunk, recompute, labelled, cap in ((5, True, False, None), (5, False, False, None),
                                                    (5, True, True, None), (1000, True, False, None),
                                                    (5, True, False, SOFTCAP), (5, False, False, SOFTCAP),
                                                    (1000, True, False, SOFTCAP)):
                ref, ref_gh, ref_gw, _ = refs[cap]
                s_rows = slice(r * S // tp, (r + 1) * S // tp) if sp else slice(None)
                h = hidden[s_rows].clone().requires_grad_()  # [s/tp, b, h] under SP
                w = weight[rows].clone().requires_grad_()  # [v_pad/tp, h]
                token = fused_token_logps(h, w, labels, vocab_size, group, sequence_parallel=sp,
                                          chunk_tokens=chunk, recompute=recompute,
                                          token_index=labelled_positions(labels) if labelled else None,
                                          softcap=cap)
                objective(token, labels).backward()
                case = (f"fused v{vocab_size}/{v_pad} sp={sp} chunk={chunk} recompute={recompute} "
                        f"labelled={labelled} softcap={cap}")
                results[case] = dict(
                    value=(token.double() - ref).abs().max().item(),
                    grad_hidden=rel(h.grad, ref_gh[s_rows]),
                    grad_weight=rel(w.grad, ref_gw[rows]),
                    grad_padded_rows=w.grad[max(0, vocab_size - r * vl):].abs().max().item()
                    if vocab_size < (r + 1) * vl else 0.0,
                )
        for chunk, cap in ((4, None), (1000, None), (4, SOFTCAP)):
            ref, _, _, ref_glogits = refs[cap]
            logits = (hidden @ weight[rows].t()).requires_grad_()  # [s, b, v_pad/tp] fp32
            before = logits.detach().clone()
            token = vocab_parallel_token_logps(logits, labels, vocab_size, group, chunk_tokens=chunk, softcap=cap)
            objective(token, labels).backward()
            results[f"unfused v{vocab_size}/{v_pad} chunk={chunk} softcap={cap}"] = dict(
                value=(token.double() - ref).abs().max().item(),
                grad_logits=rel(logits.grad, ref_glogits[..., rows]),
                grad_padded_columns=logits.grad[..., max(0, vocab_size - r * vl):].abs().max().item()
                if vocab_size < (r + 1) * vl else 0.0,
                logits_changed=float(not torch.equal(logits.detach(), before)),
            )
    write_worst_over_ranks(results, out_path)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
