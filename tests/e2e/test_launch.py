"""A real run through the CPU re-launch, timed from the command's start: its first line before torch is imported,
the step lines' elapsed and the summary's wall time counted from the command's start (not from the ranks'), then
relaunches with no step left to train refused with one line and nothing written, by the launcher when it can know
the run's length and by the ranks when only they can."""

from __future__ import annotations

import re
import signal

import pytest
from helpers import CommandRun, error_lines
from train_utils import write_config

from simpo_mcore import preflight
from simpo_mcore.config import ConfigError, load_config
from simpo_mcore.parallel import distributed
from simpo_mcore.train import Trainer

FIRST_LINE_LIMIT_S = 3.0
"""The first line's time from the command's start (asked: within 3 s)."""
TIME_TOLERANCE_S = 3.0
"""Shown times are whole seconds, read against the moment their line arrived here."""


NEW_RUN = ("to start a new run instead, use another output_dir=... or add checkpoint.resume=false "
           "checkpoint.overwrite=true (which deletes this run's checkpoints and metrics)")


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def seconds(text: str) -> int:
    minutes, secs = text.split(":")[-2:]
    return int(minutes) * 60 + int(secs)


@pytest.mark.slow
def test_times_count_from_the_command_and_no_step_left_is_refused(tmp_path, tiny):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "r.yaml", *tiny, output_dir=str(out), data={"eval_path": "synthetic",
                       "max_eval_pairs": 32}, train={"max_steps": 4, "eval_interval": 2})
    run = CommandRun(["simpo-train", cfg, "--nproc", "2"], timeout=900)
    assert run.returncode == 0 and not error_lines(run.text), run.text[-5000:]
    lines = [line for _, line in run.lines]
    assert lines[0] == f"[simpo_mcore] simpo-train {cfg}: 2 CPU ranks (DP 2), output {out}, a new run; importing torch"
    assert lines[1].startswith("[simpo_mcore] launching 2 CPU ranks: torchrun "), lines[:3]
    assert lines[2] == "[simpo_mcore] 2 ranks started; importing torch and megatron-core", lines[:3]
    assert run.lines[0][0] < FIRST_LINE_LIMIT_S and run.imported_before("torch") >= 1, (run.lines[0], run.imports[:3])
    # Elapsed and wall: from the command's start, as this test measured it when the line arrived.
    timed = [(at, re.search(r"\| (\d+:\d\d) elapsed \|", line)) for at, line in run.lines if line.startswith("step ")]
    assert len(timed) == 4 and all(abs(seconds(m[1]) - at) <= TIME_TOLERANCE_S for at, m in timed), run.text
    at, summary = next((at, line) for at, line in run.lines if line.startswith("run summary (done)"))
    assert abs(seconds(summary.rsplit("wall ", 1)[1]) - at) <= TIME_TOLERANCE_S, (at, summary)
    print(f"first line at {run.lines[0][0]:.2f} s; step lines {[(round(t, 1), m[1]) for t, m in timed]}; "
          f"summary at {at:.1f} s: {summary}")

    ckpt = out / "checkpoints" / "step_0000004"
    before = snapshot(out)
    for steps in (4, 3):
        again = CommandRun(["simpo-train", cfg, f"train.max_steps={steps}", "--nproc", "2"], timeout=300)
        assert (again.returncode, [line for _, line in again.lines]) == (2, [
            f"simpo-train: error: {ckpt} is at step 4 and train.max_steps is {steps}: no step is left to train. To "
            f"train further, set train.max_steps above 4; {NEW_RUN}"]), again.text
        assert again.imported_before("torch") is None and again.wall_s < FIRST_LINE_LIMIT_S, again.wall_s
        assert snapshot(out) == before  # metrics.jsonl byte-identical, no checkpoint, no evaluation record

    # Epochs over other pairs (allowed): only the ranks know the run's length; they refuse before writing anything.
    cfg_epochs = load_config(cfg, ["train.max_steps=null", "train.epochs=0.125", "checkpoint.allow_changes=[data]"])
    assert preflight.check_train(cfg_epochs) == "resuming step_0000004"  # 256 pairs / 8 = 32 steps an epoch: 4
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with distributed(cfg_epochs.parallel, cfg_epochs.train.seed) as layout, \
                pytest.raises(ConfigError) as refused:
            Trainer.build(cfg_epochs, layout)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert str(refused.value) == (f"{ckpt} is at step 4 and train.epochs=0.125 makes 4 steps: no step is left to "
                                  f"train. To train further, set train.max_steps above 4 (or more train.epochs); "
                                  f"{NEW_RUN}")
    assert snapshot(out) == before
