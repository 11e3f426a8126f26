"""The names other trainers give the settings: transformers' ``TrainingArguments``, TRL's ``DPOConfig`` /
``CPOConfig``, the SimPO repo's ``SimPOConfig`` and the alignment-handbook's model and data arguments.

One table serves the unknown-key suggestions of the loader (``learning_rate`` -> ``optim.lr``) and the importer
(:mod:`simpo_mcore.config.importer`); docs/migrating.md is the same table for people.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mapped:
    """A foreign key that becomes a key of this project."""

    target: str
    """The project key it sets (``section.field``)."""

    how: str = ""
    """The conversion, when the value is not copied as it is."""


MAPPED: dict[str, Mapped] = {
    "learning_rate": Mapped("optim.lr"),
    "lr_scheduler_type": Mapped("optim.scheduler", "cosine, linear; constant_with_warmup -> constant; constant -> "
                                                   "constant with warm-up 0; cosine_with_min_lr -> cosine + min_lr"),
    "lr_scheduler_kwargs": Mapped("optim.min_lr", "min_lr, or min_lr_rate x learning_rate (cosine_with_min_lr)"),
    "warmup_ratio": Mapped("optim.warmup_ratio"),
    "warmup_steps": Mapped("optim.warmup_ratio", "warmup_steps / max_steps (needs max_steps)"),
    "weight_decay": Mapped("optim.weight_decay"),
    "adam_beta1": Mapped("optim.adam_beta1"),
    "adam_beta2": Mapped("optim.adam_beta2"),
    "adam_epsilon": Mapped("optim.adam_eps"),
    "max_grad_norm": Mapped("optim.clip_grad"),
    "num_train_epochs": Mapped("train.epochs"),
    "max_steps": Mapped("train.max_steps", "-1 -> null"),
    "per_device_train_batch_size": Mapped("train.global_batch_pairs",
                                          "x gradient_accumulation_steps x world size; also train.micro_batch_pairs"),
    "gradient_accumulation_steps": Mapped("train.global_batch_pairs",
                                          "per_device_train_batch_size x this x world size"),
    "seed": Mapped("train.seed"),
    "bf16": Mapped("train.precision", "true -> bf16, false -> fp32"),
    "logging_steps": Mapped("train.log_interval"),
    "eval_strategy": Mapped("train.eval_interval", "steps -> eval_steps; no -> no evaluation; epoch -> 0 "
                                                   "(the end), one epoch only"),
    "evaluation_strategy": Mapped("train.eval_interval", "as eval_strategy (its older name)"),
    "eval_steps": Mapped("train.eval_interval", "with eval_strategy steps; unset: logging_steps"),
    "do_eval": Mapped("data.eval_path", "the test split, when evaluating"),
    "save_strategy": Mapped("checkpoint.save_interval", "steps -> save_steps; no -> 0 (the end); epoch -> 0, "
                                                        "one epoch only"),
    "save_steps": Mapped("checkpoint.save_interval", "with save_strategy steps"),
    "save_total_limit": Mapped("checkpoint.keep_last", "null keeps the default (2)"),
    "output_dir": Mapped("output_dir"),
    "run_name": Mapped("logging.wandb.name", "with report_to wandb"),
    "report_to": Mapped("logging.wandb.project", "wandb -> project huggingface (the HF default); tensorboard -> "
                                                 "train.tensorboard"),
    "gradient_checkpointing": Mapped("model.recompute", "true -> full, false -> none"),
    "ddp_timeout": Mapped("parallel.timeout_minutes", "seconds / 60, rounded up"),
    "beta": Mapped("loss.beta"),
    "gamma_beta_ratio": Mapped("loss.gamma_beta_ratio"),
    "simpo_gamma": Mapped("loss.gamma_beta_ratio", "simpo_gamma / beta"),
    "sft_weight": Mapped("loss.sft_weight"),
    "cpo_alpha": Mapped("loss.sft_weight"),
    "rpo_alpha": Mapped("loss.sft_weight", "null -> 0"),
    "label_smoothing": Mapped("loss.label_smoothing"),
    "loss_type": Mapped("loss.type", "SimPO repo sigmoid / hinge -> simpo / simpo_hinge; CPO simpo -> simpo; "
                                     "DPO sigmoid -> dpo"),
    "trainer_type": Mapped("loss.type", "simpo"),
    "max_length": Mapped("data.max_length"),
    "max_prompt_length": Mapped("data.max_prompt_length"),
    "max_completion_length": Mapped("data.max_length", "only max_length - max_prompt_length (or null)"),
    "truncation_mode": Mapped("data.truncation_mode"),
    "dataset_mixer": Mapped("data.train_path", "one dataset, fraction 1.0"),
    "dataset_splits": Mapped("data.train_split", "the split named *train*; the one named *test* -> "
                                                 "data.eval_split"),
    "dataset_name": Mapped("data.train_path"),
    "dataset_train_split": Mapped("data.train_split"),
    "dataset_test_split": Mapped("data.eval_split"),
    "preprocessing_num_workers": Mapped("data.num_proc"),
    "dataset_num_proc": Mapped("data.num_proc"),
    "chat_template": Mapped("data.chat_template"),
    "model_name_or_path": Mapped("model.checkpoint", "its converted megatron checkpoint "
                                                     "(tools/convert_hf_to_mcore.py)"),
    "tokenizer_name_or_path": Mapped("model.tokenizer"),
}
"""Foreign key -> the project key it becomes. Several may feed one key (the global batch)."""

FIXED: dict[str, tuple[tuple, str]] = {
    "optim": (("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused"), "AdamW is the only optimizer"),
    "fp16": ((False,), "no fp16 here: bf16 (bf16: true) or fp32"),
    "push_to_hub": ((False,), "no hub upload: checkpoint.export_hf writes <output_dir>/hf to upload yourself"),
    "use_peft": ((False,), "full fine-tuning only, no LoRA"),
    "load_in_8bit": ((False,), "no quantised training"),
    "load_in_4bit": ((False,), "no quantised training"),
    "trust_remote_code": ((False,), "no repository code is ever run"),
    "model_revision": (("main",), "convert the revision you want: the converter reads a local download"),
    "disable_dropout": ((True,), "the models here always run without dropout"),
    "label_pad_token_id": ((-100,), "the label pad is -100"),
    "padding_value": ((None,), "padding never reaches the loss here"),
    "is_encoder_decoder": ((None, False), "decoder-only models"),
    "max_target_length": ((None,), "encoder-decoder models only"),
    "generate_during_eval": ((False,), "no generation during evaluation"),
    "auto_insert_empty_system_msg": ((True,), "an empty system message is always inserted when the chat "
                                              "template mentions one"),
    "resume_from_checkpoint": ((None,), "a run resumes from <output_dir>/checkpoints/latest by itself"),
    "overwrite_output_dir": ((False,), "starting over deletes the previous run here: set checkpoint.resume=false "
                                       "checkpoint.overwrite=true yourself"),
    "logging_strategy": (("steps",), "metrics are logged every train.log_interval steps"),
    "auto_find_batch_size": ((False,), "the batch is what the config says"),
    "reference_free": ((False,), "DPO here always has the frozen starting model as its reference"),
    "sync_ref_model": ((False,), "the DPO reference stays the starting model"),
    "use_weighting": ((False,), "no WPO weighting"),
    "f_divergence_type": (("reverse_kl",), "DPO's reverse KL only"),
    "do_train": ((True,), "simpo-train trains"),
}
"""Foreign keys with one meaning here: the values accepted, and why no other is."""

IGNORED: dict[str, str] = {
    "torch_dtype": "the checkpoint's dtype follows train.precision",
    "use_flash_attention_2": "model.spec picks the attention kernel",
    "attn_implementation": "model.spec picks the attention kernel",
    "gradient_checkpointing_kwargs": "recomputation is megatron's (model.recompute)",
    "per_device_eval_batch_size": "evaluation batches take the training layout",
    "log_level": "the console shows rank 0's progress (--verbose for every library's log)",
    "log_level_replica": "the console shows rank 0's progress",
    "logging_first_step": "every train.log_interval steps, the first included",
    "logging_dir": "TensorBoard writes under <output_dir>/tensorboard",
    "hub_model_id": "no hub upload",
    "hub_strategy": "no hub upload",
    "hub_private_repo": "no hub upload",
    "remove_unused_columns": "the data reader keeps only the columns it needs",
    "dataloader_num_workers": "batches are built in the training process from the tokenised cache",
    "dataloader_pin_memory": "batches are built in the training process from the tokenised cache",
    "tf32": "matmul precision follows train.precision",
    "ddp_find_unused_parameters": "megatron's DDP",
    "precompute_ref_log_probs": "DPO's reference log-probs are always computed once, before training",
    "bf16_full_eval": "evaluation runs in train.precision",
    "lora_r": "LoRA's settings (use_peft: true is refused)",
    "lora_alpha": "LoRA's settings (use_peft: true is refused)",
    "lora_dropout": "LoRA's settings (use_peft: true is refused)",
    "lora_target_modules": "LoRA's settings (use_peft: true is refused)",
    "lora_modules_to_save": "LoRA's settings (use_peft: true is refused)",
    "save_safetensors": "checkpoints are megatron distributed checkpoints; checkpoint.export_hf writes "
                        "safetensors",
}
"""Foreign keys with no effect on what is trained here, and why."""
