"""Chat templates: the named ones, what ``data.chat_template`` may hold, and rendering with bounds.

``data.chat_template`` is a name of :data:`NAMED_TEMPLATES` (``llama2``, ``llama3``, ``chatml`` / ``qwen``,
``mistral``, ``gemma``, ``zephyr``), a file holding a Jinja template, or the Jinja text itself; anything else
is refused with the accepted names. Each named template is the text the family's own tokenizer carries
(where it was read is written above it), so ``data.chat_template: llama2`` renders as Llama-2-chat does.

Rendering goes through ``tokenizer.apply_chat_template`` (the reference's call, so the text is the same to
the character) under two bounds, since a template is code: :data:`RENDER_SECONDS` of wall time per call
and :data:`RENDER_MAX_CHARS` of output (with :data:`RENDER_MAX_BYTES` of memory growth while it runs). A
template past either bound is broken for every row, so it stops the run with one error naming it
(:class:`TemplateLimitError`); any other failure of a template on a row (``raise_exception``, ``1 // 0``, an
``include``, a ``range`` past the sandbox's limit) makes that row a bad row.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from jinja2 import TemplateError

from simpo_mcore.data.tokenize import BadRow

TEMPLATE_ERROR = "template_error"

# Meta's Llama-2-chat template: meta-llama/Llama-2-7b-chat-hf (and -13b-chat-hf), tokenizer_config.json
# "chat_template". The Jinja literals hold the two characters backslash-n, which Jinja reads as a newline.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")

# Meta's Llama-3 Instruct template: meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json
# "chat_template" (the April 2024 text, with add_generation_prompt; princeton-nlp/SimPO chat_templates.json
# "llama3" is the same).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# ChatML, as the ChatML models carry it: teknium/OpenHermes-2.5-Mistral-7B, tokenizer_config.json
# "chat_template". Qwen models speak ChatML; their own tokenizers' templates add a default system turn
# ("You are a helpful assistant.") and tool calls, so ``qwen`` here is plain ChatML and a Qwen tokenizer's
# own template is used by leaving data.chat_template unset.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Mistral's instruct template: mistralai/Mixtral-8x7B-Instruct-v0.1, tokenizer_config.json "chat_template"
# at commit 1e637f2d7cb0a9d6fb1922f305cb784995190a83 (princeton-nlp/SimPO chat_templates.json
# "mistral-instruct", the template of its Mistral-7B-Instruct-v0.2 runs, is the same). It has no system role.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# Google's Gemma instruct template: google/gemma-7b-it, tokenizer_config.json "chat_template" (the text
# princeton-nlp/SimPO evaluates gemma-2-9b-it with, eval/arenahard/templates/gemma.jinja). It refuses a
# system turn, so none is inserted before a prompt (render.takes_system_turn). As there, the Jinja literals
# hold backslash-n.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")

# Zephyr's template: the alignment-handbook's DEFAULT_CHAT_TEMPLATE (src/alignment/data.py), the one
# HuggingFaceH4/zephyr-7b-beta and its SFT model were trained with; princeton-nlp/SimPO chat_templates.json
# "mistral-base" (its Mistral-7B-Base-SFT) is the same text.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
    "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

NAMED_TEMPLATES = {"llama2": LLAMA2, "llama3": LLAMA3, "chatml": CHATML, "mistral": MISTRAL, "gemma": GEMMA,
                   "zephyr": ZEPHYR}
ALIASES = {"qwen": "chatml"}

RENDER_SECONDS = 5.0
"""Wall time one ``apply_chat_template`` call may take (a real template renders a row in well under a
millisecond; a loop over ``range`` inside a loop over ``range`` runs for hours)."""
RENDER_MAX_CHARS = 16 << 20
"""Characters one call may render: 16 times the largest row a run reads (``formats.MAX_ROW_CHARS``)."""
RENDER_MAX_BYTES = 1 << 30
"""Memory the process may grow by while one call renders (checked every :data:`CHECK_EVERY_S`)."""
CHECK_EVERY_S = 0.05


class TemplateLimitError(ValueError):
    """A chat template past :data:`RENDER_SECONDS` or :data:`RENDER_MAX_CHARS` on a row: broken for every row."""


def accepted_names() -> str:
    names = [f"{name} (also {alias})" if (alias := next((a for a, n in ALIASES.items() if n == name), None))
             else name for name in NAMED_TEMPLATES]
    return ", ".join(names)


def read_chat_template(value: str | None) -> str | None:
    """``data.chat_template``: a template name, the Jinja text itself, or a file holding Jinja; ``None`` stays
    ``None`` (the tokenizer's own)."""
    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return value
    name = ALIASES.get(value.strip().lower(), value.strip().lower())
    if name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name]
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"data.chat_template {value!r} is neither a template name, a file, nor a Jinja template; "
                         f"names: {accepted_names()}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"data.chat_template file {path} is not UTF-8 text") from None
    if "{{" not in text and "{%" not in text:
        raise ValueError(f"data.chat_template file {path} holds no Jinja template (no '{{{{' or '{{%'); "
                         f"names: {accepted_names()}")
    return text


def template_label(value: str | None, tokenizer) -> str:
    """How errors name the template in use: the config value, or the tokenizer's."""
    if value is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        return f"the chat template of model.tokenizer ({name})"
    if "{{" in value or "{%" in value:
        return "data.chat_template (the Jinja text given)"
    return f"data.chat_template {value}"


def render_chat(tokenizer, messages: list[dict], template: str, label: str) -> str:
    """``apply_chat_template`` of ``messages`` (text, no generation prompt) within the bounds above. A
    template failing on this chat raises :class:`BadRow` (``detail`` is the template's message); one past a
    bound raises :class:`TemplateLimitError` naming ``label``."""
    try:
        with _bounded(label):
            text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    except TemplateLimitError:
        raise
    except TemplateError as exc:
        raise BadRow(TEMPLATE_ERROR, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a template is code: 1 // 0, an include, a range past the limit
        raise BadRow(TEMPLATE_ERROR, f"{type(exc).__name__}: {exc}") from None
    if len(text) > RENDER_MAX_CHARS:
        raise TemplateLimitError(f"{label} rendered {len(text)} characters for one row, over the limit of "
                                 f"{RENDER_MAX_CHARS}: the template repeats its text; fix it or pick a named "
                                 f"template ({accepted_names()})")
    return text


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _bounded(label: str):
    """Raise :class:`TemplateLimitError` inside the block once it has run :data:`RENDER_SECONDS` or grown the
    process by :data:`RENDER_MAX_BYTES`: a timer signal checks every :data:`CHECK_EVERY_S`. Signals reach the
    main thread only, so elsewhere the block runs unbounded (the data pipeline renders on a main thread: of
    this process, or of each ``datasets.map`` worker)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    deadline, start_rss, active = time.monotonic() + RENDER_SECONDS, _resident_bytes(), [True]

    def check(signum, frame):
        if not active[0]:
            return
        grown = (_resident_bytes() or 0) - start_rss if start_rss is not None else 0
        if time.monotonic() > deadline or grown > RENDER_MAX_BYTES:
            active[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            what = (f"took more than {RENDER_SECONDS:g} s to render one row" if grown <= RENDER_MAX_BYTES else
                    f"grew the process by more than {RENDER_MAX_BYTES >> 20} MiB rendering one row")
            raise TemplateLimitError(f"{label} {what}: an endless or huge loop? Fix the template or pick a named "
                                     f"one ({accepted_names()})")

    previous = signal.signal(signal.SIGALRM, check)
    outer = signal.setitimer(signal.ITIMER_REAL, CHECK_EVERY_S, CHECK_EVERY_S)
    try:
        yield
    finally:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer[0] > 0:  # someone else's timer was running: let it go on
            signal.setitimer(signal.ITIMER_REAL, *outer)
