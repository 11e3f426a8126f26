"""Non-finite steps are skipped, counted and eventually abort in one error line per rank; a rank-0 error is
every rank's; SIGTERM saves a loadable checkpoint; launches into one output_dir, ``kill -9`` and a damaged
checkpoint lose nothing."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from helpers import ROOT, SCRIPTS, error_lines, free_port, launch_ranks, run_ranks, wandb_records
from train_utils import read_metrics, write_config

from simpo_mcore.cli import train_main
from simpo_mcore.convert.safe_pickle import read_metadata
from simpo_mcore.output_dir import LOCK_FILE, OutputDirLock


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

    # The abort is documented behaviour, not a crash: one error line and exit code 2 on every rank (not a
    # FloatingPointError traceback per rank).
    ranks = launch_ranks("train_entry.py", 2, write_config(
        tmp_path / "abort.yaml", *tiny, output_dir=str(tmp_path / "abort"), parallel=par,
        train={"max_steps": 8, "max_nonfinite_steps": 3}, logging={"wandb": {"project": "t", "mode": "offline"}}),
        env={"TEST_NAN_AT_STEPS": "2,3,4"})
    for rank in ranks:
        assert rank.returncode == 2, rank.stderr[-3000:]
        assert "Traceback" not in rank.stderr
        assert error_lines(rank.stderr) == [
            "simpo-train: error: 3 consecutive non-finite steps (last: step 4); aborting "
            "(train.max_nonfinite_steps=3); no checkpoint was saved. Lower optim.lr, check the data, or raise "
            "train.max_nonfinite_steps"]
    # The aborted run's W&B run is closed as failed, with the steps it took.
    (run_file,) = (tmp_path / "abort" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1]
    assert [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"] == [1, 2, 3]


@pytest.mark.slow
def test_rank0_data_error_is_every_ranks_error(tmp_path, tiny):
    """Rank 0 reads the data while the others wait: its error (here an empty file) must not leave them to
    die with "Connection closed by peer" (and torchrun to blame one of them): every rank prints the same
    single line and exits 2."""
    empty = tmp_path / "prefs.jsonl"
    empty.write_text("")
    cfg = write_config(tmp_path / "c.yaml", *tiny, output_dir=str(tmp_path / "run"), data={"train_path": str(empty)})
    ranks = launch_ranks("train_entry.py", 2, cfg)
    for rank in ranks:
        assert rank.returncode == 2, rank.stderr[-3000:]
        assert error_lines(rank.stderr) == [f"simpo-train: error: data file {empty} is empty"]
        assert "Traceback" not in rank.stderr and "Connection closed" not in rank.stderr


def relaunch(cfg, log) -> subprocess.Popen:
    """``simpo-train CONFIG --nproc 2`` on the CPU: the command re-launches itself under torchrun, in-process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "simpo_mcore.cli", "simpo-train", str(cfg), "--nproc", "2"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(condition, proc, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def loss_lines(metrics) -> int:
    return sum('"loss"' in line for line in metrics.read_text().splitlines()) if metrics.exists() else 0


def flip_optimizer_byte(ckpt_dir):
    """Flip one bit inside an optimizer tensor's bytes (found through the checkpoint's own metadata)."""
    metadata = read_metadata(ckpt_dir)
    index, info = next((i, v) for i, v in metadata.storage_data.items() if i.fqn.startswith("optimizer.state.exp_avg"))
    shard = ckpt_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset + info.length // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard.name, index.fqn


@pytest.mark.slow
def test_signals_lock_damage_and_relaunch(tmp_path, tiny, straight, capsys):
    """The CPU re-launch (``simpo-train --nproc 2``) and the launches that share an output_dir:

    1. a launch into an output_dir another run holds is refused by the launcher before any rank starts, naming
       the holder (host, pid), exit 2 (a second launch must not resume the first one's checkpoint and delete its
       save);
    2. SIGTERM to the launcher reaches the ranks: they save at an agreed step and the launcher exits 0
       (torchrun's own handling exits 1 with "signal 15"); the lock is released;
    3. ``kill -9`` of the launcher takes both ranks with it (no orphan runs on);
    4. a bit flipped in an optimizer tensor of the saved checkpoint is refused by name (not loaded silently);
    5. the same command again replaces the dead run's stale lock, resumes, and the whole run equals the
       uninterrupted one bit for bit."""
    steps = 20
    out = tmp_path / "run"
    metrics, lock_file = out / "metrics.jsonl", out / LOCK_FILE
    cfg = write_config(tmp_path / "r.yaml", *tiny, output_dir=str(out), parallel={"device": "cpu"})

    held = OutputDirLock(out)
    out.mkdir()
    held.acquire()
    try:
        refused = subprocess.run([sys.executable, "-m", "simpo_mcore.cli", "simpo-train", str(cfg), "--nproc", "2"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=600,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    finally:
        held.release()
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = error_lines(refused.stderr)
    # From the launcher, before any rank started: one line, and nothing on stdout (no torchrun line).
    assert len(lines) == 1 and refused.stdout == "", refused.stdout + refused.stderr[-3000:]
    assert lines[0].startswith(f"simpo-train: error: output_dir {out} is in use by another run (host "
                               f"{socket.gethostname()}, pid {os.getpid()}, since "), lines[0]
    assert "Traceback" not in refused.stderr and not metrics.exists()

    with open(tmp_path / "a.log", "w+") as log:
        run = relaunch(cfg, log)
        try:
            wait_for(lambda: loss_lines(metrics) >= 3, run, "3 steps")
            ranks = psutil.Process(run.pid).children()
            assert json.loads(lock_file.read_text())["pid"] in {r.pid for r in ranks}  # rank 0 holds the lock
            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=120) == 0
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
        log.seek(0)
        output = log.read()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 3 <= stopped_at < steps, output[-3000:]
    assert f"stopped by SIGTERM at step {stopped_at}" in output and not lock_file.exists()
    info = json.loads((out / "checkpoints" / latest / "simpo_mcore.json").read_text())["info"]
    assert info["step"] == stopped_at and info["consumed_pairs"] == stopped_at * 8

    with open(tmp_path / "c.log", "w") as log:
        run = relaunch(cfg, log)
        try:
            # Killed while its ranks build the run (the lock is taken first): no step, no save, no cleanup.
            wait_for(lambda: lock_file.exists() and len(psutil.Process(run.pid).children()) == 2, run, "the lock")
            ranks = psutil.Process(run.pid).children()
            run.kill()
            _, alive = psutil.wait_procs(ranks, timeout=30)
            assert not alive, [p.pid for p in alive]
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert lock_file.exists()  # left behind, naming a dead rank

    damaged = tmp_path / "damaged" / "checkpoints"
    shutil.copytree(out / "checkpoints" / latest, damaged / latest)
    (damaged / "latest").write_text(latest + "\n")
    shard, tensor = flip_optimizer_byte(damaged / latest)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    capsys.readouterr()
    try:
        assert train_main([str(cfg), f"output_dir={damaged.parent}"]) == 2
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert error_lines(capsys.readouterr().err) == [
        f"simpo-train: error: checkpoint {damaged / latest} is damaged: {shard} has changed since it was written "
        f"(its SHA-256 differs). Restore it from a copy, or use an earlier checkpoint (point checkpoints/latest at "
        f"it)"], tensor

    run_ranks("train_entry.py", 2, cfg)  # the same command again (through torchrun directly)
    a, b = straight("dp2"), read_metrics(out)
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert b[step]["loss"] == a[step]["loss"], step


def launch_job(cfg, log, env: dict[str, str]) -> subprocess.Popen:
    """torchrun with 2 CPU ranks of the test entry point (its fault injection in ``env``), in a session of its own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(SCRIPTS / "train_entry.py"), str(cfg)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
                "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_kill_during_an_asynchronous_write_keeps_the_previous_checkpoint(tmp_path, tiny, straight):
    """The step-6 save's writers are held back (``TEST_SLOW_WRITE_AT``): training goes on to step 8 meanwhile
    while ``latest`` still names step 3, the save being unpublished; ``kill -9`` of the launcher then takes the
    ranks, their writers and their queue servers with it; the relaunch resumes from step 3 and the whole run
    equals the uninterrupted one bit for bit."""
    out = tmp_path / "run"
    ckpts, metrics = out / "checkpoints", out / "metrics.jsonl"
    cfg = write_config(tmp_path / "k.yaml", *tiny, output_dir=str(out), checkpoint={"save_interval": 3})
    with open(tmp_path / "k.log", "w+") as log:
        run = launch_job(cfg, log, {"TEST_SLOW_WRITE_AT": "6"})
        try:
            wait_for(lambda: loss_lines(metrics) >= 8, run, "step 8")
            assert (ckpts / "latest").read_text().strip() == "step_0000003"
            assert (ckpts / "step_0000006.incomplete").is_dir() and not (ckpts / "step_0000006").exists()
            everything = psutil.Process(run.pid).children(recursive=True)  # ranks, writers, queue servers
            assert len(everything) >= 6, [p.cmdline() for p in everything]
            run.kill()
            _, alive = psutil.wait_procs(everything, timeout=60)
            assert not alive, [p.cmdline() for p in alive]
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert (ckpts / "latest").read_text().strip() == "step_0000003"

    run_ranks("train_entry.py", 2, cfg)
    a, b = straight("dp2"), read_metrics(out)
    assert sorted(b) == list(range(1, 21))
    for step in range(1, 21):
        assert b[step]["loss"] == a[step]["loss"], step
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000018", "step_0000020"]


@contextlib.contextmanager
def small_file_system(path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (True) when this process may mount one (root); else nothing (False)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_is_one_error_line_and_latest_stays(tmp_path, tiny, async_save):
    """A save onto a file system with room for one checkpoint of the tiny run (3.3 MB) and not two: the step-6
    save fails on it; each rank prints one line naming the checkpoint, why and the free space, and exits 2;
    ``latest`` still names step 3 and the partial save is gone. Without the permission to mount a small file
    system the writes of the step-6 save fail with ENOSPC instead (``TEST_ENOSPC_AT``)."""
    out = tmp_path / "disk" / "run"
    with small_file_system(tmp_path / "disk", "5m") as mounted:
        cfg = write_config(tmp_path / "f.yaml", *tiny, output_dir=str(out),
                           checkpoint={"save_interval": 3, "async_save": async_save}, train={"max_steps": 8})
        ranks = launch_ranks("train_entry.py", 2, cfg, env={} if mounted else {"TEST_ENOSPC_AT": "6"})
        ckpts = out / "checkpoints"
        for rank in ranks:
            assert rank.returncode == 2, rank.stderr[-3000:]
            assert "Traceback" not in rank.stderr
        lines = [error_lines(rank.stderr) for rank in ranks]
        assert len(lines[0]) == 1 and lines[0] == lines[1], lines
        assert re.fullmatch(
            rf"simpo-train: error: checkpoint {ckpts}/step_0000006 could not be saved: rank \d: \[Errno 28\] No "
            rf"space left on device: '{ckpts}/step_0000006\.incomplete/__\d_0\.distcp' \((\d+\.\d [kMG]B|\d+ bytes) "
            rf"free on the file system of {ckpts}, the checkpoint needs about 3\.\d MB\); latest still names "
            r"step_0000003, and the partial save was removed\. Make room \(or move output_dir\) and relaunch the "
            r"same command", lines[0][0]), lines[0][0]
        assert (ckpts / "latest").read_text().strip() == "step_0000003"
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000003"]


@pytest.mark.slow
def test_a_signal_before_the_first_step_exits_cleanly(tmp_path, tiny):
    """SIGTERM while the ranks tokenise the data (before step 1, the distributed optimizer has no state yet): every
    rank stops before the first step, saves nothing (there is nothing trained) and exits 0."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "s.yaml", *tiny, output_dir=str(out))
    ranks = launch_ranks("train_entry.py", 2, cfg, env={"TEST_SIGTERM_IN_STARTUP": "1"})
    for rank in ranks:
        assert rank.returncode == 0, rank.stderr[-3000:]
        assert "Traceback" not in rank.stderr and not error_lines(rank.stderr)
    assert "stopped by SIGTERM at step 0; resume with the same command" in ranks[0].stdout + ranks[0].stderr
    assert not (out / "checkpoints").exists() and loss_lines(out / "metrics.jsonl") == 0
