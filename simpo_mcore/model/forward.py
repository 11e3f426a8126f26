"""Plain forward passes through the (possibly pipelined) model: logits for parity checks and demos.

Training and evaluation go through :mod:`simpo_mcore.objective`; this module returns full-vocabulary
logits, which the log-prob head deliberately never materialises. It also builds the attention parameters
of a packed row (:func:`packed_row_params`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


@dataclass
class PackedRow(PackedSeqParams):
    """megatron's ``PackedSeqParams`` for one packed row (``qkv_format="thd"``, batch dimension 1), plus the
    segment lengths on the host: :class:`~simpo_mcore.model.specs.SDPAttention` splits the row by them
    without reading ``cu_seqlens`` back from the device. Transformer Engine reads the base fields only."""

    seqlens: tuple[int, ...] = ()
    padded_seqlens: tuple[int, ...] = ()
    """With ``cu_seqlens_q_padded``: the padded segment lengths (global, before the context-parallel split)."""


def packed_row_params(cu_seqlens: torch.Tensor, seqlens: tuple[int, ...], cu_seqlens_padded: torch.Tensor | None = None,
                      padded_seqlens: tuple[int, ...] | None = None) -> PackedRow:
    """``GPTModel.forward(packed_seq_params=...)`` for a row whose segments end at ``cu_seqlens`` ([m + 1] int32,
    from 0 to the row's length, on the model's device) and have the host lengths ``seqlens``: attention stays
    within each segment and RoPE restarts at each (megatron applies it per ``cu_seqlens`` segment; TE's fused
    attention takes them as they are). ``max_seqlen`` comes from the host lengths, so nothing waits for the
    device.

    Under context parallelism: ``cu_seqlens_padded`` / ``padded_seqlens``, the boundaries (on the device) and host
    lengths of the segments padded for the split (``data.context_parallel.PackedSplit``), global; ``cu_seqlens``
    then holds the real lengths. megatron splits the local row and its RoPE by the padded ones, TE's CP attention
    reads both, and ``max_seqlen`` is the longest padded segment (RoPE's table must cover every padded position)."""
    if cu_seqlens_padded is None:
        return PackedRow(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                         max_seqlen_q=max(seqlens), max_seqlen_kv=max(seqlens), seqlens=tuple(seqlens))
    return PackedRow(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                     cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
                     max_seqlen_q=max(padded_seqlens), max_seqlen_kv=max(padded_seqlens), seqlens=tuple(seqlens),
                     padded_seqlens=tuple(padded_seqlens))


@torch.no_grad()
def forward_logits(chunks: list, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Logits ``[b, s, vocab_size]`` (padded rows stripped, fp32) for ``tokens [b, s]``.

    Runs one micro-batch through megatron's schedule, so any TP / PP / VPP layout works. Returns
    the logits on the last pipeline stage and ``None`` elsewhere; ``tokens`` must be the same on
    every rank of the model-parallel group. ``vocab_size``: the real (unpadded) vocabulary.
    """
    b, s = tokens.shape
    out: dict[str, torch.Tensor] = {}

    def forward_step(data_iterator, model):
        logits = model(tokens, position_ids_like(tokens), attention_mask=None)

        def loss_func(output):
            # The model returns [b, s, v/tp] (vocab-parallel); gather the vocab shards.
            full = gather_from_tensor_model_parallel_region(output.float())  # [b, s, v_padded]
            out["logits"] = full[..., :vocab_size]
            return output.new_zeros(()), {}

        return logits, loss_func

    for c in chunks:
        c.eval()
    forward_backward = get_forward_backward_func()
    forward_backward(
        forward_step_func=forward_step,
        data_iterator=[iter([None])] * len(chunks) if len(chunks) > 1 else iter([None]),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    return out.get("logits") if ps.is_pipeline_last_stage() else None
