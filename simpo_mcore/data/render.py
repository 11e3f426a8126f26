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

Templates come from :mod:`templates` (named ones, files, Jinja text; bounded rendering). Template errors on
a row (``raise_exception`` in the template, an undefined variable, any exception of the template's code)
make it a bad row (reason ``template_error``). Where the reference would insert a system message into a
template that refuses system turns (Gemma's), none is inserted (:func:`takes_system_turn`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simpo_mcore.data.formats import FORMATS, Pair, detect_format, parse_row, value_kind
from simpo_mcore.data.templates import TEMPLATE_ERROR, render_chat
from simpo_mcore.data.tokenize import MISSING_FIELD, BadRow

ALONE_REFUSED = "the chat template refused a response rendered alone"
"""How the detail of a bad row starts when only ``response_rendering: alone`` made it bad."""
IN_CONVERSATION_HINT = ("data.response_rendering: in_conversation renders each response after its prompt, as "
                        "templates that check the order of turns (Llama-2's, Mistral's, Gemma's) need")


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
    template_label: str = "the chat template"
    """How errors name the template (:func:`templates.template_label`)."""
    system_turn: bool | None = None
    """Whether an empty system turn goes before a prompt that has none (:func:`takes_system_turn`);
    ``None``: the reference's rule alone (the template mentions ``system`` or is ChatML)."""


def no_template_error(tokenizer, what: str) -> ValueError:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return ValueError(f"{what} need a chat template, and the tokenizer of model.tokenizer ({name}) has "
                      f"none: set data.chat_template to a template name, file or string")


def mentions_system(template: str) -> bool:
    """The reference's rule (alignment-handbook ``maybe_insert_system_message``)."""
    return "system" in template or "<|im_start|>" in template


def takes_system_turn(tokenizer, template: str, label: str) -> bool:
    """The reference's rule, except for a template that refuses a system turn (Gemma's raises "System role
    not supported"): inserting one there would make every row a template error."""
    if not mentions_system(template):
        return False
    try:
        render_chat(tokenizer, [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], template,
                    label)
    except BadRow:
        return False
    return True


def maybe_insert_system_message(messages: list[dict], template: str, system_turn: bool | None = None) -> list[dict]:
    """Prepend an empty system message when the template takes one and the first turn is not one."""
    if system_turn is None:
        system_turn = mentions_system(template)
    if system_turn and messages[0]["role"] != "system":
        return [{"role": "system", "content": ""}, *messages]
    return messages


def strip_bos(text: str, tokenizer) -> str:
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


def _render(tokenizer, messages: list[dict], template: str, label: str, what: str) -> str:
    try:
        return render_chat(tokenizer, messages, template, label)
    except BadRow as exc:
        raise BadRow(TEMPLATE_ERROR, f"{what}: {exc.detail}") from None


def render_messages(pair: Pair, tokenizer, template: str, response_rendering: str = "alone", *,
                    label: str = "the chat template", system_turn: bool | None = None) -> tuple[str, str, str]:
    """Rendered ``(prompt, chosen, rejected)`` text of a message pair."""
    prompt = maybe_insert_system_message(list(pair.prompt), template, system_turn)
    refused = "the chat template refused the row"
    text_prompt = _render(tokenizer, prompt, template, label, refused)
    responses = []
    for response in (pair.chosen, pair.rejected):
        if response_rendering == "alone":
            try:
                responses.append(strip_bos(render_chat(tokenizer, response, template, label), tokenizer))
            except BadRow as exc:
                _render(tokenizer, prompt + list(response), template, label, refused)  # fails too: not the rendering
                raise BadRow(TEMPLATE_ERROR, f"{ALONE_REFUSED} ({exc.detail}) but renders it after its prompt") \
                    from None
            continue
        whole = _render(tokenizer, prompt + list(response), template, label, refused)
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
    return render_messages(pair, tokenizer, template, options.response_rendering, label=options.template_label,
                           system_turn=options.system_turn)


def needs_template(fmt: str, plain_strings: str) -> bool:
    return FORMATS[fmt].messages or plain_strings == "chat"


def template_response_prefix(tokenizer, template: str, label: str = "the chat template",
                             system_turn: bool | None = None) -> tuple[str, str] | None:
    """``(alone, in_conversation)`` renderings of one probe reply when a response rendered alone
    differs from the same turn after a prompt (a default system prompt added to every chat, as
    SmolLM2's ChatML does), else ``None`` (also when the template refuses the probe)."""
    probe = Pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}],
                 [{"role": "assistant", "content": "Hello"}])
    try:
        alone = render_messages(probe, tokenizer, template, "alone", label=label, system_turn=system_turn)[1]
        in_conversation = render_messages(probe, tokenizer, template, "in_conversation", label=label,
                                          system_turn=system_turn)[1]
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
