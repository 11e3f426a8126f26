"""Non-finite steps are skipped, counted and eventually abort; SIGTERM saves a loadable checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, free_port, run_ranks, wandb_records
from train_utils import read_metrics, write_config


@pytest.mark.slow
def test_nonfinite_gradient_is_skipped_then_aborts(tmp_path, tiny, straight):
    """A NaN in one rank's gradient at step 3: the update is skipped on every rank (all-reduced
    check), counted, the scheduler does not advance, and training goes on. Three in a row abort."""
    par = {"device": "cpu", "distributed_optimizer": True}
    out = tmp_path / "nan"
    proc = run_ranks("train_entry.py", 2, write_config(tmp_path / "nan.yaml", *tiny, output_dir=str(out),
                                                       parallel=par),
                     env={"TEST_NAN_AT_STEPS": "3"})
    assert "step 3: non-finite loss or gradient" in proc.stdout + proc.stderr
    a, b = straight("dp2"), read_metrics(out)
    assert b[2]["loss"] == a[2]["loss"] and b[3]["skipped_steps"] == 1 and b[20]["skipped_steps"] == 1
    assert b[3]["grad_norm"] == "nan" or math.isnan(float(b[3]["grad_norm"]))
    assert b[4]["lr"] == a[3]["lr"]  # the skipped step did not advance the schedule
    assert all(math.isfinite(b[s]["loss"]) for s in range(4, 21))

    with pytest.raises(AssertionError, match="3 consecutive non-finite steps"):
        run_ranks("train_entry.py", 2, write_config(tmp_path / "abort.yaml", *tiny, output_dir=str(tmp_path / "abort"),
                                                    parallel=par, train={"max_steps": 8, "max_nonfinite_steps": 3},
                                                    logging={"wandb": {"project": "t", "mode": "offline"}}),
                  env={"TEST_NAN_AT_STEPS": "2,3,4"})
    # The aborted run's W&B run is closed as failed, with the steps it took.
    (run_file,) = (tmp_path / "abort" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1]
    assert [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"] == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_saves_loadable_checkpoint(tmp_path, tiny, straight):
    """SIGTERM to torchrun mid-run: the ranks agree on a stop step, save, exit; relaunching the same
    command resumes from it and reproduces the uninterrupted run."""
    steps = 20
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "r.yaml", *tiny, output_dir=str(out), parallel={"device": "cpu"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", str(ROOT / "tests/distributed/scripts/train_entry.py"), str(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 3 <= stopped_at < steps, output[-3000:]
    assert f"stopped by SIGTERM at step {stopped_at}" in output
    info = json.loads((out / "checkpoints" / latest / "simpo_mcore.json").read_text())["info"]
    assert info["step"] == stopped_at and info["consumed_pairs"] == stopped_at * 8

    run_ranks("train_entry.py", 2, cfg)  # the same command again
    a, b = straight("dp2"), read_metrics(out)
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(stopped_at + 1, steps + 1):
        assert b[step]["loss"] == a[step]["loss"], step
