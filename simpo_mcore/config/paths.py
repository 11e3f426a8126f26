"""What a config's paths name, decided without reading them: the synthetic rows, a local data file or directory,
or a hub dataset; whether a local one exists; whether a directory (output_dir, the data cache) can be written.
Imports neither torch nor datasets: the launcher checks the paths before any rank starts, and the ranks check
them again with the same functions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from simpo_mcore.config.schema import DataConfig

SYNTHETIC = "synthetic"
"""``data.train_path`` / ``data.eval_path`` value of the embedded synthetic rows."""
DATA_FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
"""Local data files by suffix, and the ``datasets`` loader each is read with."""


def looks_local(path: str) -> bool:
    """Whether ``path`` can only be a local path, not a hub name (``name`` or ``org/name``): absolute,
    ``~``, ``./`` or ``../``, a data-file suffix, or more than one ``/``."""
    return (path.startswith(("/", "~", ".")) or Path(path).suffix in DATA_FILE_FORMATS or path.count("/") > 1
            or "\\" in path)


def check_local_path(path: str, field: str) -> None:
    """Refuse a ``field`` (``data.train_path``) that can only be a local path and does not exist."""
    if path != SYNTHETIC and looks_local(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{field} {path} does not exist (relative paths start at {Path.cwd()})")


def check_local_data_paths(cfg: DataConfig, splits: tuple[str, ...]) -> None:
    """Every local data path of ``splits`` (``train``, ``eval``) exists."""
    for split in splits:
        path = getattr(cfg, f"{split}_path")
        if path is not None:
            check_local_path(path, f"data.{split}_path")


def unwritable_reason(path: Path) -> str | None:
    """Why this process cannot create ``path`` as a directory and files in it (the OS's words), or ``None``:
    tried, not guessed from permissions (root writes through them; a read-only file system raises EROFS,
    which is no PermissionError)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return str(exc.strerror or exc)
    return None
