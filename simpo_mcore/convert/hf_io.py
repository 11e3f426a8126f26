"""Reading and writing HF safetensors checkpoints tensor by tensor (no pickle, no full load)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from simpo_mcore.convert.keymap import IGNORED_HF_SUFFIXES

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json", "added_tokens.json",
)


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, holds an unexpected one, or has a wrong shape or config."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``{name: (dtype, shape, begin, end)}`` with absolute byte offsets, from the JSON header
    (8-byte little-endian length, then the header; see the safetensors format)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
        out = {}
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                out[name] = (SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin, 8 + n + end)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    last = max((entry[3] for entry in out.values()), default=8 + n)
    if last > size:
        raise CheckpointError(f"{path} is truncated: its header needs {last} bytes, the file has {size}")
    return out


class SafetensorsReader:
    """Lazy access to the tensors of an HF model directory (single file or sharded with an index).

    Tensors are read with plain file reads into fresh memory, not memory-mapped: a mapped file
    stays resident in this process as it is touched, so a converter holding packed copies of
    some tensors and mapped views of the others peaks at well over one copy of the weights.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        self._headers: dict[str, dict] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map = {name: SINGLE_FILE for name in self._header(SINGLE_FILE)}
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {bins[0]}: pickled weights are not read; re-save with safetensors)" if bins else ""
            raise CheckpointError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.weight_map = {k: v for k, v in weight_map.items() if not k.endswith(IGNORED_HF_SUFFIXES)}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _header(self, file: str) -> dict:
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(self.dir / file)
        return self._headers[file]

    def _entry(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing")
        file = self.weight_map[name]
        path = self.dir / file
        if not path.is_file():
            raise CheckpointError(f"{path} (listed in {INDEX_FILE} for tensor {name}) does not exist")
        header = self._header(file)
        if name not in header:
            raise CheckpointError(f"{path} does not hold tensor {name} ({INDEX_FILE} says it does)")
        return path, header[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1][1]

    def get(self, name: str) -> torch.Tensor:
        path, (dtype, shape, begin, end) = self._entry(name)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(begin)
            got = f.readinto(buf.numpy())
        if got != end - begin:
            raise CheckpointError(f"{path} is truncated: tensor {name} needs bytes {begin}..{end}, got {got}")
        return buf.view(dtype).reshape(shape)


class ShardedSafetensorsWriter:
    """Writes tensors in arrival order into ``model-0000i-of-0000N.safetensors`` files of at most
    ``max_shard_bytes`` each, then the index. Holds at most one shard's tensors in memory."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self.files)
        tmp_name = f"shard-{index:05d}.tmp.safetensors"
        save_file(self.pending, str(self.dir / tmp_name), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            (self.dir / "shard-00000.tmp.safetensors").rename(self.dir / SINGLE_FILE)
            return [self.dir / SINGLE_FILE]
        weight_map, paths = {}, []
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / f"shard-{i:05d}.tmp.safetensors").rename(self.dir / final)
            paths.append(self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return paths


def new_sibling_dir(path: Path, tag: str) -> Path:
    """Create and return ``<path>.<tag>-<random>`` next to ``path``: a name no one else uses, made here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = path.with_name(f"{path.name}.{tag}-{uuid.uuid4().hex[:8]}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield a new directory next to ``out_dir`` (``<out_dir>.incomplete-<random>``, created here) to write
    into; it becomes ``out_dir`` (absent or empty) only on success and is deleted on any failure, so an
    interrupted conversion leaves no half output. Nothing this did not create is deleted: a user's
    ``<out_dir>.incomplete`` and a checkpoint of that name being converted stay as they are."""
    tmp = new_sibling_dir(out_dir, "incomplete")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)


EXPORT_MARKER = "simpo_export.json"
"""In a directory an export owns (``checkpoint.export_hf``): the names of the entries the export wrote."""


def _owned_entries(out: Path) -> list[str] | None:
    """The entries an earlier export recorded in ``out``'s marker; ``None`` when it has no readable marker."""
    try:
        names = json.loads((out / EXPORT_MARKER).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = isinstance(names, list) and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                                         for n in names)
    return names if ok else None


@contextmanager
def owned_export(out: Path, what: str) -> Iterator[Path]:
    """Yield a new empty directory to export into; on success it replaces ``out`` with a marker of its
    entries (:data:`EXPORT_MARKER`), so that the next export may replace it in turn. ``out`` is replaced only
    when it is absent, empty, or holds exactly what an earlier export recorded: anything else in it is the
    user's, and the export is refused (naming ``what`` and the entry) before anything is written. Nothing is
    deleted that an export did not write."""
    found = sorted(os.listdir(out)) if out.is_dir() else None
    if out.exists() and found is None:
        raise FileExistsError(f"{what}: {out} exists and is not a directory")
    owned = set(_owned_entries(out) or ()) if found else set()
    foreign = [name for name in found or () if name not in owned and not (owned and name == EXPORT_MARKER)]
    if foreign:
        raise FileExistsError(f"{what}: {out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                              f"which no export wrote; move it away, or export the checkpoint elsewhere with "
                              f"tools/convert_mcore_to_hf.py")
    staged = new_sibling_dir(out, "export")
    try:
        yield staged
        entries = sorted(os.listdir(staged))
        (staged / EXPORT_MARKER).write_text(json.dumps({"entries": entries}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    old = None
    if found:
        old = new_sibling_dir(out, "replaced")
        old.rmdir()
        out.rename(old)
    elif found is not None:
        out.rmdir()
    staged.rename(out)
    if old is not None:
        for name in [*owned, EXPORT_MARKER]:
            path = old / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # something added since the check above stays, in plain sight
            old.rmdir()


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer / generation files found in ``src`` to ``dst``; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"1024"`` -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)
