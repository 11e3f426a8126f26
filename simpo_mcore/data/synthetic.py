"""The embedded default: a character tokenizer and learnable preference rows, nothing from a hub.

The tokenizer is a ``tokenizers`` WordLevel model over printable ASCII plus a few special tokens,
wrapped in ``transformers.PreTrainedTokenizerFast`` with a small chat template; it round-trips
through ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` so it can be stored with checkpoints.

The rows follow the UltraFeedback schema (``prompt``, ``prompt_id``, ``chosen`` / ``rejected`` message
lists). The task is instruction following on digit strings: the user asks to sort 4-8 digits ``up``
or ``down``; the chosen reply does, the rejected reply sorts the other way or leaves the digits as
they are. A random 2-layer Llama (hidden 64) trained with SimPO (beta 2, gamma/beta 0.5, lr 1e-3,
16 pairs a step) goes from ~0.5 to > 0.95 held-out reward accuracy within 50 steps. Train and eval
prompts are disjoint by construction (a hash of the prompt text picks the split).
"""

from __future__ import annotations

import hashlib
import random

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|eot|>"]
"""Ids 0..7: pad 0, bos 1, eos 2 (the tiny Llamas in the tests use these ids)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""Llama-3 style: BOS before the first message, a role token, the content, an end-of-turn token.
The pipeline then appends EOS to each response, so a response is ``<|assistant|> text <|eot|> </s>``."""

EVAL_FRACTION_256THS = 32
"""Prompts whose SHA-256 starts with a byte below this (1/8 of them) belong to the eval split."""

DIRECTIONS = ("up", "down")

TASK_VERSION = 1
"""Bump when the generated rows change (it is part of the tokenised-data cache key)."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: 8 special tokens + ``\\n`` + printable ASCII (104 ids)."""
    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", chat_template=CHAT_TEMPLATE, model_max_length=4096)


def _split_of(prompt: str) -> str:
    first_byte = hashlib.sha256(prompt.encode()).digest()[0]
    return "eval" if first_byte < EVAL_FRACTION_256THS else "train"


def generate_rows(num_rows: int, split: str = "train", seed: int = 0, min_digits: int = 4,
                  max_digits: int = 8) -> list[dict]:
    """``num_rows`` UltraFeedback-schema rows of ``split`` (``train`` or ``eval``), deterministic in
    ``seed``. A prompt never appears in both splits; within a split a prompt may repeat (rarely).

    ``sort up 5120`` -> chosen ``0125``; rejected is, with equal odds, the other direction ``5210``
    or the digits unchanged ``5120`` (redrawn while that equals the chosen reply).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"simpo-synthetic-{seed}-{split}")
    rows = []
    while len(rows) < num_rows:
        direction = rng.choice(DIRECTIONS)
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits)))
        prompt = f"sort {direction} {digits}"
        chosen = "".join(sorted(digits, reverse=direction == "down"))
        rejected = rng.choice(["".join(sorted(digits, reverse=direction == "up")), digits])
        if rejected == chosen or _split_of(prompt) != split:
            continue
        user = {"role": "user", "content": prompt}
        rows.append({
            "prompt": prompt,
            "prompt_id": hashlib.sha256(prompt.encode()).hexdigest()[:16],
            "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}],
        })
    return rows
