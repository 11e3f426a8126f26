"""The on-disk cache of tokenised preference datasets.

A tokenised dataset lives in ``<cache_dir>/<split>-<key>/`` (``dataset/`` written by
``save_to_disk`` plus ``report.json``). The key hashes everything that can change the token ids:
the source fingerprint, the tokenizer (vocabulary, merges, normaliser, added tokens, chat template,
BOS/EOS), the length and rendering settings and the row limit, plus :data:`PIPELINE_VERSION`. An entry is built
in a temporary folder and renamed into place, so a reader never sees a half-written entry; when two
processes build the same entry at once, the second rename loses and its copy is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from simpo_mcore.config.paths import unwritable_reason

PIPELINE_VERSION = 5
"""Bump when rendering or tokenisation changes, so that stale cache entries are not reused."""


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides the ids: the backend's full JSON (or the vocabulary of a slow
    tokenizer), the chat template, and the BOS/EOS tokens and ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [type(tokenizer).__name__, tokenizer.chat_template, tokenizer.bos_token,
             tokenizer.bos_token_id, tokenizer.eos_token, tokenizer.eos_token_id]
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """A short stable hash of ``parts`` (JSON-serialisable values)."""
    text = json.dumps({"pipeline_version": PIPELINE_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def entry_dir(cache_dir: str | Path, split: str, key: str) -> Path:
    return Path(cache_dir) / f"{split}-{key}"


def is_complete(entry: Path) -> bool:
    return (entry / "report.json").is_file() and (entry / "dataset").is_dir()


def read_report(entry: Path) -> dict[str, Any]:
    return json.loads((entry / "report.json").read_text())


def check_writable(cache_dir: Path, what: str) -> None:
    """Refuse, naming ``what``, a cache directory this process cannot write into."""
    if (reason := unwritable_reason(cache_dir)) is not None:
        raise ValueError(f"{what} cannot be written ({reason}): point data.cache_dir at a writable directory")


def discard(entry: Path) -> None:
    """Remove a damaged entry: renamed out of the way first, so a reader never sees it half deleted."""
    gone = entry.with_name(f".damaged-{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, gone)
    except OSError:
        return  # another process moved it first, or the file system is read-only: building again says so
    shutil.rmtree(gone, ignore_errors=True)


def new_tmp_dir(cache_dir: str | Path, key: str) -> Path:
    tmp = Path(cache_dir) / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, entry: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` into ``tmp`` and rename ``tmp`` to ``entry`` (atomic on one file system)."""
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    try:
        os.rename(tmp, entry)
    except OSError:
        if not is_complete(entry):  # not a lost race: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)
