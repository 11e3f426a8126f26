"""Shared by the end-to-end tests: one tiny converted model, and uninterrupted reference runs.

The reference ("straight") runs are the tiny config's 20 steps at a few layouts; each is trained
once per session, on first use, and compared against by several tests (layouts, resume, signals,
non-finite steps, options), which keeps the number of multi-rank launches down.
"""

from __future__ import annotations

import pytest
from helpers import run_ranks
from train_utils import make_tiny, read_metrics, write_config

STRAIGHT = {  # name: (ranks, parallel section, other sections); packed rows unless the data section says not
    "tp1": (1, {}, {}),
    "dp2": (2, {}, {}),
    "tp2pp2": (4, {"tp": 2, "pp": 2}, {}),
    "pp2vpp2": (2, {"pp": 2, "vpp": 2}, {}),
    "tp1_padded": (1, {}, {"data": {"packing": False}}),
    "cp2": (2, {"cp": 2}, {}),
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(converted checkpoint, tokenised-data cache dir) shared by the training runs."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny(root / "model"), root / "cache"


@pytest.fixture(scope="session")
def straight(tiny, tmp_path_factory):
    """``straight(name)`` -> metrics by step of the uninterrupted 20-step run at layout ``name``."""
    root = tmp_path_factory.mktemp("straight")
    done: dict[str, dict] = {}

    def get(name: str) -> dict[int, dict]:
        if name not in done:
            nproc, parallel, sections = STRAIGHT[name]
            out = root / name
            cfg = write_config(root / f"{name}.yaml", *tiny, output_dir=str(out),
                               parallel={"device": "cpu", **parallel}, **sections)
            run_ranks("train_entry.py", nproc, cfg)
            done[name] = read_metrics(out)
        return done[name]

    return get
