"""The typed run configuration: YAML + dotted ``key=value`` overrides + validation.

One dataclass per section. Components receive only their own section (``cfg.data``, ``cfg.loss``,
...); only the jobs that wire them together (``runtime``, ``train``, ``evaluate``, ``reference``) hold
the whole run config. Loading rejects unknown keys and wrong types with
the dotted name of the offending field, and :meth:`RunConfig.validate` checks the cross-field rules
(batch sizes that divide, prompt length below max length, ...) before any process group exists.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class UserError(Exception):
    """Something the user gave or did stops the job: a file, path, checkpoint or setting, or a documented
    stop (``train.max_nonfinite_steps``). The entry points print it as one line ``error: ...`` and exit 2,
    on every rank."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)
"""What the entry points report as the user's error (one ``error:`` line, exit 2): ours, and the errors the
libraries raise for bad values and paths."""


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
    """A Jinja chat template (a file path, or the template itself) used instead of the tokenizer's
    own to render message rows. ``None``: the tokenizer's (``model.tokenizer``)."""

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
    by cp ranks (docs/context_parallel.md). The world size is a multiple of tp x pp x cp."""

    cp_comm_type: Literal["p2p", "all_gather", "a2a", "a2a+p2p"] = "p2p"
    """How Transformer Engine's attention exchanges keys and values under ``cp`` > 1 (``model.spec: te``): ``p2p``
    (a ring, overlapped with compute), ``all_gather``, ``a2a`` (all-to-all of heads, Ulysses style) or ``a2a+p2p``
    (all-to-all within groups of ``cp_a2a_size`` ranks, p2p between them). The SDPA spec always all-gathers them."""

    cp_a2a_size: int | None = None
    """With ``cp_comm_type: a2a+p2p``: the ranks of each all-to-all group (a divisor of ``cp`` between 2 and
    ``cp / 2``, e.g. the CP ranks within one node). Unset otherwise."""

    distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (megatron's distributed optimizer)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA + NCCL when a GPU is present, else CPU + gloo. ``cpu`` forces CPU mode."""

    timeout_minutes: int = 30
    """Collective timeout."""


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
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

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
    """Keep the newest K step checkpoints up to the step just saved (never the one just saved; never
    one of a higher step)."""

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

    allow_changes: list[str] = field(default_factory=list)
    """On resume, what may differ from the run config saved in the checkpoint among the settings that change
    what is optimised (:data:`RESUME_GUARDED`: ``loss``, the training data, ``train.global_batch_pairs``,
    ``train.seed``, ``model.checkpoint``): sections (``loss``, ``data``) or fields (``loss.beta``). Any other
    such difference is refused, naming the field with its old and new values. The optimiser's settings and the
    run's length need no permission: the learning-rate schedule always follows the config."""


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
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "runs/simpo"
    """Everything a run writes: checkpoints, metrics.jsonl, TensorBoard, eval_metrics.json."""

    def validate(self) -> RunConfig:
        """Cross-field checks that need no process group. Raises ConfigError naming the field."""
        d, t, p, loss = self.data, self.train, self.parallel, self.loss
        _positive(self, ["data.max_length", "data.max_prompt_length", "train.micro_batch_pairs",
                         "train.global_batch_pairs", "parallel.tp", "parallel.pp", "parallel.cp", "data.pack_tokens",
                         "model.make_vocab_size_divisible_by", "train.log_interval",
                         "model.recompute_num_layers", "parallel.timeout_minutes"])
        if d.max_prompt_length >= d.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({d.max_prompt_length}) must be below data.max_length "
                f"({d.max_length}): no room would be left for the responses")
        for key, column in d.columns.items():
            if key not in DATA_COLUMNS:
                raise ConfigError(f"data.columns.{key}: unknown column role (known: {', '.join(DATA_COLUMNS)})")
            if not column:
                raise ConfigError(f"data.columns.{key}: empty column name")
        if sorted(set(d.columns.values())) != sorted(d.columns.values()):
            raise ConfigError(f"data.columns maps one column to several roles: {d.columns}")
        if d.packing:
            if d.pack_tokens % 16:
                raise ConfigError(f"data.pack_tokens ({d.pack_tokens}) must be a multiple of 16")
            if d.pack_tokens < 2 * d.max_length:
                raise ConfigError(
                    f"data.pack_tokens ({d.pack_tokens}) must be at least 2 x data.max_length ({2 * d.max_length}): "
                    "a pair (chosen and rejected, each up to max_length tokens) must fit in one row")
            if p.sequence_parallel and d.pack_tokens % p.tp:
                raise ConfigError(f"data.pack_tokens ({d.pack_tokens}) must be a multiple of parallel.tp ({p.tp}) "
                                  "under sequence parallelism")
            if self.model.spec == "local":
                raise ConfigError("data.packing needs model.spec te or sdpa (megatron's local attention takes no "
                                  "packed rows); set data.packing: false to use model.spec: local")
        if d.chat_template is not None and not d.chat_template.strip():
            raise ConfigError("data.chat_template is empty; leave it unset to use the tokenizer's template")
        if not d.packing and t.global_batch_pairs % t.micro_batch_pairs:
            raise ConfigError(
                f"train.global_batch_pairs ({t.global_batch_pairs}) must be a multiple of "
                f"train.micro_batch_pairs ({t.micro_batch_pairs})")
        if p.vpp is not None:
            if p.vpp < 2:
                raise ConfigError(f"parallel.vpp must be >= 2 or null, got {p.vpp}")
            if p.pp < 2:
                raise ConfigError("parallel.vpp needs parallel.pp >= 2")
        if p.sequence_parallel and p.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
        _validate_cp(p, self.model.spec, d.packing)
        if loss.beta <= 0:
            raise ConfigError(f"loss.beta must be positive, got {loss.beta}")
        if not 0.0 <= loss.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing}")
        if loss.sft_weight < 0:
            raise ConfigError(f"loss.sft_weight must be >= 0, got {loss.sft_weight}")
        if loss.type == "simpo_hinge" and loss.label_smoothing:
            raise ConfigError("loss.label_smoothing has no effect with loss.type: simpo_hinge; set it to 0")
        if t.max_steps is not None and t.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {t.max_steps}")
        if t.epochs <= 0:
            raise ConfigError(f"train.epochs must be positive, got {t.epochs}")
        _validate_optim(self.optim)
        for name in self.checkpoint.allow_changes:
            if name not in config_fields(self):
                raise ConfigError(f"checkpoint.allow_changes: {name!r} is not a config section or field "
                                  "(e.g. loss, data, loss.beta)")
        if self.model.logprob_chunk_tokens < 0:
            raise ConfigError("model.logprob_chunk_tokens must be >= 0")
        for name in ("save_interval", "keep_last"):
            if getattr(self.checkpoint, name) < 0:
                raise ConfigError(f"checkpoint.{name} must be >= 0")
        if self.checkpoint.keep_last < 1:
            raise ConfigError("checkpoint.keep_last must be >= 1")
        if self.checkpoint.overwrite and self.checkpoint.resume:
            raise ConfigError("checkpoint.overwrite deletes a previous run to start over: it needs "
                              "checkpoint.resume: false (resuming keeps the previous run)")
        if self.logging.progress_interval_s < 0:
            raise ConfigError(f"logging.progress_interval_s must be >= 0, got {self.logging.progress_interval_s}")
        for name in ("project", "name", "entity"):
            if getattr(self.logging.wandb, name) == "":
                raise ConfigError(f"logging.wandb.{name} is empty; leave it unset (null) instead")
        if t.precision == "fp8" and self.model.spec in ("local", "sdpa"):
            raise ConfigError(
                f"train.precision: fp8 needs the Transformer Engine spec; model.spec is {self.model.spec!r}")
        return self


SECTIONS = tuple(name for name, tp in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(tp))
"""The config's sections (``model``, ``data``, ...), in order."""

RESUME_GUARDED = ("loss", "data", "train.global_batch_pairs", "train.seed", "model.checkpoint",
                  "model.make_vocab_size_divisible_by")
"""What a resumed run may change only with ``checkpoint.allow_changes``: what is optimised (the objective,
the training pairs and their order, the batch a step averages over, the starting model). Data settings that
do not decide the training pairs (:data:`DATA_NOT_GUARDED`) are free."""

DATA_NOT_GUARDED = ("data.eval_path", "data.eval_split", "data.max_eval_pairs", "data.num_proc", "data.cache_dir",
                    "data.packing", "data.pack_tokens")
"""``data.packing`` / ``data.pack_tokens`` lay a step's pairs out (packed rows or padded micro-batches, as
``train.micro_batch_pairs`` does): the same pairs and the same mean, equal to fp32 rounding."""


def config_fields(cfg: RunConfig) -> set[str]:
    """The names ``checkpoint.allow_changes`` may hold: every section and every ``section.field``."""
    names = set()
    for f in dataclasses.fields(cfg):
        names.add(f.name)
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            names.update(f"{f.name}.{g.name}" for g in dataclasses.fields(getattr(cfg, f.name)))
    return names


def flat_config(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"loss.beta": 2.0, ..., "output_dir": ...}`` from a config tree (``dataclasses.asdict`` or YAML)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in SECTIONS:
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_changes(saved: dict[str, Any], cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, value now)`` for every field of ``cfg`` that differs from the saved config tree
    (fields the saved config does not have, from another version, are skipped)."""
    old, now = flat_config(saved), flat_config(dataclasses.asdict(cfg))
    return [(name, old[name], value) for name, value in now.items() if name in old and old[name] != value]


def is_guarded(name: str) -> bool:
    """Whether changing the field ``name`` on resume changes what is optimised (:data:`RESUME_GUARDED`)."""
    return name not in DATA_NOT_GUARDED and (name in RESUME_GUARDED or name.split(".")[0] in RESUME_GUARDED)


def is_allowed(name: str, allow: list[str]) -> bool:
    """Whether ``checkpoint.allow_changes`` names the field ``name`` or its section."""
    return name in allow or name.split(".")[0] in allow


DATA_COLUMNS = ("prompt", "chosen", "rejected", "conversations", "system", "prompt_id", "input",
                "preferred_output", "non_preferred_output")
"""The column names the data formats read (the keys ``data.columns`` may map)."""


def _validate_optim(o: OptimConfig) -> None:
    """AdamW and schedule values that would train nothing or diverge silently."""
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"optim.lr must be a positive number, got {o.lr}")
    if not 0.0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if not 0.0 <= o.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    if not o.adam_eps > 0:
        raise ConfigError(f"optim.adam_eps must be positive, got {o.adam_eps}")
    for name in ("weight_decay", "clip_grad"):
        if not getattr(o, name) >= 0:
            raise ConfigError(f"optim.{name} must be >= 0, got {getattr(o, name)}")
    if o.scheduler == "constant" and o.min_lr:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) has no effect with optim.scheduler: constant; set it to 0")


def _validate_cp(p: ParallelConfig, spec: str, packing: bool) -> None:
    """Context-parallel settings that cannot run (``parallel.cp`` >= 1 is checked with the other sizes)."""
    if p.cp_comm_type == "a2a+p2p":
        a2a = p.cp_a2a_size
        if a2a is None or not (2 <= a2a <= p.cp // 2 and p.cp % a2a == 0):
            raise ConfigError(f"parallel.cp_a2a_size must be a divisor of parallel.cp ({p.cp}) between 2 and "
                              f"{p.cp // 2} with parallel.cp_comm_type: a2a+p2p, got {a2a}")
    elif p.cp_a2a_size is not None:
        raise ConfigError(f"parallel.cp_a2a_size is only used with parallel.cp_comm_type: a2a+p2p "
                          f"(it is {p.cp_comm_type}); leave it unset")
    if p.cp == 1:
        return
    if spec == "local":
        raise ConfigError("parallel.cp > 1 needs model.spec te or sdpa: megatron's local attention has no context "
                          "parallelism")
    if spec == "te" and packing and p.cp_comm_type in ("all_gather", "a2a+p2p"):
        raise ConfigError(f"parallel.cp_comm_type: {p.cp_comm_type} takes no packed rows in Transformer Engine's "
                          "attention (model.spec: te); use p2p or a2a, or data.packing: false")
    # The model, its attention and the head split sequences over CP ranks; the training step, evaluation and
    # DPO's reference pass do not give them split micro-batches yet.
    raise ConfigError(f"parallel.cp: {p.cp} is not supported by simpo-train / simpo-eval / simpo-data yet (context "
                      "parallelism is built at the model level only); use parallel.cp: 1")


def _positive(cfg: RunConfig, names: list[str]) -> None:
    for name in names:
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


# --------------------------------------------------------------------------------------------
# Loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{name}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):  # one name, as `key=name` on the command line gives it
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {_coerce(k, key_type, name): _coerce(v, value_type, f"{name}.{k}") for k, v in value.items()}
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp}")


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]} (known keys{' of ' + prefix if prefix else ''}: "
            f"{', '.join(sorted(known))})")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, name)
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.seed=3", "model.checkpoint=ckpt"]`` -> [(key, YAML-parsed value), ...]."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        parsed.append((key.strip(), value))
    return parsed


BASE_KEY = "_base_"
"""A YAML may name files (relative to itself) that it extends, merged in order, then itself:
``_base_: ../common.yaml`` or ``_base_: [row.yaml, _8gpu.yaml]``."""


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of ``path`` with its ``_base_`` chain merged in (child keys win)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path in _seen:
        raise ConfigError(f"config file {path} includes itself through {BASE_KEY}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    bases = tree.pop(BASE_KEY, None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_yaml_tree(path.parent / base, (*_seen, path)))
    return _merge(merged, tree)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (or none: all defaults), apply dotted overrides, type-check and validate."""
    tree: dict[str, Any] = read_yaml_tree(path) if path is not None else {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return _build(RunConfig, tree, "").validate()

