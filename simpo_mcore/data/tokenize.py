"""Rendered (prompt, chosen, rejected) strings -> token ids and labels, exactly as the reference.

This reproduces ``build_tokenized_answer`` / ``tokenize_row`` of princeton-nlp/SimPO's
``simpo_trainer.py`` (TRL-0.8-era DPO tokenisation), quirks included:

- the answer ids are ``enc(prompt + answer)[len(enc(prompt)):]``; when the last prompt token merged
  with the first answer token, the boundary moves back by one (that merged token is a response token);
- BOS is prepended only if not already first, EOS appended only if not already last;
- an over-long pair first loses prompt tokens (``keep_end`` keeps the last ``max_prompt_length``,
  which can cut the BOS), then each response is cut to ``max_length - max_prompt_length`` (a cut
  response loses its EOS).

Our additions: a pair the reference would train on with a NaN or reject with an opaque error raises
:class:`BadRow` with a short reason; the caller drops or reports it. Pure functions, no ``datasets``.
"""

from __future__ import annotations

from typing import Literal

from simpo_mcore.microbatch import LABEL_PAD

# Reasons a row cannot form a valid pair (the keys of the drop report).
MISSING_FIELD = "missing_field"
NOT_ASSISTANT = "last_turn_not_assistant"
EMPTY_RESPONSE = "empty_response"
PROMPT_MISMATCH = "prompt_mismatch"
NO_ROOM = "no_room"


class BadRow(ValueError):
    """A row that cannot form a valid preference pair; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_tokenized_answer(tokenizer, prompt: str, answer: str,
                           prompt_ids: list[int] | None = None) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` with ``prompt_ids + answer_ids == enc(prompt + answer)``.

    ``enc(a + b) != enc(a) + enc(b)`` for BPE/sentencepiece vocabularies, but
    ``enc(a + b)[:len(enc(a))]`` is ``enc(a)`` unless the last prompt token merged across the
    boundary; then that merged token goes to the answer. ``prompt_ids``: ``enc(prompt)`` if known.
    """
    full_ids = encode(tokenizer, prompt + answer)
    if prompt_ids is None:
        prompt_ids = encode(tokenizer, prompt)
    start = len(prompt_ids)
    if prompt_ids != full_ids[:start]:
        start -= 1
    return full_ids[:start], full_ids[start:]


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, *, max_length: int,
                  max_prompt_length: int,
                  truncation_mode: Literal["keep_end", "keep_start"] = "keep_end") -> dict[str, list[int]]:
    """One rendered pair -> ``chosen_input_ids``, ``chosen_labels``, ``rejected_*`` and the truncated
    ``prompt_input_ids`` (as the reference; for generation, not training); also the lengths before
    truncation, ``prompt_length``, ``chosen_length``, ``rejected_length``, and ``truncated``.

    Labels equal the ids on response positions (EOS included) and ``LABEL_PAD`` on the prompt; they
    are not shifted (logits at t predict labels[t + 1]). Raises :class:`BadRow` for an empty
    response, chosen/rejected prompts that tokenise differently beyond the merged last token, or a
    sequence left with no predicted label token. ``max_prompt_length < max_length``, as the config's validation
    requires.
    """
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ValueError(f"data.truncation_mode: unknown {truncation_mode!r}")
    prompt_ids = encode(tokenizer, prompt)
    chosen_prompt, chosen_ids = build_tokenized_answer(tokenizer, prompt, chosen, prompt_ids)
    rejected_prompt, rejected_ids = build_tokenized_answer(tokenizer, prompt, rejected, prompt_ids)
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        if not ids:
            raise BadRow(EMPTY_RESPONSE, f"the {name} response has no tokens")

    # The merged last token may differ between chosen and rejected; nothing else may.
    num_diff_tokens = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt))
    if num_diff_tokens > 1 or abs(len(chosen_prompt) - len(rejected_prompt)) > 1:
        raise BadRow(PROMPT_MISMATCH, f"chosen and rejected prompts tokenise differently "
                                      f"({num_diff_tokens} tokens differ, lengths {len(chosen_prompt)} "
                                      f"and {len(rejected_prompt)})")
    prompt_ids = prompt_ids[:min(len(chosen_prompt), len(rejected_prompt))]

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        prompt_ids, chosen_prompt, rejected_prompt = (
            ids if ids and ids[0] == bos else [bos] + ids
            for ids in (prompt_ids, chosen_prompt, rejected_prompt))
    if eos is not None:
        chosen_ids, rejected_ids = (ids if ids[-1] == eos else ids + [eos]
                                    for ids in (chosen_ids, rejected_ids))
    return _truncate_and_label(prompt_ids, chosen_prompt, rejected_prompt, chosen_ids, rejected_ids,
                               max_length=max_length, max_prompt_length=max_prompt_length,
                               truncation_mode=truncation_mode)


def _truncate_and_label(prompt_ids: list[int], chosen_prompt: list[int], rejected_prompt: list[int],
                        chosen_ids: list[int], rejected_ids: list[int], *, max_length: int, max_prompt_length: int,
                        truncation_mode: str) -> dict:
    """The reference's truncation of a pair whose BOS and EOS are in place, its labels, and the lengths before
    truncation (see :func:`tokenize_pair`)."""
    # Both checks use the longer response, for chosen and rejected alike (as the reference).
    longer = max(len(chosen_ids), len(rejected_ids))

    def cut_prompt(ids: list[int]) -> list[int]:
        if len(ids) + longer <= max_length:
            return ids
        return ids[:max_prompt_length] if truncation_mode == "keep_start" else ids[-max_prompt_length:]

    def cut_response(prompt_part: list[int], ids: list[int]) -> list[int]:
        if len(prompt_part) + longer <= max_length:
            return ids
        return ids[:max_length - max_prompt_length]

    # Lengths before truncation (BOS and EOS included), for the data preview.
    out = {"prompt_length": len(prompt_ids), "chosen_length": len(chosen_ids),
           "rejected_length": len(rejected_ids),
           "truncated": len(chosen_prompt) + longer > max_length or len(rejected_prompt) + longer > max_length}
    chosen_prompt, rejected_prompt, prompt_ids = map(cut_prompt, (chosen_prompt, rejected_prompt, prompt_ids))
    chosen_ids = cut_response(chosen_prompt, chosen_ids)
    rejected_ids = cut_response(rejected_prompt, rejected_ids)

    out["prompt_input_ids"] = prompt_ids
    for name, prompt_part, ids in (("chosen", chosen_prompt, chosen_ids),
                                   ("rejected", rejected_prompt, rejected_ids)):
        labels = [LABEL_PAD] * len(prompt_part) + ids
        # The first position is never predicted (no logit before it): with an empty prompt a
        # one-token response would give 0 label tokens, i.e. 0/0 = NaN in the average.
        if all(label == LABEL_PAD for label in labels[1:]):
            raise BadRow(NO_ROOM, f"the {name} sequence has no predicted response token "
                                  f"(prompt {len(prompt_part)} tokens, response {len(ids)})")
        out[f"{name}_input_ids"] = prompt_part + ids
        out[f"{name}_labels"] = labels
    return out
