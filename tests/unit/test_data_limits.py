"""Data that is legal but extreme, and a cache a user (or a crash) damaged: strings that look like JSON stay
strings; a row too large for any pair is a bad row, not gigabytes of memory; a damaged cache entry is built
again; a cache directory that cannot be written, and a tokenizer larger than the model's vocabulary, are one
``error:`` line."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_formats import build, build_tokenizer, m, sharegpt, write_rows

from simpo_mcore.cli import data_main
from simpo_mcore.data import sources
from simpo_mcore.data.formats import MAX_ROW_CHARS
from simpo_mcore.data.preference import BadRowError
from simpo_mcore.data.synthetic import build_tokenizer as tiny_tokenizer

LOOK_LIKE_JSON = ["4", "true", "null", "[1, 2]", "{}", "-0.5e3"]


def trained_text(tok, row, side="chosen") -> str:
    return tok.decode([t for t, label in zip(row[f"{side}_input_ids"], row[f"{side}_labels"]) if label != -100])


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_strings_that_look_like_json_stay_strings(tmp_path, suffix):
    """A value that is a list in one row made datasets store the whole field as JSON text and decode every
    value of it, so ``"4"`` came back as the number 4 and each such row was dropped as non-string."""
    rows = [{"conversations": [sharegpt(m("user", f"Say {text}"))], "chosen": sharegpt(m("assistant", text)),
             "rejected": sharegpt(m("assistant", text + "!"))} for text in LOOK_LIKE_JSON]
    rows.append({"conversations": [sharegpt(m("user", "q"))], "chosen": {"from": "gpt", "value": ["a", "list"]},
                 "rejected": sharegpt(m("assistant", "b"))})
    rows.append({"conversations": [sharegpt(m("user", "q"))], "chosen": {"from": "gpt", "value": 4},
                 "rejected": sharegpt(m("assistant", "b"))})
    tok = build_tokenizer("llama3")
    ds, report = build(tok, write_rows(rows, tmp_path / f"rows{suffix}"), tmp_path)
    assert report.formats == {str(tmp_path / f"rows{suffix}"): "sharegpt"}
    assert (report.rows_kept, report.dropped) == (len(LOOK_LIKE_JSON), {"missing_field": 2})
    assert [r["detail"] for r in report.first_dropped] == ["a chosen message has no string content"] * 2
    for row, text in zip(ds, LOOK_LIKE_JSON, strict=True):
        assert trained_text(tok, row) == f"<|start_header_id|>assistant<|end_header_id|>\n\n{text}<|eot_id|>" \
                                         "<|end_of_text|>"
        assert trained_text(tok, row, "rejected").endswith(f"\n\n{text}!<|eot_id|><|end_of_text|>")
    # The file's own errors name the line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"^data file {bad}: line 2, column 2 is not valid JSON"):
        build(tok, bad, tmp_path)
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text(json.dumps(rows[0]) + '\n"text"\n')
    with pytest.raises(ValueError, match=rf"^data file {scalar}: line 2 holds a JSON str, not an object"):
        build(tok, scalar, tmp_path)


def test_a_row_over_the_size_limit_is_a_bad_row(tmp_path):
    """One 50 MB JSON line drove simpo-data past 12.7 GB of memory tokenising it (tests/e2e/test_data_cli.py
    measures the memory); here: such rows are counted, named, and refused under on_bad_row: error."""
    tok = build_tokenizer("llama3")
    rows = [{"prompt": f"q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(6)]
    lines = [json.dumps(r) for r in rows]
    lines[2] = json.dumps({**rows[2], "chosen": " " + "x" * (sources.MAX_LINE_BYTES + 10)})
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds, report = build(tok, path, tmp_path)
    assert (report.rows_kept, report.dropped) == (5, {"row_too_large": 1})
    assert report.first_dropped[0]["row_id"] == "2"
    assert report.first_dropped[0]["detail"] == (f"its line is {len(lines[2]) + 1} bytes long; a line over "
                                                 f"{sources.MAX_LINE_BYTES} bytes is not read")
    assert ds["row_id"] == ["0", "1", "3", "4", "5"]
    with pytest.raises(BadRowError, match=r"row 2 \(index 2\) .* is bad: row_too_large"):
        build(tok, path, tmp_path, on_bad_row="error")
    # Any source: a parquet row under the line limit but over the text limit.
    large = {**rows[2], "rejected": " " + "y" * MAX_ROW_CHARS}
    pq.write_table(pa.Table.from_pylist([*rows[:2], large]), tmp_path / "big.parquet")
    ds, report = build(tok, tmp_path / "big.parquet", tmp_path)
    assert (report.rows_kept, report.dropped) == (2, {"row_too_large": 1})
    chars = sum(len(key) + len(value) for key, value in large.items())  # every name and string of the row
    assert report.first_dropped[0]["detail"] == (f"it holds {chars} characters of text, over the limit of "
                                                 f"{MAX_ROW_CHARS}")


@pytest.mark.parametrize("damage", ["not json", "a list", "an unknown key", "a wrong type", "no dataset",
                                    "fewer pairs"])
def test_a_damaged_cache_entry_is_built_again(tmp_path, caplog, damage):
    """A damaged report.json ended in a traceback (JSONDecodeError, or TypeError from its keys)."""
    tok = build_tokenizer("llama3")
    path = write_rows([{"prompt": f"q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(4)],
                      tmp_path / "rows.jsonl")
    first, report = build(tok, path, tmp_path)
    entry = Path(report.cache_path)
    stored = json.loads((entry / "report.json").read_text())
    (entry / "report.json").write_text({
        "not json": '{"source": ', "a list": "[1, 2]", "an unknown key": json.dumps({**stored, "x": 1}),
        "a wrong type": json.dumps({**stored, "rows_kept": "4"}), "no dataset": json.dumps(stored),
        "fewer pairs": json.dumps({**stored, "rows_kept": 3})}[damage])
    if damage == "no dataset":
        for f in (entry / "dataset").iterdir():
            f.unlink()
    with caplog.at_level(logging.WARNING):
        again, report = build(tok, path, tmp_path)
    assert not report.cache_hit and Path(report.cache_path) == entry
    assert any(r.getMessage().startswith(f"the data cache entry {entry} is damaged") for r in caplog.records)
    assert again[:] == first[:]
    assert build(tok, path, tmp_path)[1].cache_hit


@pytest.fixture
def read_only(monkeypatch):
    """Directories (added to the returned list) that act as on a read-only file system: creating anything in
    them fails with EROFS, as the kernel answers (not EACCES: root writes through permissions)."""
    roots: list[Path] = []
    real_mkdir, real_open = os.mkdir, os.open

    def refused(path) -> bool:
        return any(Path(os.path.abspath(path)).is_relative_to(root) for root in roots)

    def mkdir(path, *args, **kwargs):
        if refused(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    return roots


def write_config(path: Path, **data) -> str:
    path.write_text(json.dumps({"model": {"checkpoint": "tiny-random"},
                                "data": {"train_path": "synthetic", "synthetic_pairs": 16, "max_length": 64,
                                         "max_prompt_length": 40, "num_proc": 1, **data},
                                "train": {"micro_batch_pairs": 4, "global_batch_pairs": 8},
                                "output_dir": str(path.parent / "run")}))
    return str(path)


def test_a_cache_dir_that_cannot_be_written_is_one_error_line(tmp_path, capsys, read_only):
    """A read-only data.cache_dir ended in an OSError traceback (EROFS is no PermissionError)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only.append(ro)
    config = write_config(tmp_path / "run.yaml", cache_dir=str(ro))
    assert data_main([config, "--samples", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"simpo-data: error: data.cache_dir {ro} cannot be written (Read-only file system): point "
                   f"data.cache_dir at a writable directory")
    read_only.append(tmp_path / "run")
    assert data_main([config, "data.cache_dir=null", "--samples", "0"]) == 2
    assert f"the data cache {tmp_path / 'run' / 'data_cache'} (in output_dir; data.cache_dir moves it) cannot be " \
           f"written" in capsys.readouterr().err


def test_simpo_data_checks_the_vocabulary_as_the_run_does(tmp_path, capsys):
    """simpo-data accepted a tokenizer the run then refused (its ids past the model's embedding)."""
    larger = build_tokenizer("llama3")
    larger.save_pretrained(tmp_path / "tok")
    config = write_config(tmp_path / "run.yaml")
    vocab = len(tiny_tokenizer())
    assert len(larger) > vocab
    assert data_main([config, f"model.tokenizer={tmp_path / 'tok'}", "--samples", "0"]) == 2
    assert capsys.readouterr().err.strip() == (f"simpo-data: error: tokenizer {tmp_path / 'tok'} has {len(larger)} "
                                               f"tokens but the model's vocabulary is {vocab}")
    assert data_main([config, "--samples", "0"]) == 0
