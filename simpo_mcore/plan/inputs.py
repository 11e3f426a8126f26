"""What the planner reads from a run config: the architecture (the converted checkpoint's metadata, an HF
``config.json``, or one shipped in ``configs/hf/``), the real lengths of the training pairs when the data cache
holds them, and the batch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from simpo_mcore.config import DataConfig, ModelConfig, TrainConfig, UserError
from simpo_mcore.convert.checkpoint_meta import META_FILE, CheckpointMeta
from simpo_mcore.model.hf_config import ModelArch

SHIPPED_HF = Path(__file__).resolve().parents[2] / "configs" / "hf"
"""``configs/hf/<org>__<name>/config.json``: the architecture of every model the shipped configs name."""
CHECKPOINT_SUFFIX = "-mcore"
"""What ``tools/convert_hf_to_mcore.py --out checkpoints/<name>-mcore`` adds to a model's name in the configs."""


class PlanError(UserError):
    """The planner cannot answer for this input (no architecture, no GPUs, ...)."""


@dataclass(frozen=True)
class Architecture:
    arch: ModelArch
    source: str
    """Where it came from, for the report."""


def find_architecture(model: ModelConfig, config_path: str | Path | None, hf_config: str | Path | None = None,
                      search: tuple[Path, ...] = ()) -> Architecture:
    """The model's architecture: ``hf_config`` when given, else the converted checkpoint's metadata when
    ``model.checkpoint`` exists, else the shipped ``config.json`` whose ``<org>__<name>`` matches the checkpoint's
    directory name (less ``-mcore``) or ``model.tokenizer`` (``org/name``)."""
    if hf_config is not None:
        path = Path(hf_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"--hf-config {hf_config} does not exist")
        return Architecture(_read_hf(path), str(path))
    ckpt = model.checkpoint
    if ckpt and (Path(ckpt) / META_FILE).is_file():
        return Architecture(CheckpointMeta.read(ckpt).arch, f"checkpoint {ckpt} ({META_FILE})")
    dirs = [*search, *([Path(config_path).resolve().parent.parent / "hf"] if config_path else []), SHIPPED_HF]
    names = _wanted_names(model)
    for folder in dirs:
        for candidate in sorted(folder.glob("*__*/config.json")) if folder.is_dir() else []:
            if candidate.parent.name.lower() in names or candidate.parent.name.split("__", 1)[1].lower() in names:
                return Architecture(_read_hf(candidate), f"{_shown(candidate)} (matched to model.checkpoint {ckpt})")
    if not ckpt:
        raise PlanError("no architecture found: model.checkpoint is not set (is this a layout fragment?); "
                        "pass --hf-config FILE (a Hugging Face config.json)")
    raise PlanError(
        f"no architecture found for model.checkpoint {ckpt!r}: it is not a converted checkpoint "
        f"({META_FILE} missing) and no configs/hf/<org>__<name>/config.json matches "
        f"{sorted(names) or 'it'}; pass --hf-config FILE (a Hugging Face config.json)")


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (the repository's ``configs/hf/...``)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _wanted_names(model: ModelConfig) -> set[str]:
    names = set()
    if model.checkpoint:
        name = Path(model.checkpoint.rstrip("/")).name.lower()
        names.add(name.removesuffix(CHECKPOINT_SUFFIX))
    if model.tokenizer and "/" in model.tokenizer and not Path(model.tokenizer).exists():
        names.add(model.tokenizer.lower().replace("/", "__"))
    return names


def _read_hf(path: Path) -> ModelArch:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path} does not hold a JSON object")
    return ModelArch.from_hf_dict(data, source=str(path))


@dataclass(frozen=True)
class Lengths:
    """The training pairs' token counts, as the data cache holds them (after truncation)."""

    chosen: np.ndarray
    rejected: np.ndarray
    labelled_fraction: float
    """Labelled (response) tokens over all tokens: what the log-prob head computes."""
    source: str

    @property
    def pairs(self) -> int:
        return len(self.chosen)

    @property
    def pair_tokens(self) -> np.ndarray:
        return self.chosen + self.rejected


def cached_lengths(data: DataConfig, output_dir: str | Path) -> tuple[Lengths | None, str]:
    """The lengths of the newest complete training-split entry of the data cache (``data.cache_dir``, else
    ``<output_dir>/data_cache``, where ``simpo-train`` and ``simpo-data`` write it) whose source is
    ``data.train_path`` and whose pairs fit ``data.max_length``; and a note on what was (not) found."""
    cache = Path(data.cache_dir) if data.cache_dir else Path(output_dir) / "data_cache"
    entries = sorted(cache.glob("train-*/report.json"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if cache.is_dir() else []
    for report_path in entries:
        try:
            report = json.loads(report_path.read_text())
            if report.get("source") != data.train_path or report.get("split", "train") != "train":
                continue
            lengths = _read_lengths(report_path.parent / "dataset", str(report_path.parent))
        except (OSError, ValueError, KeyError, pa.ArrowException):
            continue  # a damaged or foreign entry: look further
        if lengths.pairs and max(lengths.chosen.max(), lengths.rejected.max()) <= data.max_length:
            return lengths, f"lengths of {lengths.pairs} pairs from the data cache {lengths.source}"
    return None, (f"no data cache of {data.train_path} in {cache} (simpo-data builds it): every sequence taken "
                  f"at data.max_length {data.max_length}, an upper bound on the time")


def _read_lengths(dataset_dir: Path, source: str) -> Lengths:
    """Token counts from the ``datasets`` arrow files (streaming IPC), without loading the ids into Python."""
    tables = [pa.ipc.open_stream(path).read_all() for path in sorted(dataset_dir.glob("data-*.arrow"))]
    if not tables:
        raise ValueError(f"{dataset_dir}: no arrow files")
    table = pa.concat_tables(tables)
    chosen = pc.list_value_length(table["chosen_input_ids"]).to_numpy(zero_copy_only=False)
    rejected = pc.list_value_length(table["rejected_input_ids"]).to_numpy(zero_copy_only=False)
    labelled = sum(pc.sum(pc.not_equal(pc.list_flatten(table[c]), -100)).as_py() or 0
                   for c in ("chosen_labels", "rejected_labels"))
    total = int(chosen.sum() + rejected.sum())
    return Lengths(chosen.astype(np.int64), rejected.astype(np.int64), labelled / max(total, 1), source)


@dataclass(frozen=True)
class Workload:
    """The batch of a step and what else a run does, from the config's ``train`` / ``data`` / ``loss``."""

    global_pairs: int
    micro_batch_pairs: int
    packed: bool
    pack_tokens: int
    max_length: int
    dpo: bool
    lengths: Lengths | None = None

    @classmethod
    def from_config(cls, train: TrainConfig, data: DataConfig, loss_type: str,
                    lengths: Lengths | None) -> Workload:
        return cls(global_pairs=train.global_batch_pairs, micro_batch_pairs=train.micro_batch_pairs,
                   packed=data.packing, pack_tokens=data.pack_tokens, max_length=data.max_length,
                   dpo=loss_type == "dpo", lengths=lengths)
