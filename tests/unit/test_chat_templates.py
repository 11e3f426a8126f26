"""Chat templates by name, and templates that fail: each named template renders its family's format (written
out here from the families' documentation, not from the template); ``llama2`` trains on a LLaMA-Factory file
as Llama-2-chat formats it; a template refusing responses rendered alone points at
``data.response_rendering: in_conversation``; a template that loops for ever, or blows up its output, ends in
one error naming it within the bound; a template raising on a row makes a bad row, never a traceback."""

from __future__ import annotations

import logging
import time

import pytest
from test_data_formats import LLAMA3, build, char_tokenizer, llama_factory_rows, m, sharegpt, write_rows

import simpo_mcore.data.preview  # noqa: F401 - imported before the timings below (they time the template)
import simpo_mcore.runtime  # noqa: F401
from simpo_mcore.cli import data_main
from simpo_mcore.config import load_config
from simpo_mcore.data import templates
from simpo_mcore.data.templates import NAMED_TEMPLATES, RENDER_SECONDS, TemplateLimitError, read_chat_template

FAMILY_TOKENS = {"llama2": ("<s>", "</s>"), "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
                 "chatml": (None, "<|im_end|>"), "mistral": ("<s>", "</s>"), "gemma": ("<bos>", "<eos>"),
                 "zephyr": ("<s>", "</s>")}
"""BOS and EOS of each family's tokenizer."""

FAMILY_FORMATS = {
    # system "S", user "U", assistant "A", as each family's model card / tokenizer documents its prompt.
    "llama2": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s>",
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"),
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n",
    "zephyr": "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\nA</s>\n",
    # Mistral and Gemma have no system role.
    "mistral": "<s>[INST] U [/INST]A</s>",
    "gemma": "<bos><start_of_turn>user\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n",
}


def family_tokenizer(name: str, template: str | None = None):
    bos, eos = FAMILY_TOKENS[name]
    return char_tokenizer(template or NAMED_TEMPLATES[name], bos, eos)


@pytest.mark.parametrize("name", list(FAMILY_FORMATS))
def test_each_named_template_renders_its_family_format(name):
    chat = [m("user", "U"), m("assistant", "A")]
    if name not in ("mistral", "gemma"):
        chat = [m("system", "S"), *chat]
    tok = family_tokenizer(name)
    assert tok.apply_chat_template(chat, tokenize=False, chat_template=read_chat_template(name)) == FAMILY_FORMATS[name]


def test_names_are_selectable_and_anything_else_is_refused_with_the_names(tmp_path):
    assert read_chat_template("qwen") == read_chat_template("chatml") == NAMED_TEMPLATES["chatml"]
    assert read_chat_template(" Llama2 ") == NAMED_TEMPLATES["llama2"]
    assert load_config(None, ["data.chat_template=llama2"]).data.chat_template == "llama2"
    names = r"names: llama2, llama3, chatml \(also qwen\), mistral, gemma, zephyr$"
    plain = tmp_path / "notes.txt"
    plain.write_text("just words")
    for value, why in [("llama4", "is neither a template name, a file, nor a Jinja template"),
                       (str(tmp_path), "is neither a template name, a file, nor a Jinja template"),
                       (str(plain), "holds no Jinja template")]:
        with pytest.raises(ValueError, match=rf"data.chat_template.*{why}.*{names}"):
            read_chat_template(value)


def llama2_chat(prompt: list[dict], reply: dict) -> tuple[str, str]:
    """(prompt text, response text) as Llama-2-chat formats a conversation, written out: the first user turn
    ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]``, a later one ``<s>[INST] {user} [/INST]``,
    each assistant turn `` {reply} </s>`` (contents stripped). A prompt without a system turn gets an empty
    one, as the reference inserts it (``<<SYS>>\\n\\n<</SYS>>``)."""
    system, turns = (prompt[0]["content"], prompt[1:]) if prompt[0]["role"] == "system" else ("", prompt)
    text = ""
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            header = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 else ""
            text += f"<s>[INST] {header}{turn['content'].strip()} [/INST]"
        else:
            text += f" {turn['content'].strip()} </s>"
    return text, f" {reply['content'].strip()} </s>"


def test_llama2_trains_on_a_llama_factory_file_as_llama2_chat(tmp_path):
    tok = family_tokenizer("llama2", template="{{ raise_exception('the tokenizer template is not used') }}")
    rows, meant = llama_factory_rows(60)
    path = write_rows(rows, tmp_path / "dpo_en.json")
    ds, report = build(tok, path, tmp_path, chat_template="llama2", response_rendering="in_conversation")
    kept = [x for x in meant if x is not None]
    assert (report.rows_in, report.rows_kept, report.dropped) == (60, 58, {"unsupported_role": 2})  # tool calls
    for out, (prompt, chosen, rejected) in zip(ds, kept, strict=True):
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            text_prompt, response = llama2_chat(prompt, reply)
            prompt_ids = tok(text_prompt, add_special_tokens=False)["input_ids"]
            response_ids = tok(response, add_special_tokens=False)["input_ids"]
            assert prompt_ids[0] == tok.bos_token_id and response_ids[-1] == tok.eos_token_id
            assert out[f"{side}_input_ids"] == prompt_ids + response_ids
            assert out[f"{side}_labels"] == [-100] * len(prompt_ids) + response_ids


def test_a_template_refusing_responses_alone_names_in_conversation(tmp_path, caplog):
    """Llama-2's template refuses an assistant message alone ("roles must alternate"): every row dropped,
    and the error says which setting renders them. With some rows only, the drop warning says it too."""
    rows, _ = llama_factory_rows(20)
    path = write_rows(rows, tmp_path / "dpo_en.json")
    fix = "data.response_rendering: in_conversation renders each response after its prompt"
    with pytest.raises(ValueError, match=r"^no valid preference pairs .*template_error: 19.*roles must alternate"
                                         rf".*{fix}") as error:
        build(family_tokenizer("llama2"), path, tmp_path, chat_template="llama2")
    assert "\n" not in str(error.value)

    picky = "{% if messages|length == 1 and messages[0]['content'] == 'odd' %}{{ raise_exception('no') }}{% endif %}"
    rows = [{"conversations": [sharegpt(m("user", f"q{i}"))],
             "chosen": sharegpt(m("assistant", "odd" if i < 2 else "a")), "rejected": sharegpt(m("assistant", "b"))}
            for i in range(6)]
    tok = family_tokenizer("llama3", template=picky + LLAMA3)
    with caplog.at_level(logging.WARNING):
        _, report = build(tok, write_rows(rows, tmp_path / "some.jsonl"), tmp_path)
    assert report.dropped == {"template_error": 2}
    warning = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped 2 of 6"))
    assert "the chat template refused a response rendered alone (no)" in warning and fix in warning
    # A template that refuses the row whatever the rendering: no such advice.
    rows[0]["conversations"] = [sharegpt(m("user", "odd")), sharegpt(m("assistant", "odd")), sharegpt(m("user", "q"))]
    picky_anywhere = "{% for x in messages %}{% if x['content'] == 'odd' %}{{ raise_exception('no') }}{% endif %}" \
                     "{% endfor %}"
    _, report = build(family_tokenizer("llama3", template=picky_anywhere + LLAMA3),
                      write_rows(rows[:1] + rows[2:], tmp_path / "one.jsonl"), tmp_path)
    assert report.dropped == {"template_error": 1} and fix not in report.drop_summary()


ENDLESS = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}{% endfor %}"
           "{% endfor %}{% endfor %}")
"""10^15 iterations: it hung simpo-data until killed."""


def test_an_endless_template_ends_in_one_error_naming_it_within_the_bound(tmp_path, capsys):
    path = write_rows([{"prompt": "q", "chosen": [m("assistant", "a")], "rejected": [m("assistant", "b")]}],
                      tmp_path / "rows.jsonl")
    loop = tmp_path / "loop.jinja"
    loop.write_text(ENDLESS)
    start = time.monotonic()
    with pytest.raises(TemplateLimitError, match=rf"^data.chat_template {loop} took more than {RENDER_SECONDS:g} s "
                                                 r"to render one row: an endless or huge loop\?"):
        build(family_tokenizer("llama3"), path, tmp_path, chat_template=str(loop))
    assert time.monotonic() - start < RENDER_SECONDS + 10

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{tokenizer: {tmp_path / 'tok'}}}\n"
                      f"data: {{train_path: {path}, chat_template: {loop}, num_proc: 1}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    family_tokenizer("llama3").save_pretrained(tmp_path / "tok")
    capsys.readouterr()
    start = time.monotonic()
    assert data_main([str(config)]) == 2
    assert time.monotonic() - start < RENDER_SECONDS + 20
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"simpo-data: error: data.chat_template {loop} took more than") and "\n" not in err, err


def test_a_template_repeating_its_output_is_stopped_at_the_output_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(templates, "RENDER_MAX_CHARS", 1 << 20)
    path = write_rows([{"prompt": "q", "chosen": [m("assistant", "a")], "rejected": [m("assistant", "b")]}],
                      tmp_path / "rows.jsonl")
    huge = "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"  # 10 M characters
    with pytest.raises(TemplateLimitError, match=r"rendered 10000000 characters for one row, over the limit of "
                                                 r"1048576"):
        build(family_tokenizer("llama3"), path, tmp_path, chat_template=huge)


@pytest.mark.parametrize("body, why", [
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
    ("{% include 'other.jinja' %}", "TypeError: no loader for this environment specified"),
    ("{% for i in range(10 ** 9) %}{% endfor %}", "OverflowError: Range too big"),
    ("{% for message in messages %}{{ message.nope.deeper }}{% endfor %}", "has no attribute 'nope'"),
])
def test_template_errors_are_bad_rows_and_one_error_line(tmp_path, capsys, body, why):
    """Each of these ended in a traceback from inside Jinja."""
    path = write_rows([{"prompt": "q", "chosen": [m("assistant", "a")], "rejected": [m("assistant", "b")]}],
                      tmp_path / "rows.jsonl")
    family_tokenizer("llama3").save_pretrained(tmp_path / "tok")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{tokenizer: {tmp_path / 'tok'}}}\ndata: {{train_path: {path}, num_proc: 1}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    (tmp_path / "t.jinja").write_text(body)
    assert data_main([str(config), f"data.chat_template={tmp_path / 't.jinja'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simpo-data: error: no valid preference pairs") and "template_error: 1" in err, err
    assert why in err and "\n" not in err and "Traceback" not in err
