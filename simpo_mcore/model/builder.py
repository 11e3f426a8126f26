"""Build the megatron-core model: ``ModelArch`` -> ``TransformerConfig`` -> ``GPTModel`` chunks.

This is the only place that constructs the model, so moving from ``GPTModel`` (deprecated in 0.19
in favour of ``HybridModel``, which lacks Llama-3.1 RoPE scaling) is a change to this file alone.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.model.moe import freeze_routers, reduce_experts_over_expert_groups
from simpo_mcore.model.specs import ExtendedTransformerConfig, block_spec
from simpo_mcore.parallel import cp_hierarchy

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


@dataclass(frozen=True)
class ModelOptions:
    """How to build (not what to build: that is :class:`ModelArch`)."""

    spec: str = "sdpa"
    """Resolved layer spec: ``te``, ``sdpa`` or ``local`` (see :mod:`simpo_mcore.model.specs`)."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp8`` (bf16 parameters, FP8 matmuls through TE)."""
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    """Context-parallel size (the process groups must have been made with it)."""
    cp_comm_type: str = "p2p"
    """Transformer Engine's key / value exchange under CP: ``p2p``, ``all_gather``, ``a2a`` or ``a2a+p2p``."""
    cp_a2a_size: int | None = None
    """With ``a2a+p2p``: the ranks of each all-to-all group."""
    sequence_parallel: bool = False
    make_vocab_size_divisible_by: int = 128
    recompute: str = "none"
    recompute_num_layers: int = 1
    fp8_recipe: str = "delayed"
    fp8_format: str = "hybrid"
    cuda: bool = False
    """Whether the model runs on a GPU (enables the fused kernels that exist only there)."""
    ep: int = 1
    """Expert-parallel size: an MoE layer's experts split over this many ranks of the data-parallel group."""
    etp: int | None = None
    """Expert tensor-parallel size (each expert's FFN split over this many ranks); ``None``: ``tp``."""
    moe_dispatcher: str = "auto"
    """megatron's token dispatcher: ``alltoall``, ``allgather`` or ``auto`` (alltoall on a GPU, else allgather)."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of megatron's load-balancing loss (0: none, as HF / TRL without ``output_router_logits``)."""
    moe_load_balancing: str = "aux_loss"
    """megatron's ``moe_router_load_balancing_type``: ``aux_loss``, ``seq_aux_loss``, ``global_aux_loss``, ``none``."""
    moe_freeze_router: bool = False
    """The routers' weights take no gradient and no update."""
    moe_grouped_gemm: bool | None = None
    """Experts as TE's grouped GEMM (``TEGroupedMLP``, spec ``te`` only) or one GEMM pair per expert
    (``SequentialMLP``); ``None``: grouped with spec ``te``."""


def padded_vocab_size(vocab_size: int, divisor: int, tp: int) -> int:
    """Megatron pads the embedding to a multiple of ``divisor * tp`` rows."""
    multiple = divisor * tp
    return -(-vocab_size // multiple) * multiple


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF's ``gelu_pytorch_tanh``): GeGLU's gate activation."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}


def window_settings(arch: ModelArch) -> dict:
    """megatron's ``window_size`` (``(W - 1, 0)``: the query and the W - 1 tokens before it) and
    ``window_attn_skip_freq`` (a 0 / 1 entry per layer, 1 = sliding) for the layers that slide."""
    sliding = arch.sliding_layers()
    if not any(sliding):
        return dict(window_size=None, window_attn_skip_freq=None)
    pattern = None if all(sliding) else [int(x) for x in sliding]
    return dict(window_size=(arch.sliding_window - 1, 0), window_attn_skip_freq=pattern)


def context_parallel_settings(opts: ModelOptions) -> dict:
    """megatron's ``context_parallel_size``, the ``cp_comm_type`` each layer hands TE's attention (none at CP 1,
    where megatron checks nothing of it) and the hierarchy of ``a2a+p2p``."""
    if opts.cp == 1:
        return dict(context_parallel_size=1)
    return dict(context_parallel_size=opts.cp, cp_comm_type=opts.cp_comm_type,
                hierarchical_context_parallel_sizes=cp_hierarchy(opts.cp, opts.cp_comm_type, opts.cp_a2a_size))
def moe_settings(arch: ModelArch, opts: ModelOptions) -> dict:
    """megatron's MoE fields for ``arch`` (none for a dense model): dropless (no capacity factor), routing by
    :class:`simpo_mcore.model.moe.HFTopKRouter` from the softmax over all experts, the logits in the model's
    dtype as HF computes them."""
    if not arch.is_moe:
        return {}
    shared = arch.shared_expert_intermediate_size
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_intermediate_size,
        moe_router_topk=arch.num_experts_per_tok,
        moe_layer_freq=1 if all(arch.moe_layers) else [int(x) for x in arch.moe_layers],
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=shared is not None,
        moe_router_score_function="softmax",  # the load-balancing losses' scores; the routing is HFTopKRouter's
        moe_router_dtype=None,  # router logits in the model's dtype, as HF computes them
        moe_norm_topk_prob=arch.norm_topk_prob,
        moe_route_weights_fp32=arch.route_weights_fp32,
        moe_expert_capacity_factor=None,
        moe_token_dispatcher_type=token_dispatcher(opts),
        moe_router_load_balancing_type=opts.moe_load_balancing,
        moe_aux_loss_coeff=opts.moe_aux_loss_coeff,
        moe_grouped_gemm=opts.spec == "te" if opts.moe_grouped_gemm is None else opts.moe_grouped_gemm,
        expert_model_parallel_size=opts.ep,
        expert_tensor_parallel_size=opts.etp or opts.tp,
    )


def token_dispatcher(opts: ModelOptions) -> str:
    """The dispatcher ``opts`` asks for; ``auto``: ``alltoall`` (it moves only the tokens each rank needs, and
    each rank may hold its own number of tokens), except on a CPU with expert tensor parallelism, where it would
    need uneven all-gathers, which gloo lacks."""
    if opts.moe_dispatcher != "auto":
        return opts.moe_dispatcher
    return "alltoall" if opts.cuda or (opts.etp or opts.tp) == 1 else "allgather"


def experts_span_replicas(opts: ModelOptions) -> bool:
    """Whether an expert group (``ep x etp`` ranks, laid over the tensor- then context-parallel ranks first, as
    megatron does) reaches into other data-parallel replicas, whose micro-batches hold other tokens (the CP ranks of
    one replica split the same micro-batches)."""
    return opts.ep * (opts.etp or opts.tp) > opts.tp * opts.cp


def check_dispatcher_for_data(opts: ModelOptions) -> None:
    """Refuse a dispatcher that cannot take the training and evaluation micro-batches: each data-parallel
    replica's have their own lengths, and megatron's ``allgather`` dispatcher needs every rank of an expert group
    to hold as many tokens (``alltoall`` takes any)."""
    if not experts_span_replicas(opts) or token_dispatcher(opts) != "allgather":
        return
    etp = opts.etp or opts.tp
    if not opts.cuda and etp > 1:
        raise ValueError(f"parallel.ep={opts.ep} with expert tensor parallelism (parallel.etp={etp}) on a CPU: the "
                         "expert groups span data-parallel replicas, whose micro-batches differ in length, which "
                         "only the alltoall dispatcher takes, and with etp > 1 it needs uneven all-gathers, which "
                         "gloo lacks; set parallel.etp: 1")
    raise ValueError(f"model.moe_token_dispatcher: allgather with parallel.ep={opts.ep}: the expert groups "
                     f"({opts.ep} x {etp} ranks) span data-parallel replicas, whose micro-batches differ in length, "
                     "and the all-gather dispatcher needs as many tokens on every rank; use alltoall (or auto)")


def check_moe_layout(arch: ModelArch, opts: ModelOptions) -> None:
    """Refuse what megatron would refuse later with an assertion or a traceback, naming the settings."""
    if not arch.is_moe:
        if opts.ep > 1:
            raise ValueError(f"parallel.ep={opts.ep} needs a mixture-of-experts model; this one is dense")
        return
    if arch.num_experts % opts.ep:
        raise ValueError(f"parallel.ep={opts.ep} must divide the model's {arch.num_experts} experts")
    if opts.tp > 1 and not opts.sequence_parallel:
        raise ValueError(f"parallel.tp={opts.tp} with a mixture-of-experts model needs "
                         "parallel.sequence_parallel: true (megatron's MoE layers refuse TP without it in training)")
    if opts.moe_grouped_gemm and opts.spec != "te":
        raise ValueError(f"grouped-GEMM experts need the Transformer Engine spec; model.spec is {opts.spec!r}")
    etp = opts.etp or opts.tp
    if token_dispatcher(opts) == "alltoall" and etp > 1 and not opts.cuda:
        raise ValueError(f"model.moe_token_dispatcher: alltoall with expert tensor parallelism ({etp}) needs uneven "
                         "all-gathers, which gloo (CPU) lacks; use allgather (auto picks it on a CPU)")


def transformer_config(arch: ModelArch, opts: ModelOptions) -> ExtendedTransformerConfig:
    dtype = PRECISIONS[opts.precision]
    fused = opts.cuda  # the jit / TE fusions exist only on a GPU
    recompute = {}
    if opts.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif opts.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=opts.recompute_num_layers)
    fp8 = {}
    if opts.precision == "fp8":
        fp8 = dict(fp8=opts.fp8_format, fp8_recipe=opts.fp8_recipe)
        if opts.fp8_recipe == "delayed":
            fp8.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return ExtendedTransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        layernorm_zero_centered_gamma=arch.norm_zero_centered,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[arch.hidden_act],
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        softmax_scale=arch.softmax_scale,
        **window_settings(arch),
        attn_logit_softcapping=arch.attn_logit_softcapping,
        final_logit_softcapping=arch.final_logit_softcapping,
        embedding_multiplier=math.sqrt(arch.hidden_size) if arch.scale_embeddings else None,
        sandwich_norms=arch.sandwich_norms,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=opts.tp,
        pipeline_model_parallel_size=opts.pp,
        virtual_pipeline_model_parallel_size=opts.vpp,
        **context_parallel_settings(opts),
        sequence_parallel=opts.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # gloo + interleaved pipeline with batched p2p gives wrong losses silently; unbatched p2p
        # is exact there and costs nothing measurable on NCCL at our message sizes.
        batch_p2p_comm=not (opts.vpp and not opts.cuda),
        variable_seq_lengths=False,
        use_cpu_initialization=not opts.cuda,
        perform_initialization=True,
        # megatron fuses SwiGLU (and exact-GELU GeGLU), not the tanh GeGLU.
        bias_activation_fusion=fused and arch.hidden_act == "silu",
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused and opts.spec == "te",
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        init_method_std=0.02,
        **recompute,
        **fp8,
        **moe_settings(arch, opts),
    )


class FamilyGPTModel(GPTModel):
    """``GPTModel`` plus the two model-level pieces of the families that megatron-core's has no option for:
    embeddings multiplied by ``config.embedding_multiplier`` (in their dtype, as HF Gemma rounds it), and
    logits soft-capped by ``config.final_logit_softcapping`` (where ``GPTModel`` applies its own output
    scaling; the log-prob head caps inside its fused computation instead)."""

    def __init__(self, config: ExtendedTransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.embedding_multiplier is not None and hasattr(self, "embedding"):
            self.embedding.register_forward_hook(self._scale_embeddings)

    def _scale_embeddings(self, module, inputs, embeddings: torch.Tensor) -> torch.Tensor:
        # HF rounds the multiplier to the embedding dtype, then multiplies. The same number as a Python float
        # gives the same product (the multiply runs in fp32 either way, rounded once) and, unlike a tensor
        # made on the device each call, never waits for the GPU.
        return embeddings * _rounded(self.config.embedding_multiplier, embeddings.dtype)

    def _preprocess(self, *args, **kwargs):
        # GPTModel splits the padding mask along the sequence for sequence parallelism on the first pipeline
        # stage only; the MoE layers of the later stages need their ranks' share too.
        out = super()._preprocess(*args, **kwargs)
        padding = out[5]
        if padding is not None and not self.pre_process and self.config.sequence_parallel:
            padding = scatter_to_sequence_parallel_region(padding.transpose(0, 1).contiguous())  # [s / tp, b]
            out = (*out[:5], padding.transpose(0, 1).contiguous(), *out[6:])  # [b, s / tp]
        return out

    def _scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits = super()._scale_logits(logits)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim / 2]`` in fp32 for ``arch``'s ``rope_theta`` and ``rope_scaling``: the
    numbers HF computes (megatron's built-in Llama-3 scaling hard-codes its low / high factors and 8192)."""
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [hn / 2]
    rs = arch.rope_scaling
    if rs is None or rs["rope_type"] == "default":
        return inv
    if rs["rope_type"] == "linear":
        return inv / rs["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@functools.lru_cache(maxsize=8)
def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (as HF's ``torch.tensor(value, dtype=dtype)``), as a Python float."""
    return float(torch.tensor(value, dtype=torch.float32).to(dtype))


def build_model(arch: ModelArch, opts: ModelOptions) -> list[GPTModel]:
    """One ``GPTModel`` per virtual pipeline stage held by this rank (a list of one without VPP).

    Parameters are randomly initialised; load a checkpoint into them with
    :func:`simpo_mcore.checkpoint.load_model`.
    """
    check_moe_layout(arch, opts)
    config = transformer_config(arch, opts)
    vocab = padded_vocab_size(arch.vocab_size, opts.make_vocab_size_divisible_by, opts.tp)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    chunks = []
    # GPTModel logs a deprecation warning per construction; one line in our own log says it once.
    gpt_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    level = gpt_logger.level
    gpt_logger.setLevel(logging.ERROR)
    try:
        for vp_stage in range(opts.vpp or 1):
            vp = vp_stage if opts.vpp else None
            model = FamilyGPTModel(
                config=config,
                transformer_layer_spec=block_spec(opts.spec, config, vp_stage=vp, pp_rank=pp_rank),
                vocab_size=vocab,
                max_sequence_length=arch.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                parallel_output=True,
                share_embeddings_and_output_weights=arch.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=arch.rope_theta,
                vp_stage=vp,
            )
            if hasattr(model, "rotary_pos_emb"):
                # Our own inverse frequencies: HF's numbers for every supported rope type.
                model.rotary_pos_emb.inv_freq = rope_inv_freq(arch).to(model.rotary_pos_emb.inv_freq.device)
            if opts.cuda:
                model.cuda(torch.cuda.current_device())
            chunks.append(model)
    finally:
        gpt_logger.setLevel(level)
    if arch.is_moe:
        reduce_experts_over_expert_groups(chunks)
    if opts.moe_freeze_router:
        freeze_routers(chunks)
    return chunks
