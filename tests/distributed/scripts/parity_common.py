"""Shared by the parity scripts: the test batches and the HF reference (run on every rank)."""

from __future__ import annotations

import torch

BATCH, SEQ = 3, 96
"""SEQ > 64 = the rope-scaling model's original_max_position_embeddings, and divisible by TP=2 (SP)."""
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
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def hf_logits(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF's logits [b, s, vocab] with its attention mask (causal + padding)."""
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits.float()
