"""Reading and writing HF safetensors checkpoints tensor by tensor (no pickle, no full load)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
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


class SafetensorsReader:
    """Lazy access to the tensors of an HF model directory (single file or sharded with an index)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            with safe_open(self.dir / SINGLE_FILE, framework="pt") as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {bins[0]}: pickled weights are not read; re-save with safetensors)" if bins else ""
            raise CheckpointError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.weight_map = {k: v for k, v in weight_map.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _handle(self, name: str):
        file = self.weight_map[name]
        if file not in self._handles:
            path = self.dir / file
            if not path.is_file():
                raise CheckpointError(f"{path} (listed in {INDEX_FILE} for tensor {name}) does not exist")
            self._handles[file] = safe_open(path, framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing")
        return self._handle(name).get_tensor(name)


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
