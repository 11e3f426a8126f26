"""Where raw preference rows come from: a hub dataset, local files, or the synthetic generator.

Each loader returns the rows as a ``datasets.Dataset`` and a *source fingerprint*: a string that
changes whenever the rows could have changed (hub: name + split + the datasets fingerprint of the
downloaded files; local: paths + sizes + modification times; synthetic: the generator settings).
For local files the fingerprint is computed without reading them, so a cache hit skips the load.
"""

from __future__ import annotations

import codecs
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow

from simpo_mcore.config.paths import DATA_FILE_FORMATS
from simpo_mcore.data import synthetic

SYNTHETIC_EVAL_PAIRS = 256
SYNTHETIC_SEED = 0
"""The synthetic rows are fixed (the training seed orders them, it does not regenerate them)."""

HUB_PROBE_TIMEOUT_S = 5.0
"""How long to wait for the hub's (or the proxy's) TCP port before calling it unreachable: the hub client
itself retries for tens of seconds before giving up."""
UTF8_CHECK_BYTES = 16 << 20


def local_files(path: str) -> list[Path] | None:
    """The data files of a local ``path`` (a file or a directory of them); ``None`` if not local."""
    root = Path(path).expanduser()
    if not root.exists():
        return None
    files = sorted(p for p in root.iterdir() if p.suffix in DATA_FILE_FORMATS) if root.is_dir() else [root]
    if not files:
        raise ValueError(f"data path {path}: no .parquet/.jsonl/.json files in this directory")
    formats = {DATA_FILE_FORMATS.get(p.suffix) for p in files}
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


def check_utf8(file: Path) -> bool:
    """Refuse a text file that is not UTF-8, naming the line (Arrow reads the bytes as they are, and the
    first string that holds them fails far from the file). Returns whether it holds more than whitespace."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before, offset, line_start, content = 0, 0, 0, False
    with open(file, "rb") as f:
        while True:
            chunk = f.read(UTF8_CHECK_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                # The decoder's input is the bytes it held back from the last chunk (part of one character,
                # never a newline), then this chunk.
                bad = offset - (len(exc.object) - len(chunk)) + exc.start  # in the file
                in_chunk = max(bad - offset, 0)
                line = lines_before + chunk.count(b"\n", 0, in_chunk) + 1
                newline = chunk.rfind(b"\n", 0, in_chunk)
                column = bad - (offset + newline + 1 if newline >= 0 else line_start) + 1
                raise ValueError(f"data file {file}: line {line}, column {column} is not valid UTF-8 (byte offset "
                                 f"{bad}); save the file as UTF-8") from None
            if not chunk:
                return content
            content = content or bool(chunk.strip())
            lines_before += chunk.count(b"\n")
            if (newline := chunk.rfind(b"\n")) >= 0:
                line_start = offset + newline + 1
            offset += len(chunk)


def load_local(file: Path, raw_cache_dir: Path) -> datasets.Dataset:
    """One local file's rows (each file of a directory is read, and its format detected, alone)."""
    if file.stat().st_size == 0:
        raise ValueError(f"data file {file} is empty")
    if DATA_FILE_FORMATS[file.suffix] == "json" and not check_utf8(file):
        raise ValueError(f"data file {file} holds no rows")
    try:
        rows = datasets.load_dataset(DATA_FILE_FORMATS[file.suffix], data_files=[str(file)], split="train",
                                     cache_dir=str(raw_cache_dir))
    except StopIteration:  # datasets' JSON reader on a file of blank lines
        rows = None
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError) as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        raise ValueError(f"data file {file} could not be read: {exc}{cause}") from None
    if rows is None or len(rows) == 0:
        raise ValueError(f"data file {file} holds no rows")
    return rows


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub's host (or the proxy that reaches it) accepts a TCP connection within
    :data:`HUB_PROBE_TIMEOUT_S`."""
    endpoint = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    target = urllib.parse.urlparse(proxy if "://" in (proxy or "://") else f"http://{proxy}") if proxy else endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def hub_unreachable_error(what: str) -> str:
    return (f"{what} is not a local path, and the Hugging Face Hub ({huggingface_hub.constants.ENDPOINT}) "
            f"cannot be reached from here: give a local path, or download it where there is network and run "
            f"with HF_HUB_OFFLINE=1 to read it from the Hugging Face cache")


def load_hub(name: str, split: str, field: str) -> tuple[datasets.Dataset, str]:
    """A hub dataset split (downloaded once into the Hugging Face cache) and its fingerprint. Without
    network (and without ``HF_HUB_OFFLINE``) this fails at once instead of after the hub client's
    retries; ``field`` (``data.train_path``) names the setting in errors."""
    what = f"{field} {name!r}"
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise ValueError(hub_unreachable_error(what))
    try:
        rows = datasets.load_dataset(name, split=split)
    except (ConnectionError, datasets.exceptions.DatasetsError, FileNotFoundError, ValueError) as exc:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if datasets.config.HF_HUB_OFFLINE else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} is not a local path, and it could not be loaded from the Hugging Face "
                         f"Hub{offline}: {first}") from None
    return rows, f"hub:{name}:{split}:{rows._fingerprint}"


def load_synthetic(split: str, num_rows: int) -> tuple[datasets.Dataset, str]:
    """``split`` is ``train`` or ``eval``; rows are fixed for a given count."""
    rows = synthetic.generate_rows(num_rows, split=split, seed=SYNTHETIC_SEED)
    return (datasets.Dataset.from_list(rows),
            f"synthetic:{split}:{num_rows}:{SYNTHETIC_SEED}:{synthetic.TASK_VERSION}")
