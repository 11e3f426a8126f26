"""DPO's frozen reference: summed log-probs of every pair under the starting weights, computed
once in a forward-only pass and stored beside the run, so no second model is ever in memory.

The file ``<output_dir>/reference_logps/<split>.npz`` holds ``[N, 2]`` float64 (chosen, rejected)
and a fingerprint of what produced it: the reference checkpoint, the tokenised data (its cache
key and row count) and the precision. A run whose fingerprint differs refuses the file instead of
silently training against a stale reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from simpo_mcore.data.collate import REF_COLUMNS
from simpo_mcore.data.pipeline import TokenizedSplit
from simpo_mcore.objective import batch_sequence_logps, run_schedule, token_logps_forward
from simpo_mcore.parallel import agreed
from simpo_mcore.runtime import Runtime

log = logging.getLogger("simpo_mcore")


def fingerprint(rt: Runtime, split: TokenizedSplit, name: str) -> dict:
    ckpt = Path(rt.ckpt_dir).resolve()
    meta_bytes = (ckpt / "simpo_mcore.json").read_bytes()
    md = ckpt / "metadata.json"
    return {
        "checkpoint": str(ckpt),
        "checkpoint_meta_sha256": hashlib.sha256(meta_bytes).hexdigest()[:16],
        "checkpoint_mtime": int(md.stat().st_mtime) if md.exists() else None,
        "data": split.cache_key,
        "rows": len(split),
        "split": name,
        "precision": rt.cfg.train.precision,
        "spec": rt.options.spec,
    }


def reference_path(output_dir: str | Path, split: str) -> Path:
    return Path(output_dir) / "reference_logps" / f"{split}.npz"


@torch.no_grad()
def compute_reference_logps(rt: Runtime, split: TokenizedSplit, name: str = "") -> np.ndarray:
    """``[N, 2]`` summed log-probs (chosen, rejected) under the model as it is now, on every rank."""
    out = torch.zeros(len(split), 2, dtype=torch.float64, device=rt.layout.device)

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(rt.layout.device)
        output = token_logps_forward(model, batch, rt.logps_context)

        def loss_func(token_logps):
            sum_logps, _, _ = batch_sequence_logps(batch, token_logps)
            k = batch.num_pairs
            if not batch.filler:  # a filler's rows belong to another micro-batch (or another rank)
                out[batch.row_index, 0] = sum_logps[:k].double()
                out[batch.row_index, 1] = sum_logps[k:].double()
            return token_logps.new_zeros(()), {}

        return output, loss_func

    for c in rt.chunks:
        c.eval()
    for group in rt.eval_groups(split, progress=f"reference log-probs {name}".rstrip()):
        run_schedule(rt.chunks, forward_step, group, forward_only=True)
    for c in rt.chunks:
        c.train()
    # Rows were filled on the last pipeline stage of their data-parallel replica, once per TP and CP rank.
    if not ps.is_pipeline_last_stage() or ps.get_tensor_model_parallel_rank() != 0 \
            or ps.get_context_parallel_rank() != 0:
        out.zero_()
    dist.all_reduce(out)
    return out.cpu().numpy()


def attach_reference_logps(rt: Runtime, split: TokenizedSplit, name: str) -> TokenizedSplit:
    """The split with the reference columns (``REF_COLUMNS``: chosen, rejected summed log-probs), from the
    stored file when its fingerprint matches, else computed now (under the current weights, which
    must be the starting checkpoint's) and stored."""
    path = reference_path(rt.cfg.output_dir, name)
    want = fingerprint(rt, split, name)
    # Rank 0 alone looks at the file and tells every rank what it found (the values, or the error):
    # output_dir need not be on a file system every node sees, and no rank can decide differently.
    found = [_read_stored(path, want) if rt.layout.rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    kind, payload = found[0]
    if kind == "error":
        raise ValueError(payload)
    if kind == "values":
        values = payload
        log.info("reference log-probs for %s: loaded %s", name, path)
    else:
        log.info("reference log-probs for %s: forward pass over %d pairs", name, len(split))
        values = compute_reference_logps(rt, split, name)

        def store():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, logps=values, fingerprint=json.dumps(want))
            tmp.replace(path)

        agreed(store, run=rt.layout.rank == 0)  # a full disk on rank 0 is every rank's error, not a hang
    if values.shape != (len(split), 2) or not np.isfinite(values).all():
        raise ValueError(f"reference log-probs {path} have shape {values.shape} or non-finite values; "
                         f"expected ({len(split)}, 2) finite")
    return split.with_columns({REF_COLUMNS[0]: values[:, 0].tolist(), REF_COLUMNS[1]: values[:, 1].tolist()})


def _read_stored(path: Path, want: dict) -> tuple[str, object]:
    """``("values", [N, 2])`` from a stored file whose fingerprint matches, ``("error", message)`` for a
    stale or unreadable one, ``("missing", None)`` when there is none."""
    if not path.is_file():
        return "missing", None
    try:
        with np.load(path) as stored:
            have, values = json.loads(str(stored["fingerprint"])), stored["logps"]
    except Exception as exc:  # noqa: BLE001 - any damage: say which file and how
        return "error", (f"reference log-probs {path} cannot be read ({type(exc).__name__}: {exc}). "
                         "Delete the file to recompute them from model.checkpoint.")
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        return "error", (
            f"reference log-probs {path} are stale: they were computed for a different "
            f"{', '.join(diff)} ({', '.join(f'{k}: {have.get(k)!r} -> {want.get(k)!r}' for k in diff)}). "
            "Delete the file to recompute them from model.checkpoint, or use another output_dir.")
    return "values", values
