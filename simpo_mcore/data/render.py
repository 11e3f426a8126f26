"""A raw preference row -> ``(prompt, chosen, rejected)`` strings, rendered as the reference does.

A row is first read as a :class:`~simpo_mcore.data.formats.Pair` (:mod:`formats`: which layouts
exist and which turns are the prompt). Message pairs are then rendered with the chat template as
``run_simpo.py: apply_chat_template`` (task ``simpo``) does: the prompt conversation, after an empty
system message is inserted when the template mentions one; each response rendered alone as an
assistant chat, minus a leading BOS string (``response_rendering: alone``). So for Llama-3 the
assistant header belongs to the response. A template that adds a default system prompt to every
chat puts that text into each response too; :func:`template_response_prefix` finds it and
``response_rendering: in_conversation`` renders each response as the text the template adds after
the prompt in the whole conversation instead. Plain-text pairs are used as they are.

Template errors on a row (``raise_exception`` in the template, an undefined variable) make it a
bad row (reason ``template_error``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from simpo_mcore.data.formats import FORMATS, Pair, detect_format, parse_row, value_kind
from simpo_mcore.data.tokenize import MISSING_FIELD, BadRow

TEMPLATE_ERROR = "template_error"


@dataclass(frozen=True)
class RenderOptions:
    format: str = "auto"
    """The rows' format (:data:`formats.FORMATS`); ``auto`` detects it from each row."""
    chat_template: str | None = None
    """Jinja template text; ``None`` uses the tokenizer's."""
    plain_strings: str = "raw"
    """``raw`` or ``chat`` (``data.plain_strings``)."""
    response_rendering: str = "alone"
    """``alone`` (the reference) or ``in_conversation`` (``data.response_rendering``)."""


def read_chat_template(value: str | None) -> str | None:
    """``data.chat_template``: a file's text, or the value itself when it is a Jinja template."""
    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"data.chat_template {value!r} is neither a file nor a Jinja template")
    return path.read_text()


def no_template_error(tokenizer, what: str) -> ValueError:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return ValueError(f"{what} need a chat template, and the tokenizer of model.tokenizer ({name}) has "
                      f"none: set data.chat_template to a template file or string")


def maybe_insert_system_message(messages: list[dict], template: str) -> list[dict]:
    """Prepend an empty system message when the template knows one and the first turn is not one."""
    if messages[0]["role"] != "system" and ("system" in template or "<|im_start|>" in template):
        return [{"role": "system", "content": ""}, *messages]
    return messages


def apply_template(tokenizer, messages: list[dict], template: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    except TemplateError as exc:
        raise BadRow(TEMPLATE_ERROR, f"the chat template refused the row: {exc}") from None


def strip_bos(text: str, tokenizer) -> str:
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


def render_messages(pair: Pair, tokenizer, template: str, response_rendering: str = "alone") -> tuple[str, str, str]:
    """Rendered ``(prompt, chosen, rejected)`` text of a message pair."""
    prompt = maybe_insert_system_message(list(pair.prompt), template)
    text_prompt = apply_template(tokenizer, prompt, template)
    responses = []
    for response in (pair.chosen, pair.rejected):
        if response_rendering == "alone":
            responses.append(strip_bos(apply_template(tokenizer, response, template), tokenizer))
            continue
        whole = apply_template(tokenizer, prompt + list(response), template)
        if not whole.startswith(text_prompt):
            raise BadRow(TEMPLATE_ERROR, "the chat template renders the prompt differently when a response "
                                         "follows it; data.response_rendering: alone renders this row")
        responses.append(whole[len(text_prompt):])
    return text_prompt, responses[0], responses[1]


def render_row(row: dict[str, Any], tokenizer, options: RenderOptions = RenderOptions()) -> tuple[str, str, str]:
    """Rendered ``(prompt, chosen, rejected)`` text of one row; raises :class:`BadRow`."""
    fmt = options.format
    if fmt == "auto":
        fmt = detect_format({key: value_kind(value) for key, value in row.items()})
        if fmt is None:
            raise BadRow(MISSING_FIELD, f"no known layout fits the fields {sorted(row)}")
    pair = parse_row(row, fmt, options.plain_strings)
    if not pair.is_chat:
        return pair.prompt, pair.chosen, pair.rejected
    template = options.chat_template or tokenizer.chat_template
    if template is None:
        raise no_template_error(tokenizer, "message-list rows")
    return render_messages(pair, tokenizer, template, options.response_rendering)


def needs_template(fmt: str, plain_strings: str) -> bool:
    return FORMATS[fmt].messages or plain_strings == "chat"


def template_response_prefix(tokenizer, template: str) -> tuple[str, str] | None:
    """``(alone, in_conversation)`` renderings of one probe reply when a response rendered alone
    differs from the same turn after a prompt (a default system prompt added to every chat, as
    SmolLM2's ChatML does), else ``None`` (also when the template refuses the probe)."""
    probe = Pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}],
                 [{"role": "assistant", "content": "Hello"}])
    try:
        alone = render_messages(probe, tokenizer, template, "alone")[1]
        in_conversation = render_messages(probe, tokenizer, template, "in_conversation")[1]
    except BadRow:
        return None
    return None if alone == in_conversation else (alone, in_conversation)


def describe_response_prefix(alone: str, in_conversation: str) -> str:
    """The warning for :func:`template_response_prefix`'s finding."""
    if alone.endswith(in_conversation):
        what = f"adds {alone[:-len(in_conversation)]!r} before every response rendered alone"
    else:
        what = (f"renders a reply alone as {alone!r} but as {in_conversation!r} after a prompt")
    return (f"the chat template {what}; with data.response_rendering: alone (the reference's rendering) "
            f"that text is part of every response's labels and is trained on. data.response_rendering: "
            f"in_conversation trains on the assistant turn only")
