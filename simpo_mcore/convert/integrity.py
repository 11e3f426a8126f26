"""``integrity.json``: every file of a checkpoint with its size and SHA-256, written at save and verified
before anything reads the checkpoint, so that a truncated, deleted or bit-flipped file is refused by name
instead of loaded (or failing as a bare ``EOFError`` deep inside torch).

The file is megatron's integrity manifest (``dist_checkpointing.save(..., verify_integrity=True)``:
``{"algorithm": "sha256", "files": {name: digest}}``) plus ``"sizes"``, so megatron's own
``load(..., verify_integrity=True)`` accepts our checkpoints. Megatron hashes every file on rank 0 alone;
here the files are spread over the ranks of the job (each rank the shards it wrote, the rest to the
least loaded rank) and each rank hashes its share on a few threads (``hashlib`` releases the GIL), so the
cost per rank is the checkpoint size / ranks at the rate docs/operations.md measures. Sizes are checked
first: a truncated file is reported without reading anything.

Both functions are collective when a process group of several ranks exists (every rank calls them);
a converter's single process does all the work itself.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from simpo_mcore.convert.hf_io import CheckpointError

MANIFEST = "integrity.json"
"""megatron's ``INTEGRITY_FNAME``."""
ALGORITHM = "sha256"
READ_BYTES = 8 << 20
HASH_THREADS = 4
"""Threads per rank: more than one file at a time keeps a parallel file system busy."""
_WRITER = re.compile(r"__(\d+)_\d+\.distcp$")
"""torch_dist shard files are ``__<writing rank>_<thread>.distcp``."""


def sha256_file(path: Path, size: int | None = None) -> str:
    """The file's SHA-256; with ``size``, of at most that many bytes, and an OSError when the file holds more
    (so that no listed file, however crafted, is read without end)."""
    digest = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES if left is None else min(READ_BYTES, left + 1)):
            if left is not None:
                left -= len(chunk)
                if left < 0:
                    raise OSError(errno.EFBIG, f"it holds more than the {size} bytes recorded")
            digest.update(chunk)
    return digest.hexdigest()


def entry_problem(ckpt_dir: Path, name) -> str | None:
    """Why an ``integrity.json`` entry is not a plain name of a regular file inside the checkpoint (found
    without opening it), or ``None``. An entry that leaves the checkpoint (``../``, an absolute path, a link
    pointing out) is refused before anything reads it: verification must never read a file it does not own
    (``/proc/self/pagemap`` reads for ever), nor open a FIFO (which blocks)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return "is not a file name"
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        return "is not a plain name inside the checkpoint (an absolute path or one with '..')"
    root = os.path.realpath(ckpt_dir)
    real = os.path.realpath(ckpt_dir / name)
    if os.path.commonpath([root, real]) != root:
        return "is a link that points out of the checkpoint"
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return "is missing"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def checkpoint_files(ckpt_dir: Path) -> dict[str, int]:
    """Every regular file under ``ckpt_dir`` (relative POSIX path -> size), the manifest excepted."""
    out = {}
    for path in sorted(ckpt_dir.rglob("*")):
        rel = path.relative_to(ckpt_dir).as_posix()
        if path.is_file() and rel != MANIFEST:
            out[rel] = path.stat().st_size
    return out


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files ``rank`` hashes: the shards it wrote (page cache, local disk), then the others largest
    first to the least loaded rank. Every rank computes the same split from the same listing."""
    loads = [0] * world
    owner: dict[str, int] = {}
    for name, size in sizes.items():
        match = _WRITER.search(name)
        if match and int(match.group(1)) < world:
            owner[name] = int(match.group(1))
            loads[owner[name]] += size
    for name in sorted((n for n in sizes if n not in owner), key=lambda n: (-sizes[n], n)):
        owner[name] = min(range(world), key=lambda r: loads[r])
        loads[owner[name]] += max(sizes[name], 1)
    return [name for name, r in owner.items() if r == rank]


def _hash_files(ckpt_dir: Path, sizes: dict[str, int]) -> dict[str, str]:
    """name -> digest of its first ``sizes[name]`` bytes, or name -> ``"error: ..."`` for a file that cannot be
    read or holds more."""
    def one(name: str) -> str:
        try:
            return sha256_file(ckpt_dir / name, sizes[name])
        except OSError as exc:
            return f"error: {exc.strerror or exc}"

    names = list(sizes)
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(names)))) as pool:
        return dict(zip(names, pool.map(one, names)))


def _gather(local: dict) -> dict:
    rank, world = _world()
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def write_manifest(ckpt_dir: str | Path) -> None:
    """Hash every file of ``ckpt_dir`` (collective) and write ``integrity.json`` (rank 0)."""
    ckpt_dir = Path(ckpt_dir)
    manifest = collect_manifest(ckpt_dir)
    rank, world = _world()
    if rank == 0:
        store_manifest(ckpt_dir, manifest)
    if world > 1:
        dist.barrier()


def collect_manifest(ckpt_dir: Path, known: dict[str, tuple[int, str]] | None = None) -> dict:
    """The manifest of every file of ``ckpt_dir`` (collective: each rank hashes a share, every rank gets it all).
    ``known``: ``{file: (size, SHA-256)}`` this rank hashed already (its writer's shards, which are its share),
    taken where the size still matches. Raises ``OSError`` on every rank when a file cannot be read back."""
    rank, world = _world()
    sizes = checkpoint_files(ckpt_dir)
    known = {name: digest for name, (size, digest) in (known or {}).items() if sizes.get(name) == size}
    mine = share(sizes, rank, world)
    local = {name: known[name] for name in mine if name in known}
    local.update(_hash_files(ckpt_dir, {name: sizes[name] for name in mine if name not in known}))
    digests = _gather(local)
    unreadable = {n: d for n, d in digests.items() if d.startswith("error")}
    if unreadable:
        name = next(iter(unreadable))
        raise OSError(f"{ckpt_dir / name} cannot be read back after saving: {unreadable[name]}")
    return {"algorithm": ALGORITHM, "files": {n: digests[n] for n in sizes}, "sizes": sizes}


def store_manifest(ckpt_dir: Path, manifest: dict) -> None:
    """``integrity.json`` from :func:`collect_manifest`'s result (one process)."""
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, ckpt_dir / MANIFEST)


def read_manifest(ckpt_dir: Path) -> dict | None:
    """``{"files": ..., "sizes": ...}``, or None when the checkpoint has none."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files, sizes = manifest["files"], manifest.get("sizes", {})
        if (manifest.get("algorithm", ALGORITHM) != ALGORITHM or not isinstance(files, dict)
                or not isinstance(sizes, dict)):
            raise ValueError(f"algorithm {manifest.get('algorithm')!r}, files of type {type(files).__name__}, "
                             f"sizes of type {type(sizes).__name__}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: its {MANIFEST} cannot be read ({exc})") from None
    return {"files": files, "sizes": sizes}


def verify_manifest(ckpt_dir: str | Path) -> bool:
    """Check every file ``integrity.json`` lists: present, of the recorded size, of the recorded SHA-256
    (collective: each rank hashes a share, every rank learns every finding). Raises
    :class:`CheckpointError` naming the checkpoint and the damaged files; returns False when there is no
    manifest to check against."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    if manifest is None:
        return False
    rank, world = _world()
    files, sizes = manifest["files"], manifest["sizes"]
    problems: dict[str, str] = {}
    on_disk: dict[str, int] = {}
    for name in files:
        if (problem := entry_problem(ckpt_dir, name)) is not None:
            problems[str(name)] = problem
            continue
        on_disk[name] = (ckpt_dir / name).stat().st_size
        if name in sizes and on_disk[name] != sizes[name]:
            problems[name] = f"has {on_disk[name]} bytes, {sizes[name]} were written (truncated or replaced)"
    to_hash = {n: s for n, s in on_disk.items() if n not in problems}
    for name, digest in _hash_files(ckpt_dir, {n: to_hash[n] for n in share(to_hash, rank, world)}).items():
        if digest.startswith("error"):
            problems[name] = f"cannot be read ({digest[7:]})"
        elif digest != files[name]:
            problems[name] = "has changed since it was written (its SHA-256 differs)"
    problems = _gather(problems)
    if problems:
        names = sorted(problems)
        more = f"; also {', '.join(names[1:4])}{' ...' if len(names) > 4 else ''}" if len(names) > 1 else ""
        raise CheckpointError(
            f"checkpoint {ckpt_dir} is damaged: {names[0]} {problems[names[0]]}{more}. Restore it from a "
            f"copy, or use an earlier checkpoint (point checkpoints/latest at it)")
    return True
