"""What a user sees of a run with no terminal attached (every SLURM log), and what it leaves for W&B.

One short TP=2 run through the CLI as a user types it (re-launched on 2 CPU ranks, output piped), on a
data file with bad rows, with W&B in offline mode: stopped by ``train.exit_interval`` at step 2, then
relaunched to resume to step 4 and export. The two launches are shared by every test here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, item_key, wandb_records, warning_lines

from simpo_mcore.console import format_count
from simpo_mcore.data.synthetic import generate_rows

pytestmark = pytest.mark.slow

ROWS, BAD_ROWS, STEPS = 64, 4, 4
MAX_WARNING_LINES = 2
"""Library warning lines allowed per launch (measured: 0)."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``(output_dir, first launch, second launch)`` (CompletedProcess, stdout and stderr apart)."""
    root = tmp_path_factory.mktemp("console")
    rows = generate_rows(ROWS, "train")
    for row in rows[10:10 + BAD_ROWS]:  # the last chosen turn not from the assistant: a bad row, dropped
        row["chosen"] = row["chosen"][:1]
    data = root / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "run"
    cmd = [sys.executable, "-m", "simpo_mcore.cli", "simpo-train", "configs/tiny_cpu.yaml", f"output_dir={out}",
           f"data.train_path={data}", "data.max_eval_pairs=64", f"train.max_steps={STEPS}", "train.exit_interval=2",
           "logging.progress_interval_s=0", "logging.wandb.project=simpo-test", "logging.wandb.mode=offline",
           "checkpoint.export_hf=true"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "CUDA_VISIBLE_DEVICES": ""}
    procs = []
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        procs.append(proc)
    return out, procs[0], procs[1]


def metrics_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_step_lines_progress_and_rank0_only(run):
    out, first, second = run
    records = {(r["step"], "loss" in r): r for r in metrics_records(out)}
    for proc, steps in ((first, (1, 2)), (second, (3, 4))):
        lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
        assert len(lines) == len(steps), proc.stdout  # one line per step (train.log_interval: 1), one rank
        for line, step in zip(lines, steps):
            r = records[(step, True)]
            assert line.startswith(f"step {step}/{STEPS} ({100 * step // STEPS}%) | loss {r['loss']:.4f} | "
                                   f"acc {r['rewards/accuracies']:.3f} | margin {r['rewards/margins']:.3f} | "
                                   f"lr {r['lr']:.2e} | grad {r['grad_norm']:.3g} | "), line
            # Packed rows (the default): real tokens/s and the real share of the positions computed.
            real = round(100 * r["tokens_real"] / r["tokens_computed"])
            assert re.search(rf"\| [\d.]+k? tok/s \(real {real}%\) \| mem [\d.]+ GiB RSS \| \d+:\d\d elapsed "
                             r"\| ETA \d+:\d\d$", line), line
        assert proc.stdout.count("model: 4 layers") + proc.stderr.count("model: 4 layers") == 1
    # Tokenisation and evaluation report progress (logging.progress_interval_s=0: a line per piece).
    assert f"tokenising train data: {ROWS}/{ROWS} rows (100%)" in first.stdout
    assert "eval step 0: 64/64 pairs (100%)" in first.stdout and "eval step 4: 64/64 pairs (100%)" in second.stdout
    assert "tokenising" not in second.stdout  # the cache is read back, not tokenised again


def test_no_library_warnings_and_the_drop_summary_once(run):
    _, first, second = run
    for proc in (first, second):
        both = proc.stdout + proc.stderr
        assert len(warning_lines(both)) <= MAX_WARNING_LINES, warning_lines(both)
        # Two ranks read the data; the drop summary is rank 0's alone.
        assert both.count(f"dropped {BAD_ROWS} of {ROWS} train rows") == 1, both
        assert "Traceback" not in both


def test_run_summary(run):
    out, first, second = run
    records = metrics_records(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 4]
    def tokens(steps):  # packed rows: the real tokens, then the positions computed
        return (f"{format_count(sum(r['tokens_real'] for r in steps))} real tokens "
                f"({format_count(sum(r['tokens_computed'] for r in steps))} tokens computed)")

    assert (f"run summary (stopped by train.exit_interval=2): step 2 of {STEPS} (2 in this process), 32 pairs, "
            f"{tokens(train[:2])}") in first.stdout
    summary = second.stdout[second.stdout.index("run summary (done)"):]
    assert summary.startswith(f"run summary (done): step 4 of {STEPS} (2 in this process), 64 pairs, "
                              f"{tokens(train)}, wall ")
    final = evals[-1]
    assert (f"final eval (step 4): loss {final['eval/loss']:.4f}, reward accuracy "
            f"{final['eval/rewards/accuracies']:.4f}, margin {final['eval/rewards/margins']:.4f}") in summary
    # The best evaluation counts the step-0 one of the first launch, read back from metrics.jsonl.
    best_acc = max(evals, key=lambda r: (r["eval/rewards/accuracies"], -r["eval/loss"]))
    best_loss = min(evals, key=lambda r: r["eval/loss"])
    assert (f"best eval: reward accuracy {best_acc['eval/rewards/accuracies']:.4f} at step {best_acc['step']}, "
            f"loss {best_loss['eval/loss']:.4f} at step {best_loss['step']}") in summary
    assert f"checkpoint: {out / 'checkpoints' / 'step_0000004'}" in summary
    assert f"Hugging Face export: {out / 'hf'}" in summary and (out / "hf" / "config.json").is_file()
    assert "final held-out reward accuracy" in summary.splitlines()[-1]


def test_every_logged_key_is_documented(run):
    """docs/metrics.md gives each key of metrics.jsonl its formula (an evaluation key under its name without
    the ``eval/`` prefix); a key added to the records must be added there."""
    out, _, _ = run
    documented = {name for line in (ROOT / "docs" / "metrics.md").read_text().splitlines()
                  if line.startswith("| `") for name in re.findall(r"`([^`]+)`", line.split(" | ")[0])}
    keys = {key.removeprefix("eval/") for record in metrics_records(out) for key in record}
    assert {"loss", "lr", "logps/chosen", "tokens_real", "rss_gib", "step", "time"} <= keys
    assert sorted(keys - documented) == []


def test_wandb_offline_run_holds_the_metrics_and_continues_after_resume(run):
    out, first, _ = run
    run_id = (out / "wandb_run_id").read_text().strip()
    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, list((out / "wandb").iterdir())  # one per launch, the same run id
    assert f"W&B run {run_id}: offline in" in first.stdout
    history: dict[int, dict] = {}
    configs = []
    for path in files:
        configs.append({})
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item_key(i): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(record.history.step.num, {}).update(
                    {k: v for k, v in row.items() if not k.startswith("_")})
            elif kind == "run":
                assert record.run.run_id == run_id and record.run.project == "simpo-test"
                configs[-1].update({item_key(i): json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":  # what the job added once built
                configs[-1].update({item_key(i): json.loads(i.value_json) for i in record.config.update})
    expected: dict[int, dict] = {}
    for r in metrics_records(out):
        expected.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in ("step", "time")})
    assert sorted(history) == sorted(expected) == [0, 1, 2, 3, 4]
    for step, metrics in expected.items():
        assert history[step] == metrics, step
    # The resolved config, as the run used it (overrides applied).
    for config in configs:
        assert config["output_dir"] == str(out) and config["loss"]["beta"] == 2.5
        assert config["train"]["max_steps"] == STEPS and config["run"]["train_pairs"] == ROWS - BAD_ROWS
