"""Rendering and tokenisation of one pair: the reference's boundary, BOS, EOS and truncation rules.

The tokenizer is a BPE built here over single letters with the merges ``a b -> ab`` and
``ab c -> abc``, so a prompt ending in ``a`` merges with an answer starting with ``b``.
"""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, models
from transformers import PreTrainedTokenizerFast

from simpo_mcore.data import synthetic
from simpo_mcore.data.formats import UNSUPPORTED_ROLE
from simpo_mcore.data.render import render_row
from simpo_mcore.data.tokenize import (
    EMPTY_RESPONSE,
    MISSING_FIELD,
    NO_ROOM,
    NOT_ASSISTANT,
    PROMPT_MISMATCH,
    BadRow,
    build_tokenized_answer,
    tokenize_pair,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
V = {t: i for i, t in enumerate(SPECIALS + list("abcdefghijklmnopqrstuvwxyz ") + ["ab", "abc"])}
BOS, EOS, M = V["<s>"], V["</s>"], -100


def bpe_tokenizer(bos: str | None = "<s>") -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(vocab=V, merges=[("a", "b"), ("ab", "c")], unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def ids(text: str) -> list[int]:
    return [V[c] for c in text]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def pair(tok, prompt, chosen, rejected, max_length=64, max_prompt_length=32, mode="keep_end"):
    return tokenize_pair(tok, prompt, chosen, rejected, max_length=max_length,
                         max_prompt_length=max_prompt_length, truncation_mode=mode)


def test_boundary_merge_moves_the_boundary_back_by_one(tok):
    # enc("xa") = [x, a] but enc("xabc") = [x, abc]: the merged token belongs to the answer.
    assert build_tokenized_answer(tok, "xa", "bc") == ([V["x"]], [V["abc"]])
    assert build_tokenized_answer(tok, "xa", "bd") == ([V["x"]], [V["ab"], V["d"]])
    assert build_tokenized_answer(tok, "xa", "cd") == (ids("xa"), ids("cd"))  # no merge

    out = pair(tok, "xa", "bc", "cd")
    # chosen prompt [x] and rejected prompt [x, a] differ in length by 1: allowed.
    assert out["chosen_input_ids"] == [BOS, V["x"], V["abc"], EOS]
    assert out["chosen_labels"] == [M, M, V["abc"], EOS]
    assert out["rejected_input_ids"] == [BOS, V["x"], V["a"], V["c"], V["d"], EOS]
    assert out["rejected_labels"] == [M, M, M, V["c"], V["d"], EOS]
    assert out["prompt_input_ids"] == [BOS, V["x"]]  # cut to the shorter prompt, as the reference


def test_bos_not_doubled_and_eos_not_doubled(tok):
    out = pair(tok, "<s>hi", "yo</s>", "no")
    assert out["chosen_input_ids"] == [BOS, *ids("hi"), *ids("yo"), EOS]
    assert out["chosen_labels"] == [M, M, M, *ids("yo"), EOS]
    assert out["rejected_input_ids"] == [BOS, *ids("hi"), *ids("no"), EOS]


def test_keep_end_truncation_can_cut_the_bos(tok):
    # prompt [<s> g h i j k] (6), chosen [m n </s>] (3), rejected [m n o p </s>] (5): 6 + 5 > 8
    out = pair(tok, "ghijk", "mn", "mnop", max_length=8, max_prompt_length=3, mode="keep_end")
    assert out["chosen_input_ids"] == [*ids("ijk"), *ids("mn"), EOS]
    assert out["chosen_labels"] == [M, M, M, *ids("mn"), EOS]
    assert out["rejected_input_ids"] == [*ids("ijk"), *ids("mnop"), EOS]
    assert out["prompt_input_ids"] == ids("ijk")


def test_keep_start_truncation(tok):
    out = pair(tok, "ghijk", "mn", "mnop", max_length=8, max_prompt_length=3, mode="keep_start")
    assert out["chosen_input_ids"] == [BOS, *ids("gh"), *ids("mn"), EOS]
    assert out["rejected_input_ids"] == [BOS, *ids("gh"), *ids("mnop"), EOS]
    assert out["rejected_labels"] == [M, M, M, *ids("mnop"), EOS]


def test_response_truncation_drops_the_eos(tok):
    # prompt cut to 2; 2 + 5 > 6 still, so each response is cut to 6 - 2 = 4 tokens.
    out = pair(tok, "ghijk", "mn", "mnop", max_length=6, max_prompt_length=2, mode="keep_end")
    assert out["chosen_input_ids"] == [*ids("jk"), *ids("mn"), EOS]  # 3 tokens: untouched
    assert out["rejected_input_ids"] == [*ids("jk"), *ids("mnop")]  # EOS lost
    assert out["rejected_labels"] == [M, M, *ids("mnop")]


def test_short_pair_is_not_truncated(tok):
    out = pair(tok, "ghijk", "mn", "mnop", max_length=11, max_prompt_length=3)
    assert out["rejected_input_ids"] == [BOS, *ids("ghijk"), *ids("mnop"), EOS]


def test_bad_pairs(tok):
    with pytest.raises(BadRow) as err:
        pair(tok, "hi", "", "no")
    assert err.value.reason == EMPTY_RESPONSE and "chosen" in str(err.value)
    # No BOS and an empty prompt: the lone response token sits at position 0, never predicted.
    with pytest.raises(BadRow) as err:
        pair(bpe_tokenizer(bos=None), "", "</s>", "no")
    assert err.value.reason == NO_ROOM
    assert pair(bpe_tokenizer(bos=None), "", "n", "no")["chosen_labels"] == [V["n"], EOS]


# ---------------------------------------------------------------------------- rendering


def msgs(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def test_render_ultrafeedback_row():
    tok = synthetic.build_tokenizer()
    row = {"prompt": "sort up 31", "prompt_id": "p",
           "chosen": msgs(("user", "sort up 31"), ("assistant", "13")),
           "rejected": msgs(("user", "sort up 31"), ("assistant", "31"))}
    prompt, chosen, rejected = render_row(row, tok)
    # The template mentions "system": an empty system message is inserted; the response loses BOS.
    assert prompt == "<s><|system|><|eot|><|user|>sort up 31<|eot|>"
    assert chosen == "<|assistant|>13<|eot|>" and rejected == "<|assistant|>31<|eot|>"
    out = tokenize_pair(tok, prompt, chosen, rejected, max_length=64, max_prompt_length=32)
    response = [t for t, lab in zip(out["chosen_input_ids"], out["chosen_labels"]) if lab != M]
    assert tok.decode(response) == "<|assistant|>13<|eot|></s>"
    assert out["chosen_input_ids"][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|system|>")]


def test_render_prompt_as_messages_and_system_turn_kept():
    tok = synthetic.build_tokenizer()
    row = {"prompt": msgs(("system", "be brief"), ("user", "q")),
           "chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))}
    assert render_row(row, tok) == ("<s><|system|>be brief<|eot|><|user|>q<|eot|>",
                                    "<|assistant|>a<|eot|>", "<|assistant|>b<|eot|>")


def test_render_plain_strings_untouched():
    assert render_row({"prompt": "P", "chosen": "C", "rejected": "R"}, None) == ("P", "C", "R")
    # No prompt: the common prefix is the prompt; the space before the first difference is not.
    assert render_row({"chosen": "Q: x? A: yes", "rejected": "Q: x? A: no"}, None) == ("Q: x? A:", " yes", " no")
    assert render_row({"chosen": "a", "rejected": "b"}, None) == ("", "a", "b")


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "q", "chosen": msgs(("user", "q"), ("assistant", "a"))}, MISSING_FIELD),
    ({"chosen": msgs(("user", "q"), ("assistant", "a")), "rejected": None}, MISSING_FIELD),
    ({"chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))}, MISSING_FIELD),
    ({"prompt": "q", "chosen": "a", "rejected": None}, MISSING_FIELD),
    ({"prompt": "q", "chosen": msgs(("user", "q"), ("assistant", "a")), "rejected": msgs(("assistant", "b"))},
     PROMPT_MISMATCH),
    ({"prompt": msgs(("user", "q")), "chosen": msgs(("user", "Q"), ("assistant", "a")),
      "rejected": msgs(("user", "Q"), ("assistant", "b"))}, PROMPT_MISMATCH),
    ({"chosen": msgs(("user", "q"), ("tool", "t"), ("assistant", "a")),
      "rejected": msgs(("user", "q"), ("tool", "t"), ("assistant", "b"))}, UNSUPPORTED_ROLE),
    ({"chosen": msgs(("user", "q"), ("assistant", "a")), "rejected": msgs(("user", "q"), ("user", "b"))},
     NOT_ASSISTANT),
    ({"chosen": msgs(("user", "q"), ("assistant", "a")), "rejected": msgs(("user", "Q"), ("assistant", "b"))},
     PROMPT_MISMATCH),
])
def test_render_bad_rows(row, reason):
    with pytest.raises(BadRow) as err:
        render_row(row, synthetic.build_tokenizer())
    assert err.value.reason == reason
