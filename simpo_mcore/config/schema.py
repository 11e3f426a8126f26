"""The run config's schema: one dataclass per section, a docstring under every field, nothing else.

Components receive only their own section (``cfg.data``, ``cfg.loss``, ...); only the jobs that wire them
together (``runtime``, ``train``, ``evaluate``, ``reference``) hold the whole :class:`RunConfig`. Reading a YAML
into these classes is :mod:`simpo_mcore.config.loader`'s job; the rules between values are
:mod:`simpo_mcore.config.validation`'s.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelConfig:
    checkpoint: str | None = None
    """A megatron checkpoint written by ``tools/convert_hf_to_mcore.py`` (or a simpo-train
    checkpoint directory). ``None`` only for the embedded tiny default, which builds its own."""

    tokenizer: str | None = None
    """Local tokenizer directory or hub name. ``None``: the tokenizer recorded in the checkpoint."""

    spec: Literal["auto", "te", "local", "sdpa"] = "auto"
    """Layer implementation. ``auto``: Transformer Engine when it imports and a GPU is used, else
    megatron's local layers with a torch SDPA core attention (``sdpa``). ``local`` keeps megatron's
    unfused ``DotProductAttention`` (slow and memory hungry; for comparisons only)."""

    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times TP; padded rows never carry probability."""

    logprob_chunk_tokens: int = 4096
    """Tokens per chunk in the fused output-projection + log-prob head (memory flat in tokens x
    vocab). 0 computes full logits and uses megatron's ``vocab_parallel_cross_entropy``."""

    logprob_kernel: Literal["auto", "torch", "triton"] = "auto"
    """The fused head's elementwise passes (``simpo_mcore.logprobs_kernels``): ``auto`` = Triton kernels
    on a GPU (no fp32 copy of a logits chunk), torch elsewhere."""

    logprob_recompute: bool = True
    """The fused head recomputes the logits in its backward, so its memory stays flat in tokens x vocab.
    ``false`` keeps the forward's logits until the backward instead: one of the head's four
    ``tokens x vocab x hidden`` GEMMs fewer, for ``tokens x vocab / TP`` more elements of memory
    (2 GiB at 8192 tokens x 128256 in bf16)."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: ``selective`` recomputes the attention core, ``full`` whole layers."""

    recompute_num_layers: int = 1
    """With ``recompute: full``: layers per recomputed block (uniform method)."""

    moe_token_dispatcher: Literal["auto", "alltoall", "allgather"] = "auto"
    """Mixture-of-experts models: how tokens reach the ranks holding their experts (megatron's dispatchers, the
    same results). ``auto``: ``alltoall`` on a GPU (moves only the tokens each rank needs), ``allgather`` on a
    CPU (gloo has no uneven all-gather, which ``alltoall`` needs with ``parallel.etp > 1``)."""

    moe_aux_loss_coeff: float = 0.0
    """Mixture-of-experts models: weight of megatron's load-balancing loss per MoE layer (docs/moe.md defines
    it). 0 (the default) trains on the preference loss alone, as TRL does for the hub's Mixtral / Qwen MoE
    configs (``output_router_logits: false``)."""

    moe_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    """With ``moe_aux_loss_coeff > 0``: megatron's load-balancing loss over each micro-batch's tokens
    (``aux_loss``), per sequence (``seq_aux_loss``) or with expert loads over the global batch
    (``global_aux_loss``); ``none``: no such loss."""

    moe_freeze_router: bool = False
    """Mixture-of-experts models: the routers' weights are not trained (NeMo-RL's ``freeze_moe_router``)."""


@dataclass
class DataConfig:
    train_path: str | None = None
    """Training preferences: a hub dataset name, a local parquet/jsonl/json file or directory, or
    ``synthetic`` (the learnable digit-sorting preferences generated in code)."""

    train_split: str = "train_prefs"
    """Split of ``train_path`` (hub datasets; local files are always one ``train`` split)."""

    eval_path: str | None = None
    """Held-out preferences, same forms as ``train_path``. ``None``: no evaluation."""

    eval_split: str = "test_prefs"
    """Split of ``eval_path``."""

    max_length: int = 2048
    """Longest prompt + response in tokens; longer pairs are truncated as the reference does."""

    max_prompt_length: int = 1800
    """Longest prompt after truncation; must be below ``max_length``."""

    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """Which end of an over-long prompt to keep."""

    on_bad_row: Literal["drop", "error"] = "drop"
    """Rows that cannot form a valid pair (missing field, last turn not from the assistant, empty
    response, no room left by the prompt, a chat-template error): ``drop`` with a counted warning, or
    ``error``."""

    identical_pairs: Literal["keep", "drop"] = "keep"
    """Pairs whose chosen and rejected responses are the same tokens carry no preference (their loss term
    has no gradient; they still count in the batch mean and as misses in reward accuracy). They are
    counted and warned about once; ``keep`` trains on them as the reference does, ``drop`` removes them."""

    max_pairs: int | None = None
    """Use only the first N rows of the training split (debugging); ``None`` uses all."""

    max_eval_pairs: int | None = None
    """Use only the first N rows of the evaluation split."""

    packing: bool = True
    """Pack whole preference pairs end to end into rows (``docs/packing.md``): attention and labels stop at
    every sequence boundary, and almost no position of a batch is padding. ``train.micro_batch_pairs`` is then
    unused: a micro-batch is one row, holding as many pairs as fit. ``false``: micro-batches of
    ``train.micro_batch_pairs`` pairs, each sequence right-padded. Needs ``model.spec`` ``te`` or ``sdpa``
    (``auto`` is one of them); megatron's ``local`` attention takes no packed rows."""

    pack_tokens: int = 8192
    """With ``packing``: the most positions a row (one micro-batch) holds, a multiple of 16 and at least
    ``2 x max_length`` so that any pair fits. Each step's pairs are spread over the fewest rows per
    data-parallel rank that fit, as evenly as they go, so a row is usually shorter than this: it bounds the
    memory of a micro-batch; a smaller value gives more (shorter) micro-batches."""

    num_proc: int | None = None
    """Processes for tokenisation (``datasets.map``); ``None`` picks min(8, cpu count)."""

    cache_dir: str | None = None
    """Where tokenised datasets are cached; ``None`` uses ``<output_dir>/data_cache``."""

    synthetic_pairs: int = 2048
    """With ``train_path: synthetic``: number of generated training pairs (evaluation gets 256)."""

    format: Literal["auto", "h4", "conversational", "implicit_conversational", "standard",
                    "implicit_standard", "sharegpt", "openai"] = "auto"
    """Row layout of the data files (docs/data.md has the table). ``auto`` detects it per file from
    the columns and the shape of their values; a named format refuses files that do not fit it."""

    columns: dict[str, str] = field(default_factory=dict)
    """Your column names for the ones a format reads, e.g. ``{prompt: question, chosen: good,
    rejected: bad}``. Keys: ``prompt``, ``chosen``, ``rejected``, ``conversations``, ``system``,
    ``prompt_id``, ``input``, ``preferred_output``, ``non_preferred_output``."""

    chat_template: str | None = None
    """A chat template used instead of the tokenizer's own to render message rows: a built-in name
    (``llama2``, ``llama3``, ``chatml`` / ``qwen``, ``mistral``, ``gemma``, ``zephyr``: docs/data.md), a file
    holding a Jinja template, or the Jinja text itself. ``None``: the tokenizer's (``model.tokenizer``)."""

    plain_strings: Literal["raw", "chat"] = "raw"
    """Plain-string rows (``standard``, ``implicit_standard``): ``raw`` uses the text as it is (as
    the reference and TRL do); ``chat`` renders each as one user turn and one assistant turn with
    the chat template."""

    response_rendering: Literal["alone", "in_conversation"] = "alone"
    """How a response of a message row is rendered. ``alone`` (the reference): the assistant turn
    as a one-message chat, minus a leading BOS; a template that adds a default system prompt to
    every chat (SmolLM2's ChatML, Llama-3.1's date header) puts that text into the response's
    labels. ``in_conversation``: the text the template adds after the prompt when the whole
    conversation is rendered, so only the assistant turn is trained on."""


@dataclass
class LossConfig:
    type: Literal["simpo", "simpo_hinge", "dpo"] = "simpo"
    """``simpo`` (sigmoid on average log-probs), ``simpo_hinge``, or ``dpo`` (sigmoid on summed
    log-prob ratios against the frozen starting checkpoint)."""

    beta: float = 2.0
    """Reward scale. SimPO uses 2-10; DPO baselines 0.01 (SimPO paper) or 0.1 (Marin)."""

    gamma_beta_ratio: float = 0.5
    """SimPO target margin divided by beta (gamma = beta * gamma_beta_ratio). Ignored by DPO."""

    label_smoothing: float = 0.0
    """Conservative sigmoid loss; 0 is the plain loss. Ignored by the hinge loss."""

    sft_weight: float = 0.0
    """Weight of the token-mean cross-entropy on chosen responses added to the loss."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""

    pp: int = 1
    """Pipeline-parallel size."""

    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); ``None`` for none."""

    sequence_parallel: bool = False
    """Shard activations along the sequence between tensor-parallel regions (needs tp > 1)."""

    cp: int = 1
    """Context-parallel size: every sequence is split over this many ranks (megatron's load-balanced split: 2 x cp
    chunks, rank r keeping chunks r and 2cp - 1 - r), so that a sequence's activations and attention are shared
    by cp ranks (docs/context_parallel.md). The world size is a multiple of tp x pp x cp. Not with ``ep`` > 1 nor
    a mixture-of-experts model yet (not tested)."""

    cp_comm_type: Literal["p2p", "all_gather", "a2a", "a2a+p2p"] = "p2p"
    """How Transformer Engine's attention exchanges keys and values under ``cp`` > 1 (``model.spec: te``): ``p2p``
    (a ring, overlapped with compute), ``all_gather``, ``a2a`` (all-to-all of heads, Ulysses style) or ``a2a+p2p``
    (all-to-all within groups of ``cp_a2a_size`` ranks, p2p between them). The SDPA spec always all-gathers them."""

    cp_a2a_size: int | None = None
    """With ``cp_comm_type: a2a+p2p``: the ranks of each all-to-all group (a divisor of ``cp`` between 2 and
    ``cp / 2``, e.g. the CP ranks within one node). Unset otherwise."""

    ep: int = 1
    """Expert-parallel size (mixture-of-experts models): each MoE layer's experts are split over this many
    ranks inside the data-parallel group, as megatron does. Must divide the experts, and ``ep x etp`` the ranks
    of a pipeline stage (``world / pp``)."""

    etp: int | None = None
    """Expert tensor-parallel size: each expert's FFN split over this many ranks; ``null``: ``tp``."""

    distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (megatron's distributed optimizer)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA + NCCL when a GPU is present, else CPU + gloo. ``cpu`` forces CPU mode."""

    timeout_minutes: int = 30
    """Collective timeout in minutes, from 1 to 10080 (a week)."""

    def min_world_size(self) -> int:
        """The fewest ranks this layout runs on: each pipeline stage holds whole tensor- and context-parallel groups
        (``tp x cp``) and whole expert groups (``ep x etp``, inside the data-parallel group), so
        ``pp x lcm(tp x cp, ep x etp)``."""
        return self.pp * math.lcm(self.tp * self.cp, self.ep * (self.etp or self.tp))


@dataclass
class OptimConfig:
    lr: float = 6e-7
    """Peak learning rate, reached at the end of the warm-up."""

    min_lr: float = 0.0
    """Floor of the decay. 0 (the HF Trainer's and the reference's schedules) decays to 0; ``min_lr > 0``
    decays to ``min_lr`` instead, as transformers' ``cosine_with_min_lr`` does (linear: the same form). Must
    be 0 with ``scheduler: constant``."""

    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, exactly transformers' ``get_{cosine,linear,constant}_schedule_with_warmup``."""

    warmup_ratio: float = 0.1
    """Warm-up of ``ceil(warmup_ratio x total steps)`` updates (the HF Trainer's count), the lr rising linearly
    from 0: any ratio > 0 warms up at least one update, and the first update uses lr 0."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""

    adam_beta1: float = 0.9
    """AdamW's first-moment decay, in [0, 1)."""

    adam_beta2: float = 0.999
    """AdamW's second-moment decay, in [0, 1)."""

    adam_eps: float = 1e-8
    """AdamW's denominator epsilon, > 0."""

    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""


@dataclass
class TrainConfig:
    micro_batch_pairs: int = 1
    """Preference pairs per micro-batch (2x sequences: chosen then rejected), without ``data.packing``."""

    global_batch_pairs: int = 128
    """Pairs per optimizer step (the loss is their mean): a multiple of the data-parallel size with
    ``data.packing``, else micro_batch_pairs x accumulation steps x data-parallel size."""

    epochs: float = 1.0
    """Passes over the training set; ignored when ``max_steps`` is set."""

    max_steps: int | None = None
    """Optimizer steps to run; ``None`` derives it from ``epochs``."""

    seed: int = 42
    """Seeds data order and any random initialisation."""

    precision: Literal["fp32", "bf16", "fp8"] = "bf16"
    """Parameters and activations: fp32, bf16 mixed precision (fp32 master weights), or FP8
    matmuls through Transformer Engine on top of bf16."""

    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe (Transformer Engine), with ``precision: fp8``."""

    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    """FP8 format: ``hybrid`` (e4m3 forward, e5m2 backward) or ``e4m3`` everywhere."""

    eval_interval: int = 0
    """Evaluate on ``data.eval_path`` every N steps (and at the end); 0 only at the end."""

    exit_interval: int | None = None
    """Save a checkpoint and exit cleanly once the step is a multiple of N (a job-time budget, as
    Megatron-LM's --exit-interval); the schedule still spans the whole run and a relaunch resumes."""

    log_interval: int = 1
    """Write metrics (``metrics.jsonl``, TensorBoard, W&B) every N steps, and without a terminal print a
    step line (loss, reward accuracy and margin, lr, grad norm, tokens/s, MFU, memory, ETA) as often."""

    max_nonfinite_steps: int = 3
    """Abort after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""

    tensorboard: bool = True
    """Write TensorBoard event files under ``<output_dir>/tensorboard``."""

    progress_bar: bool = True
    """On a terminal, rank 0 draws a progress bar on stderr; ``false`` prints the step lines instead
    (as it always does without a terminal)."""


@dataclass
class CheckpointConfig:
    save_interval: int = 0
    """Save every N steps (0: only at the end and on a signal)."""

    keep_last: int = 2
    """Keep the newest K checkpoints of the run's line, by progress (pairs consumed): never the one just saved,
    never one past the checkpoint the run started from (one ``latest`` was pointed back from, another run's).
    Checkpoint names never repeat: a step saved again (after a changed global batch, or ``latest`` pointed
    back) is ``step_N-2``."""

    resume: bool = True
    """Resume from ``<output_dir>/checkpoints/latest`` when it exists."""

    overwrite: bool = False
    """With ``resume: false``: delete what a previous run left in ``output_dir`` (checkpoints,
    metrics.jsonl, TensorBoard events, the HF export, eval_metrics.json) and start over. Without it,
    a fresh run into an output_dir that holds a previous run is refused."""

    export_hf: bool = False
    """Also write a Hugging Face model to ``<output_dir>/hf`` at the end."""

    save_optimizer: bool = True
    """Include optimizer state (needed for exact resume)."""

    async_save: bool = True
    """Write checkpoints in the background: training goes on while a forked process per rank writes the shards,
    and the checkpoint is published (integrity manifest, rename, ``latest``, pruning) at the first step after
    every rank's write is done. At most one save is in flight; the end of the run, a signal and
    ``train.exit_interval`` wait for it, and a crash during the write leaves ``latest`` on the previous
    checkpoint (docs/operations.md). On by default on CPU and GPU (Linux, macOS); synchronous where the
    platform cannot fork (Windows) or with ``false``. Costs host memory for a copy of the rank's share of the
    checkpoint while it is written."""

    fully_parallel_save: bool = True
    """Spread the writes of tensors every data-parallel rank holds (the weights; the distributed optimizer's
    state is sharded already) over the data-parallel ranks instead of writing each from the first of them
    (megatron's ``FullyParallelSaveStrategyWrapper``). Measured faster on CPU at DP 2 (docs/operations.md)."""

    fully_parallel_load: bool = False
    """Read each replicated tensor on one data-parallel rank and send it to the others
    (``FullyParallelLoadStrategyWrapper``) instead of every rank reading all it needs. Measured slower on CPU at
    DP 2 in 2 of 3 rounds, where every rank reads from the same page cache (docs/operations.md); not yet measured
    on a GPU node."""

    allow_changes: list[str] = field(default_factory=list)
    """On resume, what may differ from the run config saved in the checkpoint among the settings that change
    what is optimised (:data:`simpo_mcore.resume.RESUME_GUARDED`: ``loss``, the training data,
    ``train.global_batch_pairs``, ``train.seed``, ``model.checkpoint``): sections (``loss``, ``data``) or fields
    (``loss.beta``). Any other such difference is refused, naming the field with its old and new values. The
    optimiser's settings and the run's length need no permission: the learning-rate schedule always follows the
    config."""


@dataclass
class WandbConfig:
    project: str | None = None
    """Weights & Biases project. ``None`` (the default): no W&B. Needs the optional extra
    (``pip install -e .[wandb]``). The run gets the resolved config and every metric of
    ``metrics.jsonl``; a resumed run continues the same W&B run (its id is kept in
    ``<output_dir>/wandb_run_id``)."""

    name: str | None = None
    """Run name shown in W&B; ``None``: the last component of ``output_dir``."""

    entity: str | None = None
    """W&B team or user; ``None``: the default entity of the logged-in account."""

    mode: Literal["online", "offline", "disabled"] = "online"
    """``online`` streams to the W&B server (needs network and ``wandb login`` or ``WANDB_API_KEY``);
    ``offline`` writes the run under ``<output_dir>/wandb`` with no network (upload it later with
    ``wandb sync <output_dir>/wandb/offline-run-*``); ``disabled`` turns W&B off."""


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases tracking (off unless ``project`` is set). TensorBoard is ``train.tensorboard``."""

    progress_interval_s: float = 30.0
    """Without a terminal (a SLURM log, a pipe): seconds between the progress lines of tokenisation, the
    DPO reference pass and evaluation. Training prints a line every ``train.log_interval`` steps; on a
    terminal every task draws a progress bar instead."""


@dataclass
class RunConfig:
    """A whole run: every section, and where the run writes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting checkpoint, its tokenizer, the layer implementation and the log-prob head."""

    data: DataConfig = field(default_factory=DataConfig)
    """The preference pairs: where they are, how they are rendered, truncated and laid out."""

    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout and the device."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch, length of the run, precision, intervals."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming and exporting."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Weights & Biases and the progress lines."""

    output_dir: str = "runs/simpo"
    """Everything a run writes: checkpoints, metrics.jsonl, TensorBoard, eval_metrics.json."""


SECTIONS = tuple(name for name, tp in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(tp))
"""The config's sections (``model``, ``data``, ...), in order."""

DATA_COLUMNS = ("prompt", "chosen", "rejected", "conversations", "system", "prompt_id", "input",
                "preferred_output", "non_preferred_output")
"""The column names the data formats read (the keys ``data.columns`` may map)."""


def config_fields(cfg: RunConfig) -> set[str]:
    """The names ``checkpoint.allow_changes`` may hold: every section and every ``section.field``."""
    names = set()
    for f in dataclasses.fields(cfg):
        names.add(f.name)
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            names.update(f"{f.name}.{g.name}" for g in dataclasses.fields(getattr(cfg, f.name)))
    return names


def field_types(cls: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """``{"loss.beta": float, "logging.wandb.project": str | None, ...}``: every leaf field's dotted name and
    annotation, sections (``loss``, ``logging.wandb``) included with their dataclass."""
    out: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        dotted = f"{prefix}{name}"
        out[dotted] = tp
        if dataclasses.is_dataclass(tp):
            out.update(field_types(tp, f"{dotted}."))
    return out
