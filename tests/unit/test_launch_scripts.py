"""tools/launch/*: the scripts parse, refuse bad input with a message naming what is wrong, and the
SLURM script turns SIGUSR1 into a checkpoint, a clean exit and a requeue (on CPU ranks, with
stand-ins for srun and scontrol; no GPU job is launched)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, free_port

LAUNCH = ROOT / "tools" / "launch"
SCRIPTS = ["torchrun_single_node.sh", "torchrun_multinode.sh", "slurm_multinode.sbatch", "common.sh"]
ENV_KEYS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "SLURM_JOB_ID")


def run(script: str, *args, env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    return subprocess.run(["bash", str(LAUNCH / script), *map(str, args)], capture_output=True, text=True,
                          env={**base, "PYTHON": sys.executable, **(env or {})}, cwd=cwd, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    path = LAUNCH / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True)  # -x: sourced too
        assert proc.returncode == 0, proc.stdout
    assert os.access(path, os.X_OK) or script in ("slurm_multinode.sbatch", "common.sh")  # sbatch'd / sourced


def test_single_node_needs_an_existing_config():
    proc = run("torchrun_single_node.sh")
    assert proc.returncode == 2 and "error: missing CONFIG" in proc.stderr
    proc = run("torchrun_single_node.sh", "configs/no_such.yaml")
    assert proc.returncode == 2 and "config file 'configs/no_such.yaml' does not exist" in proc.stderr
    proc = run("torchrun_single_node.sh", "configs/tiny_cpu.yaml", env={"SIMPO_JOB": "simpo-foo"})
    assert proc.returncode == 2 and "SIMPO_JOB must be simpo-train or simpo-eval" in proc.stderr
    proc = run("torchrun_single_node.sh", "configs/tiny_cpu.yaml", env={"NPROC_PER_NODE": "two"})
    assert proc.returncode == 2 and "NPROC_PER_NODE must be a positive integer" in proc.stderr


def test_multinode_names_the_missing_variables():
    proc = run("torchrun_multinode.sh", "configs/tiny_cpu.yaml", env={"NNODES": "2", "MASTER_PORT": "29500"})
    assert proc.returncode == 2
    assert "missing environment variable(s) NODE_RANK MASTER_ADDR" in proc.stderr
    full = {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    proc = run("torchrun_multinode.sh", "configs/tiny_cpu.yaml", env=full)
    assert proc.returncode == 2 and "NODE_RANK must be an integer in [0, NNODES=2), got '2'" in proc.stderr
    proc = run("torchrun_multinode.sh", env={**full, "NODE_RANK": "1"})
    assert proc.returncode == 2 and "missing CONFIG" in proc.stderr


def test_sbatch_refuses_to_run_outside_slurm():
    proc = run("slurm_multinode.sbatch", "configs/tiny_cpu.yaml")
    assert proc.returncode == 2 and "submit this script with sbatch" in proc.stderr


FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done   # srun's own options
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$REQUEUED_FILE" ;;
esac
"""


@pytest.mark.slow
def test_sbatch_usr1_saves_exits_and_requeues(tmp_path):
    """The time-limit warning (SIGUSR1 to the batch shell) reaches every rank through srun and
    torchrun; training stops at a step boundary with a checkpoint, and the script requeues the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "parallel.tp=1", "train.max_steps=10000", "data.eval_path=null",
                 "data.synthetic_pairs=64", "train.progress_bar=false", "train.tensorboard=false"]
    requeued = tmp_path / "requeued"
    env = {**{k: v for k, v in os.environ.items() if k not in ENV_KEYS},
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "REQUEUED_FILE": str(requeued),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node0", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_CPUS_PER_TASK": "2", "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "SHUTDOWN_TIMEOUT": "120", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm_multinode.sbatch"), "configs/tiny_cpu.yaml", *overrides],
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(1)
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-5000:]
    assert "stopped by SIGUSR1" in log and "requeueing job 4242" in log
    assert requeued.read_text().split() == ["4242"]
    step = (out / "checkpoints" / "latest").read_text().strip()
    last_logged = max(json.loads(line)["step"] for line in (out / "metrics.jsonl").open())
    assert step == f"step_{last_logged:07d}" and 0 < last_logged < 10_000
