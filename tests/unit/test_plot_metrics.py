"""tools/plot_metrics.py: reads metrics.jsonl as simpo-train writes it and draws a readable PNG."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "plot_metrics.py"


def _tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(step: int, loss, acc: float = 0.5) -> dict:
    return {"step": step, "time": 1.0 + step, "loss": loss, "rewards/chosen": -2.0 + 0.1 * step,
            "rewards/rejected": -2.0 - 0.1 * step, "rewards/margins": 0.2 * step, "rewards/accuracies": acc,
            "lr": 1e-3, "grad_norm": 1.0, "num_pairs": 8.0}


def _eval(step: int, loss: float) -> dict:
    return {"step": step, "time": 1.0, "eval/loss": loss, "eval/rewards/chosen": -1.9, "eval/rewards/rejected": -2.2,
            "eval/rewards/margins": 0.3, "eval/rewards/accuracies": 0.6, "eval/num_pairs": 16.0}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Steps 1-6 with a NaN loss at step 3 (written as "nan", as MetricsLogger does), evals at
    0 and 4, and a resume that logged step 4 again with a different loss."""
    records = [_eval(0, 0.75)] + [_train(s, 0.7 - 0.01 * s) for s in (1, 2)] + [_train(3, "nan")]
    records += [_train(4, 0.1), _eval(4, 0.70)]          # the interrupted run's step 4...
    records += [_train(4, 0.66, acc=0.75), _train(5, 0.65), _train(6, 0.64), _eval(6, 0.69)]  # ...and after resume
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_read_series_later_record_wins_and_nan_is_a_gap(run_dir):
    series = _tool().read_series(run_dir / "metrics.jsonl")
    assert sorted(series["loss"]) == [1, 2, 3, 4, 5, 6]
    assert series["loss"][4] == 0.66 and series["rewards/accuracies"][4] == 0.75  # the resumed record
    assert math.isnan(series["loss"][3])
    assert series["eval/loss"] == {0: 0.75, 4: 0.70, 6: 0.69}
    assert "time" not in series and "step" not in series


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _pixels_near(img: np.ndarray, rgb: str) -> int:
    target = np.array([int(rgb[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img[..., :3] - target).max(axis=-1) < 0.08).sum())


def test_plot_writes_a_readable_png(run_dir):
    proc = run_tool(run_dir)
    assert proc.returncode == 0, proc.stderr
    png = run_dir / "metrics.png"
    assert png.is_file() and f"wrote {png}" in proc.stdout
    assert _png_size(png) == (1200, 800)
    assert png.stat().st_size > 20_000  # four panels of lines, legends and labels

    import matplotlib.image

    img = matplotlib.image.imread(png)  # [h, w, rgba] floats
    top_right = img[:400, 600:]  # the rewards panel: chosen in blue (C0), rejected in orange (C1)
    assert _pixels_near(top_right, "#1f77b4") > 200 and _pixels_near(top_right, "#ff7f0e") > 200
    assert _pixels_near(img[:400, :600], "#ff7f0e") == 0  # the loss panel has one (blue) series


def test_out_option_and_file_argument(run_dir, tmp_path):
    out = tmp_path / "plots" / "m.png"
    proc = run_tool(run_dir / "metrics.jsonl", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out) == (1200, 800)
    assert not (run_dir / "metrics.png").exists()


def test_truncated_last_line_is_ignored_with_a_warning(run_dir):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.6')  # the run was killed mid-write
    proc = run_tool(run_dir)
    assert proc.returncode == 0, proc.stderr
    assert "line 11 is incomplete" in proc.stderr


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ('{"step": 1, "loss": 0.5}\nnot json\n{"step": 2, "loss": 0.4}\n', "line 2 is not JSON"),
    ('{"loss": 0.5}\n', "line 1 has no integer 'step'"),
    ('{"step": 1, "loss": "nan", "lr": 0.1}\n', "no finite value of loss"),
])
def test_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    proc = run_tool(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and str(path) in proc.stderr and message in proc.stderr
    assert not (tmp_path / "metrics.png").exists()


def test_metrics_log_writes_tensors_as_numbers_and_nan_as_text(tmp_path):
    """On a GPU megatron hands back the gradient norm as a 0-d CUDA tensor; the log must still be JSON lines
    (this broke the first GPU run), and a non-finite value must stay visible rather than vanish."""
    import torch

    from simpo_mcore.metrics_log import MetricsLogger

    logger = MetricsLogger(tmp_path, rank=0, total_steps=2, start_step=0, tensorboard=True, progress_bar=False)
    logger.log(1, {"loss": 0.5, "grad_norm": torch.tensor(2.5, dtype=torch.float64)})
    logger.log(2, {"loss": float("nan"), "grad_norm": torch.tensor(float("inf"))})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in rows] == [(1, 0.5, 2.5), (2, "nan", "inf")]
