"""GPU-only checks: the Transformer Engine spec, bf16 and FP8 logits against HF (Llama, and each other family),
packed rows through TE's THD attention, the Triton head kernels (plain and soft-capped), and a training step
without host syncs of its own.

CI has no GPU, so these skip there; they run on an H100 / H200 with megatron-core and Transformer Engine
installed (``benchmarks/gpu_session.sh`` runs them). With ``SIMPO_MCORE_GPU_REPORT=path.json`` the measured
errors are also written there, for the notes.

Tolerances: bf16 paths are compared with HF's own bf16 run against the same fp32 reference, so the bound
says "no worse than HF in bf16" rather than a guessed constant; fp32 on the GPU (TF32 off, torch's
default) must meet the CPU tolerance of 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[2]
REPORT: dict = {}


def _report(key: str, value) -> None:
    REPORT[key] = value
    path = os.environ.get("SIMPO_MCORE_GPU_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=1))


@pytest.fixture(scope="module")
def layout():
    from simpo_mcore.config import ParallelConfig
    from simpo_mcore.parallel import init_distributed, shutdown

    yield init_distributed(ParallelConfig(device="cuda"), seed=1234)
    shutdown()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random HF Llama (GQA, vocab 1000: not a multiple of 128; FP8-friendly widths) and its
    megatron checkpoint, converted by the CLI in its own process."""
    from helpers import make_tiny_hf_llama

    root = tmp_path_factory.mktemp("gpu")
    hf_dir, ckpt = root / "hf", root / "ckpt"
    make_tiny_hf_llama(hf_dir, vocab_size=1000, hidden_size=256, intermediate_size=704, num_layers=4,
                       heads=8, kv_heads=2)
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_mcore.py"), "--hf", str(hf_dir),
                    "--out", str(ckpt)], check=True, cwd=ROOT, capture_output=True, text=True)
    return hf_dir, ckpt


def _batch(vocab: int):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (3, 96), generator=g)  # 288 tokens: a multiple of 16 for FP8 GEMMs
    mask = torch.ones_like(tokens)
    mask[1, 70:] = 0  # right padding (random ids): the causal mask alone must keep it out
    mask[2, 41:] = 0
    return tokens.cuda(), mask.cuda()


def _hf_logits(hf_dir, dtype, tokens, mask):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa").cuda().eval()
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits.float()


def _mcore_logits(ckpt, spec, precision, tokens, fp8_recipe="tensorwise"):
    from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
    from simpo_mcore.convert.mcore_io import load_model_weights
    from simpo_mcore.model.builder import ModelOptions, build_model
    from simpo_mcore.model.forward import forward_logits

    arch = CheckpointMeta.read(ckpt).arch
    chunks = build_model(arch, ModelOptions(spec=spec, precision=precision, fp8_recipe=fp8_recipe, cuda=True))
    load_model_weights(chunks, ckpt)
    return forward_logits(chunks, tokens, arch.vocab_size), chunks


def test_logits_parity_bf16_te_and_sdpa_fp8_te(layout, converted):
    from simpo_mcore.model.specs import te_available

    hf_dir, ckpt = converted
    tokens, mask = _batch(1000)
    real = mask.bool()
    ref = _hf_logits(hf_dir, torch.float32, tokens, mask)
    scale = ref[real].abs().max().item()

    def err(logits):
        return (logits - ref).abs()[real].max().item()

    errors = {"hf_bf16": err(_hf_logits(hf_dir, torch.bfloat16, tokens, mask)), "logits_max_abs": scale}
    specs = [("sdpa", "fp32"), ("sdpa", "bf16")]
    if te_available():
        specs += [("te", "fp32"), ("te", "bf16"), ("te", "fp8")]
    for spec, precision in specs:
        logits, chunks = _mcore_logits(ckpt, spec, precision, tokens)
        errors[f"mcore_{spec}_{precision}"] = err(logits)
        if precision == "fp8":
            te_modules = [m for m in chunks[0].modules() if hasattr(m, "fp8") and hasattr(m, "fp8_meta")]
            errors["fp8_modules_engaged"] = f"{sum(bool(m.fp8) for m in te_modules)}/{len(te_modules)}"
            errors["fp8_rel_l2"] = ((logits - ref)[real].norm() / ref[real].norm()).item()
        del chunks
    _report("logits_max_abs_err_vs_hf_fp32", errors)
    assert te_available(), "Transformer Engine does not import on this GPU"
    assert errors["mcore_sdpa_fp32"] <= 1e-4
    # TE's fp32 GEMMs run in TF32 (10-bit mantissa): about 1e-3 relative, measured 1.3e-3 on logits of 1.4.
    assert errors["mcore_te_fp32"] <= 5e-3 * errors["logits_max_abs"]
    # bf16: no worse than HF's own bf16 run (same weights, same tokens), with a little slack.
    assert errors["mcore_sdpa_bf16"] <= 2 * errors["hf_bf16"] + 1e-3
    assert errors["mcore_te_bf16"] <= 2 * errors["hf_bf16"] + 1e-3
    # FP8 (e4m3 forward, 3 mantissa bits; current per-tensor scaling, so the first forward is already
    # scaled: delayed scaling would start from scale 1): every TE layer ran in FP8, logits stay close.
    engaged, total = map(int, errors["fp8_modules_engaged"].split("/"))
    assert total > 0 and engaged == total
    assert errors["fp8_rel_l2"] < 0.15  # measured 0.099 on an H200 (e4m3 rounding is up to 6% per element)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2"])
def test_family_logits_bf16_sdpa_and_te(layout, tmp_path, family):
    """Each family beyond Llama (``helpers.FAMILY_MODELS``: windows of 16 at sequence 96, biases, q / k norms,
    Gemma-2's soft-capping), converted, against HF in fp32 on this GPU: the SDPA spec in fp32 and bf16, and the
    TE spec in bf16 where TE can run the model (Gemma-2 needs TE's DotProductAttention(softcap=); without it
    ``model.spec: auto`` takes the SDPA spec, as recorded in the report)."""
    from helpers import FAMILY_MODELS, load_hf_model, make_tiny_hf_model

    from simpo_mcore.model.specs import te_available, te_softcap_available

    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    make_tiny_hf_model(hf_dir, vocab_size=1000, hidden_size=256, intermediate_size=704, heads=8, kv_heads=2,
                       **FAMILY_MODELS[family])
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_mcore.py"), "--hf", str(hf_dir),
                    "--out", str(ckpt)], check=True, cwd=ROOT, capture_output=True, text=True)
    tokens, mask = _batch(1000)
    real = mask.bool()

    def hf(dtype):
        model = load_hf_model(hf_dir, dtype=dtype).cuda()
        with torch.no_grad():
            return model(input_ids=tokens, attention_mask=mask).logits.float()

    ref = hf(torch.float32)
    errors = {"hf_bf16": (hf(torch.bfloat16) - ref).abs()[real].max().item(),
              "logits_max_abs": ref[real].abs().max().item()}
    te_runs = te_available() and (family != "gemma2" or te_softcap_available())
    errors["te_used"] = te_runs
    for spec, precision in [("sdpa", "fp32"), ("sdpa", "bf16")] + ([("te", "bf16")] if te_runs else []):
        logits, chunks = _mcore_logits(ckpt, spec, precision, tokens)
        errors[f"mcore_{spec}_{precision}"] = (logits - ref).abs()[real].max().item()
        del chunks
    _report(f"family_{family}_logits_max_abs_err_vs_hf_fp32", errors)
    assert errors["mcore_sdpa_fp32"] <= 1e-4 * max(1.0, errors["logits_max_abs"])
    for key in ("mcore_sdpa_bf16", "mcore_te_bf16"):
        if key in errors:
            assert errors[key] <= 2 * errors["hf_bf16"] + 1e-3, key


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap30"])
@pytest.mark.parametrize("tp_chunks", [(4096, 100), (1000, 333)])
def test_triton_head_matches_torch_head_on_gpu(layout, tp_chunks, softcap):
    import torch.distributed as dist

    from simpo_mcore.logprobs import fused_token_logps, sequence_logps

    chunk_tokens, prompt = tp_chunks
    s, b, h, vocab, v_pad = 1024, 4, 512, 50000, 50048
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(s, b, h, generator=g, device="cuda").bfloat16()
    weight = (torch.randn(v_pad, h, generator=g, device="cuda") * 0.05).bfloat16()
    labels = torch.randint(0, vocab, (b, s), generator=g, device="cuda")
    labels[:, :prompt] = -100
    labels[1, -50:] = -100
    group = dist.new_group([dist.get_rank()])
    out, grads = {}, {}
    # (name, kernel, recompute): the Triton passes with the logits recomputed and kept, against torch's.
    for name, kernel, recompute in (("torch", "torch", True), ("triton", "triton", True),
                                    ("triton_keep", "triton", False)):
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logps = fused_token_logps(hh, ww, labels, vocab, group, chunk_tokens=chunk_tokens, kernel=kernel,
                                  recompute=recompute, softcap=softcap)
        _, _, avg = sequence_logps(logps, labels)
        (avg * torch.linspace(-1, 1, b, device="cuda")).sum().backward()
        out[name], grads[name] = logps.detach(), (hh.grad.float(), ww.grad.float())
    report = {}
    for name in ("triton", "triton_keep"):
        diff = (out[name] - out["torch"]).abs().max().item()
        rel = [((grads[name][i] - grads["torch"][i]).norm() / grads["torch"][i].norm()).item() for i in (0, 1)]
        report[name] = {"max_abs_logp_diff": diff, "grad_hidden_rel": rel[0], "grad_weight_rel": rel[1]}
    _report(f"triton_vs_torch_head_chunk{chunk_tokens}_softcap{softcap}", report)
    assert torch.equal(out["triton_keep"], out["triton"])  # the same forward
    for name, r in report.items():
        assert (out[name][labels == -100] == 0).all()
        assert (grads[name][1][vocab:] == 0).all()
        assert r["max_abs_logp_diff"] < 1e-4, name  # same bf16 logits; only the fp32 exp / summation order differ
        assert r["grad_hidden_rel"] < 1e-2 and r["grad_weight_rel"] < 1e-2, name  # bf16 g can flip by one ulp


def test_training_step_makes_no_host_sync_of_its_own(layout, converted):
    """From the first forward to the last backward of a micro-batch, simpo_mcore's code never waits for
    the device (labels checked on the host, pinned copies, no ``.item()``): torch's sync debug mode
    reports every synchronising call, and each is attributed to the innermost frame outside torch.
    Syncs inside megatron-core or Transformer Engine are reported (``host_syncs``), not failed."""
    import traceback
    import warnings

    from simpo_mcore.config import LossConfig
    from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
    from simpo_mcore.convert.mcore_io import load_model_weights
    from simpo_mcore.data.padded import collate_pairs
    from simpo_mcore.logprobs import TokenLogpsContext
    from simpo_mcore.microbatch import LossScale
    from simpo_mcore.model.builder import ModelOptions, build_model
    from simpo_mcore.model.specs import te_available
    from simpo_mcore.objective import make_forward_step

    _, ckpt = converted
    arch = CheckpointMeta.read(ckpt).arch
    spec = "te" if te_available() else "sdpa"
    (model,) = build_model(arch, ModelOptions(spec=spec, precision="bf16", cuda=True))
    load_model_weights([model], ckpt)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, arch.vocab_size, (4, 128), generator=g).tolist()
    labels = [[-100] * 40 + row[40:] for row in tokens]
    # A host micro-batch, as collation gives it: two pairs of 128 tokens, 88 targets per sequence.
    batch = collate_pairs({"chosen_input_ids": tokens[:2], "chosen_labels": labels[:2],
                           "rejected_input_ids": tokens[2:], "rejected_labels": labels[2:]}, [0, 1], 128, 0,
                          arch.vocab_size)
    step = make_forward_step(LossConfig(), TokenLogpsContext(arch.vocab_size, chunk_tokens=256),
                             torch.device("cuda"), LossScale(1, 1, 2, 2 * 88))

    def run():
        output, loss_func = step(iter([batch]), model)
        loss, report = loss_func(output)
        loss.backward()
        return report

    run()  # compiles the Triton kernels, allocates the caches
    torch.cuda.synchronize()
    syncs = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                      and "warnings.py" not in f.filename]
            syncs.append(f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno}" if frames else "?")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            report = run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    ours = [where for where in syncs if "simpo_mcore/" in where and "/tests/" not in where]
    _report("host_syncs_in_a_step", {"spec": spec, "all": syncs, "simpo_mcore": ours})
    assert torch.isfinite(report["report"]).all()
    assert ours == [], ours


def test_packed_rows_through_te_thd_attention(layout, converted):
    """Pairs packed into one row through the TE spec (THD fused attention, TE's fused THD RoPE) and the SDPA
    spec (per-sequence attention), bf16: each sequence's average log-prob against HF fp32 on that sequence
    alone, no worse than HF's own bf16 run; the same pairs padded as the other reference; and changing one
    sequence's tokens leaves every other sequence of the row unchanged."""
    import random

    from transformers import LlamaForCausalLM

    from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
    from simpo_mcore.convert.mcore_io import load_model_weights
    from simpo_mcore.data.packing import collate_packed_row
    from simpo_mcore.data.padded import collate_pairs
    from simpo_mcore.logprobs import TokenLogpsContext, sequence_logps
    from simpo_mcore.model.builder import ModelOptions, build_model
    from simpo_mcore.model.specs import te_available
    from simpo_mcore.objective import sequence_token_logps, token_logps_forward

    hf_dir, ckpt = converted
    arch = CheckpointMeta.read(ckpt).arch
    rng = random.Random(5)
    pairs = []
    for prompt, chosen, rejected in ((20, 61, 17), (5, 33, 90), (48, 12, 40)):
        pair = {}
        for side, n in (("chosen", chosen), ("rejected", rejected)):
            ids = [rng.randrange(3, arch.vocab_size) for _ in range(prompt + n)]
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, [-100] * prompt + ids[prompt:]
        pairs.append(pair)

    def columns(rows):
        return {name: [p[name] for p in rows] for name in rows[0]}

    def hf_avg(dtype):
        model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa").cuda().eval()
        out = []
        with torch.no_grad():
            for side in ("chosen", "rejected"):
                for p in pairs:
                    ids = torch.tensor([p[f"{side}_input_ids"]], device="cuda")
                    targets = torch.tensor(p[f"{side}_labels"][1:], device="cuda")
                    logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                    mask = targets != -100
                    out.append(logps[mask].gather(-1, targets[mask, None]).mean().item())
        return torch.tensor(out)

    ref, hf_bf16 = hf_avg(torch.float32), hf_avg(torch.bfloat16)
    bound = 2 * (hf_bf16 - ref).abs().max().item() + 1e-3
    head = TokenLogpsContext(arch.vocab_size, chunk_tokens=256)
    device = torch.device("cuda")
    vocab = arch.vocab_size
    packed = collate_packed_row(columns(pairs), [0, 1, 2], 512, pad_id=0, vocab_size=vocab)
    changed = [dict(p) for p in pairs]
    changed[1]["chosen_input_ids"] = [rng.randrange(3, arch.vocab_size) for _ in pairs[1]["chosen_input_ids"]]
    changed[1]["chosen_labels"] = [-100] * 5 + changed[1]["chosen_input_ids"][5:]  # its prompt is 5 tokens
    after = collate_packed_row(columns(changed), [0, 1, 2], 512, pad_id=0, vocab_size=vocab)
    padded = collate_pairs(columns(pairs), [0, 1, 2], seq_len=144, pad_id=0, vocab_size=vocab)
    report = {"hf_bf16_max_abs_avg_logp_err": (hf_bf16 - ref).abs().max().item()}
    specs = ["sdpa"] + (["te"] if te_available() else [])
    for spec in specs:
        (model,) = build_model(arch, ModelOptions(spec=spec, precision="bf16", cuda=True))
        load_model_weights([model], ckpt)
        model.eval()
        got = {}
        with torch.no_grad():
            for name, batch in (("packed", packed), ("changed", after), ("padded", padded)):
                batch = batch.to(device)
                token_logps = sequence_token_logps(batch, token_logps_forward(model, batch, head))
                got[name] = (token_logps.float().cpu(), sequence_logps(token_logps, batch.sequence_targets)[2].cpu())
        report[spec] = {
            "packed_max_abs_avg_logp_err": (got["packed"][1] - ref).abs().max().item(),
            "padded_max_abs_avg_logp_err": (got["padded"][1] - ref).abs().max().item(),
            "others_max_abs_change": max((got["changed"][0][i] - got["packed"][0][i]).abs().max().item()
                                         for i in range(6) if i != 1),
            "changed_max_abs_change": (got["changed"][0][1] - got["packed"][0][1]).abs().max().item(),
        }
        del model
    _report("packed_rows_bf16", report)
    assert te_available(), "Transformer Engine does not import on this GPU"
    for spec in specs:
        r = report[spec]
        assert r["packed_max_abs_avg_logp_err"] <= bound, (spec, r, bound)
        assert r["padded_max_abs_avg_logp_err"] <= bound, (spec, r, bound)
        assert r["others_max_abs_change"] <= 1e-6 < r["changed_max_abs_change"], (spec, r)


def _cp_parity(tmp_path, ckpt, nproc: int, layouts: str, *flags: str) -> dict:
    """``tests/distributed/scripts/cp_parity.py`` on ``nproc`` GPUs (the model-level CP check the CPU tests run on
    gloo): per-sequence sums / averages and gradients of each layout next to the CP 1 reference's."""
    from helpers import free_port

    out = tmp_path / f"cp_{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", str(ROOT / "tests" / "distributed" / "scripts" / "cp_parity.py"), str(out),
           layouts, f"llama={ckpt}", "--device", "cuda", *flags]
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())["llama"]


def _errors(result: dict) -> dict:
    """Worst relative per-sequence error (sums and averages) and worst relative gradient error of a layout."""
    return {batching: {"logps": max(abs(a - b) / abs(b) for kind in ("sum", "avg") for a, b in got[kind]),
                       "grads": max(got["grads"].values())} for batching, got in result.items()}


def test_context_parallel_path_at_cp1_leaves_results_unchanged(layout, converted, tmp_path):
    """One GPU: the CP code path at CP 1 (the training's collation with the split: every packed segment padded to
    an even length and handed over as ``cu_seqlens_q_padded``, the local ``sequence_index``) against the plain path
    of the same spec and precision, padded micro-batches and packed rows: the SDPA spec in fp32 (bounds ten times
    the CPU's: 1e-5 per sequence, 1e-4 gradients) and TE in bf16 (bounds to be set from the first measurement:
    1e-2 per sequence, 5e-2 gradients). Not yet measured on a GPU."""
    from simpo_mcore.model.specs import te_available

    _, ckpt = converted
    report = {"sdpa_fp32": _errors(_cp_parity(tmp_path, ckpt, 1, "1,1,1,0"))}
    if te_available():
        report["te_bf16"] = _errors(_cp_parity(tmp_path, ckpt, 1, "1,1,1,0", "--spec", "te", "--precision", "bf16",
                                               "--ref-spec", "te", "--ref-precision", "bf16"))
    _report("context_parallel_cp1_path_vs_plain", report)
    for batching, err in report["sdpa_fp32"].items():
        assert err["logps"] <= 1e-5 and err["grads"] <= 1e-4, (batching, err)
    assert te_available(), "Transformer Engine does not import on this GPU"
    for batching, err in report["te_bf16"].items():
        assert err["logps"] <= 1e-2 and err["grads"] <= 5e-2, (batching, err)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_te_context_parallel_attention_matches_cp1(layout, converted, tmp_path):
    """Two GPUs: Transformer Engine's CP attention (p2p ring, megatron's wiring) at CP 2 against CP 1, bf16, the
    same rows (padded micro-batches, and packed rows through TE's THD CP path), both against the fp32 SDPA
    reference computed in the same launch: CP 2 must be no further from it than twice CP 1's distance (+1e-3).
    Not yet measured on a GPU."""
    from simpo_mcore.model.specs import te_available

    assert te_available(), "Transformer Engine does not import on this GPU"
    _, ckpt = converted
    result = _cp_parity(tmp_path, ckpt, 2, "1,1,1,0/2,1,1,0", "--spec", "te", "--precision", "bf16")
    cp1, cp2 = _errors(result["1,1,1,0"]), _errors(result["2,1,1,0"])
    _report("te_context_parallel_cp2_vs_cp1_bf16", {"cp1_vs_fp32": cp1, "cp2_vs_fp32": cp2})
    for batching in ("padded", "packed"):
        for kind in ("logps", "grads"):
            assert cp2[batching][kind] <= 2 * cp1[batching][kind] + 1e-3, (batching, kind, cp1, cp2)
