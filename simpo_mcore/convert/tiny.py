"""The embedded default's model: a random tiny Llama over the tokenizer built in code.

It goes through the same path as a real model (HF directory -> converter -> megatron checkpoint),
so the demo exercises conversion too and needs nothing from any hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
from simpo_mcore.data.synthetic import build_tokenizer
from simpo_mcore.parallel import ensure_process_group

TINY_ARCH = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, **arch_overrides) -> Path:
    """Write ``out_dir/hf`` (HF model + tokenizer) and ``out_dir/mcore`` (converted); return the latter."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    arch = {**TINY_ARCH, **arch_overrides}
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **arch)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    torch.set_rng_state(generator_state)
    model.save_pretrained(out_dir / "hf", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "hf")
    ensure_process_group()
    convert_hf_to_mcore(out_dir / "hf", out_dir / "mcore", log=None)
    return out_dir / "mcore"
