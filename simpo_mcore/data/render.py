"""A raw preference row -> ``(prompt, chosen, rejected)`` strings, as the reference renders them.

Two schemas:

- UltraFeedback (``HuggingFaceH4/ultrafeedback_binarized``): ``chosen`` / ``rejected`` are message
  lists ``[{role, content}, ...]`` ending with the assistant reply. The prompt is ``chosen[:-1]``
  (or ``prompt`` when that is itself a message list), rendered with the tokenizer's chat template
  after inserting an empty system message when the template mentions one; each response is its
  final message rendered alone, minus a leading BOS string (``run_simpo.py: apply_chat_template``,
  task ``simpo``). So for Llama-3 the assistant header belongs to the response.
- Plain strings: ``prompt``, ``chosen``, ``rejected`` are used as they are (no chat template).
"""

from __future__ import annotations

from typing import Any

from simpo_mcore.data.tokenize import MISSING_FIELD, NOT_ASSISTANT, PROMPT_MISMATCH, BadRow


def is_openai_format(messages: Any) -> bool:
    """A list of ``{role, content}`` dicts (alignment-handbook's test, which accepts ``[]``)."""
    return (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)
            and all("role" in m and "content" in m for m in messages))


def maybe_insert_system_message(messages: list[dict], tokenizer) -> list[dict]:
    """Prepend an empty system message when the template knows one and the first turn is not one."""
    template = tokenizer.chat_template or ""
    if messages[0]["role"] != "system" and ("system" in template or "<|im_start|>" in template):
        return [{"role": "system", "content": ""}, *messages]
    return messages


def render_row(row: dict[str, Any], tokenizer) -> tuple[str, str, str]:
    """Rendered ``(prompt, chosen, rejected)`` text of one row; raises :class:`BadRow`."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise BadRow(MISSING_FIELD, f"{key!r} is missing")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise BadRow(MISSING_FIELD, "plain-string chosen/rejected need a string 'prompt'")
        return prompt, chosen, rejected
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not is_openai_format(value) or not value:
            raise BadRow(MISSING_FIELD, f"{key!r} is neither a string nor a list of {{role, content}} "
                                        f"messages")
        if value[-1]["role"] != "assistant":
            raise BadRow(NOT_ASSISTANT, f"the last {key} message has role {value[-1]['role']!r}")
        if any(not isinstance(m["content"], str) for m in value):
            raise BadRow(MISSING_FIELD, f"a {key} message has no string content")
    if tokenizer.chat_template is None:
        raise ValueError("message-list rows need a tokenizer with a chat template")

    if is_openai_format(prompt):
        prompt_messages, chosen_messages, rejected_messages = prompt, chosen, rejected
    else:
        prompt_messages = chosen[:-1]
        if _turns(rejected[:-1]) != _turns(prompt_messages):
            raise BadRow(PROMPT_MISMATCH, "chosen[:-1] and rejected[:-1] differ")
        chosen_messages, rejected_messages = chosen[-1:], rejected[-1:]
    if not prompt_messages:
        raise BadRow(MISSING_FIELD, "no prompt turns before the final assistant message")

    prompt_messages = maybe_insert_system_message(list(prompt_messages), tokenizer)
    text_prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False)
    return (text_prompt, _render_response(chosen_messages, tokenizer),
            _render_response(rejected_messages, tokenizer))


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def _render_response(messages: list[dict], tokenizer) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return text
