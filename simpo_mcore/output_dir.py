"""A training run's ``output_dir``: usable, held by one run at a time, never silently overwritten.

    check_output_dir(cfg.output_dir, cfg.checkpoint)        # the launcher, before any rank starts
    with claim_output_dir(cfg.output_dir, cfg.checkpoint, layout.rank):   # simpo-train's ranks (train.py)
        ...

- **Usable**: a directory (created when missing) that this process can write to; otherwise an error
  naming ``output_dir``, before anything slow happens.
- **One run at a time**: rank 0 creates ``<output_dir>/.simpo_mcore.lock`` with ``O_CREAT | O_EXCL``
  (atomic on local file systems and on NFSv3+ / Lustre / GPFS; no ``fcntl`` lock, which some NFS
  set-ups do not honour and which leaves no record of the holder), writes its host, pid and start
  time into it, refreshes its modification time every :data:`HEARTBEAT_S` seconds and deletes it when
  the run ends in any way Python sees (return, error, signal). A second launch is refused, naming the
  holder. A lock left by a process that was killed outright is stale: on the holder's host when that
  pid no longer runs (or runs another program), elsewhere once its heartbeat is :data:`STALE_AFTER_S`
  seconds old, and at once when it is an earlier run of the same requeued SLURM job (same
  ``SLURM_JOB_ID``, lower ``SLURM_RESTART_COUNT``); a stale lock is replaced.
- **Never silently overwritten**: a fresh run (``checkpoint.resume: false``) into an output_dir that
  holds a previous run's outputs is refused unless ``checkpoint.overwrite: true``, which deletes them.

No torch: :func:`check_output_dir` runs in the launcher before any rank starts (it refuses a lock held by a live
run but neither takes nor replaces one, and deletes nothing); the ranks then claim the directory with the same
checks (``train.claim_output_dir``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil

from simpo_mcore.config import CheckpointConfig, UserError
from simpo_mcore.config.paths import unwritable_reason

log = logging.getLogger("simpo_mcore")

LOCK_FILE = ".simpo_mcore.lock"
HEARTBEAT_S = 30.0
"""How often the holder refreshes the lock file's modification time."""
STALE_AFTER_S = 600.0
"""A lock from another host whose heartbeat is older than this is stale (clocks may differ a little)."""
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "hf", "eval_metrics.json")
"""What a run leaves in output_dir (caches beside them, ``data_cache``, ``tiny_init``, ``reference_logps``,
are keyed by their inputs and are kept)."""


def check_writable(path: str | Path) -> None:
    """``path`` is (or becomes) a directory this process can create files in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir {path} is a file, not a directory")
    if (reason := unwritable_reason(path)) is not None:
        raise UserError(f"output_dir {path} is not a directory this process can write to ({reason})")


def previous_run(path: str | Path) -> list[str]:
    """The outputs of an earlier run in ``path`` (names relative to it)."""
    path = Path(path)
    found = []
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any(p.name.startswith("step_") or p.name == "latest" for p in checkpoints.iterdir()):
        found.append("checkpoints")
    found += [name for name in RUN_OUTPUTS[1:] if (path / name).exists()]
    return found


def check_fresh(path: str | Path, overwrite: bool) -> list[str]:
    """Before a run that does not resume: the previous run's outputs in ``path`` (refused unless ``overwrite``)."""
    found = previous_run(path)
    if found and not overwrite:
        raise UserError(
            f"output_dir {path} holds a previous run ({', '.join(found)}) and checkpoint.resume is false: a new "
            f"run there would mix its checkpoints and metrics with the old ones. Resume it (checkpoint.resume=true), "
            f"choose another output_dir, or add checkpoint.overwrite=true to delete them and start over")
    return found


def start_fresh(path: str | Path, overwrite: bool) -> None:
    """Before a run that does not resume: refuse a previous run's outputs, or delete them when asked."""
    path = Path(path)
    found = check_fresh(path, overwrite)
    if not found:
        return
    for name in found:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    log.warning("checkpoint.overwrite: deleted the previous run's %s from %s", ", ".join(found), path)


class OutputDirLock:
    """The lock file that marks an output_dir as in use by one run (see the module docstring)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        me = psutil.Process()
        return {"host": socket.gethostname(), "pid": me.pid, "process_started": me.create_time(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": self.token, **_slurm_job()}

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, age = self._read()
                if not self._stale(holder, age) or not self._break(holder):
                    raise UserError(self._in_use(holder)) from None
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="output_dir-lock", daemon=True)
            self._thread.start()
            return
        raise UserError(self._in_use(self._read()[0]))

    def check_free(self) -> None:
        """Refuse a lock held by a live run, without taking it (a stale one is left for :meth:`acquire`)."""
        holder, age = self._read()
        if age is not None and not self._stale(holder, age):
            raise UserError(self._in_use(holder))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _read(self) -> tuple[dict | None, float | None]:
        """(holder record or None while it is being written, seconds since its last heartbeat)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text() or "null")
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return None, age
        return (holder if isinstance(holder, dict) else None), age

    @staticmethod
    def _stale(holder: dict | None, age: float | None) -> bool:
        if age is None:
            return True  # gone since we tried
        job = _slurm_job()
        if holder is not None and job and holder.get("slurm_job_id") == job["slurm_job_id"] \
                and int(holder.get("slurm_restart_count", 0)) < job["slurm_restart_count"]:
            return True  # an earlier run of this requeued SLURM job: SLURM ended it before requeueing
        if holder is None or holder.get("host") != socket.gethostname():
            return age > STALE_AFTER_S  # being written, or on another host: only the heartbeat tells
        try:
            process = psutil.Process(int(holder["pid"]))
            return abs(process.create_time() - float(holder["process_started"])) > 1.0  # the pid was reused
        except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
            return True

    def _break(self, holder: dict | None) -> bool:
        """Move a stale lock aside; False when it turned out to be a fresh one (then it is put back)."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        try:
            taken = json.loads(aside.read_text() or "null")
        except (OSError, ValueError):
            taken = None
        if holder is not None and (taken or {}).get("token") != holder.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # another launch locked it meanwhile: give it back
            aside.unlink()
            return False
        aside.unlink()
        log.warning("output_dir lock %s was stale (%s); replaced", self.path,
                    _describe(holder) if holder else "unreadable")
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder, _ = self._read()
            if holder is None or holder.get("token") != self.token:
                log.warning("output_dir lock %s is no longer this run's (%s)", self.path,
                            _describe(holder) if holder else "deleted")
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _in_use(self, holder: dict | None) -> str:
        who = _describe(holder) if holder else "a run whose lock file is being written"
        return (f"output_dir {self.path.parent} is in use by another run ({who}; lock file {self.path}): two runs "
                f"there would resume and delete each other's checkpoints. Wait for it or stop it, or use another "
                f"output_dir; if that process no longer exists (it ran on another machine), delete the lock file")


def _slurm_job() -> dict:
    """This process's SLURM job id and restart count (a requeued job keeps its id), when under SLURM."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {"slurm_job_id": os.environ["SLURM_JOB_ID"],
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def check_output_dir(output_dir: str | Path, cfg: CheckpointConfig) -> None:
    """What :func:`~simpo_mcore.train.claim_output_dir` will find, checked by one process before the ranks start:
    ``output_dir`` writable (created when missing), not locked by a live run and (without ``cfg.resume``) free of a
    previous run's outputs unless ``cfg.overwrite``. Takes no lock and deletes nothing."""
    check_writable(output_dir)
    OutputDirLock(output_dir).check_free()
    if not cfg.resume:
        check_fresh(output_dir, cfg.overwrite)
