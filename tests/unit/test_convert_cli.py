"""The two conversion CLIs as a user runs them: progress on stdout, exit 0; bad input gives one
``error:`` line naming the field / tensor / file on stderr, exit code 2 and no traceback.

Subprocesses (a few seconds each for the imports), hence ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, make_tiny_hf_llama
from safetensors import safe_open

pytestmark = pytest.mark.slow


def cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny fp32 HF Llama and its checkpoint, made by the import CLI."""
    root = tmp_path_factory.mktemp("cli")
    make_tiny_hf_llama(root / "hf", num_layers=2)
    proc = cli("convert_hf_to_mcore.py", "--hf", root / "hf", "--out", root / "ckpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[convert] reading: 2/2 layers (100%)" in proc.stdout and "[convert] done" in proc.stdout
    return root


def test_cli_roundtrip_sharded_bf16(converted, tmp_path):
    out = tmp_path / "out"
    proc = cli("convert_mcore_to_hf.py", "--ckpt", converted / "ckpt", "--out", out,
               "--max-shard-size", "20KB", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[export] writing: 2/2 layers (100%)" in proc.stdout and "[export] done" in proc.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((out / f).is_file() for f in files)
    with safe_open(converted / "hf" / "model.safetensors", framework="pt") as src:
        for name, file in index["weight_map"].items():
            with safe_open(out / file, framework="pt") as f:
                got = f.get_tensor(name)
            assert got.dtype == torch.bfloat16 and torch.equal(got, src.get_tensor(name).to(torch.bfloat16)), name
        assert sorted(index["weight_map"]) == sorted(src.keys())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("case", ["sliding_window", "bin_only", "missing_tensor", "out_not_empty", "no_config"])
def test_import_cli_bad_input(case, converted, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in (converted / "hf").iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "ckpt"
    if case == "sliding_window":
        cfg = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**cfg, "sliding_window": 4096}))
        expect = ("config.json", "sliding_window=4096")
    elif case == "bin_only":
        (hf / "model.safetensors").rename(hf / "pytorch_model.bin")  # content irrelevant: never read
        expect = ("pytorch_model.bin", "pickle")
    elif case == "missing_tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(hf / "model.safetensors")
        del tensors["model.layers.1.self_attn.o_proj.weight"]
        save_file(tensors, hf / "model.safetensors")
        expect = ("model.layers.1.self_attn.o_proj.weight", "missing")
    elif case == "out_not_empty":
        out.mkdir()
        (out / "x").write_text("x")
        expect = (str(out), "not empty")
    else:
        (hf / "config.json").unlink()
        expect = ("config.json", "does not exist")
    assert_clean_error(cli("convert_hf_to_mcore.py", "--hf", hf, "--out", out), *expect)


@pytest.mark.parametrize("case", ["not_a_checkpoint", "bad_shard_size", "out_not_empty"])
def test_export_cli_bad_input(case, converted, tmp_path):
    ckpt, out, extra = converted / "ckpt", tmp_path / "out", []
    if case == "not_a_checkpoint":
        ckpt = converted / "hf"
        expect = ("simpo_mcore.json",)
    elif case == "bad_shard_size":
        extra = ["--max-shard-size", "lots"]
        expect = ("--max-shard-size", "lots")
    else:
        out.mkdir()
        (out / "config.json").write_text("{}")
        expect = (str(out), "not empty")
    assert_clean_error(cli("convert_mcore_to_hf.py", "--ckpt", ckpt, "--out", out, *extra), *expect)


def test_cli_usage_errors_exit_nonzero(tmp_path):
    proc = cli("convert_hf_to_mcore.py", "--hf", tmp_path, "--out", tmp_path / "o", "--dtype", "float64")
    assert proc.returncode == 2 and "--dtype" in proc.stderr
    proc = cli("convert_mcore_to_hf.py", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--ckpt" in proc.stderr
