"""SimPO objective parity with the reference formulas, at every parallel layout.

The reference is written out plainly here: the HF model's full-vocabulary ``log_softmax``, the
average over response tokens, ``-logsigmoid(beta * (avg_c - avg_r - gamma_beta_ratio))`` with label
smoothing, the SFT token mean over all chosen response tokens of the batch, and the metrics as
plain means over pairs. simpo_mcore computes the same step through megatron's schedule on 1-4
ranks, with the batch split over data-parallel ranks and micro-batches of uneven token counts.

Half the pairs are random token ids; the other half are multi-turn conversations with system
prompts (H4 and ShareGPT files) that simpo_mcore reads through its data pipeline, while the
reference takes the chat template of the whole conversation: the prompt is the conversation before
the final assistant turn, the response what the template adds for that turn, then EOS.

Besides the Llama models, at TP=2: Gemma-2 (the head's final logit soft-capping, the sandwich norms' partial
gradients) and a Qwen2.5-shaped model (q / k / v biases split over TP ranks). A Qwen3-MoE (8 experts, top-3,
layers 0 and 3 dense) at EP 2 over two data-parallel ranks, and with the load-balancing loss on
(``model.moe_aux_loss_coeff``) at DP 1, at EP 2, at EP 2 x PP 2 and at TP 2 + SP x PP 2 with the experts over
the TP ranks (EP 2, expert TP 1): its reference adds the term docs/moe.md defines, computed from HF's router
logits of each micro-batch's tokens::

    aux_l(m) = E / (k T_m^2) x sum_e (sum_{t in m} p_l[t, e]) x n_l,e(m)    p_l = softmax(router logits of layer l)
    term     = c x (1 / dp) x sum_r (1 / n_r) x sum_{m of rank r} sum_l aux_l(m)

(T_m the real tokens of micro-batch m, prompts included; n_l,e(m) those whose top k hold expert e; n_r the
micro-batches of data-parallel rank r), so every batching (micro-batches of 1, 2, 4 or 8 pairs, packed rows)
checks the weight the term gets; the logged ``moe/aux_loss`` must equal the term, the logged expert load
imbalance the one of HF's routing, and SimPO's metrics stay those of the reference without it.

Each layout runs the step padded (micro-batches of k pairs) and packed (rows of whole pairs laid end to end,
split over the data-parallel ranks as training splits them), including the interleaved pipeline (PP 2 x VPP 2);
the packed step must match the reference too, and the padded step to within fp32 rounding: per-sequence sums
and averages to 1e-6 relative, gradients to 1e-5.

Under context parallelism (CP 2, and CP 2 x DP 2) every micro-batch is split over the two CP ranks as training
splits it (every sequence padded for the split, none of these a multiple of 4), the per-sequence sums reduced over
them: the same reference, the same bounds, with ``LossScale`` as at CP 1 (megatron's schedule multiplies each loss
by cp, DDP averages over dp x cp ranks). The Qwen3-MoE too, with the load-balancing term, at CP 2 x EP 1, CP 2 x
EP 2 x DP 2 and CP 2 x EP 4 x DP 2: each CP rank's router loss is its tokens' probabilities against the micro-batch's
expert counts reduced over the CP group (the term's share), and megatron scales its gradient by cp as the loss's.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILY_MODELS, MOE_MODELS, QUIET, hub_names, make_tiny_hf_model, run_ranks
from safetensors.torch import load_file

from simpo_mcore.config import DataConfig
from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
from simpo_mcore.data import synthetic
from simpo_mcore.data.preference import build_preference_dataset
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.parallel import ensure_process_group

BETA, RATIO, LS, SFT_W = 2.0, 0.5, 0.1, 0.5
NUM_PAIRS = 8


MODELS = {"untied": dict(tie=False, seed=0), "tied": dict(tie=True, seed=5),
          "gemma2": dict(FAMILY_MODELS["gemma2"], seed=6), "qwen25": dict(family="qwen2", tie=False, seed=7),
          "qwen3_moe": dict(MOE_MODELS["qwen3_moe"], seed=8)}
"""``tied`` (Llama-3.2 style): with PP > 1 the embedding and the output layer share one weight held on the
first and the last stage, whose two gradient halves megatron must sum (``finalize_model_grads``)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    ensure_process_group()
    hfs = {}
    for name, kwargs in MODELS.items():
        hfs[name] = make_tiny_hf_model(root / name / "hf", vocab_size=250, num_layers=4, hidden_size=64, heads=4,
                                       kv_heads=2, **kwargs)
        convert_hf_to_mcore(root / name / "hf", root / name / "mcore", **QUIET)
    rng = random.Random(0)
    random_pairs = []
    for _ in range(NUM_PAIRS // 2):  # uneven prompt and response lengths
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(2, 12))]
        random_pairs.append({"prompt": prompt,
                             "chosen": [rng.randrange(3, 250) for _ in range(rng.randint(1, 14))],
                             "rejected": [rng.randrange(3, 250) for _ in range(rng.randint(1, 14))]})
    chat_pairs, chat_inputs = chat_rows(root / "chat")
    pairs, inputs = [], []  # the reference's (prompt, chosen, rejected) ids; what the launch reads
    for plain, chat, chat_input in zip(random_pairs, chat_pairs, chat_inputs):
        pairs += [plain, chat]
        inputs += [{f"{key}_{part}": value for key in ("chosen", "rejected")
                    for part, value in (("input_ids", plain["prompt"] + plain[key]),
                                        ("labels", [-100] * len(plain["prompt"]) + plain[key]))}, chat_input]
    (root / "pairs.json").write_text(json.dumps(inputs))
    return root, hfs, pairs


def m(role, content):
    return {"role": role, "content": content}


def chat_rows(folder):
    """NUM_PAIRS // 2 multi-turn conversations with a system prompt, written as H4 and ShareGPT files
    and tokenised by simpo_mcore's pipeline. Returns the reference's ids of each (from the chat
    template of the whole conversation) and the pipeline's tokenised pairs."""
    tok = synthetic.build_tokenizer()
    rng = random.Random(1)
    conversations, h4, sharegpt = [], [], []
    for i in range(NUM_PAIRS // 2):
        prompt = [m("system", "Reply with digits only." if i % 2 else "Be exact.")]
        for t in range(1 + i % 2):
            prompt += [m("user", f"sort up {rng.randint(10, 10 ** (2 + t))}"), m("assistant", str(rng.randint(0, 999)))]
        digits = str(rng.randint(100, 10 ** (3 + i)))
        prompt.append(m("user", f"sort down {digits}"))
        chosen = m("assistant", "".join(sorted(digits, reverse=True)))
        rejected = m("assistant", digits[:-1] if i % 2 else digits)
        conversations.append((prompt, chosen, rejected))
        if i < NUM_PAIRS // 4:
            h4.append({"prompt": prompt[-1]["content"], "prompt_id": f"chat{i}", "chosen": [*prompt, chosen],
                       "rejected": [*prompt, rejected]})
        else:
            tags = {"system": "system", "user": "human", "assistant": "gpt"}
            sharegpt.append({"conversations": [{"from": tags[x["role"]], "value": x["content"]} for x in prompt],
                             "chosen": {"from": "gpt", "value": chosen["content"]},
                             "rejected": {"from": "gpt", "value": rejected["content"]}})
    folder.mkdir(parents=True)
    (folder / "a_h4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in h4))
    (folder / "b_sharegpt.json").write_text(json.dumps(sharegpt))
    cfg = DataConfig(train_path=str(folder), max_length=512, max_prompt_length=256, num_proc=1)
    dataset, report = build_preference_dataset(cfg, tok, "train", folder.parent / "cache")
    assert sorted(report.formats.values()) == ["h4", "sharegpt"] and len(dataset) == NUM_PAIRS // 2

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    reference = []
    for prompt, chosen, rejected in conversations:
        prompt_ids = enc(tok.apply_chat_template(prompt, tokenize=False))
        pair = {"prompt": prompt_ids}
        for key, reply in (("chosen", chosen), ("rejected", rejected)):
            whole = enc(tok.apply_chat_template([*prompt, reply], tokenize=False)) + [tok.eos_token_id]
            assert whole[:len(prompt_ids)] == prompt_ids
            pair[key] = whole[len(prompt_ids):]
        reference.append(pair)
    columns = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    return reference, [{c: row[c] for c in columns} for row in dataset]


def reference(hf, pairs, micro_batches=None, coeff=0.0):
    """Plain SimPO on the HF model: per-pair avg log-probs, loss, SFT term, metrics, grads. A mixture of experts
    also gets its expert load imbalance and, with ``coeff``, the load-balancing term over ``micro_batches``
    (each data-parallel rank's micro-batches as lists of pairs; :func:`load_balancing_term`) in its loss and
    gradients, as ``moe/aux_loss``."""
    hf.zero_grad()
    moe = hf.config.model_type == "qwen3_moe"
    avg_c, avg_r, nll_sum, nll_tokens = [], [], 0.0, 0
    router_logits = {}  # (pair, side) -> per MoE layer [tokens, E]
    for i, p in enumerate(pairs):
        for key, out in (("chosen", avg_c), ("rejected", avg_r)):
            ids = torch.tensor([p["prompt"] + p[key]])
            result = hf(ids, output_router_logits=True) if moe else hf(ids)
            if moe:
                router_logits[i, key] = result.router_logits
            logps = result.logits.float().log_softmax(-1)[0, :-1]  # position t predicts t+1
            targets = ids[0, 1:]
            token_logps = logps.gather(-1, targets[:, None])[:, 0][len(p["prompt"]) - 1:]
            out.append(token_logps.mean())
            if key == "chosen":
                nll_sum = nll_sum - token_logps.sum()
                nll_tokens += token_logps.numel()
    c, r = torch.stack(avg_c), torch.stack(avg_r)
    z = BETA * ((c - r) - RATIO)
    pref = (-F.logsigmoid(z) * (1 - LS) - F.logsigmoid(-z) * LS).mean()
    sft = nll_sum / nll_tokens
    loss = pref + SFT_W * sft
    aux = load_balancing_term(router_logits, micro_batches, coeff, hf.config) if coeff else None
    (loss if aux is None else loss + aux).backward()
    rc, rr = BETA * c.detach(), BETA * r.detach()
    metrics = {"loss": loss.item(), "sft_loss": sft.item(), "rewards/chosen": rc.mean().item(),
               "rewards/rejected": rr.mean().item(), "rewards/accuracies": (rc > rr).float().mean().item(),
               "rewards/margins": (rc - rr).mean().item(), "logps/chosen": c.mean().item(),
               "logps/rejected": r.mean().item()}
    if moe:
        metrics.update(expert_load(router_logits, hf.config))
    if aux is not None:
        metrics["moe/aux_loss"] = aux.item()
    grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters()}
    if moe:  # transformers' fused experts -> the hub's per-expert tensors, as the launches gather them
        grads = hub_names(grads, ModelArch.from_hf_dict(hf.config.to_dict()))
    return c.detach(), r.detach(), metrics, grads


def top_k_counts(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[E]``: the tokens of ``logits [T, E]`` whose top k of the router's softmax hold each expert."""
    top = logits.float().softmax(-1).topk(k, dim=-1).indices  # [T, k]
    return torch.bincount(top.flatten(), minlength=logits.shape[1])


def load_balancing_term(router_logits: dict, micro_batches: list[list[list[int]]], coeff: float, config):
    """The load-balancing term of one step, as docs/moe.md defines it (the module docstring's formula)."""
    k, dp = config.num_experts_per_tok, len(micro_batches)
    term = 0.0
    for rank in micro_batches:
        for pairs in rank:
            for layer in range(len(router_logits[pairs[0], "chosen"])):
                logits = torch.cat([router_logits[i, side][layer] for i in pairs for side in ("chosen", "rejected")])
                t, experts = logits.shape  # [T_m, E]
                aux = experts / (k * t * t) * (logits.float().softmax(-1).sum(0) * top_k_counts(logits, k)).sum()
                term = term + aux / (len(rank) * dp)
    return coeff * term


def expert_load(router_logits: dict, config) -> dict[str, float]:
    """``moe/load_imbalance`` (mean over MoE layers) and ``_max`` (worst layer) of max / mean real tokens per
    expert over the whole batch, from HF's routing."""
    per_layer = []
    for layer in range(len(next(iter(router_logits.values())))):
        counts = sum(top_k_counts(logits[layer].detach(), config.num_experts_per_tok)
                     for logits in router_logits.values()).float()
        per_layer.append(counts.max() / counts.mean())
    return {"moe/load_imbalance": torch.stack(per_layer).mean().item(),
            "moe/load_imbalance_max": torch.stack(per_layer).max().item()}


# (tp, pp, dp, sp, vpp); one launch per world size covers its layouts (the groups are rebuilt per layout).
LAYOUTS = [(1, 1, 1, False, None), (2, 1, 1, False, None), (1, 2, 1, False, None), (2, 2, 1, False, None),
           (1, 1, 2, False, None), (2, 1, 1, True, None), (1, 2, 1, False, 2)]
# The tied model where it differs: the shared weight split over two pipeline stages.
TIED_LAYOUTS = [(2, 2, 1, False, None), (1, 2, 2, False, None)]
FAMILY_LAYOUTS = [(2, 1, 1, False, None)]
def cp_layout(tp, pp, dp, sp, vpp, cp) -> tuple:
    """A context-parallel layout in the launches' tuple: (tp, pp, dp, sp, vpp, ep, aux, etp, cp)."""
    return (tp, pp, dp, sp, vpp, 1, 0.0, None, cp)


AUX = 0.05
# The mixture of experts: (tp, pp, dp, sp, vpp, ep, moe_aux_loss_coeff, etp[, cp]). Under CP 2: EP 1, EP 2 over
# the two CP ranks of each replica, and EP 4 over both replicas' CP ranks (the expert data-parallel group spans
# DP x CP), each with the load-balancing term, whose token counts megatron reduces over TP x CP.
MOE_LAYOUTS = [(1, 1, 2, False, None, 2, 0.0, None), (1, 1, 2, False, None, 2, AUX, None),
               (1, 1, 1, False, None, 1, AUX, None), (1, 2, 2, False, None, 2, AUX, None),
               (2, 2, 1, True, None, 2, AUX, 1), (1, 1, 2, False, None, 2, AUX, None, 2)]
# (tp, pp, dp, sp, vpp, cp): context parallelism, added to the launches of 2 and 4 ranks.
CP_LAYOUTS = [(1, 1, 1, False, None, 2), (1, 1, 2, False, None, 2)]
MODEL_LAYOUTS = {"untied": LAYOUTS + [cp_layout(*x) for x in CP_LAYOUTS], "tied": TIED_LAYOUTS,
                 "gemma2": FAMILY_LAYOUTS, "qwen25": FAMILY_LAYOUTS, "qwen3_moe": MOE_LAYOUTS}


def layout_name(tp, pp, dp, sp, vpp, ep=1, aux=0.0, etp=None, cp=1) -> str:
    return (f"{tp}-{pp}-{dp}-{int(sp)}" + (f"-vpp{vpp}" if vpp else "") + (f"-ep{ep}" if ep > 1 else "")
            + (f"-etp{etp}" if etp else "") + (f"-aux{aux:g}" if aux else "") + (f"-cp{cp}" if cp > 1 else ""))


def launch_spec(tp, pp, dp, sp, vpp, ep=1, aux=0.0, etp=None, cp=1) -> str:
    """The launch's LAYOUT (``scripts/objective_parity.py``)."""
    return (f"{tp},{pp},{int(sp)}" + (f",{vpp}" if vpp else "") + (f",ep:{ep}" if ep > 1 else "")
            + (f",etp:{etp}" if etp else "") + (f",aux:{aux:g}" if aux else "") + (f",cp:{cp}" if cp > 1 else ""))


@pytest.fixture(scope="module")
def results(setup, tmp_path_factory):
    """One launch per world size (1, 2, 4 ranks), each running every model's layouts of that size."""
    root, _, _ = setup
    out = tmp_path_factory.mktemp("objective_results")
    by_world: dict[int, dict[str, list[str]]] = {}
    for model, layouts in MODEL_LAYOUTS.items():
        for layout in layouts:
            tp, pp, dp = layout[:3]
            cp = layout[8] if len(layout) > 8 else 1
            by_world.setdefault(tp * pp * dp * cp, {}).setdefault(model, []).append(launch_spec(*layout))
    for world, models in sorted(by_world.items()):
        specs = [f"{m}={root / m / 'hf'}={root / m / 'mcore'}={'/'.join(layouts)}" for m, layouts in models.items()]
        run_ranks("objective_parity.py", world, root / "pairs.json", out, *specs)
    return out


@pytest.fixture(scope="module")
def expected(setup):
    _, hfs, pairs = setup
    return {name: reference(hf, pairs) for name, hf in hfs.items()}


def inputs(setup) -> list[dict]:
    """The tokenised pairs the launches read."""
    return json.loads((setup[0] / "pairs.json").read_text())


LOGPS_RTOL = 1e-6  # packed vs padded, per sequence: |diff| <= 1e-6 x |value| (sums ~-80, averages ~-5.6)
GRAD_RTOL = 1e-5


def relative_grad_error(got: dict, ref: dict) -> dict[str, float]:
    assert set(got) == set(ref)
    return {name: ((got[name] - r).norm() / r.norm()).item() for name, r in ref.items()}


def check_layout(run_dir, expected, inputs, dp, vpp=None):
    """Every batching of the step (padded micro-batches of k pairs, packed rows of two capacities) against the
    HF reference (``expected``, or a function of the batching's result giving it, when it depends on the
    micro-batches); the packed ones also against the padded step (per-sequence log-probs and, with one
    reference for all, gradients)."""
    result = json.loads((run_dir / "result.json").read_text())
    per_rank = NUM_PAIRS // dp
    padded = [f"padded_k{k}" for k in ([2] if vpp else [per_rank, 2 if dp == 1 else 1])]
    packed = [name for name in result if name.startswith("packed_")]
    assert sorted(result) == sorted(padded + packed) and len(packed) == 2
    real = sum(len(p[f"{key}_input_ids"]) for p in inputs for key in ("chosen", "rejected"))
    for name in padded + packed:
        got = result[name]
        ref_c, ref_r, ref_metrics, ref_grads = expected(got) if callable(expected) else expected
        counts = got["num_microbatches"]
        if name.startswith("padded"):
            assert counts == [per_rank // int(name.removeprefix("padded_k"))] * len(counts)
        else:  # packed: every rank the same number of rows (a multiple of PP under VPP)
            assert len(set(counts)) == 1 and counts[0] % (2 if vpp else 1) == 0, counts
        avg = torch.tensor([got["logps"][str(i)]["avg"] for i in range(NUM_PAIRS)])  # [pairs, 2]
        assert torch.allclose(avg[:, 0], ref_c, atol=1e-5, rtol=0), (name, (avg[:, 0] - ref_c).abs().max())
        assert torch.allclose(avg[:, 1], ref_r, atol=1e-5, rtol=0), (name, (avg[:, 1] - ref_r).abs().max())
        assert sorted(got["metrics"].keys() & {"moe/aux_loss", "moe/load_imbalance"}) == sorted(
            ref_metrics.keys() & {"moe/aux_loss", "moe/load_imbalance"}), name
        for metric, value in ref_metrics.items():
            assert got["metrics"][metric] == pytest.approx(value, abs=1e-5), (name, metric)
        if "moe/aux_loss" in ref_metrics:
            assert got["metrics"]["moe/aux_loss"] == pytest.approx(ref_metrics["moe/aux_loss"], rel=1e-6), name
        assert got["metrics"]["num_pairs"] == NUM_PAIRS
        # Every position of every sequence counted once as real, prompt included; padding only in computed.
        assert got["metrics"]["tokens_real"] == real
        assert got["metrics"]["tokens_computed"] >= real
        grads = load_file(str(run_dir / f"grads_{name}.safetensors"))
        errors = relative_grad_error(grads, ref_grads)
        bad = {n: e for n, e in errors.items() if not e <= GRAD_RTOL}
        assert not bad, f"{name}: relative gradient error above {GRAD_RTOL}: {bad}"
        worst_avg = max((avg[:, 0] - ref_c).abs().max().item(), (avg[:, 1] - ref_r).abs().max().item())
        print(f"[objective] {run_dir.parent.name} {run_dir.name} {name}: avg_logps max |err| {worst_avg:.2g}, "
              f"gradients max relative error {max(errors.values()):.2g}")
    base = result[padded[-1]]
    base_grads = load_file(str(run_dir / f"grads_{padded[-1]}.safetensors"))
    for name in packed:
        for i in range(NUM_PAIRS):
            for kind in ("sum", "avg"):
                for a, b in zip(result[name]["logps"][str(i)][kind], base["logps"][str(i)][kind]):
                    assert abs(a - b) <= LOGPS_RTOL * abs(b), (name, i, kind, a, b)
        if callable(expected):  # each batching's gradient has its own reference
            continue
        grads = load_file(str(run_dir / f"grads_{name}.safetensors"))
        bad = {n: e for n, e in relative_grad_error(grads, base_grads).items() if not e <= GRAD_RTOL}
        assert not bad, f"{name} vs {padded[-1]}: relative gradient error above {GRAD_RTOL}: {bad}"
    assert result[packed[-1]]["metrics"]["tokens_computed"] < base["metrics"]["tokens_computed"]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp,sp,vpp", LAYOUTS, ids=lambda v: str(v))
def test_objective_matches_reference(setup, results, expected, tp, pp, dp, sp, vpp):
    check_layout(results / "untied" / layout_name(tp, pp, dp, sp, vpp), expected["untied"], inputs(setup), dp, vpp)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp,sp,vpp,cp", CP_LAYOUTS, ids=lambda v: str(v))
def test_objective_matches_reference_under_context_parallelism(setup, results, expected, tp, pp, dp, sp, vpp, cp):
    run_dir = results / "untied" / layout_name(*cp_layout(tp, pp, dp, sp, vpp, cp))
    check_layout(run_dir, expected["untied"], inputs(setup), dp, vpp)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp,sp,vpp", TIED_LAYOUTS, ids=lambda v: str(v))
def test_tied_embeddings_split_over_pipeline_stages(setup, results, expected, tp, pp, dp, sp, vpp):
    """The embedding's gradient is the sum of its use as input embedding and as output layer, on two
    different pipeline stages; HF's tied model has one ``embed_tokens.weight`` gradient holding both."""
    check_layout(results / "tied" / layout_name(tp, pp, dp, sp, vpp), expected["tied"], inputs(setup), dp, vpp)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma2", "qwen25"])
@pytest.mark.parametrize("tp,pp,dp,sp,vpp", FAMILY_LAYOUTS, ids=lambda v: str(v))
def test_model_families_match_reference(setup, results, expected, model, tp, pp, dp, sp, vpp):
    """Gemma-2's average log-probs come from soft-capped logits (HF caps them; the fused head caps inside its
    chunks), its gradients through the cap and the post-attention / post-MLP norms; Qwen2.5's through biases
    sharded over the two TP ranks. Packed, Gemma-2's sliding windows and attention soft-capping apply within
    each sequence of a row."""
    check_layout(results / model / layout_name(tp, pp, dp, sp, vpp), expected[model], inputs(setup), dp, vpp)


@pytest.mark.slow
@pytest.mark.parametrize("layout", MOE_LAYOUTS, ids=lambda v: layout_name(*v))
def test_mixture_of_experts_matches_reference(setup, results, expected, layout):
    """SimPO on a Qwen3-MoE at EP 2 as on the HF model; with the load-balancing loss on (at DP 1, EP 2, EP 2 x
    PP 2 with the stages' MoE layers gathered, TP 2 + SP x PP 2 with the padding split over the TP ranks of the
    second stage too, under CP 2 at EP 1, 2 and 4 with every sequence split over two ranks and each rank's router
loss its tokens' share) the reference gains the term of the module docstring for the step's own micro-batches,
    whose logged value and gradients must match, and SimPO's metrics do not move. The term carries most of the
    routers' gradient, so a wrong weight cannot pass."""
    _, hfs, pairs = setup
    tp, pp, dp, sp, vpp, ep, aux, etp = layout[:8]

    def reference_of(got):
        return reference(hfs["qwen3_moe"], pairs, got["micro_batches"], aux)

    run_dir = results / "qwen3_moe" / layout_name(*layout)
    check_layout(run_dir, reference_of if aux else expected["qwen3_moe"], inputs(setup), dp, vpp)
    if aux:
        first = next(iter(json.loads((run_dir / "result.json").read_text()).values()))
        with_term = reference_of(first)[3]
        routers = {n: e for n, e in relative_grad_error(with_term, expected["qwen3_moe"][3]).items() if ".gate." in n}
        assert len(routers) == 2 and min(routers.values()) > 0.5, routers
