"""Plain forward passes through the (possibly pipelined) model: logits for parity checks and demos.

Training and evaluation go through :mod:`simpo_mcore.step`; this module returns full-vocabulary
logits, which the log-prob head deliberately never materialises.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


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
