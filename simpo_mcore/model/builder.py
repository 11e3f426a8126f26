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

from simpo_mcore.model.hf_config import ModelArch
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
    return chunks
