"""The console: --help of every command, the library-warning filter, progress bars / lines, the training
step line, the run summary, and the logging config section."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import ROOT

from simpo_mcore import console, metrics_log
from simpo_mcore.config import ConfigError, WandbConfig, load_config
from simpo_mcore.metrics_log import EvalRecord, RunTotals, StepConsole, format_step_line, read_evals, run_summary

HELP_COMMANDS = {  # command line: (its usage line, a phrase of its own description, phrases of its options)
    "simpo-train": ([sys.executable, "-m", "simpo_mcore.cli", "simpo-train"], "usage: simpo-train",
                    "Train a model with SimPO", ["more adds data-parallel ranks, DP = nproc / (tp x pp x cp)"]),
    "simpo-eval": ([sys.executable, "-m", "simpo_mcore.cli", "simpo-eval"], "usage: simpo-eval",
                   "Evaluate a checkpoint on a preference split", ["more adds data-parallel ranks"]),
    "simpo-data": ([sys.executable, "-m", "simpo_mcore.cli", "simpo-data"], "usage: simpo-data",
                   "Show a run's preference data", ["which split to show: train (data.train_path, the default) or",
                                                    "eval (data.eval_path)"]),
    "simpo-plan": ([sys.executable, "-m", "simpo_mcore.cli", "simpo-plan"], "usage: simpo-plan",
                   "Plan a run before launching it", ["memory of one GPU (default 80)",
                                                      "print the layouts as a JSON list"]),
    "hf-to-mcore": ([sys.executable, "tools/convert_hf_to_mcore.py"], "usage: convert_hf_to_mcore.py",
                    "Convert a Hugging Face model directory",
                    ["Llama 2 / 3 / 3.x, Mistral, Qwen2 / 2.5, Qwen3, Gemma-2"]),
    "mcore-to-hf": ([sys.executable, "-m", "simpo_mcore.convert", "mcore-to-hf"],
                    "usage: python -m simpo_mcore.convert mcore-to-hf", "Export a simpo_mcore checkpoint", []),
}


@pytest.mark.parametrize("name", HELP_COMMANDS)
def test_help_is_the_first_thing_printed(name):
    """A fresh process (as a user starts it): usage first, its own description, what each option does, the
    override syntax and examples; not one warning (stderr empty) and exit 0."""
    cmd, usage, description, options = HELP_COMMANDS[name]
    proc = subprocess.run([*cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
                               "COLUMNS": "200"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(usage), proc.stdout[:200]
    assert description in proc.stdout and "examples:" in proc.stdout and "--verbose" in proc.stdout
    for phrase in options:
        assert phrase in proc.stdout, (phrase, proc.stdout)
    assert "Llama directory" not in proc.stdout  # the converter takes every family
    if name.startswith("simpo-"):
        assert "dotted.key=value" in proc.stdout and "train.max_steps=200" in proc.stdout


def test_module_entry_without_a_command_is_a_usage_line():
    proc = subprocess.run([sys.executable, "-m", "simpo_mcore.cli"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: python -m simpo_mcore.cli")
    assert "Traceback" not in proc.stderr


@pytest.fixture
def quiet_env(monkeypatch):
    """Whatever quiet_third_party sets in the environment is restored after the test."""
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    for name in ("TORCH_CPP_LOG_LEVEL", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    levels = {name: logging.getLogger(name).level for name in console.QUIET_LOGGERS}
    yield monkeypatch
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def warn_from(module: str, message: str) -> None:
    warnings.warn_explicit(message, UserWarning, f"/{module.replace('.', '/')}.py", 1, module=module)


def test_library_warnings_are_filtered_by_message_and_module(quiet_env):
    text = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.quiet_third_party()
        warn_from("megatron.core.optimizer", text)  # filtered
        warn_from("megatron.core.models.backends", "Apex is not installed. Falling back to Torch Norm")
        warn_from("my_training_code", text)  # the same words from elsewhere: shown
        warn_from("megatron.core.optimizer", "Your learning rate is negative")  # a warning we do not know: shown
    assert [(w.filename, str(w.message)) for w in seen] == [
        ("/my_training_code.py", text), ("/megatron/core/optimizer.py", "Your learning rate is negative")]
    assert logging.getLogger("torch.utils.cpp_extension").level == logging.ERROR


def test_verbose_shows_everything(quiet_env):
    quiet_env.setenv(console.VERBOSE_ENV, "1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.quiet_third_party()
        warn_from("megatron.core.optimizer", "Transformer Engine and Apex are not installed.")
    assert len(seen) == 1


def test_progress_lines_without_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    lines: list[str] = []
    with console.Progress(10, "tokenising train data", "rows", write=lines.append, interval_s=0, bar=False) as p:
        for _ in range(4):
            p.update(3)  # capped at the total
    assert [line.split(" | ")[0] for line in lines] == [
        "tokenising train data: 3/10 rows (30%)", "tokenising train data: 6/10 rows (60%)",
        "tokenising train data: 9/10 rows (90%)", "tokenising train data: 10/10 rows (100%)"]
    assert lines[-1].endswith("ETA 0:00")
    # A long interval that never passes: a quick task prints nothing at all.
    lines.clear()
    with console.Progress(4, "eval", "pairs", write=lines.append, interval_s=3600, bar=False) as p:
        p.update(2)
        p.update(2)
    assert lines == []
    # Other ranks draw nothing; neither does a silent one.
    monkeypatch.setenv("RANK", "1")
    with console.Progress(2, "eval", write=lines.append, interval_s=0, bar=False) as p:
        p.update(2)
    monkeypatch.setenv("RANK", "0")
    with console.Progress(2, "eval", write=None, interval_s=0) as p:
        p.update(2)
    assert lines == [] and capsys.readouterr().err == ""


def test_track_counts_what_was_consumed(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    lines: list[str] = []
    items = list(console.track([[1, 2], [3], [4, 5, 6]], 6, "pass", "pairs", size=len, write=lines.append,
                               interval_s=0, bar=False))
    assert items == [[1, 2], [3], [4, 5, 6]]
    assert [line.split(" | ")[0] for line in lines] == ["pass: 2/6 pairs (33%)", "pass: 3/6 pairs (50%)",
                                                        "pass: 6/6 pairs (100%)"]


RECORD = {"loss": 0.69312, "rewards/accuracies": 0.625, "rewards/margins": 0.1534, "lr": 9.8e-4, "grad_norm": 1.0234,
          "tokens": 4096.0, "step_time_s": 2.0, "tokens_per_s": 2048.0, "rss_gib": 1.234}


def test_step_line():
    line = format_step_line(12, 150, RECORD, elapsed_s=75.0, eta_s=3725.0)
    assert line == ("step 12/150 (8%) | loss 0.6931 | acc 0.625 | margin 0.153 | lr 9.80e-04 | grad 1.02 | "
                    "2.05k tok/s | mem 1.23 GiB RSS | 1:15 elapsed | ETA 1:02:05")
    # A GPU step with real / computed token counts (packing): real tokens/s, their share, MFU, the GPU peak.
    gpu = {**RECORD, "tokens_real": 3000.0, "tokens_computed": 4000.0, "mfu": 0.4123, "mem_peak_gib": 61.5}
    del gpu["rss_gib"]
    assert " | 1.5k tok/s (real 75%) | MFU 41.2% | mem 61.50 GiB | " in format_step_line(1, 2, gpu, 1.0, 1.0)


def test_step_console_prints_every_log_interval(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    out = StepConsole(total_steps=7, start_step=0, log_interval=3, bar=False)
    for step in range(1, 8):
        out.step(step, RECORD)
    out.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["step 3/7", "step 6/7", "step 7/7"]


def test_run_summary_and_the_evaluations_of_a_resumed_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/loss": 0.9, "eval/rewards/accuracies": 0.5, "eval/rewards/margins": 0.0},
            {"step": 1, "loss": 0.8},
            {"step": 2, "eval/loss": 0.5, "eval/rewards/accuracies": 0.8, "eval/rewards/margins": 1.0},
            {"step": 4, "eval/loss": 0.1, "eval/rewards/accuracies": 0.95, "eval/rewards/margins": 2.0},
            {"step": 2, "eval/loss": 0.4, "eval/rewards/accuracies": 0.9, "eval/rewards/margins": 1.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')  # cut by a kill
    # Resumed at step 3: the step-4 evaluation of the interrupted run is not this run's; step 2's last wins.
    evals = read_evals(path, up_to_step=3)
    assert [(e.step, e.metrics["eval/loss"]) for e in evals] == [(0, 0.9), (2, 0.4)]
    evals.append(EvalRecord(6, {"eval/loss": 0.45, "eval/rewards/accuracies": 0.85, "eval/rewards/margins": 1.2}))
    totals = RunTotals(step=6, total_steps=6, steps_this_process=3, pairs=96, tokens=123456, real_tokens=None,
                       skipped_steps=1, wall_s=3723.0)
    text = run_summary(totals, evals, tmp_path / "checkpoints" / "step_0000006", tmp_path / "hf", tmp_path,
                       "W&B run abc: offline")
    assert text.splitlines() == [
        "run summary (done): step 6 of 6 (3 in this process, 1 skipped), 96 pairs, 123k tokens computed, wall 1:02:03",
        "  final eval (step 6): loss 0.4500, reward accuracy 0.8500, margin 1.2000",
        "  best eval: reward accuracy 0.9000 at step 2, loss 0.4000 at step 2",
        f"  checkpoint: {tmp_path}/checkpoints/step_0000006 (named in {tmp_path}/checkpoints/latest)",
        f"  Hugging Face export: {tmp_path}/hf",
        f"  metrics: {tmp_path}/metrics.jsonl; W&B run abc: offline"]
    stopped = RunTotals(step=2, total_steps=6, steps_this_process=2, pairs=32, tokens=999, real_tokens=800,
                        skipped_steps=0, wall_s=5.0, stopped_by="SIGTERM")
    lines = run_summary(stopped, [], None, None, Path("runs/x")).splitlines()
    assert lines[0] == ("run summary (stopped by SIGTERM): step 2 of 6 (2 in this process), 32 pairs, 800 real "
                        "tokens (999 tokens computed), wall 0:05")
    assert lines[1:] == ["  no evaluation (data.eval_path is not set)", "  metrics: runs/x/metrics.jsonl"]


def test_logging_config_section(tmp_path):
    cfg = load_config(None, ["logging.wandb.project=simpo", "logging.wandb.mode=offline",
                             "logging.progress_interval_s=5"])
    assert cfg.logging.wandb == WandbConfig(project="simpo", mode="offline") and cfg.logging.progress_interval_s == 5
    assert load_config(None).logging.wandb.project is None  # W&B is off by default
    for override, field in (("logging.wandb.mode=cloud", "logging.wandb.mode"),
                            ("logging.wandb.project=", None),  # YAML null: allowed
                            ("logging.wandb.project=''", "logging.wandb.project"),
                            ("logging.progress_interval_s=-1", "logging.progress_interval_s"),
                            ("logging.wandb.team=x", "logging.wandb.team")):
        if field is None:
            load_config(None, [override])
            continue
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, [override])


def test_wandb_asked_for_but_not_installed_is_a_config_error(monkeypatch):
    monkeypatch.setattr(metrics_log.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"logging\.wandb\.project is set but wandb is not installed"):
        metrics_log.check_wandb(WandbConfig(project="simpo"))
    metrics_log.check_wandb(WandbConfig())  # not asked for: fine
    metrics_log.check_wandb(WandbConfig(project="simpo", mode="disabled"))


def test_step_line_elapsed_and_eta(monkeypatch, capsys):
    """Elapsed counts from the command's start (wall-clock time, shared with the launcher); the ETA from the start of
    this process's first step (the build and the step-0 evaluation before it would make the first estimates far too
    long)."""
    monkeypatch.setenv("RANK", "0")
    clock = [100.0]
    monkeypatch.setattr(metrics_log.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(metrics_log.time, "time", lambda: clock[0] + 1e9)  # wall-clock seconds
    out = StepConsole(total_steps=7, start_step=0, log_interval=1, bar=False, job_started=1e9)
    clock[0] = 110.0
    out.step(1, RECORD)  # step_time_s 2: the loop started at 108
    clock[0] = 114.0
    out.step(2, RECORD)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[-2:] for line in lines] == [["1:50 elapsed", "ETA 0:12"], ["1:54 elapsed", "ETA 0:15"]]
