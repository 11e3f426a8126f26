"""The embedded synthetic tokenizer and rows: save/load round trip, chat rendering, the task."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from simpo_mcore.data import synthetic
from simpo_mcore.data.render import render_row
from simpo_mcore.data.tokenize import tokenize_pair


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tok = synthetic.build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) == 104
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    text = "<s><|user|>sort up 9031, please!\n<|eot|><|assistant|>0139<|eot|></s>"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 + len("sort up 9031, please!\n") + 2 + len("0139") + 2  # one id per char
    assert loaded.decode(ids) == text
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == "<s><|user|>hi<|eot|>"
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<s><|user|>hi<|eot|><|assistant|>"


def test_rows_render_and_encode_the_task():
    tok = synthetic.build_tokenizer()
    rows = synthetic.generate_rows(200, "train", seed=3)
    assert rows == synthetic.generate_rows(200, "train", seed=3)  # deterministic
    assert rows != synthetic.generate_rows(200, "train", seed=4)
    kinds = set()
    for row in rows:
        _, direction, digits = row["prompt"].split()
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert chosen == "".join(sorted(digits, reverse=direction == "down")) != rejected
        assert sorted(rejected) == sorted(digits) and 4 <= len(digits) <= 8
        kinds.add("unsorted" if rejected == digits else "other direction")
        prompt, chosen_text, _ = render_row(row, tok)
        assert prompt == f"<s><|system|><|eot|><|user|>{row['prompt']}<|eot|>"
        assert chosen_text == f"<|assistant|>{chosen}<|eot|>"
        out = tokenize_pair(tok, *render_row(row, tok), max_length=64, max_prompt_length=48)
        assert len(out["chosen_input_ids"]) <= 64 and len(out["rejected_input_ids"]) <= 64
        assert sum(lab != -100 for lab in out["chosen_labels"]) == len(chosen) + 3  # header, eot, eos
    assert kinds == {"unsorted", "other direction"}


def test_train_and_eval_prompts_are_disjoint():
    train = {r["prompt"] for r in synthetic.generate_rows(2048, "train")}
    evals = {r["prompt"] for r in synthetic.generate_rows(256, "eval")}
    assert len(evals) > 250 and not train & evals
    with pytest.raises(ValueError, match="split"):
        synthetic.generate_rows(1, "test")
