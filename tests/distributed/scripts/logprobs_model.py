"""The log-prob head inside a real GPTModel: ``output_processor=token_logps_output_processor`` (fused and
unfused) vs ``log_softmax`` of the model's own logits, values and the gradient of every parameter.

argv: out_json tp. With tp > 1 both layouts run: plain TP and TP + sequence parallelism; tied and untied
Llama embeddings and a tied Gemma-2-shaped model (its logits soft-capped by the model, which the head must
reproduce inside its chunks from the model's config) each time. Errors are reduced with MAX over ranks;
rank 0 writes them as JSON.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from parity_common import write_worst_over_ranks

from simpo_mcore.config import ParallelConfig
from simpo_mcore.logprobs import TokenLogpsContext, token_logps_output_processor
from simpo_mcore.model.builder import ModelOptions, build_model, padded_vocab_size
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.parallel import init_distributed, shutdown

VOCAB, B, S = 250, 2, 16


def arch(variant: str) -> ModelArch:
    base = ModelArch(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=variant != "untied")
    if variant != "gemma2":
        return base
    return replace(base, model_type="gemma2", hidden_act="gelu_pytorch_tanh", sliding_window=8,
                   layer_types=("sliding_attention", "full_attention"), norm_zero_centered=True,
                   sandwich_norms=True, scale_embeddings=True, query_pre_attn_scalar=12,
                   attn_logit_softcapping=5.0, final_logit_softcapping=1.5)


def batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.roll(tokens, -1, dims=1)  # label t = token t+1
    labels[:, -1] = -100
    labels[0, :5] = -100  # prompt
    labels[1, :3] = -100
    labels[1, 12:] = -100  # right padding
    position_ids = torch.arange(S).unsqueeze(0).expand(B, S)
    return tokens, position_ids, labels


def objective(token_logps, labels):
    mask = labels != -100
    avg = (token_logps.double() * mask).sum(-1) / mask.sum(-1)
    return (torch.tensor([1.7, -0.6], dtype=torch.float64) * avg).sum()


def grads(model):
    out = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def worst_rel(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
    worst = 0.0
    for name, r in ref.items():
        scale = r.abs().max().item()
        worst = max(worst, (got[name] - r).abs().max().item() / (scale if scale > 0 else 1.0))
    return worst


def main(out_path, tp):
    init_distributed(ParallelConfig(tp=tp), seed=0)
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    tokens, position_ids, labels = batch()
    results = {}
    for sp in ([False, True] if tp > 1 else [False]):
        for variant in ("untied", "tied", "gemma2"):
            (model,) = build_model(arch(variant), ModelOptions(tp=tp, sequence_parallel=sp))
            v_pad = padded_vocab_size(VOCAB, 128, tp)
            weight = model.shared_embedding_or_output_weight()
            vl = weight.shape[0]
            with torch.no_grad():  # loud padded rows: they must not change any log-prob
                if variant == "gemma2":  # logits of about 1.6 (from 0.16), which the cap of 1.5 bends
                    weight.mul_(10.0)
                first_pad = max(0, VOCAB - tp_rank * vl)
                weight[first_pad:] = torch.randn(weight[first_pad:].shape) * 2.0

            # Reference: the model's vocab-parallel logits [b, s, v_pad/tp], gathered, full log_softmax.
            logits = model(tokens, position_ids, attention_mask=None)
            full = gather_from_tensor_model_parallel_region(logits)  # [b, s, v_pad]
            assert full.shape[-1] == v_pad
            logps = torch.log_softmax(full[..., :VOCAB].double(), dim=-1)  # [b, s, v]
            valid = labels != -100
            ref = logps.gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1)
            ref = torch.where(valid, ref, 0.0)  # [b, s]
            objective(ref, labels).backward()
            ref_grads = grads(model)

            for chunk in (0, 5, 4096):
                token_logps = model(tokens, position_ids, attention_mask=None, labels=labels,
                                    output_processor=token_logps_output_processor,
                                    output_processor_context=TokenLogpsContext(VOCAB, chunk))
                assert token_logps.shape == (B, S) and token_logps.dtype == torch.float32
                objective(token_logps, labels).backward()
                results[f"tp={tp} sp={sp} {variant} chunk={chunk}"] = dict(
                    value=(token_logps.double() - ref.detach()).abs().max().item(),
                    grad_params=worst_rel(grads(model), ref_grads),
                )
    write_worst_over_ranks(results, out_path)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
