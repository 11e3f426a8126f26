"""Where raw preference rows come from: a hub dataset, local files, or the synthetic generator.

Each loader returns the rows as a ``datasets.Dataset`` and a *source fingerprint*: a string that
changes whenever the rows could have changed (hub: name + split + the datasets fingerprint of the
downloaded files; local: paths + sizes + modification times; synthetic: the generator settings).
For local files the fingerprint is computed without reading them, so a cache hit skips the load.

Local JSON / JSON Lines files are read here (:func:`load_json`), not by datasets' JSON reader, so that a
string stays a string whatever the other rows hold, and a line too long for any row is skipped unread.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow

from simpo_mcore.config.paths import DATA_FILE_FORMATS
from simpo_mcore.data import synthetic
from simpo_mcore.data.formats import OVERSIZE_COLUMN

SYNTHETIC_EVAL_PAIRS = 256
SYNTHETIC_SEED = 0
"""The synthetic rows are fixed (the training seed orders them, it does not regenerate them)."""

HUB_PROBE_TIMEOUT_S = 5.0
"""How long to wait for the hub's (or the proxy's) TCP port before calling it unreachable: the hub client
itself retries for tens of seconds before giving up."""
UTF8_CHECK_BYTES = 16 << 20
MAX_LINE_BYTES = 16 << 20
"""A JSON Lines row longer than this is not parsed: 16 x ``formats.MAX_ROW_CHARS``, the most a row of that
many characters can take (a character written as an escaped surrogate pair is 12 bytes)."""
JSON_READER_VERSION = 1
"""Part of the raw cache's fingerprint of a JSON file: bump when :func:`load_json` changes what it stores."""


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


@dataclass(frozen=True)
class RowSource:
    """One file's (hub split's, the generator's) rows, as the pipeline reads them."""

    name: str
    rows: datasets.Dataset
    json_text: bool = False
    """Every column holds its values as JSON text (:func:`load_json`): :func:`decode_row` reads a row."""


def load_local(file: Path, raw_cache_dir: Path) -> RowSource:
    """One local file's rows (each file of a directory is read, and its format detected, alone)."""
    if file.stat().st_size == 0:
        raise ValueError(f"data file {file} is empty")
    if DATA_FILE_FORMATS[file.suffix] == "json":
        if not check_utf8(file):
            raise ValueError(f"data file {file} holds no rows")
        return RowSource(str(file), load_json(file, raw_cache_dir), json_text=True)
    try:
        rows = datasets.load_dataset(DATA_FILE_FORMATS[file.suffix], data_files=[str(file)], split="train",
                                     cache_dir=str(raw_cache_dir))
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError) as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        raise ValueError(f"data file {file} could not be read: {exc}{cause}") from None
    if len(rows) == 0:
        raise ValueError(f"data file {file} holds no rows")
    return RowSource(str(file), rows)


def load_json(file: Path, raw_cache_dir: Path) -> datasets.Dataset:
    """A JSON Lines file (or a JSON array of objects) as a dataset with one column per key, each value kept as
    its JSON text. datasets' own JSON reader stores a column whose rows mix strings and objects as JSON and
    decodes every value of it, so the strings ``"4"``, ``"true"``, ``"null"``, ``"[1, 2]"`` came back as a
    number, a bool, ``None`` and a list; here each value is decoded once, when its row is read
    (:func:`decode_row`). A line longer than :data:`MAX_LINE_BYTES` is not parsed, nor held in memory: its row
    holds only its size (:data:`OVERSIZE_COLUMN`) and is a bad row (``row_too_large``)."""
    columns: dict[str, None] = {}  # every key of every row, in the order they first appear
    oversize = False
    for _, row in _json_objects(file):
        if isinstance(row, dict):
            columns.update(dict.fromkeys(row))
        oversize = oversize or isinstance(row, int)
    if not columns and not oversize:
        raise ValueError(f"data file {file} holds no rows")
    features = {name: datasets.Value("large_string") for name in columns}
    if oversize:
        features[OVERSIZE_COLUMN] = datasets.Value("int64")
    version = f"{local_fingerprint([file])}:{MAX_LINE_BYTES}:{JSON_READER_VERSION}"
    return datasets.Dataset.from_generator(
        _json_rows, features=datasets.Features(features), cache_dir=str(raw_cache_dir),
        # A tuple: datasets splits a list among its shards, one column each.
        gen_kwargs={"file": str(file), "columns": tuple(columns), "oversize": oversize},
        fingerprint=hashlib.sha256(version.encode()).hexdigest()[:20])


def _json_rows(file: str, columns: tuple[str, ...], oversize: bool):
    for _, row in _json_objects(Path(file)):
        if isinstance(row, int):
            yield {**dict.fromkeys(columns), OVERSIZE_COLUMN: row}
        elif row is not None:
            out = {name: json.dumps(row[name], ensure_ascii=False) if name in row else None for name in columns}
            yield {**out, OVERSIZE_COLUMN: None} if oversize else out


def _json_objects(file: Path):
    """``(line, object)`` for each row of a JSON Lines file or a JSON array: the object, its size in bytes
    (an int) when the line is over :data:`MAX_LINE_BYTES`, or ``None`` for a blank line."""
    with open(file, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if head.startswith(b"["):
            try:
                items = json.loads(f.read())
            except json.JSONDecodeError as exc:
                raise ValueError(f"data file {file}: line {exc.lineno}, column {exc.colno} is not valid JSON "
                                 f"({exc.msg})") from None
            for i, item in enumerate(items):
                yield i + 1, _object(item, file, f"item {i + 1} of its array")
            return
        for number, line in enumerate(_bounded_lines(f), 1):
            if isinstance(line, int) or not line.strip():
                yield number, line if isinstance(line, int) else None
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"data file {file}: line {number}, column {exc.colno} is not valid JSON "
                                 f"({exc.msg})") from None
            yield number, _object(item, file, f"line {number}")


def _object(item, file: Path, where: str) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"data file {file}: {where} holds a JSON {type(item).__name__}, not an object (a row "
                         f"is an object of columns)")
    return item


def _bounded_lines(f):
    """The file's lines as bytes; a line over :data:`MAX_LINE_BYTES` as its length, read past in pieces."""
    while line := f.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        size = len(line)
        while piece := f.readline(1 << 20):
            size += len(piece)
            if piece.endswith(b"\n"):
                break
        yield size


def decode_row(row: dict) -> dict:
    """A row of :func:`load_json`: each value decoded (a key the row lacks is absent, as in the file)."""
    return {name: json.loads(value) for name, value in row.items() if value is not None}


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
