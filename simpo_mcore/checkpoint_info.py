"""The small files of a checkpoint, read without torch: the ``latest`` marker of a run's checkpoints, the run
config a training checkpoint saves (``run_config.yaml``) and the JSON of ``simpo_mcore.json`` (architecture,
tokenizer, a training checkpoint's progress). The launcher reads them before any rank starts (the resume checks);
the ranks read them through the same functions. The tensors are :mod:`simpo_mcore.checkpoint`'s and
:mod:`simpo_mcore.convert.mcore_io`'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

LATEST = "latest"
"""In a run's ``checkpoints/``: the name of the newest complete checkpoint."""
RUN_CONFIG_FILE = "run_config.yaml"
"""The resolved config of the run that wrote a training checkpoint (a config ``simpo-train`` accepts)."""
META_FILE = "simpo_mcore.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""1: Llama / Mistral without a sliding window, before ``ModelArch`` had its family fields; their defaults
are that model, so a version 1 file reads as the architecture it was written for."""


def checkpoint_root(output_dir: str | Path) -> Path:
    """Where a run in ``output_dir`` keeps its checkpoints (``step_N`` directories and ``latest``)."""
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``root/latest`` names, if both exist."""
    root = Path(root)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which is not a complete checkpoint")
    return path


def write_run_config(ckpt_dir: str | Path, run_config: dict) -> None:
    text = yaml.safe_dump(run_config, sort_keys=False, default_flow_style=False)
    (Path(ckpt_dir) / RUN_CONFIG_FILE).write_text(
        "# The resolved config of the run that wrote this checkpoint (simpo-train accepts it as a config).\n"
        "# A resume compares what is optimised (loss, training data, global batch, seed, model) with it.\n" + text)


def read_run_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """The saved run config of a training checkpoint (every one has it: a missing file is damage)."""
    path = Path(ckpt_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{ckpt_dir} has no {RUN_CONFIG_FILE}: the checkpoint is damaged or is not a training "
                         "checkpoint of simpo_mcore")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc}); the checkpoint's run config is damaged") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a mapping; the checkpoint's run config is damaged")
    return tree


def read_meta_json(ckpt_dir: str | Path) -> dict[str, Any]:
    """The JSON object of ``ckpt_dir/simpo_mcore.json``, of a format version this version reads
    (:class:`~simpo_mcore.convert.checkpoint_meta.CheckpointMeta` checks its architecture)."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir} is not a simpo_mcore checkpoint: {META_FILE} is missing "
            "(convert a Hugging Face model with tools/convert_hf_to_mcore.py)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); the checkpoint's metadata is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if data.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format_version {data.get('format_version')} is not one this version reads "
                         f"{READABLE_VERSIONS}")
    return data


def checkpoint_info(ckpt_dir: str | Path) -> dict[str, Any]:
    """What a checkpoint records besides its architecture (``info``: a training checkpoint's progress, its
    run's total steps and training-data fingerprint)."""
    info = read_meta_json(ckpt_dir).get("info", {})
    if not isinstance(info, dict):
        raise ValueError(f"{Path(ckpt_dir) / META_FILE}: field 'info' is not an object")
    return info
