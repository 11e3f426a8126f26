"""``simpo_mcore.json``: what a megatron checkpoint directory of ours holds besides tensors.

Megatron's ``dist_checkpointing`` stores tensors and a pickled common state; the architecture and
tokenizer a checkpoint belongs to live in this small JSON file beside them, so every tool can
rebuild the model without the original HF directory.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from simpo_mcore.checkpoint_info import FORMAT_VERSION, META_FILE, read_meta_json
from simpo_mcore.model.hf_config import ModelArch

TOKENIZER_DIR = "tokenizer"


@dataclass
class CheckpointMeta:
    arch: ModelArch
    tokenizer: str | None = None
    """A directory relative to the checkpoint (``tokenizer``), an absolute path, or a hub name."""
    kind: str = "converted"
    """``converted`` (from HF, model only) or ``train`` (model + optimizer + progress)."""
    info: dict[str, Any] = field(default_factory=dict)

    def write(self, ckpt_dir: str | Path) -> None:
        data = {"format_version": FORMAT_VERSION, "kind": self.kind, "arch": self.arch.to_json(),
                "tokenizer": self.tokenizer, "info": self.info}
        (Path(ckpt_dir) / META_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, ckpt_dir: str | Path) -> CheckpointMeta:
        path = Path(ckpt_dir) / META_FILE
        data = read_meta_json(ckpt_dir)
        arch = data.get("arch")
        if not isinstance(arch, dict):
            raise ValueError(f"{path}: field 'arch' is missing or not an object")
        known = {f.name for f in fields(ModelArch)}
        unknown, missing = sorted(set(arch) - known), sorted(
            f.name for f in fields(ModelArch)
            if f.name not in arch and f.default is MISSING and f.default_factory is MISSING)
        if unknown or missing:
            raise ValueError(f"{path}: field 'arch' has unknown keys {unknown} and lacks required keys {missing}")
        return cls(arch=ModelArch.from_json(arch), tokenizer=data.get("tokenizer"),
                   kind=data.get("kind", "converted"), info=data.get("info", {}))

    def tokenizer_path(self, ckpt_dir: str | Path) -> str | None:
        """The tokenizer as ``AutoTokenizer.from_pretrained`` takes it."""
        if self.tokenizer is None:
            return None
        local = Path(ckpt_dir) / self.tokenizer
        return str(local) if local.is_dir() else self.tokenizer
