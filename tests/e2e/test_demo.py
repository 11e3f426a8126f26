"""The README's first command: the embedded default trains at TP=2 on CPU and learns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_embedded_default_learns(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "simpo_mcore.cli", "simpo-train", "configs/tiny_cpu.yaml", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-5000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval/loss" in line]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 150
    assert 0.3 < first["eval/rewards/accuracies"] < 0.7, first
    assert last["eval/rewards/accuracies"] > 0.8, last
    assert f"final held-out reward accuracy: {last['eval/rewards/accuracies']:.3f}" in proc.stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000150"
