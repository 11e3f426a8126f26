"""The README's first command: the embedded default trains at TP=2 on CPU and learns, and its console
(captured with no terminal, as in a SLURM log) shows a line per step and no library warnings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, warning_lines

MAX_WARNING_LINES = 2
"""Library warning lines the demo may print, all ranks together (measured: 0; 39 of 54 lines before
the console filtered them)."""


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
    # No terminal: a step line every train.log_interval (1) steps, from rank 0 only, and the summary.
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == [f"{i}/150" for i in range(1, 151)]
    assert "run summary (done): step 150 of 150 (150 in this process), 2400 pairs" in proc.stdout
    both = proc.stdout + proc.stderr
    assert len(warning_lines(both)) <= MAX_WARNING_LINES, warning_lines(both)
