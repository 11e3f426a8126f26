"""Every accepted row layout, rendered and labelled token for token as ``apply_chat_template`` of the
whole conversation says it should be, with a Llama-3 template and ChatML with and without a default
system prompt; format detection, column mapping, and the errors of data the pipeline cannot read.

The expectations are written here from the chat template applied to the whole conversation: the
prompt is the conversation before the final assistant turn (an empty system message first when the
template knows system turns), the response is what the template adds for that turn, then EOS; the
labels are -100 on the prompt. The one deliberate exception is the reference's rendering of a
response alone, which under a template with a default system prompt puts that system turn (its
leading BOS string removed) into the response: written out literally below (``INJECTED``).
"""

from __future__ import annotations

import json
import logging
import random

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from simpo_mcore.config import ConfigError, DataConfig, load_config
from simpo_mcore.data.formats import FORMATS
from simpo_mcore.data.preference import BadRowError, build_preference_dataset

SPECIALS = ["<pad>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>"]

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
"""Meta's Llama-3 Instruct template."""
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEFAULT_SYSTEM = "You are a helpful test assistant."
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""SmolLM2's ChatML: a default system turn when the chat does not start with one."""
INJECTED = f"system\n{DEFAULT_SYSTEM}<|im_end|>\n"
"""What a response rendered alone starts with under CHATML_DEFAULT_SYSTEM, once its leading BOS
string (``<|im_start|>``, SmolLM2's BOS) is removed as the reference does."""

TEMPLATES = {  # name: (template, bos, eos) as the real tokenizers set them
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>"),
    "chatml": (CHATML, None, "<|im_end|>"),  # Qwen-like: no BOS
    "chatml_default_system": (CHATML_DEFAULT_SYSTEM, "<|im_start|>", "<|im_end|>"),  # SmolLM2
}


def build_tokenizer(name: str, template: str | None = "default") -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with the chat specials as single tokens."""
    chat_template, bos, eos = TEMPLATES[name]
    return char_tokenizer(chat_template if template == "default" else template, bos, eos)


def char_tokenizer(chat_template: str | None, bos: str | None, eos: str | None) -> PreTrainedTokenizerFast:
    """:func:`build_tokenizer` with any template and BOS / EOS (one of :data:`SPECIALS`)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + ["\n"] + [chr(i) for i in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # newlines too
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>", chat_template=chat_template)


@pytest.fixture(scope="module", params=list(TEMPLATES))
def tok(request):
    return build_tokenizer(request.param)


def template_name(tok) -> str:
    return next(name for name, (template, *_) in TEMPLATES.items() if template == tok.chat_template)


def m(role, content):
    return {"role": role, "content": content}


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def with_eos(tok, ids):
    return ids if ids and ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]


def expected_chat(tok, prompt, reply, rendering="alone"):
    """(ids, labels) of ``prompt`` messages + the ``reply`` assistant message, from the template
    applied to the whole conversation (see the module docstring)."""
    if prompt[0]["role"] != "system" and ("system" in tok.chat_template or "<|im_start|>" in tok.chat_template):
        prompt = [m("system", ""), *prompt]
    text_prompt = tok.apply_chat_template(prompt, tokenize=False)
    whole = tok.apply_chat_template([*prompt, reply], tokenize=False)
    assert whole.startswith(text_prompt)
    response = whole[len(text_prompt):]
    if template_name(tok) == "chatml_default_system" and rendering == "alone":
        response = INJECTED + response
    prompt_ids = enc(tok, text_prompt)
    if tok.bos_token_id is not None and prompt_ids[0] != tok.bos_token_id:
        prompt_ids = [tok.bos_token_id] + prompt_ids
    response_ids = with_eos(tok, enc(tok, response))
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def expected_text(tok, prompt, response):
    prompt_ids = enc(tok, prompt)
    if tok.bos_token_id is not None and (not prompt_ids or prompt_ids[0] != tok.bos_token_id):
        prompt_ids = [tok.bos_token_id] + prompt_ids
    response_ids = with_eos(tok, enc(tok, response))
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def write_rows(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tok, path, tmp_path, **kw):
    cfg = DataConfig(train_path=str(path), max_length=512, max_prompt_length=400, num_proc=1, **kw)
    return build_preference_dataset(cfg, tok, "train", tmp_path / "cache")


def check_pair(out, want_chosen, want_rejected):
    assert (out["chosen_input_ids"], out["chosen_labels"]) == want_chosen
    assert (out["rejected_input_ids"], out["rejected_labels"]) == want_rejected


# ------------------------------------------------------------------ one conversation, every layout

SYSTEM = "You are terse."
TURNS = [m("user", "Hi there"), m("assistant", "Hello."), m("user", "Sort 3 1 2")]
CHOSEN, REJECTED = m("assistant", "1 2 3"), m("assistant", "3 2 1")
PROMPT = [m("system", SYSTEM), *TURNS]  # multi-turn, with a system prompt


def sharegpt(message):
    return {"from": {"system": "system", "user": "human", "assistant": "gpt"}[message["role"]],
            "value": message["content"]}


LAYOUTS = {  # format -> (row, prompt messages the row means)
    "h4": ({"prompt": "Sort 3 1 2", "prompt_id": "p0", "chosen": [*PROMPT, CHOSEN],
            "rejected": [*PROMPT, REJECTED]}, PROMPT),
    # The case that trained on user turns: a message-list prompt and whole conversations.
    "conversational/whole": ({"prompt": PROMPT, "chosen": [*PROMPT, CHOSEN], "rejected": [*PROMPT, REJECTED]},
                             PROMPT),
    "conversational": ({"prompt": PROMPT, "chosen": [CHOSEN], "rejected": [REJECTED]}, PROMPT),
    "conversational/one message": ({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, PROMPT),
    "h4/assistant only": ({"prompt": "Sort 3 1 2", "chosen": [CHOSEN], "rejected": [REJECTED]},
                          [m("user", "Sort 3 1 2")]),
    "implicit_conversational": ({"chosen": [*PROMPT, CHOSEN], "rejected": [*PROMPT, REJECTED]}, PROMPT),
    "sharegpt": ({"conversations": [sharegpt(x) for x in PROMPT], "chosen": sharegpt(CHOSEN),
                  "rejected": sharegpt(REJECTED)}, PROMPT),
    "sharegpt/system column": ({"conversations": [sharegpt(x) for x in TURNS], "system": SYSTEM,
                                "chosen": sharegpt(CHOSEN), "rejected": sharegpt(REJECTED)}, PROMPT),
    "openai": ({"input": {"messages": PROMPT, "tools": []}, "preferred_output": [CHOSEN],
                "non_preferred_output": [REJECTED]}, PROMPT),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_message_layout_trains_on_the_final_assistant_turn(tok, layout, tmp_path):
    row, prompt = LAYOUTS[layout]
    ds, report = build(tok, write_rows([row], tmp_path / "rows.jsonl"), tmp_path)
    assert list(report.formats.values()) == [layout.split("/")[0]]
    assert (report.rows_in, report.rows_kept) == (1, 1)
    check_pair(ds[0], expected_chat(tok, prompt, CHOSEN), expected_chat(tok, prompt, REJECTED))
    # Only the reply (and, alone-rendered under a default system prompt, that system turn) is trained on.
    trained = tok.decode([t for t, lab in zip(ds[0]["chosen_input_ids"], ds[0]["chosen_labels"]) if lab != -100])
    assert "1 2 3" in trained and "Sort" not in trained and SYSTEM not in trained


@pytest.mark.parametrize("layout", ["h4", "conversational/whole", "sharegpt", "openai"])
def test_in_conversation_rendering_trains_on_the_assistant_turn_only(tok, layout, tmp_path, caplog):
    row, prompt = LAYOUTS[layout]
    path = write_rows([row], tmp_path / "rows.jsonl")
    with caplog.at_level(logging.WARNING):
        ds, _ = build(tok, path, tmp_path, response_rendering="in_conversation")
    check_pair(ds[0], expected_chat(tok, prompt, CHOSEN, "in_conversation"),
               expected_chat(tok, prompt, REJECTED, "in_conversation"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    trained = tok.decode([t for t, lab in zip(ds[0]["chosen_input_ids"], ds[0]["chosen_labels"]) if lab != -100])
    assert DEFAULT_SYSTEM not in trained
    if template_name(tok) != "chatml_default_system":  # no default system prompt: the same tokens
        alone, _ = build(tok, path, tmp_path)
        assert alone[0] == ds[0]


def test_default_system_prompt_is_found_and_warned_about_once(tmp_path, caplog):
    tok = build_tokenizer("chatml_default_system")
    rows = [LAYOUTS["h4"][0], LAYOUTS["sharegpt"][0]]
    folder = tmp_path / "data"
    write_rows(rows[:1], folder / "a.jsonl"), write_rows(rows[1:] * 2, folder / "b.jsonl")
    with caplog.at_level(logging.INFO):
        _, report = build(tok, folder, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and repr(INJECTED) in warnings[0] and "in_conversation" in warnings[0]
    assert report.formats == {str(folder / "a.jsonl"): "h4", str(folder / "b.jsonl"): "sharegpt"}
    for name in ("llama3", "chatml"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            build(build_tokenizer(name), folder, tmp_path)
        assert not caplog.records


def test_files_of_different_formats_in_one_directory(tmp_path):
    tok = build_tokenizer("llama3")
    folder = tmp_path / "data"
    write_rows([LAYOUTS["sharegpt"][0]] * 2, folder / "a.json")
    write_rows([LAYOUTS["openai"][0]] * 3, folder / "b.json")
    ds, report = build(tok, folder, tmp_path, max_pairs=4)
    assert list(report.formats.values()) == ["sharegpt", "openai"] and report.rows_in == 4
    assert ds["row_id"] == ["0", "1", "2", "3"]  # indices over the files in order
    want = expected_chat(tok, PROMPT, CHOSEN)
    assert all((r["chosen_input_ids"], r["chosen_labels"]) == want for r in ds)


# ------------------------------------------------------------------ plain strings


def hh_rows(n, seed=0):
    """hh-rlhf's layout: whole transcripts in chosen / rejected, no prompt column. Returns the rows
    and, per row, the prompt and responses TRL's prompt extraction gives (by construction)."""
    rng = random.Random(seed)
    rows, meant = [], []
    for i in range(n):
        turns = "".join(f"\n\nHuman: question {i}.{t}\n\nAssistant: answer {rng.randint(0, 99)}"
                        for t in range(rng.randint(0, 2)))
        prompt = f"{turns}\n\nHuman: final question {i}?\n\nAssistant:"
        good, bad = f" Yes, {rng.randint(0, 9)}.", f" No{'.' * rng.randint(1, 3)}"
        rows.append({"chosen": prompt + good, "rejected": prompt + bad})
        meant.append((prompt, good, bad))
    return rows, meant


@pytest.mark.parametrize("plain_strings", ["raw", "chat"])
def test_hh_rlhf_layout(tok, plain_strings, tmp_path, caplog):
    rows, meant = hh_rows(40)
    with caplog.at_level(logging.INFO):
        ds, report = build(tok, write_rows(rows, tmp_path / "hh.jsonl"), tmp_path, plain_strings=plain_strings)
    assert list(report.formats.values()) == ["implicit_standard"] and report.rows_kept == 40
    for out, (prompt, good, bad) in zip(ds, meant):
        if plain_strings == "raw":
            check_pair(out, expected_text(tok, prompt, good), expected_text(tok, prompt, bad))
        else:
            user = [m("user", prompt)]
            check_pair(out, expected_chat(tok, user, m("assistant", good)),
                       expected_chat(tok, user, m("assistant", bad)))
    notes = [r.getMessage() for r in caplog.records if "plain-string rows" in r.getMessage()]
    assert len(notes) == (1 if plain_strings == "raw" else 0)
    if plain_strings == "raw":
        assert "data.plain_strings: chat" in notes[0]


def test_hh_rlhf_rows_with_an_empty_prompt_column(tok, tmp_path):
    """Exports of hh-rlhf often carry ``prompt: ""``: still implicit-prompt rows (the prompt split off as TRL
    does), not standard rows that would train on the whole transcript, human turns included."""
    rows, meant = hh_rows(12)
    ds, report = build(tok, write_rows([{"prompt": "", **r} for r in rows], tmp_path / "hh.jsonl"), tmp_path)
    assert list(report.formats.values()) == ["implicit_standard"] and report.rows_kept == 12
    for out, (prompt, good, bad) in zip(ds, meant):
        check_pair(out, expected_text(tok, prompt, good), expected_text(tok, prompt, bad))


def test_standard_rows_and_column_mapping(tmp_path):
    tok = build_tokenizer("llama3")
    rows = [{"question": f"Q: {i}+{i}?", "good": f" {2 * i}", "bad": f" {2 * i + 1}"} for i in range(3)]
    path = write_rows(rows, tmp_path / "mine.jsonl")
    with pytest.raises(ValueError) as err:
        build(tok, path, tmp_path)
    message = str(err.value)
    assert "columns question (text), good (text), bad (text)" in message and "\n" not in message
    for fmt in ("h4 (prompt text, chosen and rejected messages)", "standard (prompt, chosen and rejected text)",
                "sharegpt (conversations [{from, value}]", "openai (input {messages}", "implicit_standard (chosen"):
        assert fmt in message
    ds, report = build(tok, path, tmp_path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert list(report.formats.values()) == ["standard"]
    for out, row in zip(ds, rows):
        check_pair(out, expected_text(tok, row["question"], row["good"]),
                   expected_text(tok, row["question"], row["bad"]))
    chat, _ = build(tok, path, tmp_path, plain_strings="chat",
                    columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    user = [m("user", rows[0]["question"])]
    check_pair(chat[0], expected_chat(tok, user, m("assistant", rows[0]["good"])),
               expected_chat(tok, user, m("assistant", rows[0]["bad"])))
    with pytest.raises(ValueError, match=r"data.columns.chosen: .* has no column 'nice'"):
        build(tok, path, tmp_path, columns={"prompt": "question", "chosen": "nice", "rejected": "bad"})


def test_forced_format(tmp_path):
    tok = build_tokenizer("llama3")
    path = write_rows([{"prompt": "Q", "chosen": " a", "rejected": " b"}], tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match=r"data.format is 'h4' but its 'chosen' column holds text"):
        build(tok, path, tmp_path, format="h4")
    with pytest.raises(ValueError, match=r"data.format is 'implicit_standard' but it has a 'prompt' column"):
        build(tok, path, tmp_path, format="implicit_standard")
    assert list(build(tok, path, tmp_path, format="standard")[1].formats.values()) == ["standard"]


# ------------------------------------------------------------------ LLaMA-Factory ranking files


def llama_factory_rows(n=300, seed=0):
    """LLaMA-Factory's ShareGPT ranking layout: a JSON array of conversations (system turns in a
    third of them, a ``system`` column in another third; 1-3 exchanges), chosen / rejected single
    ``{from, value}`` messages. Every 50th row calls a tool (roles function_call / observation)."""
    rng = random.Random(seed)
    rows, meant = [], []
    for i in range(n):
        prompt = [m("system", f"System prompt {i}.")] if i % 3 else []
        for t in range(rng.randint(0, 2)):
            prompt += [m("user", f"Turn {t} of row {i}: " + "x" * rng.randint(0, 40)),
                       m("assistant", "Reply " + "y" * rng.randint(0, 40))]
        prompt.append(m("user", f"Last question {i}" + "?" * rng.randint(1, 60)))
        chosen = m("assistant", "Good " + "g" * rng.randint(0, 80))
        rejected = m("assistant", "Bad " * rng.randint(1, 20))
        conversations = [sharegpt(x) for x in prompt]
        row = {"chosen": sharegpt(chosen), "rejected": sharegpt(rejected)}
        if i % 3 == 2:
            row["system"] = conversations[0]["value"]
            conversations = conversations[1:]
        if i % 50 == 7:
            conversations = conversations[:-1] + [{"from": "function_call", "value": "{}"},
                                                  {"from": "observation", "value": "42"}, conversations[-1]]
        rows.append({"conversations": conversations, **row})
        meant.append(None if i % 50 == 7 else (prompt, chosen, rejected))
    return rows, meant


def test_llama_factory_ranking_file(tok, tmp_path):
    rows, meant = llama_factory_rows()
    path = write_rows(rows, tmp_path / "dpo_en.json")
    ds, report = build(tok, path, tmp_path)
    assert report.formats == {str(path): "sharegpt"}
    assert (report.rows_in, report.rows_kept, report.dropped) == (300, 294, {"unsupported_role": 6})
    assert report.first_dropped[0]["row_id"] == "7" and "'function_call'" in report.first_dropped[0]["detail"]
    kept = [x for x in meant if x is not None]
    for out, (prompt, chosen, rejected) in zip(ds, kept, strict=True):
        check_pair(out, expected_chat(tok, prompt, chosen), expected_chat(tok, prompt, rejected))
    with pytest.raises(BadRowError, match=r"row 7 \(index 7\).*unsupported_role"):
        build(tok, path, tmp_path, on_bad_row="error")


# ------------------------------------------------------------------ errors


def test_no_chat_template_names_the_fields_and_data_chat_template_fixes_it(tmp_path):
    bare = build_tokenizer("llama3", template=None)
    path = write_rows([LAYOUTS["h4"][0]], tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match=r"need a chat template.*model\.tokenizer.*data\.chat_template"):
        build(bare, path, tmp_path)
    template_file = tmp_path / "llama3.jinja"
    template_file.write_text(LLAMA3)
    want = expected_chat(build_tokenizer("llama3"), PROMPT, CHOSEN)
    for value in (LLAMA3, str(template_file)):
        ds, _ = build(bare, path, tmp_path, chat_template=value)
        assert (ds[0]["chosen_input_ids"], ds[0]["chosen_labels"]) == want
    # data.chat_template overrides the tokenizer's own, and is part of the cache key.
    chatml, report = build(build_tokenizer("llama3"), path, tmp_path, chat_template=CHATML)
    assert (chatml[0]["chosen_input_ids"], chatml[0]["chosen_labels"]) != want
    assert tok_text(bare, chatml[0]["chosen_input_ids"]).startswith("<|begin_of_text|><|im_start|>system\n")
    with pytest.raises(ValueError, match=r"data.chat_template 'nope.jinja' is neither a template name, a file, nor a "
                                         r"Jinja template; names: llama2, llama3, chatml \(also qwen\), mistral"):
        build(bare, path, tmp_path, chat_template="nope.jinja")


def tok_text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_template_errors_and_other_roles_are_bad_rows(tmp_path):
    strict = LLAMA3.replace("{% for message in loop_messages %}",
                            "{% for message in loop_messages %}{% if message['content'] == 'BOOM' %}"
                            "{{ raise_exception('no booms here') }}{% endif %}")
    tok = build_tokenizer("llama3", template=strict)
    good = LAYOUTS["h4"][0]
    boom = {**good, "prompt_id": "boom", "chosen": [*PROMPT, m("assistant", "BOOM")]}
    tool = {**good, "prompt_id": "tool", "chosen": [*PROMPT[:-1], m("tool", "42"), PROMPT[-1], CHOSEN],
            "rejected": [*PROMPT[:-1], m("tool", "42"), PROMPT[-1], REJECTED]}
    ds, report = build(tok, write_rows([good, boom, tool], tmp_path / "rows.jsonl"), tmp_path)
    assert ds["row_id"] == ["p0"] and report.dropped == {"template_error": 1, "unsupported_role": 1}
    assert "no booms here" in report.first_dropped[0]["detail"]
    # Under data.on_bad_row: error the template's refusal names the row instead (a jinja TemplateError
    # reached the user as a traceback once).
    with pytest.raises(BadRowError, match=r"row boom \(index 1\) .* is bad: template_error: .*no booms here"):
        build(tok, tmp_path / "rows.jsonl", tmp_path, on_bad_row="error")


def test_config_fields(tmp_path):
    cfg = load_config(None, ["data.columns.prompt=question", "data.columns.chosen=good", "data.format=standard",
                             "data.plain_strings=chat", "data.response_rendering=in_conversation"])
    assert cfg.data.columns == {"prompt": "question", "chosen": "good"}
    assert (cfg.data.format, cfg.data.plain_strings, cfg.data.response_rendering) == ("standard", "chat",
                                                                                       "in_conversation")
    with pytest.raises(ConfigError, match=r"data.columns.question: unknown column role"):
        load_config(None, ["data.columns.question=prompt"])
    with pytest.raises(ConfigError, match=r"data.columns: expected a mapping"):
        load_config(None, ["data.columns=prompt"])
    with pytest.raises(ConfigError, match=r"data.format: 'alpaca' is not one of"):
        load_config(None, ["data.format=alpaca"])
    with pytest.raises(ConfigError, match=r"data.columns maps one column to several roles"):
        load_config(None, ["data.columns.prompt=x", "data.columns.chosen=x"])


def test_the_examples_in_docs_data_md(tmp_path):
    """Each example row of docs/data.md is detected as the format it is listed under and kept."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    block = text.split("One row of each")[1].split("```text\n")[1].split("```")[0]
    rows: dict[str, str] = {}
    for line in block.splitlines():
        name, sep, rest = line.partition(": ")
        if sep and name.strip() and not line.startswith(" "):
            rows[name.strip()] = rest
        else:
            rows[list(rows)[-1]] += line.strip()
    assert sorted(rows) == sorted(f.name for f in FORMATS.values())
    tok = build_tokenizer("llama3")
    for name, row in rows.items():
        ds, report = build(tok, write_rows([json.loads(row)], tmp_path / f"{name}.jsonl"), tmp_path)
        assert list(report.formats.values()) == [name] and report.rows_kept == 1, name
        trained = tok.decode([t for t, lab in zip(ds[0]["chosen_input_ids"], ds[0]["chosen_labels"]) if lab != -100])
        assert "4" in trained and "2+2" not in trained, (name, trained)


def test_sequence_of_structs_reads_as_messages():
    """Hub datasets declared with ``datasets.Sequence({...})`` give each row a dict of lists."""
    import datasets

    from simpo_mcore.data.formats import column_kinds
    from simpo_mcore.data.render import RenderOptions, render_row

    tok = build_tokenizer("llama3")
    row, _ = LAYOUTS["sharegpt"]
    turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
    columnar = {**row, "conversations": {key: [t[key] for t in row["conversations"]] for key in ("from", "value")}}
    rows = datasets.Dataset.from_list(
        [columnar], features=datasets.Features({"conversations": datasets.Sequence(turn), "chosen": turn,
                                                "rejected": turn}))
    assert rows[0]["conversations"] == columnar["conversations"]  # a dict of lists
    assert column_kinds(rows)["conversations"] == "sharegpt messages"
    assert render_row(rows[0], tok, RenderOptions(format="sharegpt")) == render_row(row, tok)
