"""Shared by the parity scripts: the test batches, the HF reference (run on every rank), and the
worst-error-over-ranks report."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from simpo_mcore.model.forward import packed_row_params

BATCH, SEQ = 3, 96
"""SEQ > 64 = the rope-scaling model's original_max_position_embeddings, > 16 = the families' sliding window
(``helpers.WINDOW``), and divisible by TP=2 (SP)."""
LENGTHS = (96, 70, 41)
"""Real tokens per row of the padded batch (right padding)."""


def batches(vocab: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (tokens [b, s], mask [b, s])}``, the same on every rank (own generator).

    ``padded``: right-padded rows whose padding holds random ids, not a pad id: if padding leaked
    into real positions, random ids would make that visible.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=g)  # [b, s]
    mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    padded = torch.randint(0, vocab, (BATCH, SEQ), generator=g)  # [b, s]
    return {"full": (tokens, torch.ones_like(mask)), "padded": (padded, mask)}


def load_hf(hf_dir: str):
    """The HF model of any family, fp32, with the attention implementation HF needs (eager for Gemma-2)."""
    from helpers import load_hf_model

    return load_hf_model(hf_dir)


def hf_logits(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF's logits [b, s, vocab] with its attention mask (causal + padding)."""
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits.float()


def write_worst_over_ranks(results: dict[str, dict[str, float]], out_path: str) -> None:
    """``{case: {name: error}}`` reduced to the worst value over ranks (every rank passes the same keys;
    the order is fixed by sorting) and written as JSON by rank 0."""
    keys = sorted((case, name) for case, errs in results.items() for name in errs)
    errs = torch.tensor([results[c][n] for c, n in keys], dtype=torch.float64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        out: dict[str, dict[str, float]] = {}
        for (case, name), value in zip(keys, errs.tolist()):
            out.setdefault(case, {})[name] = value
        with open(out_path, "w") as f:
            json.dump(out, f, indent=1)


@torch.no_grad()
def packed_logits(chunks: list, sequences: list[torch.Tensor], vocab_size: int) -> torch.Tensor | None:
    """Logits ``[sum of lengths, vocab_size]`` of ``sequences`` run end to end as one packed row (positions
    restarting per sequence; a padding segment makes the row a multiple of 4 for sequence parallelism), through
    megatron's schedule (any TP / PP / EP); ``None`` off the last pipeline stage."""
    lengths = [len(s) for s in sequences]
    tail = -sum(lengths) % 4
    tokens = torch.cat([*sequences, torch.zeros(tail, dtype=torch.long)])[None]  # [1, T]
    positions = torch.cat([torch.arange(n) for n in lengths + ([tail] if tail else [])])[None]  # [1, T]
    segments = lengths + ([tail] if tail else [])
    cu_seqlens = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)
    out = {}

    def forward_step(data_iterator, model):
        output = model(tokens, positions, None, packed_seq_params=packed_row_params(cu_seqlens, tuple(segments)))

        def loss_func(logits):
            full = gather_from_tensor_model_parallel_region(logits.float())  # [1, T, v_padded]
            out["logits"] = full[0, : sum(lengths), :vocab_size]
            return logits.new_zeros(()), {}

        return output, loss_func

    for c in chunks:
        c.eval()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter([None])] * len(chunks) if len(chunks) > 1 else iter([None]),
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1, seq_length=tokens.shape[1],
        micro_batch_size=1, forward_only=True)
    return out.get("logits") if ps.is_pipeline_last_stage() else None
