"""output_dir: checked before anything slow, locked by one run (the holder named, stale locks replaced),
and a previous run never silently mixed with a new one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simpo_mcore import output_dir as od
from simpo_mcore.config import UserError, load_config


def test_output_dir_must_be_a_writable_directory(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match=rf"^output_dir {afile} is a file, not a directory$"):
        od.check_writable(afile)
    with pytest.raises(UserError, match=rf"^output_dir {afile}/run is not a directory this process can write to "
                                        r"\(Not a directory\)"):
        od.check_writable(afile / "run")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    # root writes through permission bits: /proc is a directory nobody may create files in.
    target = readonly if os.geteuid() != 0 else "/proc"
    with pytest.raises(UserError, match=rf"^output_dir {target} is not a directory this process can write to"):
        od.check_writable(target)
    od.check_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())


def test_fresh_run_into_a_previous_run_is_refused_unless_overwrite(tmp_path):
    """checkpoint.resume: false into an output_dir with a previous run would keep the old checkpoints, mix the
    metrics, and (keep_last) delete the checkpoint the new run had just written: refused without overwrite."""
    out = tmp_path / "run"
    od.start_fresh(out, overwrite=False)  # nothing there: fine
    (out / "checkpoints" / "step_0000040").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_0000040\n")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "data_cache").mkdir()
    (out / "tiny_init").mkdir()
    with pytest.raises(UserError, match=rf"output_dir {out} holds a previous run \(checkpoints, metrics.jsonl\) and "
                                        r"checkpoint.resume is false: .* add checkpoint.overwrite=true to delete them"):
        od.start_fresh(out, overwrite=False)
    assert (out / "checkpoints" / "step_0000040").is_dir()
    od.start_fresh(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["data_cache", "tiny_init"]  # caches are kept


def holder(path):
    return json.loads((path / od.LOCK_FILE).read_text())


def test_second_launch_is_refused_naming_the_holder(tmp_path):
    first, second = od.OutputDirLock(tmp_path), od.OutputDirLock(tmp_path)
    first.acquire()
    try:
        record = holder(tmp_path)
        assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(UserError, match=rf"output_dir {tmp_path} is in use by another run \(host "
                                            rf"{socket.gethostname()}, pid {os.getpid()}, since .*lock file "
                                            rf"{tmp_path}/{od.LOCK_FILE}\)"):
            second.acquire()
        second.release()  # not the holder: leaves the lock alone
        assert holder(tmp_path)["token"] == first.token
    finally:
        first.release()
    assert not (tmp_path / od.LOCK_FILE).exists()
    second.acquire()
    second.release()


def test_stale_locks_are_replaced(tmp_path, monkeypatch):
    """A run killed outright leaves its lock: on its host a dead (or reused) pid, elsewhere an old heartbeat."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file = tmp_path / od.LOCK_FILE
    here = socket.gethostname()
    cases = {
        "dead pid": ({"host": here, "pid": int(dead.stdout), "process_started": time.time() - 5, "token": "a"}, 0),
        "reused pid": ({"host": here, "pid": os.getpid(), "process_started": 12345.0, "token": "b"}, 0),
        "old heartbeat elsewhere": ({"host": "elsewhere", "pid": 1, "process_started": 0.0, "token": "c"},
                                    od.STALE_AFTER_S + 5),
        "half-written and old": (None, od.STALE_AFTER_S + 5),
    }
    for name, (record, age) in cases.items():
        lock_file.write_text(json.dumps(record) if record else "")
        os.utime(lock_file, (time.time() - age, time.time() - age))
        od.OutputDirLock(tmp_path).check_free()  # the launcher's check lets it through and leaves it there
        assert lock_file.read_text() == (json.dumps(record) if record else ""), name
        lock = od.OutputDirLock(tmp_path)
        lock.acquire()
        assert holder(tmp_path)["token"] == lock.token, name
        lock.release()
    # A requeued SLURM job (same id, one more restart) replaces its killed earlier run's fresh lock at once.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 7, "token": "e", "slurm_job_id": "4242",
                                     "slurm_restart_count": 0}))
    lock = od.OutputDirLock(tmp_path)
    lock.acquire()
    assert holder(tmp_path)["slurm_restart_count"] == 1
    lock.release()
    monkeypatch.delenv("SLURM_JOB_ID")
    # A live run on another host, heartbeat fresh: refused.
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 7, "since": "then", "token": "d"}))
    with pytest.raises(UserError, match=r"in use by another run \(host elsewhere, pid 7, since then;"):
        od.OutputDirLock(tmp_path).acquire()
    with pytest.raises(UserError, match=r"in use by another run \(host elsewhere, pid 7, since then;"):
        od.OutputDirLock(tmp_path).check_free()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(od, "HEARTBEAT_S", 0.05)
    lock = od.OutputDirLock(tmp_path)
    lock.acquire()
    try:
        old = time.time() - 1000
        os.utime(tmp_path / od.LOCK_FILE, (old, old))
        deadline = time.time() + 10
        while (tmp_path / od.LOCK_FILE).stat().st_mtime < old + 500 and time.time() < deadline:
            time.sleep(0.05)
        assert time.time() - (tmp_path / od.LOCK_FILE).stat().st_mtime < 10
    finally:
        lock.release()


def test_claim_checks_locks_and_releases(tmp_path):
    """What simpo-train's ranks do around a run (a world of one here): refused in a file, then locked and freed."""
    from simpo_mcore.train import claim_output_dir

    cfg = load_config(None, ["checkpoint.resume=false"]).checkpoint
    with pytest.raises(UserError, match="is a file"), claim_output_dir(__file__, cfg, rank=0):
        pass
    out = tmp_path / "run"
    with claim_output_dir(out, cfg, rank=0):
        assert holder(out)["pid"] == os.getpid()
        with pytest.raises(UserError, match="in use by another run"), claim_output_dir(out, cfg, rank=0):
            pass
        with pytest.raises(UserError, match="in use by another run"):
            od.check_output_dir(out, cfg)
    assert not (out / od.LOCK_FILE).exists()


def test_the_launchers_check_takes_no_lock_and_deletes_nothing(tmp_path):
    """check_output_dir refuses what claim_output_dir would, but a fresh run with checkpoint.overwrite passes it
    with the previous run still there (the ranks delete it once they hold the lock), and no lock is left."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step_0000040").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    fresh = load_config(None, ["checkpoint.resume=false"]).checkpoint
    with pytest.raises(UserError, match=r"holds a previous run \(checkpoints, metrics.jsonl\)"):
        od.check_output_dir(out, fresh)
    od.check_output_dir(out, load_config(None, ["checkpoint.resume=false", "checkpoint.overwrite=true"]).checkpoint)
    od.check_output_dir(out, load_config(None).checkpoint)  # resuming: the previous run is the point
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
    with pytest.raises(UserError, match="is a file"):
        od.check_output_dir(out / "metrics.jsonl", fresh)


def test_simpo_train_reports_them_in_one_line(tmp_path, capsys):
    """Through the command: exit code 2 and one ``error:`` line, before any model loads (not a
    NotADirectoryError traceback once the data cache is created under a file given as output_dir)."""
    from simpo_mcore.cli import train_main

    config = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert train_main([config, "parallel.tp=1", f"output_dir={afile}"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == [
        f"simpo-train: error: output_dir {afile} is a file, not a directory"]
    assert train_main([config, "optim.lr=-1e-6", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "simpo-train: error: optim.lr must be a positive number, got -1e-06"
