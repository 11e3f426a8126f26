"""Data a user gets wrong ends in one error naming the file, line or setting, fast; pairs that carry no
preference are counted and warned about."""

from __future__ import annotations

import json
import logging
import time

import datasets
import huggingface_hub
import pytest

from simpo_mcore.config import DataConfig, paths
from simpo_mcore.data import sources, synthetic
from simpo_mcore.data.preference import build_preference_dataset


@pytest.fixture(scope="module")
def tok():
    return synthetic.build_tokenizer()


def build(path, tmp_path, tok, **kw):
    cfg = DataConfig(train_path=str(path), max_length=64, max_prompt_length=48, num_proc=1, **kw)
    return build_preference_dataset(cfg, tok, "train", tmp_path / "cache")


def row(i, chosen, rejected):
    return {"prompt": f"sort up {i}", "chosen": chosen, "rejected": rejected}


def test_empty_file_and_file_of_blank_lines(tmp_path, tok):
    """An empty jsonl ended in a bare StopIteration from datasets' JSON reader."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"^data file {empty} is empty$"):
        build(empty, tmp_path, tok)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    with pytest.raises(ValueError, match=rf"^data file {blank} holds no rows$"):
        build(blank, tmp_path, tok)


def test_non_utf8_bytes_name_file_line_and_column(tmp_path, tok, monkeypatch):
    """Arrow read the bytes as they were and a UnicodeDecodeError surfaced later, naming neither."""
    lines = [json.dumps(row(i, " é", " b"), ensure_ascii=False) for i in range(5)]  # é: two bytes
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes("\n".join(lines[:3]).encode() + b'\n{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n')
    with pytest.raises(ValueError, match=rf"data file {bad}: line 4, column 16 is not valid UTF-8"):
        build(bad, tmp_path, tok)
    # Read in chunks of any size: a valid two-byte character split between chunks passes, a bad byte at any
    # place of a chunk (the last one included: the decoder holds it back) is placed on its line and column.
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines) + "\n")
    for size in range(1, 14):
        monkeypatch.setattr(sources, "UTF8_CHECK_BYTES", size)
        assert sources.check_utf8(good)
        with pytest.raises(ValueError, match=r"line 4, column 16 is not valid UTF-8 \(byte offset 192\)"):
            sources.check_utf8(bad)


def test_missing_relative_path_is_not_a_hub_lookup(tmp_path, tok, monkeypatch):
    """``data/prefs.jsonl`` that does not exist fell through to a hub lookup and a ConnectionError after
    48 s of retries."""
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    for path in ("data/prefs.jsonl", "./prefs", "../x/y/z", "prefs.parquet"):
        with pytest.raises(FileNotFoundError, match=rf"data.train_path {path} does not exist \(relative paths "
                                                    rf"start at {tmp_path}\)"):
            build(path, tmp_path, tok)
    assert time.monotonic() - start < 2.0
    assert not paths.looks_local("HuggingFaceH4/ultrafeedback_binarized") and not paths.looks_local("name")


def test_hub_name_without_network_fails_at_once(tmp_path, tok, monkeypatch):
    """Offline: one line saying what to do, within the probe's timeout (the hub client retries for tens of
    seconds). A hub endpoint that refuses connections stands in for a machine without network."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"data.train_path 'someorg/prefs' is not a local path, and the Hugging "
                                         r"Face Hub \(http://127.0.0.1:9\) cannot be reached from here: .*"
                                         r"HF_HUB_OFFLINE=1"):
        build("someorg/prefs", tmp_path, tok)
    assert time.monotonic() - start < sources.HUB_PROBE_TIMEOUT_S
    # With HF_HUB_OFFLINE the cache alone is asked, and a dataset that is not in it is one line too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"'someorg/prefs' is not a local path, and it could not be loaded from "
                                         r"the Hugging Face Hub \(HF_HUB_OFFLINE is set"):
        build("someorg/prefs", tmp_path, tok)


def test_identical_pairs_are_counted_warned_once_and_kept(tmp_path, tok, caplog):
    """Chosen == rejected carries no preference: counted and warned about once, kept as the reference
    does (or dropped on request, which is not a bad row)."""
    rows = [row(1, " 1", " 2"), row(2, " same", " same"), row(3, " 3", " 4"), row(4, " x", " x"),
            {"prompt": "bad", "chosen": "", "rejected": " y"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        ds, report = build(path, tmp_path, tok)
    assert (report.rows_in, report.rows_kept, report.identical, report.bad_rows) == (5, 4, 2, 1)
    assert [i for i, r in enumerate(ds) if r["chosen_input_ids"] == r["rejected_input_ids"]] == [1, 3]
    warned = [r.getMessage() for r in caplog.records if "identical chosen and rejected" in r.getMessage()]
    assert len(warned) == 1 and "2 of 4 pairs" in warned[0] and "kept, as the reference does" in warned[0]

    ds, report = build(path, tmp_path, tok, identical_pairs="drop")
    assert (report.rows_kept, report.identical, report.identical_dropped) == (2, 2, True)
    assert [r["chosen_input_ids"] != r["rejected_input_ids"] for r in ds] == [True, True]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    ds, report = build(clean, tmp_path, tok, identical_pairs="drop", on_bad_row="error")  # no bad rows
    assert (report.rows_kept, report.bad_rows) == (2, 0)


def test_tokenizer_path_or_hub_name_fails_at_once(tmp_path, monkeypatch):
    """model.tokenizer the same way: a missing local path is named, a hub name without network fails at once."""
    from simpo_mcore.runtime import load_tokenizer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^model.tokenizer ./tok does not exist$"):
        load_tokenizer("./tok")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"model.tokenizer 'someorg/tok' is not a local path, and the Hugging Face "
                                         r"Hub \(http://127.0.0.1:9\) cannot be reached"):
        load_tokenizer("someorg/tok")
    assert time.monotonic() - start < sources.HUB_PROBE_TIMEOUT_S
