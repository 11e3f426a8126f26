"""Where raw preference rows come from: a hub dataset, local files, or the synthetic generator.

Each loader returns the rows as a ``datasets.Dataset`` and a *source fingerprint*: a string that
changes whenever the rows could have changed (hub: name + split + the datasets fingerprint of the
downloaded files; local: paths + sizes + modification times; synthetic: the generator settings).
For local files the fingerprint is computed without reading them, so a cache hit skips the load.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow

from simpo_mcore.data import synthetic

SYNTHETIC = "synthetic"
SYNTHETIC_EVAL_PAIRS = 256
SYNTHETIC_SEED = 0
"""The synthetic rows are fixed (the training seed orders them, it does not regenerate them)."""

_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def local_files(path: str) -> list[Path] | None:
    """The data files of a local ``path`` (a file or a directory of them); ``None`` if not local."""
    root = Path(path).expanduser()
    if not root.exists():
        return None
    files = sorted(p for p in root.iterdir() if p.suffix in _FORMATS) if root.is_dir() else [root]
    if not files:
        raise ValueError(f"data path {path}: no .parquet/.jsonl/.json files in this directory")
    formats = {_FORMATS.get(p.suffix) for p in files}
    if None in formats or len(formats) > 1:
        raise ValueError(f"data path {path}: expected .parquet, .jsonl or .json files of one format, "
                         f"got {sorted(p.name for p in files)}")
    return files


def local_fingerprint(files: list[Path]) -> str:
    parts = []
    for file in files:
        stat = file.stat()
        parts.append(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "local:" + "|".join(parts)


def load_local(file: Path, raw_cache_dir: Path) -> datasets.Dataset:
    """One local file's rows (each file of a directory is read, and its format detected, alone)."""
    try:
        return datasets.load_dataset(_FORMATS[file.suffix], data_files=[str(file)], split="train",
                                     cache_dir=str(raw_cache_dir))
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError) as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        raise ValueError(f"data file {file} could not be read: {exc}{cause}") from None


def load_hub(name: str, split: str) -> tuple[datasets.Dataset, str]:
    """A hub dataset split (downloaded once into the Hugging Face cache) and its fingerprint."""
    rows = datasets.load_dataset(name, split=split)
    return rows, f"hub:{name}:{split}:{rows._fingerprint}"


def load_synthetic(split: str, num_rows: int) -> tuple[datasets.Dataset, str]:
    """``split`` is ``train`` or ``eval``; rows are fixed for a given count."""
    rows = synthetic.generate_rows(num_rows, split=split, seed=SYNTHETIC_SEED)
    return (datasets.Dataset.from_list(rows),
            f"synthetic:{split}:{num_rows}:{SYNTHETIC_SEED}:{synthetic.TASK_VERSION}")
