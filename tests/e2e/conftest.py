"""Shared by the end-to-end tests: one tiny converted model (and a tiny mixture of experts), and uninterrupted
reference runs.

The reference ("straight") runs are the tiny config's 20 steps at a few layouts; each is trained
once per session, on first use, and compared against by several tests (layouts, resume, signals,
non-finite steps, options, the mixture of experts'), which keeps the number of multi-rank launches down.
"""

from __future__ import annotations

import pytest
from helpers import run_ranks
from train_utils import make_tiny, make_tiny_moe, read_metrics, write_config

MOE_RUN = {"data": {"eval_path": "synthetic", "max_eval_pairs": 64}}
"""The mixture of experts' runs: held-out pairs evaluated at step 0 and at the end."""

# name: (ranks, parallel section, other sections[, model]); packed rows unless the data section says not
STRAIGHT = {
    "tp1": (1, {}, {}),
    "dp2": (2, {}, {}),
    "tp2pp2": (4, {"tp": 2, "pp": 2}, {}),
    "pp2vpp2": (2, {"pp": 2, "vpp": 2}, {}),
    "tp1_padded": (1, {}, {"data": {"packing": False}}),
    "cp2": (2, {"cp": 2}, {}),
    # The tiny Qwen3-MoE (train_utils.TINY_MOE) on 2 ranks: EP 1 (DP 2) and EP 2, which also exports.
    "moe_ep1": (2, {}, MOE_RUN, "moe"),
    "moe_ep2": (2, {"ep": 2}, {**MOE_RUN, "checkpoint": {"export_hf": True}}, "moe"),
    "moe_ep2_aux": (2, {"ep": 2}, {"model": {"moe_aux_loss_coeff": 0.1}}, "moe"),
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(converted checkpoint, tokenised-data cache dir) shared by the training runs."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny(root / "model"), root / "cache"


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """(converted tiny Qwen3-MoE, tokenised-data cache dir); its HF model is in ``<checkpoint>/../hf``."""
    root = tmp_path_factory.mktemp("tiny_moe")
    return make_tiny_moe(root / "model"), root / "cache"


@pytest.fixture(scope="session")
def straight(request, tiny, tmp_path_factory):
    """``straight(name)`` -> metrics by step of the uninterrupted 20-step run at layout ``name`` (its output
    directory is ``straight.root / name``)."""
    root = tmp_path_factory.mktemp("straight")
    done: dict[str, dict] = {}

    def get(name: str) -> dict[int, dict]:
        if name not in done:
            nproc, parallel, sections, *model = STRAIGHT[name]
            checkpoint = request.getfixturevalue("tiny_moe") if model == ["moe"] else tiny
            out = root / name
            cfg = write_config(root / f"{name}.yaml", *checkpoint, output_dir=str(out),
                               parallel={"device": "cpu", **parallel}, **sections)
            run_ranks("train_entry.py", nproc, cfg)
            done[name] = read_metrics(out)
        return done[name]

    get.root = root
    return get
