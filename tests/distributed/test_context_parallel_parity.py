"""Context parallelism at the model level: CP 2 against CP 1, same weights and rows (``scripts/cp_parity.py``).

Tiny converted models (4 layers, hidden 64, 4 heads / 2 key-value heads): Llama, Mistral (a window of 16 on every
layer, shorter than every sequence, so it reaches across chunk boundaries) and Gemma-2 (attention and final
soft-capping, windows on alternate layers, tied embeddings). Four pairs whose eight sequences (23 to 49 tokens)
are no multiple of 2 x CP x TP: every one is padded for the split. Each layout runs the step through megatron's
schedule and DDP, padded micro-batches and packed rows (with a padding tail, and one shared row length under
PP), against the CP 1 reference computed in the same launch by simpo_mcore's plain padded and packed paths.

Layouts (CP, TP, PP, DP): (2,1,1,1) on 2 ranks for the three models; (2,2,1,1) + SP, (2,1,2,1) and (2,1,1,2)
on 4 ranks for Llama and Mistral. Bounds (fp32): per-sequence sums and averages within 1e-6 relative, every
parameter's gradient within 1e-5 relative (HF-named, TP shards gathered).
"""

from __future__ import annotations

import pytest
from helpers import FAMILY_MODELS, QUIET, make_tiny_hf_model, read_json, run_ranks

pytestmark = pytest.mark.slow

MODELS = {"llama": dict(seed=21), "mistral": dict(FAMILY_MODELS["mistral"], seed=22),
          "gemma2": dict(FAMILY_MODELS["gemma2"], seed=23)}
LAUNCHES = {2: ("2,1,1,0", ["llama", "mistral", "gemma2"]), 4: ("2,2,1,1/2,1,2,0/2,1,1,0", ["llama", "mistral"])}
"""World size -> (layouts ``cp,tp,pp,sp``, models)."""
LOGPS_RTOL = 1e-6
GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.distributed as dist

    from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
    from simpo_mcore.parallel import ensure_process_group

    root = tmp_path_factory.mktemp("cp")
    made = not dist.is_initialized()
    ensure_process_group()
    for name, kw in MODELS.items():
        make_tiny_hf_model(root / f"{name}_hf", vocab_size=250, **kw)
        convert_hf_to_mcore(root / f"{name}_hf", root / f"{name}_ckpt", **QUIET)
    if made:
        dist.destroy_process_group()
    out = {}
    for world, (layouts, models) in LAUNCHES.items():
        run_ranks("cp_parity.py", world, root / f"cp{world}.json", layouts,
                  *(f"{m}={root / f'{m}_ckpt'}" for m in models), timeout=1200)
        out[world] = read_json(root / f"cp{world}.json")
    return out


CASES = [(world, model, layout) for world, (layouts, models) in LAUNCHES.items()
         for model in models for layout in layouts.split("/")]


def layout_id(case) -> str:
    world, model, layout = case
    cp, tp, pp, sp = (int(x) for x in layout.split(","))
    return f"{model}-cp{cp}-tp{tp}{'sp' if sp else ''}-pp{pp}-dp{world // (cp * tp * pp)}"


@pytest.mark.parametrize("case", CASES, ids=layout_id)
@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_cp2_matches_cp1(results, case, batching):
    world, model, layout = case
    got = results[world][model][layout][batching]
    assert len(got["sum"]) == len(got["avg"]) == 8  # every sequence of the step, from the ranks that held it
    for kind in ("sum", "avg"):
        for i, (cp2, cp1) in enumerate(got[kind]):
            assert abs(cp2 - cp1) <= LOGPS_RTOL * abs(cp1), (kind, i, cp2, cp1)
    assert got["missing_grads"] == [] and len(got["grads"]) >= 39  # Llama: 4 x 9 + embedding, norm, output
    bad = {name: err for name, err in got["grads"].items() if not err <= GRAD_RTOL}
    assert not bad, f"relative gradient error above {GRAD_RTOL}: {bad}"
    worst = max(abs(a - b) / abs(b) for kind in ("sum", "avg") for a, b in got[kind])
    print(f"[cp] {layout_id(case)} {batching}: per-sequence max relative error {worst:.2g}, gradients "
          f"{max(got['grads'].values()):.2g}, local row lengths {got['local_lengths']}")


@pytest.mark.parametrize("world", sorted(LAUNCHES))
def test_split_and_reduction_checks(results, world):
    """megatron's own ``get_batch_on_this_cp_rank`` gives ``split_rows``' chunks; the CP reduction's gradient on
    bare token log-probs (a nonlinear loss of the reduced sums and averages, one sequence labelled on one rank
    only) equals one process's autograd on the whole sequences: each token's gradient arrives exactly once (an
    all-reduce in the backward would double it: an error of the gradient's own size)."""
    checks = results[world]["checks"]
    assert checks["megatron_split_equal"] is True
    assert checks["reduction_grad_max_abs_err"] <= 1e-6 * checks["reduction_grad_max_abs"]
