"""Preference row layouts: which are recognised, how a file's layout is detected, and how a row of
each becomes a :class:`Pair` (one prompt, two responses; messages, or plain text).

Detection looks at the columns of a file and at the shape of their first non-empty values, and
takes the first format of :data:`FORMATS` that fits (docs/data.md has the same table):

=========================  =================================================  ============================
format                     columns (shape)                                    e.g.
=========================  =================================================  ============================
openai                     input ({messages}), preferred_output,              OpenAI preference fine-tuning
                           non_preferred_output (assistant messages)
sharegpt                   conversations ([{from, value}] or [{role,          LLaMA-Factory ranking data
                           content}]), chosen, rejected (a message or a
                           list), optional system (text)
h4                         prompt (text), chosen, rejected (message lists     HuggingFaceH4/ultrafeedback
                           or one message)                                    _binarized
conversational             prompt (messages), chosen, rejected (messages)     TRL conversational
implicit_conversational    chosen, rejected (messages), no prompt             TRL implicit prompt
implicit_standard          chosen, rejected (text), no prompt (or "" only)    Anthropic/hh-rlhf
standard                   prompt, chosen, rejected (text)                    TRL standard
=========================  =================================================  ============================

Message rows (every format but the two plain-text ones) become a prompt conversation and two
responses by :func:`split_conversation`: whole conversations (``chosen`` / ``rejected`` holding the
prompt turns too, whatever the ``prompt`` column holds) train on their final assistant turn only;
lists of assistant turns are the responses to the prompt (``prompt`` messages, or a ``prompt``
string as one user turn). Plain-text rows keep their text, or become one user and one assistant
turn with ``data.plain_strings: chat``. Implicit-prompt text rows split at the end of the longest
common prefix of chosen and rejected, as TRL's ``extract_prompt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from simpo_mcore.config import DATA_COLUMNS
from simpo_mcore.data.tokenize import MISSING_FIELD, NOT_ASSISTANT, PROMPT_MISMATCH, BadRow

UNSUPPORTED_ROLE = "unsupported_role"
UNSUPPORTED_TOOLS = "unsupported_tools"
ROW_TOO_LARGE = "row_too_large"

MAX_ROW_CHARS = 1 << 20
"""A row with more characters of text than this (every field together) is a bad row (``row_too_large``): no
pair needs it (``data.max_length`` keeps a few thousand tokens of it), and tokenising a megabyte-long text
takes hundreds of bytes per character (a 50 MB line took 19.7 GB)."""
OVERSIZE_COLUMN = "__simpo_row_bytes__"
"""A column the JSON reader adds to a file with a line too long to parse: that line's size in bytes."""

# The shape of a column's values.
TEXT = "text"
MESSAGES = "messages"            # [{role, content}, ...]
MESSAGE = "message"              # {role, content}
SHAREGPT_MESSAGES = "sharegpt messages"  # [{from, value}, ...]
SHAREGPT_MESSAGE = "sharegpt message"    # {from, value}
OPENAI_INPUT = "openai input"    # {messages: [...], ...}
NULL = "null"                    # present, but no non-empty value in the sample
BLANK = "blank text"             # "" (or white space) only: text where text is needed, no column where none may be
OTHER = "other"

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant"}
"""ShareGPT ``from`` tags we render; others (``observation``, ``function_call``) are unsupported."""

ANY_MESSAGES = frozenset({MESSAGES, MESSAGE, SHAREGPT_MESSAGES, SHAREGPT_MESSAGE})
ROLE_MESSAGES = frozenset({MESSAGES, MESSAGE})


@dataclass(frozen=True)
class Format:
    name: str
    title: str
    needs: dict[str, frozenset[str]]
    """Required columns and the value shapes accepted in each."""
    absent: tuple[str, ...] = ()
    """Columns that must not hold values (the implicit-prompt formats have no prompt)."""
    messages: bool = True
    """Rows are message lists (rendered with a chat template)."""
    shape: str = ""
    """The columns in words, for error messages."""

    def mismatch(self, kinds: dict[str, str]) -> str | None:
        """Why columns of these shapes are not this format; ``None`` if they are."""
        for column, accepted in self.needs.items():
            kind = kinds.get(column)
            if kind is None:
                return f"it has no {column!r} column"
            if kind not in accepted and not (kind == BLANK and TEXT in accepted):
                return f"its {column!r} column holds {kind}, not {' or '.join(sorted(accepted))}"
        for column in self.absent:
            # hh-rlhf exports often carry prompt: "" on every row: still rows without a prompt.
            if kinds.get(column, NULL) not in (NULL, BLANK):
                return f"it has a {column!r} column"
        return None


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("openai", "OpenAI preference fine-tuning",
           {"input": frozenset({OPENAI_INPUT}), "preferred_output": ROLE_MESSAGES,
            "non_preferred_output": ROLE_MESSAGES},
           shape="input {messages}, preferred_output and non_preferred_output messages"),
    Format("sharegpt", "ShareGPT / LLaMA-Factory ranking",
           {"conversations": frozenset({SHAREGPT_MESSAGES, MESSAGES}), "chosen": ANY_MESSAGES,
            "rejected": ANY_MESSAGES},
           shape="conversations [{from, value}], chosen and rejected {from, value}"),
    Format("h4", "H4 / UltraFeedback message lists",
           {"prompt": frozenset({TEXT}), "chosen": ROLE_MESSAGES, "rejected": ROLE_MESSAGES},
           shape="prompt text, chosen and rejected messages"),
    Format("conversational", "TRL conversational, prompt messages",
           {"prompt": frozenset({MESSAGES}), "chosen": ROLE_MESSAGES, "rejected": ROLE_MESSAGES},
           shape="prompt, chosen and rejected messages"),
    Format("implicit_conversational", "TRL conversational, implicit prompt",
           {"chosen": frozenset({MESSAGES}), "rejected": frozenset({MESSAGES})}, absent=("prompt",),
           shape="chosen and rejected messages, no prompt"),
    Format("implicit_standard", "plain strings, implicit prompt: hh-rlhf",
           {"chosen": frozenset({TEXT}), "rejected": frozenset({TEXT})}, absent=("prompt",),
           messages=False, shape="chosen and rejected text, no prompt (or an empty one)"),
    Format("standard", "TRL standard, plain strings",
           {"prompt": frozenset({TEXT}), "chosen": frozenset({TEXT}), "rejected": frozenset({TEXT})},
           messages=False, shape="prompt, chosen and rejected text"),
]}


@dataclass
class Pair:
    """One row's prompt and responses: all message lists, or all plain text."""
    prompt: list[dict] | str
    chosen: list[dict] | str
    rejected: list[dict] | str

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


# ------------------------------------------------------------------------------------ detection


def as_list_of_dicts(value: Any) -> Any:
    """A ``datasets.Sequence`` of message structs reads as a dict of equal-length lists (``{role:
    [...], content: [...]}``); that -> a list of dicts (anything else is returned as it is)."""
    if (isinstance(value, dict) and ("role" in value or "from" in value)
            and all(isinstance(v, list) for v in value.values()) and len({len(v) for v in value.values()}) == 1):
        return [dict(zip(value, items)) for items in zip(*value.values())]
    return value


def _message_kind(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    if value.get("role") is not None and "content" in value:
        return MESSAGE
    if value.get("from") is not None and "value" in value:
        return SHAREGPT_MESSAGE
    return None


def value_kind(value: Any) -> str:
    """The shape of one value (one of the constants above)."""
    value = as_list_of_dicts(value)
    if value is None or (isinstance(value, list) and not value):
        return NULL
    if isinstance(value, str):
        return TEXT if value.strip() else BLANK
    if isinstance(value, dict):
        if isinstance(value.get("messages"), list):
            return OPENAI_INPUT
        return _message_kind(value) or OTHER
    if isinstance(value, list):
        kinds = {_message_kind(m) for m in value}
        if kinds == {MESSAGE}:
            return MESSAGES
        if kinds == {SHAREGPT_MESSAGE}:
            return SHAREGPT_MESSAGES
    return OTHER


def column_kinds(rows, sample: int = 100, json_text: bool = False) -> dict[str, str]:
    """Each column's shape: that of its first non-empty value among the first ``sample`` rows (``BLANK`` when
    every value there is an empty string, ``NULL`` when none is there). ``json_text``: the values are JSON
    text (``sources.load_json``)."""
    head = rows[:min(sample, len(rows))]  # column -> values
    kinds = {}
    for column, values in head.items():
        if column == OVERSIZE_COLUMN:
            continue
        if json_text:
            values = [None if v is None else json.loads(v) for v in values]
        shapes = list(map(value_kind, values))
        found = [k for k in shapes if k not in (NULL, BLANK)]
        kinds[column] = found[0] if found else BLANK if BLANK in shapes else NULL
    return kinds


def describe_columns(kinds: dict[str, str]) -> str:
    return ", ".join(f"{column} ({kind})" for column, kind in kinds.items()) or "none"


def known_formats() -> str:
    return "; ".join(f"{f.name} ({f.shape})" for f in FORMATS.values())


def detect_format(kinds: dict[str, str]) -> str | None:
    """The first format of :data:`FORMATS` that columns of these shapes fit."""
    return next((name for name, f in FORMATS.items() if f.mismatch(kinds) is None), None)


def resolve_format(requested: str, kinds: dict[str, str], source: str) -> str:
    """``data.format`` for one file: detected (``auto``) or checked; ValueError naming the file."""
    if requested == "auto":
        found = detect_format(kinds)
        if found is None:
            raise ValueError(
                f"{source}: rows of an unknown layout, with columns {describe_columns(kinds)}. Known "
                f"formats: {known_formats()}. Rename columns with data.columns or pick one with "
                f"data.format (docs/data.md)")
        return found
    problem = FORMATS[requested].mismatch(kinds)
    if problem is not None:
        raise ValueError(f"{source}: data.format is {requested!r} but {problem} (columns: "
                         f"{describe_columns(kinds)})")
    return requested


def map_columns(rows, columns: dict[str, str], source: str):
    """``rows`` with the user's columns renamed to the names the formats read (``data.columns``)."""
    for role, name in columns.items():
        if role not in DATA_COLUMNS:
            raise ValueError(f"data.columns.{role}: unknown column role (known: {', '.join(DATA_COLUMNS)})")
        if name not in rows.column_names:
            raise ValueError(f"data.columns.{role}: {source} has no column {name!r} (columns: "
                             f"{', '.join(rows.column_names)})")
    # A column already named like a mapped role is replaced by the mapped one.
    shadowed = [role for role, name in columns.items() if role in rows.column_names and role != name
                and role not in columns.values()]
    if shadowed:
        rows = rows.remove_columns(shadowed)
    renames = {name: role for role, name in columns.items() if name != role}
    return rows.rename_columns(renames) if renames else rows


# ------------------------------------------------------------------------------------ rows


def text_chars(value: Any) -> int:
    """Characters of text in a value (strings, and the keys and strings of what it nests)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + text_chars(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(map(text_chars, value))
    return 0


def check_row_size(row: dict[str, Any]) -> None:
    """Refuse a row over :data:`MAX_ROW_CHARS` before anything renders or tokenises it."""
    size = text_chars(row)
    if size > MAX_ROW_CHARS:
        raise BadRow(ROW_TOO_LARGE, f"it holds {size} characters of text, over the limit of {MAX_ROW_CHARS}")


def to_messages(value: Any, key: str) -> list[dict]:
    """A message list (or one message) in ``{role, content}`` or ShareGPT ``{from, value}`` form
    -> ``{role, content}`` messages. Raises :class:`BadRow` for anything else."""
    value = as_list_of_dicts(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadRow(MISSING_FIELD, f"{key!r} is {'missing' if value is None else 'not a message list'}")
    out = []
    for message in value:
        if not isinstance(message, dict):
            raise BadRow(MISSING_FIELD, f"{key!r} holds a {type(message).__name__}, not a message")
        if message.get("role") is not None:
            role, content, extra = message["role"], message.get("content"), message
        elif message.get("from") is not None:
            tag = message["from"]
            role, content, extra = SHAREGPT_ROLES.get(tag, tag), message.get("value"), {}
        else:
            raise BadRow(MISSING_FIELD, f"a {key} message has no role")
        if role not in ROLES:
            raise BadRow(UNSUPPORTED_ROLE, f"a {key} message has role {role!r} (rendered roles: "
                                           f"{', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadRow(MISSING_FIELD, f"a {key} message has no string content")
        if extra:
            # Other keys (None where a column unifies several shapes) go to the template as given.
            out.append({k: v for k, v in extra.items() if k not in ("from", "value")} | {"role": role})
        else:
            out.append({"role": role, "content": content})
    return out


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def split_conversation(prompt: list[dict] | str | None, chosen: list[dict],
                       rejected: list[dict]) -> Pair:
    """Prompt messages and the two responses to train on.

    Whole conversations (a non-assistant turn in ``chosen`` and ``rejected``) train on their final
    assistant turn: the prompt is ``chosen[:-1]``, which must equal ``rejected[:-1]`` and start
    with the ``prompt`` messages when those are given (as the reference does for H4 rows, whose
    string prompt it ignores). Assistant-only lists are the responses to ``prompt`` (messages, or
    a string as one user turn)."""
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages:
            raise BadRow(MISSING_FIELD, f"{key!r} has no messages")
        if messages[-1]["role"] != "assistant":
            raise BadRow(NOT_ASSISTANT, f"the last {key} message has role {messages[-1]['role']!r}")
    whole = [any(m["role"] != "assistant" for m in messages) for messages in (chosen, rejected)]
    if all(whole):
        if _turns(chosen[:-1]) != _turns(rejected[:-1]):
            raise BadRow(PROMPT_MISMATCH, "chosen[:-1] and rejected[:-1] differ")
        if isinstance(prompt, list) and _turns(chosen[:len(prompt)]) != _turns(prompt):
            raise BadRow(PROMPT_MISMATCH, "chosen and rejected hold whole conversations that do not "
                                          "start with the prompt messages")
        return Pair(chosen[:-1], chosen[-1:], rejected[-1:])
    if any(whole):
        full, other = ("chosen", "rejected") if whole[0] else ("rejected", "chosen")
        raise BadRow(PROMPT_MISMATCH, f"{full} holds a whole conversation but {other} only responses")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not prompt:
        raise BadRow(MISSING_FIELD, "no prompt turns before the final assistant message")
    return Pair(prompt, chosen, rejected)


def common_prefix_split(chosen: str, rejected: str) -> Pair:
    """TRL's ``extract_prompt`` for plain strings: the prompt is the longest common prefix of chosen
    and rejected, less a trailing space (which goes to the responses)."""
    end = 0
    while end < min(len(chosen), len(rejected)) and chosen[end] == rejected[end]:
        end += 1
    if 0 < end < min(len(chosen), len(rejected)) and chosen[end - 1] == " ":
        end -= 1
    return Pair(chosen[:end], chosen[end:], rejected[end:])


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise BadRow(MISSING_FIELD, f"{key!r} is {'missing' if value is None else 'not a string'}")
    return value


def parse_row(row: dict[str, Any], fmt: str, plain_strings: str = "raw") -> Pair:
    """One row of format ``fmt`` -> :class:`Pair`; raises :class:`BadRow`."""
    if fmt in ("standard", "implicit_standard"):
        if fmt == "standard":
            pair = Pair(_text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected"))
        else:
            pair = common_prefix_split(_text(row, "chosen"), _text(row, "rejected"))
        if plain_strings == "chat":
            return Pair([{"role": "user", "content": pair.prompt}],
                        [{"role": "assistant", "content": pair.chosen}],
                        [{"role": "assistant", "content": pair.rejected}])
        return pair
    if fmt == "openai":
        request = row.get("input")
        if not isinstance(request, dict):
            raise BadRow(MISSING_FIELD, "'input' is not an object with 'messages'")
        if request.get("tools"):
            raise BadRow(UNSUPPORTED_TOOLS, "input.tools: tool definitions are not rendered")
        prompt = to_messages(request.get("messages"), "input.messages")
        return split_conversation(prompt, to_messages(row.get("preferred_output"), "preferred_output"),
                                  to_messages(row.get("non_preferred_output"), "non_preferred_output"))
    chosen, rejected = to_messages(row.get("chosen"), "chosen"), to_messages(row.get("rejected"), "rejected")
    if fmt == "sharegpt":
        prompt = to_messages(row.get("conversations"), "conversations")
        system = row.get("system")
        if system:
            if prompt and prompt[0]["role"] == "system":
                raise BadRow(PROMPT_MISMATCH, "both a 'system' column and a system turn in 'conversations'")
            prompt = [{"role": "system", "content": system}, *prompt]
        return split_conversation(prompt, chosen, rejected)
    prompt = row.get("prompt")
    if isinstance(prompt, (list, dict)):
        prompt = to_messages(prompt, "prompt")
    return split_conversation(prompt, chosen, rejected)
