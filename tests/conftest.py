"""Shared test fixtures: tiny random HF Llamas, converted checkpoints, a multi-rank launcher."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real tokenizers and UltraFeedback rows); tests using it skip without it."""
    path = ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture(scope="module")
def world_of_one():
    """A world of one for ``dist_checkpointing`` in this process; torn down after the module if this made
    it. A module opts in with ``pytestmark = pytest.mark.usefixtures("world_of_one")``."""
    import torch.distributed as dist

    from simpo_mcore.parallel import ensure_process_group

    made = not dist.is_initialized()
    ensure_process_group()
    yield
    if made and dist.is_initialized():
        dist.destroy_process_group()
