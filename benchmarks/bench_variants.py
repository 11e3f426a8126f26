"""The workloads :mod:`bench_step` times: one SimPO forward + backward (no optimizer step) through

* ``hf``: the transformers model of the family (``LlamaForCausalLM``, ...) with SDPA attention (eager for
  Gemma-2, whose soft-capped scores HF computes only there) and the SimPO reference's loss
  (full logits -> ``.float()`` -> ``log_softmax`` -> gather -> masked mean per sequence);
* ``mcore``: simpo_mcore's model (:func:`build_model`) under its training step's ``forward_step`` /
  ``loss_func`` (:mod:`simpo_mcore.objective`);
* ``head``: the log-prob head alone on given hidden states, naive or fused.

Every weight is random (generated here, never downloaded) and every batch holds random token ids:
zeros can run faster than real data and hide indexing errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from bench_common import Workload
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from simpo_mcore.config import LossConfig
from simpo_mcore.data.collate import shift_labels
from simpo_mcore.data.padded import collate_pairs
from simpo_mcore.logprobs import TokenLogpsContext, fused_token_logps, sequence_logps
from simpo_mcore.losses import simpo_loss
from simpo_mcore.microbatch import LABEL_PAD, LossScale
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.objective import make_forward_step
from simpo_mcore.parallel import seed_everything


@dataclass(frozen=True)
class Batch:
    """``2k`` sequences, chosen rows first, each a prompt (label -100) followed by a response."""

    tokens: torch.Tensor
    """``[2k, s]`` int64 random ids."""
    labels: torch.Tensor
    """``[2k, s]`` aligned with ``tokens``: the token id on response positions, -100 on the prompt."""

    @property
    def pairs(self) -> int:
        return self.tokens.shape[0] // 2


def make_batch(vocab_size: int, pairs: int, seq: int, prompt: int, device: torch.device, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (2 * pairs, seq), generator=g)  # [2k, s]
    labels = tokens.clone()
    labels[:, :prompt] = LABEL_PAD
    return Batch(tokens.to(device), labels.to(device))


def pair_loss(avg_logps: torch.Tensor, loss_cfg: LossConfig) -> torch.Tensor:
    """Mean SimPO sigmoid loss over the pairs of ``avg_logps [2k]`` (chosen first)."""
    k = avg_logps.shape[0] // 2
    return simpo_loss(avg_logps[:k], avg_logps[k:], loss_cfg.beta, loss_cfg.gamma_beta_ratio,
                      loss_cfg.label_smoothing).mean()


def grad_norm(params) -> float:
    """L2 norm of all gradients together (a cheap fingerprint to compare precisions on)."""
    norms = [p.grad.float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


# ------------------------------------------------------------------------------------------ HF baseline


def reference_avg_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """princeton-nlp/SimPO ``get_batch_logps(average_log_prob=True)`` on ``logits [b, s, v]``."""
    logits = logits[:, :-1, :]  # [b, s-1, v]: the logits at t predict token t+1
    labels = labels[:, 1:].clone()  # [b, s-1]
    mask = labels != LABEL_PAD
    labels[~mask] = 0
    token_logps = torch.gather(logits.float().log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)  # [b, s-1]
    return (token_logps * mask).sum(-1) / mask.sum(-1)


def hf_workload(arch: ModelArch, batch: Batch, loss_cfg: LossConfig, dtype: torch.dtype,
                device: torch.device, seed: int, experts: str | None = None) -> Workload:
    """``experts``: a mixture of experts' ``experts_implementation`` (``None``: transformers' default,
    ``grouped_mm`` where it runs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    seed_everything(seed)
    # HF soft-caps Gemma-2's attention scores only in its eager attention.
    attention = "eager" if arch.attn_logit_softcapping is not None else "sdpa"
    chosen = {"experts_implementation": experts} if experts else {}
    config = AutoConfig.for_model(**arch.to_hf_dict(), attn_implementation=attention, **chosen)
    # Initialise on the device in the training dtype: a CPU init of 1.5 B parameters takes a minute, and
    # an fp32 model cast afterwards would also round RoPE's inverse frequencies (an fp32 buffer) to bf16.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.train()
    if model.config._attn_implementation != attention:
        raise RuntimeError(f"HF attention is {model.config._attn_implementation!r}, not {attention}")

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.tokens, use_cache=False).logits  # [b, s, v] in dtype
        loss = pair_loss(reference_avg_logps(logits, batch.labels), loss_cfg)
        loss.backward()
        return loss.detach()

    def report() -> dict:
        out = {"grad_norm": grad_norm(model.parameters()), "attention": model.config._attn_implementation}
        if arch.is_moe:
            out["experts"] = model.config._experts_implementation
        return out

    return Workload(step, report)


# ------------------------------------------------------------------------------------------ simpo_mcore


def mcore_workload(arch: ModelArch, batch: Batch, loss_cfg: LossConfig, opts: ModelOptions,
                   chunk_tokens: int, seed: int, head_kernel: str = "auto", keep_logits: bool = False) -> Workload:
    """One micro-batch through simpo_mcore's training step as :mod:`simpo_mcore.objective` runs it under the
    schedule (:func:`make_forward_step`: copies to the device, the model with the fused head, ``loss_func``),
    then backward. The batch comes from the host, collated as training collates it (targets checked there).

    FP8 needs no context here: megatron-core 0.19's ``TransformerBlock.forward`` enters
    ``fp8_utils.get_fp8_context(config)`` itself (around the whole block for delayed scaling, per layer
    for the other recipes) whenever ``config.fp8`` is set; the embedding and the log-prob head stay bf16.
    """
    seed_everything(seed)  # the same initial weights for every precision of one spec
    model_parallel_cuda_manual_seed(seed)
    (model,) = build_model(arch, opts)
    model.train()
    # [2k, s] each; random ids with no padding: every position is a real token.
    ids, labels, k = batch.tokens.tolist(), batch.labels.tolist(), batch.pairs
    host = collate_pairs({"chosen_input_ids": ids[:k], "chosen_labels": labels[:k], "rejected_input_ids": ids[k:],
                          "rejected_labels": labels[k:]}, list(range(k)), len(ids[0]), 0, arch.vocab_size)
    chosen_tokens = host.chosen_tokens
    head = TokenLogpsContext(vocab_size=arch.vocab_size, chunk_tokens=chunk_tokens, kernel=head_kernel,
                             recompute=not keep_logits)
    # One micro-batch is the whole (global) batch: the loss is the mean over its pairs.
    scale = LossScale(num_microbatches=1, dp=1, global_pairs=batch.pairs, global_chosen_tokens=chosen_tokens)
    forward_step = make_forward_step(loss_cfg, head, batch.tokens.device, scale)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        output, loss_func = forward_step(iter([host]), model)
        loss, _ = loss_func(output)
        loss.backward()
        return loss.detach()

    def report() -> dict:
        out = {"grad_norm": grad_norm(model.parameters())}
        if opts.precision == "fp8":
            # TE modules record whether their last forward ran in FP8: proof the recipe was engaged.
            te_modules = [m for m in model.modules() if hasattr(m, "fp8") and hasattr(m, "fp8_meta")]
            out["fp8_modules"] = f"{sum(bool(m.fp8) for m in te_modules)}/{len(te_modules)}"
        return out

    return Workload(step, report)


# ------------------------------------------------------------------------------------------ head alone


@dataclass(frozen=True)
class HeadInputs:
    hidden: torch.Tensor
    """``[s, b, h]`` final-norm output, requires grad."""
    weight: torch.Tensor
    """``[v, h]`` output layer, requires grad."""
    targets: torch.Tensor
    """``[b, s]`` shifted labels, -100 on the prompt and the last position."""
    vocab_size: int


def make_head_inputs(batch: Batch, hidden_size: int, vocab_size: int, dtype: torch.dtype, seed: int) -> HeadInputs:
    b, s = batch.tokens.shape
    device = batch.tokens.device
    # Drawn on the device: 128256 x 4096 normals take seconds on a host CPU, and this runs three times a shape.
    g = torch.Generator(device=device).manual_seed(seed + 1)
    hidden = torch.randn(s, b, hidden_size, generator=g, device=device).to(dtype).requires_grad_()  # [s, b, h]
    # std 0.02, as megatron and HF initialise the output layer: logits of std ~0.02 sqrt(h)
    weight = (torch.randn(vocab_size, hidden_size, generator=g, device=device) * 0.02).to(dtype)
    weight.requires_grad_()  # [v, h]
    return HeadInputs(hidden, weight, shift_labels(batch.labels), vocab_size)


def naive_token_logps(inputs: HeadInputs) -> torch.Tensor:
    """``[b, s]``: bf16 logits -> ``.float()`` -> ``log_softmax`` -> gather, as the reference computes them."""
    logits = inputs.hidden @ inputs.weight.t()  # [s, b, v]
    logps = logits.float().log_softmax(-1)  # [s, b, v] fp32
    targets = inputs.targets.t()  # [s, b]
    valid = targets != LABEL_PAD
    token = logps.gather(-1, torch.where(valid, targets, 0)[..., None]).squeeze(-1)  # [s, b]
    return torch.where(valid, token, 0.0).t()  # [b, s]


HEAD_KINDS = {"naive": None, "fused": ("auto", True), "fused_torch": ("torch", True), "fused_keep": ("auto", False)}
"""Head variants: the reference's naive head, and the fused head as ``(kernel, recompute)``: elementwise
passes as Triton kernels where they run (``auto``) or as torch ops (``torch``); logits recomputed in the
backward (memory flat in tokens x vocab) or kept from the forward (``fused_keep``: one GEMM fewer)."""
FUSED_HEADS = tuple(k for k in HEAD_KINDS if k != "naive")


def head_token_logps(kind: str, inputs: HeadInputs, chunk_tokens: int) -> torch.Tensor:
    if kind == "naive":
        return naive_token_logps(inputs)
    kernel, recompute = HEAD_KINDS[kind]
    return fused_token_logps(inputs.hidden, inputs.weight, inputs.targets, inputs.vocab_size,
                             chunk_tokens=chunk_tokens, kernel=kernel, recompute=recompute)  # [b, s]


def head_workload(kind: str, make_inputs, loss_cfg: LossConfig, chunk_tokens: int) -> Workload:
    """Forward + backward of one head under the SimPO loss (gradients into hidden and weight)."""
    inputs = make_inputs()

    def step() -> torch.Tensor:
        inputs.hidden.grad = inputs.weight.grad = None
        token_logps = head_token_logps(kind, inputs, chunk_tokens)
        _, _, avg_logps = sequence_logps(token_logps, inputs.targets)
        loss = pair_loss(avg_logps, loss_cfg)
        loss.backward()
        return loss.detach()

    return Workload(step)


def head_agreement(inputs: HeadInputs, loss_cfg: LossConfig, chunk_tokens: int, ref_chunk: int = 512) -> dict:
    """How far the fused heads (Triton and torch passes) are from the naive head and from fp64.

    Token log-probs: max |difference| over labelled tokens. Gradients of the SimPO loss wrt the hidden
    states and the weight: ||fused - naive|| / ||naive||. The fp64 reference upcasts the (bf16) inputs
    and runs ``ref_chunk`` tokens at a time.
    """
    out, grads = {}, {}
    for kind in HEAD_KINDS:
        inputs.hidden.grad = inputs.weight.grad = None
        token_logps = head_token_logps(kind, inputs, chunk_tokens)
        _, _, avg_logps = sequence_logps(token_logps, inputs.targets)
        pair_loss(avg_logps, loss_cfg).backward()
        out[kind] = token_logps.detach()
        grads[kind] = (inputs.hidden.grad.float(), inputs.weight.grad.float())
    inputs.hidden.grad = inputs.weight.grad = None
    ref = _fp64_token_logps(inputs, ref_chunk)
    valid = inputs.targets != LABEL_PAD

    def max_abs(a, b) -> float:
        return float((a.double() - b.double()).abs()[valid].max())

    def rel(kind: str, i: int) -> float:
        return float((grads[kind][i] - grads["naive"][i]).norm() / grads["naive"][i].norm())

    result = {"max_abs_err_naive_vs_fp64": max_abs(out["naive"], ref)}
    for kind in FUSED_HEADS:
        result.update({
            f"max_abs_diff_{kind}_vs_naive": max_abs(out[kind], out["naive"]),
            f"max_abs_err_{kind}_vs_fp64": max_abs(out[kind], ref),
            f"grad_hidden_rel_diff_{kind}_vs_naive": rel(kind, 0),
            f"grad_weight_rel_diff_{kind}_vs_naive": rel(kind, 1),
        })
    return result


@torch.no_grad()
def _fp64_token_logps(inputs: HeadInputs, chunk: int) -> torch.Tensor:
    hidden = inputs.hidden.detach().transpose(0, 1).reshape(-1, inputs.hidden.shape[-1])  # [b*s, h]
    weight = inputs.weight.detach().double()  # [v, h]
    targets = inputs.targets.reshape(-1)  # [b*s]
    token_logps = torch.zeros(targets.shape, dtype=torch.float64, device=hidden.device)  # [b*s]
    for t0 in range(0, hidden.shape[0], chunk):
        logps = (hidden[t0:t0 + chunk].double() @ weight.t()).log_softmax(-1)  # [c, v] fp64
        token_logps[t0:t0 + chunk] = logps.gather(1, targets[t0:t0 + chunk].clamp(min=0)[:, None]).squeeze(1)
    return token_logps.view(inputs.targets.shape)  # [b, s]
