"""``simpo-data`` and the demo as a user runs them (fresh processes): a JSON line of 50 MB costs no memory
beyond what a small file costs; no library note about sequence lengths the truncation handles; a tokenizer
that comes with code never asks to run it (and never runs it); the parity demo prints its result only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, warning_lines

from simpo_mcore.data.synthetic import build_tokenizer

pytestmark = pytest.mark.slow

ENV = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
RSS_MARGIN = 300 << 20
"""How much more a file with one 50 MB line may make simpo-data hold than the same rows without it
(measured: the same peak, 1.25 GB, to the MB)."""
RSS_KILL = 4 << 30
"""A run past this is stopped (that line took 19.7 GB to tokenise)."""


def run(tmp_path: Path, cmd: list[str], stdin: str = "", timeout: float = 900) -> tuple[int, str, int]:
    """(exit code, stdout + stderr, peak resident bytes) of ``cmd`` run from the repository root; killed past
    :data:`RSS_KILL` or ``timeout`` seconds."""
    out_path = tmp_path / f"out-{time.monotonic_ns()}.txt"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "HOME": str(tmp_path)}, stdin=subprocess.PIPE,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        proc.stdin.write(stdin)
        proc.stdin.close()
        watched, deadline = psutil.Process(proc.pid), time.monotonic() + timeout

        def watchdog():
            while proc.returncode is None:
                try:
                    if watched.memory_info().rss > RSS_KILL or time.monotonic() > deadline:
                        watched.kill()
                except psutil.NoSuchProcess:
                    return
                time.sleep(0.2)

        threading.Thread(target=watchdog, daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak, which Popen.wait would not give
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out_path.read_text(), usage.ru_maxrss * 1024


def simpo_data(tmp_path: Path, config: Path, *args: str, stdin: str = "") -> tuple[int, str, int]:
    return run(tmp_path, [sys.executable, "-m", "simpo_mcore.cli", "simpo-data", str(config), "--samples", "0",
                          *args], stdin)


def write_config(path: Path, data: dict, model: dict | None = None) -> Path:
    path.write_text(json.dumps({"model": model or {"checkpoint": "tiny-random"},
                                "data": {"max_length": 64, "max_prompt_length": 40, "num_proc": 1, **data},
                                "train": {"micro_batch_pairs": 2, "global_batch_pairs": 4},
                                "output_dir": str(path.parent / f"run-{path.stem}")}))
    return path


def test_a_huge_json_line_costs_no_memory(tmp_path):
    rows = [{"prompt": f"sort up {i}", "chosen": f" {i}", "rejected": f" {i + 1}"} for i in range(20)]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    big = tmp_path / "big.jsonl"
    line = json.dumps({**rows[5], "chosen": " " + "word " * 10_000_000}) + "\n"  # 50 MB
    big.write_text("".join(line if i == 5 else json.dumps(row) + "\n" for i, row in enumerate(rows)))
    code, out, small_rss = simpo_data(tmp_path, write_config(tmp_path / "small.yaml", {"train_path": str(small)}))
    assert code == 0 and "rows: 20 read, 20 kept" in out, out[-3000:]
    code, out, big_rss = simpo_data(tmp_path, write_config(tmp_path / "big.yaml", {"train_path": str(big)}))
    assert code == 0, (big_rss >> 20, out[-3000:])
    assert "rows: 20 read, 19 kept; dropped 1 of 20 train rows" in out, out[-3000:]
    assert f"5 (row_too_large: its line is {len(line)} bytes long" in out, out[-3000:]
    assert big_rss < small_rss + RSS_MARGIN, (big_rss >> 20, small_rss >> 20)


def test_no_note_about_sequences_longer_than_the_tokenizer_maximum(tmp_path):
    """transformers' "Token indices sequence length is longer than the specified maximum" reached the
    console: misleading, data.max_length truncates those pairs."""
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(tmp_path / "tok")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "sort up " + "1234567890 " * 3, "chosen": f" {i}",
                                        "rejected": f" {i + 1}"}) + "\n" for i in range(4)))
    config = write_config(tmp_path / "run.yaml", {"train_path": str(rows)},
                          model={"checkpoint": None, "tokenizer": str(tmp_path / "tok")})
    code, out, _ = simpo_data(tmp_path, config)
    assert code == 0 and "rows: 4 read, 4 kept" in out, out
    assert "Token indices" not in out and not warning_lines(out), out


def test_a_tokenizer_with_code_is_refused_without_asking(tmp_path):
    """transformers asked "Do you wish to run the custom code? [y/N]" and, answered y on stdin, ran it."""
    tok_dir = tmp_path / "tok"
    build_tokenizer().save_pretrained(tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": ["tok.CustomTokenizer", None]})
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    ran = tmp_path / "the code ran"
    (tok_dir / "tok.py").write_text(f"open({str(ran)!r}, 'w').close()\nfrom transformers import "
                                    f"PreTrainedTokenizerFast\n\nclass CustomTokenizer(PreTrainedTokenizerFast):\n"
                                    f"    pass\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "q", "chosen": " a", "rejected": " b"}) + "\n")
    config = write_config(tmp_path / "run.yaml", {"train_path": str(rows)},
                          model={"checkpoint": None, "tokenizer": str(tok_dir)})
    code, out, _ = simpo_data(tmp_path, config, stdin="y\n")
    assert not ran.exists() and "Do you wish to run the custom code" not in out, out
    assert code == 2 and out.strip().splitlines()[-1] == (
        f"simpo-data: error: model.tokenizer '{tok_dir}' needs the Python code that comes with it (an auto_map in "
        f"its config), and simpo_mcore never runs such code: use a tokenizer of a class transformers has (its "
        f"tokenizer.json with PreTrainedTokenizerFast)"), out


def test_demo_parity_prints_its_result_only(tmp_path):
    """It printed torch's "No CUDA runtime is found" three times and megatron's async-save deprecation."""
    code, out, _ = run(tmp_path, [sys.executable, "tools/demo_parity.py"])
    assert code == 0 and out.strip().splitlines()[-1] == "PASS", out
    assert [line for line in out.splitlines() if not line.startswith("[demo] ")] == ["PASS"], out
