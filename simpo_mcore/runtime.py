"""What both ``simpo-train`` and ``simpo-eval`` set up once the process groups exist: checkpoint,
tokenizer, model and head."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from transformers import AutoTokenizer

from simpo_mcore import console
from simpo_mcore.config import RunConfig
from simpo_mcore.config.paths import looks_local
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.mcore_io import load_model_weights
from simpo_mcore.convert.tiny import TINY_ARCH
from simpo_mcore.convert.tool import run_in_fresh_process
from simpo_mcore.data.collate import pad_token_id
from simpo_mcore.data.pipeline import BatchLayout, TokenizedSplit, eval_batch_groups
from simpo_mcore.data.sources import hub_reachable, hub_unreachable_error
from simpo_mcore.data.synthetic import build_tokenizer
from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.model.builder import ModelOptions, build_model, check_dispatcher_for_data, experts_span_replicas
from simpo_mcore.model.specs import resolve_spec, te_available
from simpo_mcore.parallel import Layout, agreed

log = logging.getLogger("simpo_mcore")

TINY_CHECKPOINT = "tiny-random"
"""``model.checkpoint`` value for the embedded default: a random tiny Llama over the tokenizer
built in code (``simpo_mcore.data.synthetic``), created and converted on first use."""


@dataclass
class Runtime:
    cfg: RunConfig
    layout: Layout
    meta: CheckpointMeta
    ckpt_dir: Path
    tokenizer: object
    tokenizer_source: str
    """A local directory or hub name: what is recorded with checkpoints."""
    chunks: list
    options: ModelOptions
    logps_context: TokenLogpsContext
    """What the log-prob head needs besides what the model passes it (vocabulary, chunking, kernels)."""

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    @property
    def batch_layout(self) -> BatchLayout:
        """How this run's pairs become micro-batches (packed rows or padded pairs, and their lengths)."""
        layout = self.layout
        return BatchLayout.for_run(self.cfg.data, self.pad_id, layout.tp, self.options.sequence_parallel,
                                   layout.pp, layout.vpp, vocab_size=self.meta.arch.vocab_size, cp=layout.cp,
                                   cp_rank=layout.cp_rank)

    def eval_groups(self, split: TokenizedSplit, progress: str | None = None):
        """``split``'s forward-only micro-batch groups for this rank (evaluation, DPO reference pass);
        ``progress``: the task's name, to report its progress in pairs (rank 0's share x DP)."""
        # Expert groups across replicas exchange tokens at every MoE layer: every replica runs as many forwards.
        aligned = self.meta.arch.is_moe and experts_span_replicas(self.options)
        groups = eval_batch_groups(split, self.cfg.train.micro_batch_pairs, self.batch_layout, self.layout,
                                   aligned=aligned)
        if progress is None:
            return groups
        dp = self.layout.dp
        return console.track(groups, len(split), progress, "pairs",
                             size=lambda group: dp * sum(b.num_pairs for b in group if not b.filler))


def resolve_checkpoint(cfg: RunConfig, layout: Layout) -> Path:
    """The converted checkpoint to start from; the embedded default builds its tiny one once."""
    if cfg.model.checkpoint is None:
        raise ValueError("model.checkpoint is required (a directory written by tools/convert_hf_to_mcore.py)")
    if cfg.model.checkpoint != TINY_CHECKPOINT:
        return _existing_checkpoint(cfg.model.checkpoint)
    path = Path(cfg.output_dir) / "tiny_init"

    def build_tiny():
        if not (path / "mcore" / "metadata.json").is_file():
            log.info("building the embedded tiny model into %s (once)", path)
            # In a fresh process: dist_checkpointing.save works on the default group, which here
            # spans every rank, while only rank 0 converts.
            run_in_fresh_process("tiny", "--out", str(path), "--seed", str(cfg.train.seed))

    agreed(build_tiny, run=layout.rank == 0)
    return path / "mcore"


def _existing_checkpoint(name: str) -> Path:
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"model.checkpoint {path} does not exist")
    return path


def load_tokenizer(source: str):
    if not Path(source).exists():
        if looks_local(source):
            raise FileNotFoundError(f"model.tokenizer {source} does not exist")
        if not hf_constants.HF_HUB_OFFLINE and not hub_reachable():  # fail now, not after the hub's retries
            raise ValueError(hub_unreachable_error(f"model.tokenizer {source!r}"))
    try:
        # Never run code that comes with a tokenizer: without this, transformers asks on the terminal whether
        # to run it ("Do you wish to run the custom code? [y/N]"), and a "y" on stdin would.
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the config key that named it
        if "trust_remote_code" in str(exc):
            raise ValueError(f"model.tokenizer {source!r} needs the Python code that comes with it (an auto_map "
                             f"in its config), and simpo_mcore never runs such code: use a tokenizer of a class "
                             f"transformers has (its tokenizer.json with PreTrainedTokenizerFast)") from None
        reason = " ".join(str(exc).split())  # one line: transformers' messages span several
        raise ValueError(f"model.tokenizer {source!r} could not be loaded: {reason}") from exc


def _tokenizer_source(cfg: RunConfig, ckpt_dir: Path, meta: CheckpointMeta) -> str:
    source = cfg.model.tokenizer or meta.tokenizer_path(ckpt_dir)
    if source is None:
        raise ValueError(f"model.tokenizer is not set and {ckpt_dir} records no tokenizer")
    return source


def max_length_warning(max_length: int, max_positions: int) -> str | None:
    """The warning for a ``data.max_length`` beyond the positions the model was trained on."""
    if max_length <= max_positions:
        return None
    return (f"data.max_length ({max_length}) exceeds the model's max_position_embeddings ({max_positions}): "
            f"positions past {max_positions} are beyond what the model was trained on")


def check_vocab(tokenizer, source: str, vocab_size: int) -> None:
    """A tokenizer with ids past the model's vocabulary would index past its embedding."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {source} has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{vocab_size}")


def data_tokenizer(cfg: RunConfig) -> tuple[object, int | None]:
    """The tokenizer a run of ``cfg`` renders its data with and the model's max_position_embeddings
    (``None`` when no checkpoint is named), read without process groups or weights (``simpo-data``); its
    vocabulary checked against the model's as the run checks it."""
    if cfg.model.checkpoint == TINY_CHECKPOINT:
        tiny = build_tokenizer()
        tokenizer = load_tokenizer(cfg.model.tokenizer) if cfg.model.tokenizer else tiny
        check_vocab(tokenizer, cfg.model.tokenizer or "built in code", len(tiny))  # the tiny model's vocabulary
        return tokenizer, TINY_ARCH["max_position_embeddings"]
    if cfg.model.checkpoint is None:
        if cfg.model.tokenizer is None:
            raise ValueError("set model.tokenizer (or model.checkpoint, whose tokenizer is recorded)")
        return load_tokenizer(cfg.model.tokenizer), None
    ckpt_dir = _existing_checkpoint(cfg.model.checkpoint)
    meta = CheckpointMeta.read(ckpt_dir)
    source = _tokenizer_source(cfg, ckpt_dir, meta)
    tokenizer = load_tokenizer(source)
    check_vocab(tokenizer, source, meta.arch.vocab_size)
    return tokenizer, meta.arch.max_position_embeddings


def build_runtime(cfg: RunConfig, layout: Layout, *, load_weights: bool = True) -> Runtime:
    """Checkpoint, tokenizer, model chunks and head of a run on ``layout`` (process groups made)."""
    console.setup_logging(layout.rank)
    cuda = layout.device.type == "cuda"
    if cuda and layout.rank == 0 and not te_available():
        # megatron's own notices of this (one per module, on every rank) are filtered by the console.
        log.warning("Transformer Engine is not installed: using torch SDPA layers and megatron's torch "
                    "optimizer, slower than TE's fused kernels and without FP8 (pip install -e '.[te]')")
    if cuda and layout.rank == 0 and layout.tp > 1 and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        # megatron warns on every rank; the console filters those (docs/launch.md says why it matters).
        log.warning("CUDA_DEVICE_MAX_CONNECTIONS is not 1: tensor-parallel communication will not overlap "
                    "with the GEMMs as megatron expects (tools/launch/ scripts set it)")
    if cfg.train.precision == "fp8":  # before anything slow
        _check_fp8(resolve_spec(cfg.model.spec, cuda), cuda)
    ckpt_dir = resolve_checkpoint(cfg, layout)
    meta = CheckpointMeta.read(ckpt_dir)
    # What the model needs decides too: TE only where it soft-caps attention scores as the model does.
    spec = resolve_spec(cfg.model.spec, cuda, attn_softcap=meta.arch.attn_logit_softcapping is not None)
    if cfg.train.precision == "fp8":  # again with the spec this model gets (Gemma-2 may fall back to sdpa)
        _check_fp8(spec, cuda)
    tokenizer_source = _tokenizer_source(cfg, ckpt_dir, meta)
    tokenizer = load_tokenizer(tokenizer_source)
    if layout.rank == 0 and (warning := max_length_warning(cfg.data.max_length, meta.arch.max_position_embeddings)):
        log.warning(warning)
    check_vocab(tokenizer, tokenizer_source, meta.arch.vocab_size)
    opts = ModelOptions(
        spec=spec, precision=cfg.train.precision, tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp,
        cp_comm_type=cfg.parallel.cp_comm_type, cp_a2a_size=cfg.parallel.cp_a2a_size,
        sequence_parallel=cfg.parallel.sequence_parallel,
        make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
        recompute=cfg.model.recompute, recompute_num_layers=cfg.model.recompute_num_layers,
        fp8_recipe=cfg.train.fp8_recipe, fp8_format=cfg.train.fp8_format, cuda=cuda,
        ep=layout.ep, etp=cfg.parallel.etp, moe_dispatcher=cfg.model.moe_token_dispatcher,
        moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff, moe_load_balancing=cfg.model.moe_load_balancing_type,
        moe_freeze_router=cfg.model.moe_freeze_router,
    )
    _check_layout(meta.arch, opts)
    if meta.arch.is_moe:
        check_dispatcher_for_data(opts)
    logps_context = TokenLogpsContext(vocab_size=meta.arch.vocab_size, chunk_tokens=cfg.model.logprob_chunk_tokens,
                                      kernel=cfg.model.logprob_kernel, recompute=cfg.model.logprob_recompute)
    # Said before the build: loading a large model's weights is one of a start-up's slow phases.
    log.info("model: %d layers, hidden %d, vocab %d%s | spec %s, %s | TP %d PP %d%s%s DP %d%s%s | %s | head: %s; %s",
             meta.arch.num_layers, meta.arch.hidden_size, meta.arch.vocab_size, _describe_experts(meta.arch), spec,
             cfg.train.precision, layout.tp, layout.pp, f" (VPP {layout.vpp})" if layout.vpp else "",
             f" CP {layout.cp}" if layout.cp > 1 else "",
             layout.dp, " +SP" if opts.sequence_parallel else "", _describe_expert_layout(meta.arch, layout),
             "GPU" if cuda else "CPU (gloo)", _describe_head(logps_context),
             f"building, weights from {ckpt_dir}" if load_weights else "building (weights from the resumed checkpoint)")
    chunks = build_model(meta.arch, opts)
    if load_weights:
        load_model_weights(chunks, ckpt_dir)
    return Runtime(cfg, layout, meta, ckpt_dir, tokenizer, str(tokenizer_source), chunks, opts, logps_context)


def _describe_experts(arch) -> str:
    if not arch.is_moe:
        return ""
    return f", {arch.num_experts} experts top-{arch.num_experts_per_tok} on {sum(arch.moe_layers)} layers"


def _describe_expert_layout(arch, layout: Layout) -> str:
    """`` EP 2`` (`` EP 2 ETP 1`` when the experts' tensor parallelism is not TP's) for a mixture of experts."""
    if not arch.is_moe:
        return ""
    return f" EP {layout.ep}" + (f" ETP {layout.etp}" if layout.etp != layout.tp else "")


def _describe_head(head: TokenLogpsContext) -> str:
    if head.chunk_tokens == 0:
        return "unfused (full vocab-parallel logits)"
    return (f"fused, chunks of {head.chunk_tokens} tokens, logits {'recomputed' if head.recompute else 'kept'}, "
            f"{head.kernel} kernels")


def _check_layout(arch, opts: ModelOptions) -> None:
    if arch.num_attention_heads % opts.tp or arch.num_key_value_heads % opts.tp:
        raise ValueError(f"parallel.tp={opts.tp} must divide the attention heads ({arch.num_attention_heads}) "
                         f"and key/value heads ({arch.num_key_value_heads})")
    stages = opts.pp * (opts.vpp or 1)
    if arch.num_layers % stages:
        raise ValueError(f"parallel.pp x parallel.vpp = {stages} must divide the {arch.num_layers} layers")


def _check_fp8(spec: str, cuda: bool) -> None:
    if not cuda:
        raise ValueError("train.precision: fp8 needs a GPU (none is used)")
    if spec != "te":
        raise ValueError("train.precision: fp8 needs Transformer Engine (model.spec: te); it is not importable")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ValueError(f"train.precision: fp8 needs an FP8-capable GPU (compute capability >= 8.9); "
                         f"this one is {major}.{minor}")

