"""Building tokenised preference datasets: local formats, both schemas, bad rows, the cache."""

from __future__ import annotations

import json
import logging
import os

import datasets
import pytest

from simpo_mcore.config import DataConfig
from simpo_mcore.data import sources, synthetic
from simpo_mcore.data.preference import BadRowError, build_preference_dataset
from simpo_mcore.data.render import render_row
from simpo_mcore.data.tokenize import tokenize_pair


def msgs(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def chat_row(prompt_id, question, chosen, rejected, *, rejected_question=None, last_role="assistant"):
    return {"prompt": question, "prompt_id": prompt_id,
            "chosen": msgs(("user", question), ("assistant", chosen)),
            "rejected": msgs(("user", rejected_question or question), (last_role, rejected))}


CHAT_ROWS = [
    chat_row("g0", "sort up 321", "123", "321"),
    chat_row("g1", "sort down 123", "321", "123"),
    chat_row("bad-role", "sort up 21", "12", "21", last_role="user"),
    chat_row("bad-prompt", "sort up 54", "45", "54", rejected_question="sort down 54"),
    {**chat_row("bad-missing", "sort up 98", "89", "98"), "rejected": None},
    chat_row("g2", "sort up 5", "5", "55"),
]
PLAIN_ROWS = [  # no prompt_id: rows are named by their index
    {"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"},
    {"prompt": "Q: 2+2?", "chosen": "", "rejected": " 5"},
    {"prompt": "Q: 3+3?", "chosen": " 6", "rejected": " 7"},
    {"prompt": "Q: 4+4?", "chosen": " 8", "rejected": ""},
]


def write(rows, path):
    """``path`` by suffix: .parquet, .jsonl (one object a line) or .json (one array)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(**{"train_path": str(path), "max_length": 64, "max_prompt_length": 48,
                         "num_proc": 1, **kw})


@pytest.fixture(scope="module")
def tok():
    return synthetic.build_tokenizer()


def expected_pair(row, tok, cfg):
    return tokenize_pair(tok, *render_row(row, tok), max_length=cfg.max_length,
                         max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode)


@pytest.mark.parametrize("layout", ["rows.parquet", "rows.jsonl", "rows.json", "folder/"])
@pytest.mark.parametrize("schema", ["chat", "plain"])
def test_local_files_in_both_schemas(tmp_path, tok, layout, schema, caplog):
    rows = CHAT_ROWS if schema == "chat" else PLAIN_ROWS
    if layout == "folder/":  # a directory of two files of one format, read in name order
        path = tmp_path / "folder"
        write(rows[:3], path / "a.jsonl"), write(rows[3:], path / "b.jsonl")
    else:
        path = write(rows, tmp_path / layout)
    cfg = cfg_for(path)
    with caplog.at_level(logging.WARNING):
        ds, report = build_preference_dataset(cfg, tok, "train", tmp_path / "cache")

    if schema == "chat":
        kept, dropped = [0, 1, 5], {"last_turn_not_assistant": 1, "prompt_mismatch": 1, "missing_field": 1}
        names = ["bad-role", "bad-prompt", "bad-missing"]
        assert ds["row_id"] == ["g0", "g1", "g2"]
    else:
        kept, dropped, names = [0, 2], {"empty_response": 2}, ["1 (empty_response", "3 (empty_response"]
        assert ds["row_id"] == ["0", "2"]
    assert (report.rows_in, report.rows_kept, report.dropped) == (len(rows), len(kept), dropped)
    for out, index in zip(ds, kept):
        want = expected_pair(rows[index], tok, cfg)
        for column in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert out[column] == want[column]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("simpo")]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"dropped {len(rows) - len(kept)} of {len(rows)} train rows" in message
    for name in names:
        assert name in message
    for reason, count in dropped.items():
        assert f"{reason}: {count}" in message


def test_on_bad_row_error_names_the_row(tmp_path, tok):
    path = write(CHAT_ROWS, tmp_path / "rows.jsonl")
    with pytest.raises(BadRowError, match=r"row bad-role \(index 2\).*last_turn_not_assistant"):
        build_preference_dataset(cfg_for(path, on_bad_row="error"), tok, "train", tmp_path / "cache")
    # The cache entry written by that build still knows its bad rows.
    with pytest.raises(BadRowError, match="bad-role"):
        build_preference_dataset(cfg_for(path, on_bad_row="error"), tok, "train", tmp_path / "cache")
    ds, report = build_preference_dataset(cfg_for(path), tok, "train", tmp_path / "cache")
    assert report.cache_hit and len(ds) == 3
    good = write([CHAT_ROWS[0], CHAT_ROWS[1]], tmp_path / "good.jsonl")
    assert len(build_preference_dataset(cfg_for(good, on_bad_row="error"), tok, "train",
                                        tmp_path / "cache")[0]) == 2


def test_all_rows_bad_is_an_error(tmp_path, tok):
    path = write([PLAIN_ROWS[1], PLAIN_ROWS[3]], tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match="no valid preference pairs"):
        build_preference_dataset(cfg_for(path), tok, "train", tmp_path / "cache")


def test_cache_hits_and_misses(tmp_path, tok, monkeypatch):
    path = write(CHAT_ROWS, tmp_path / "rows.parquet")
    cache_dir = tmp_path / "cache"
    first, report1 = build_preference_dataset(cfg_for(path), tok, "train", cache_dir)
    assert not report1.cache_hit

    def no_loading(*args, **kwargs):
        raise AssertionError("a cache hit must not read the source")
    with monkeypatch.context() as m:
        m.setattr(sources, "load_local", no_loading)
        second, report2 = build_preference_dataset(cfg_for(path), tok, "train", cache_dir)
    assert report2.cache_hit and report2.cache_path == report1.cache_path
    assert second.to_dict() == first.to_dict()
    assert report2.dropped == report1.dropped and report2.first_dropped == report1.first_dropped
    assert not any(p.name.startswith(".tmp") for p in cache_dir.iterdir())  # temporary dirs removed

    def miss(cfg, tokenizer=tok):
        ds, report = build_preference_dataset(cfg, tokenizer, "train", cache_dir)
        assert not report.cache_hit and report.cache_path != report1.cache_path
        return ds

    short = miss(cfg_for(path, max_length=12, max_prompt_length=8))
    assert max(map(len, short["chosen_input_ids"])) <= 12
    miss(cfg_for(path, truncation_mode="keep_start"))
    miss(cfg_for(path, max_pairs=2))
    other_tok = synthetic.build_tokenizer()
    other_tok.chat_template = synthetic.CHAT_TEMPLATE.replace("<|eot|>", "\n")
    assert "\n" in other_tok.decode(miss(cfg_for(path), other_tok)[0]["chosen_input_ids"])
    write(CHAT_ROWS[:2], path)  # the source changed: new size and modification time
    os.utime(path, ns=(1, 1))
    assert len(miss(cfg_for(path))) == 2
    # cfg.cache_dir wins over the default passed by the caller.
    ds, report = build_preference_dataset(cfg_for(path, cache_dir=str(tmp_path / "mine")), tok,
                                          "train", cache_dir)
    assert report.cache_path.startswith(str(tmp_path / "mine"))


def test_max_pairs_takes_the_first_rows(tmp_path, tok):
    path = write(CHAT_ROWS, tmp_path / "rows.jsonl")
    ds, report = build_preference_dataset(cfg_for(path, max_pairs=2), tok, "train", tmp_path / "c")
    assert report.rows_in == 2 and ds["row_id"] == ["g0", "g1"]
    cfg = DataConfig(eval_path=str(path), max_eval_pairs=3, max_length=64, max_prompt_length=48, num_proc=1)
    ds, report = build_preference_dataset(cfg, tok, "eval", tmp_path / "c")
    assert report.rows_in == 3 and report.split == "eval" and ds["row_id"] == ["g0", "g1"]


def test_synthetic_source_and_parallel_tokenisation(tmp_path, tok):
    cfg = DataConfig(train_path="synthetic", eval_path="synthetic", synthetic_pairs=64, max_length=64,
                     max_prompt_length=48, num_proc=1)
    train, report = build_preference_dataset(cfg, tok, "train", tmp_path / "cache")
    evals, _ = build_preference_dataset(cfg, tok, "eval", tmp_path / "cache")
    assert (len(train), report.rows_kept, len(evals)) == (64, 64, sources.SYNTHETIC_EVAL_PAIRS)
    assert not set(train["row_id"]) & set(evals["row_id"])
    assert min(sum(x != -100 for x in labels) for labels in train["chosen_labels"]) >= 5
    cfg.num_proc, cfg.cache_dir = 2, str(tmp_path / "other")
    parallel, _ = build_preference_dataset(cfg, tok, "train", tmp_path / "unused")
    assert parallel.to_dict() == train.to_dict()


def test_real_ultrafeedback_rows_with_llama3(shared_data, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "llama3_tokenizer")
    path = shared_data / "ultrafeedback_binarized_sample" / "train_prefs.parquet"
    cfg = DataConfig(train_path=str(path), max_pairs=50, max_length=1024, max_prompt_length=512, num_proc=1)
    ds, report = build_preference_dataset(cfg, tok, "train", tmp_path / "cache")
    assert report.rows_in == report.rows_kept == len(ds) == 50
    raw = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path))
    raw_by_id = {row["prompt_id"]: row for row in raw.select(range(50))}
    bos, eos = tok.bos_token_id, tok.eos_token_id
    header = tok.convert_tokens_to_ids(["<|start_header_id|>", "assistant", "<|end_header_id|>"])
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    truncated = 0
    for row in ds:
        # Independent expectation: whole conversations through the chat template (Llama-3 headers
        # are special tokens, so nothing merges across the prompt/response boundary).
        raw_row = raw_by_id[row["row_id"]]
        prompt = tok.apply_chat_template(raw_row["chosen"][:-1], tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert prompt_ids[0] == bos and prompt_ids[1] != bos  # exactly one BOS
        responses = {side: tok(tok.apply_chat_template(raw_row[side], tokenize=False),
                               add_special_tokens=False)["input_ids"][len(prompt_ids):] + [eos]
                     for side in ("chosen", "rejected")}
        longer = max(map(len, responses.values()))
        if len(prompt_ids) + longer > 1024:
            truncated += 1
            prompt_ids = prompt_ids[-512:]
        for side, response in responses.items():
            assert response[:3] == header and response[-2:] == [eot, eos]
            if len(prompt_ids) + longer > 1024:
                response = response[:512]
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            assert ids == prompt_ids + response
            assert labels == [-100] * len(prompt_ids) + response
            assert len(ids) <= 1024 and sum(lab != -100 for lab in labels[1:]) > 0
    assert 0 < truncated < len(ds)


def test_cache_commit_loses_a_race_quietly(tmp_path):
    from simpo_mcore.data import cache

    entry = cache.entry_dir(tmp_path, "train", "k")
    for winner in (True, False):  # two builders of one entry; the second finds it in place
        tmp = cache.new_tmp_dir(tmp_path, "k")
        (tmp / "dataset").mkdir()
        (tmp / "dataset" / "who").write_text("first" if winner else "second")
        cache.commit(tmp, entry, {"rows_in": 1})
        assert not tmp.exists()
    assert (entry / "dataset" / "who").read_text() == "first" and cache.read_report(entry) == {"rows_in": 1}
