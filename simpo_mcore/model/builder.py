"""Build the megatron-core Llama: ``LlamaArch`` -> ``TransformerConfig`` -> ``GPTModel`` chunks.

This is the only place that constructs the model, so moving from ``GPTModel`` (deprecated in 0.19
in favour of ``HybridModel``, which lacks Llama-3.1 RoPE scaling) is a change to this file alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from simpo_mcore.model.hf_config import LlamaArch
from simpo_mcore.model.specs import block_spec

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


@dataclass(frozen=True)
class ModelOptions:
    """How to build (not what to build: that is :class:`LlamaArch`)."""

    spec: str = "sdpa"
    """Resolved layer spec: ``te``, ``sdpa`` or ``local`` (see :mod:`simpo_mcore.model.specs`)."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp8`` (bf16 parameters, FP8 matmuls through TE)."""
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    make_vocab_size_divisible_by: int = 128
    recompute: str = "none"
    recompute_num_layers: int = 1
    fp8_recipe: str = "delayed"
    fp8_format: str = "hybrid"
    cuda: bool = False
    """Whether the model runs on a GPU (enables the fused kernels that exist only there)."""


def padded_vocab_size(vocab_size: int, divisor: int, tp: int) -> int:
    """Megatron pads the embedding to a multiple of ``divisor * tp`` rows."""
    multiple = divisor * tp
    return -(-vocab_size // multiple) * multiple


def transformer_config(arch: LlamaArch, opts: ModelOptions) -> TransformerConfig:
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
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=opts.tp,
        pipeline_model_parallel_size=opts.pp,
        virtual_pipeline_model_parallel_size=opts.vpp,
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
        bias_activation_fusion=fused,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused and opts.spec == "te",
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        init_method_std=0.02,
        **recompute,
        **fp8,
    )


def build_model(arch: LlamaArch, opts: ModelOptions) -> list[GPTModel]:
    """One ``GPTModel`` per virtual pipeline stage held by this rank (a list of one without VPP).

    Parameters are randomly initialised; load a checkpoint into them with
    :func:`simpo_mcore.checkpoint.load_model`.
    """
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
            model = GPTModel(
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
                # Our own inverse frequencies: HF's numbers for every supported rope type
                # (megatron's built-in Llama-3 scaling hard-codes low/high factors and 8192).
                model.rotary_pos_emb.inv_freq = arch.inv_freq().to(model.rotary_pos_emb.inv_freq.device)
            if opts.cuda:
                model.cuda(torch.cuda.current_device())
            chunks.append(model)
    finally:
        gpt_logger.setLevel(level)
    return chunks
