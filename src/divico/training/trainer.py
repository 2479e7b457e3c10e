"""DiViCo fine-tuning (paper Sec. III-D, Algorithm 1) on the transformers ``Trainer``.

``loss = loss_LLM + beta * KL`` where ``loss_LLM`` is the causal-LM loss on assistant tokens and ``KL`` is
:func:`divico.methods.divico.gaussian_kl`: per kept visual token, the KL of its d-dimensional Gaussian
N(mu, diag(sigma^2)) to N(0, I) (a sum over the d dimensions, Eq. 8), averaged over the kept tokens, so the paper's
beta = 0.02 means what it means in the paper. ``CompressionConfig(kl_reduction="mean")`` also averages over the d
dimensions (d times weaker; what divico did before 2026-12). ``beta = 0`` trains without it. At every logging step
the log holds the KL, ``gap_norm_ratio`` (mean ||v_c'|| / ||v_s|| of the gap g_theta adds to a kept token) and
``sigma_mean`` (sigma's mean), each averaged over the micro-batches with images since the last log.

Trained: peft LoRA layers on the LLM decoder layers, DiViCo's encoder g_theta (all of it), and for ``deco`` the
projector; the vision tower and every base weight stay frozen.

Because it is a plain ``Trainer``, ``accelerate launch`` (multi-GPU, DeepSpeed, FSDP) works without code of ours. On a
machine without an accelerator, several processes need a launcher that starts them (``accelerate launch --multi_gpu
--num_processes 2``, or ``torchrun``); ``accelerate launch --cpu --num_processes 2`` starts one process only.
Checkpoints (``OUT/checkpoints/checkpoint-N``) hold only the trained tensors (safetensors) plus the Trainer's
optimizer / scheduler / RNG state, and a new run with the same output folder resumes from the last one.

Validation and early stopping (``TrainingConfig.eval_data_path``): every ``eval_steps`` optimiser steps (and after the
last one) the Trainer's evaluation computes ``eval_loss``, the causal-LM loss on the assistant tokens of the
validation records (the answer loss; no KL, no visual word loss; the model in eval mode, so no LoRA dropout and the
encoder's mean instead of a sample), and ``eval_kl`` beside it. A checkpoint is written at every evaluation, the
output folder receives the weights of the evaluation with the lowest ``eval_loss`` (``save_best``), and with
``early_stopping_patience`` training stops once that many evaluations in a row have not improved on the best
(``transformers.EarlyStoppingCallback``). ``OUT/learning_curve.json`` holds the train and validation points and
``OUT/training_summary.json`` the steps run, the best step and whether training stopped early.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from peft import LoraConfig
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from divico.api import apply_compression, get_runtime, unwrap_model
from divico.checkpoint import load_compressor, read_saved_config, save_compressor
from divico.config import CompressionConfig
from divico.lora import DEFAULT_LORA_TARGETS, has_lora, inject_lora, lora_target_regex
from divico.runtime import CompressionRuntime
from divico.training.callbacks import InformationLevelCallback
from divico.training.data import IGNORE_INDEX, LeftPaddingCollator, LlavaJsonDataset, pad_token_id_of

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"
TRAINABLE_INDEX_NAME = "trainable.json"
TRAINING_CONFIG_NAME = "training_config.json"
LEARNING_CURVE_NAME = "learning_curve.json"
TRAINING_SUMMARY_NAME = "training_summary.json"
#: Checkpoint interval without validation data (with it, a checkpoint is written at every evaluation).
DEFAULT_SAVE_STEPS = 500
PAPER_KEEP_RATIO = 64 / 576
#: Per-micro-batch quantities whose window means join every training-loss log entry: the KL term, the gap-to-token
#: norm ratio and sigma's mean (``GapEncoder.last_stats``), and the visual word loss.
LOGGED_MEANS = ("kl", "gap_norm_ratio", "sigma_mean", "visual_word_loss")


@dataclass
class TrainingConfig:
    """Everything one training run needs besides the model and processor.

    Parameters
    ----------
    data_path
        LLaVA-format JSON list or JSONL file (see :mod:`divico.training.data`).
    output_dir
        Where the trained parts go (``config.json``, ``compressor.safetensors``, ``lora/``), with Trainer
        checkpoints under ``checkpoints/``. It never holds the base model's weights.
    image_folder
        Folder the records' image paths are relative to (default: the data file's folder).
    compression
        Method, keep ratio, layer K and encoder. Trainable: ``divico`` (encoder ``variational`` = the paper,
        ``deterministic`` = Fig. 8 variant b, ``none`` = variant a), ``fastv`` (= variant a) and ``deco``.
    beta
        Weight of the KL term, >= 0 (paper: 0.02). The KL is the one ``compression.kl_reduction`` selects: by
        default Eq. 8 (summed over the d dimensions, averaged over kept tokens; see module docstring). Ignored by
        methods without a KL term.
    visual_word_weight
        Weight of the visual word loss, >= 0 (0: off): at every image token whose record gives ``"visual_words"``
        (:mod:`divico.training.data`), the cross-entropy of the LM head's next-token distribution against each of
        those words, weighted per token. A dense grounding signal (every visual token is a target) for teaching an
        LLM to read its visual tokens; it needs the visual tokens uncompressed at the output (e.g. DeCo at
        ``keep_ratio=1.0``).
    lora_r, lora_alpha, lora_dropout
        LoRA rank (0 disables LoRA), scaling numerator and dropout.
    lora_target_modules
        Which linear layers of the LLM's decoder layers get LoRA: a list of module-name suffixes (default
        :data:`DEFAULT_LORA_TARGETS`) or a full regex (a string) over module names. Suffixes are restricted to the
        language model's decoder layers, so the vision tower and projector never get LoRA.
    learning_rate, weight_decay, warmup, lr_scheduler, max_grad_norm
        Optimiser settings (``warmup`` < 1 is a share of the steps, >= 1 a step count).
    num_epochs, max_steps
        Length of training; ``max_steps > 0`` overrides ``num_epochs``.
    per_device_batch_size, gradient_accumulation_steps
        Samples per device per micro-step and micro-steps per optimiser step.
    bf16
        bf16 autocast (mixed precision). Trained tensors are float32 either way; without autocast the trained
        modules cast their inputs to float32 and their outputs back to the base's dtype (LoRA: peft does), so a bf16
        base also trains and generates with ``bf16=False``.
    gradient_checkpointing
        Recompute decoder-layer activations in the backward pass (divico's hooks stay outside the checkpoint).
    seed
        Seeds LoRA/encoder initialisation, data order, dropout and the encoder's sampling.
    logging_steps, save_steps, save_total_limit
        Log loss, KL, gap-to-token norm ratio and sigma's mean every ``logging_steps`` optimiser steps;
        checkpoint every ``save_steps`` (None: :data:`DEFAULT_SAVE_STEPS`, or with ``eval_data_path`` and
        ``save_best`` at every evaluation, the only interval that then works: the best evaluation's weights must
        be in a checkpoint); keep the newest ``save_total_limit`` checkpoints (None keeps all; the best one is
        kept besides).
    eval_data_path
        Validation records (LLaVA format, images relative to ``image_folder`` as for the training data), or None
        (no validation). See the module docstring: ``eval_loss`` is the answer loss without the KL term.
    eval_steps
        Validate every ``eval_steps`` optimiser steps, >= 1 (None: ``logging_steps``); also after the last step.
        Only with ``eval_data_path``.
    early_stopping_patience
        Stop when this many evaluations in a row (>= 1) have not improved on the best ``eval_loss`` so far
        (None: off, train for ``max_steps`` / ``num_epochs``). Only with ``eval_data_path``.
    early_stopping_threshold
        How much lower than the best so far an ``eval_loss`` must be to count as an improvement for the patience,
        a finite number >= 0 (the best checkpoint is still the lowest loss). Only with ``eval_data_path``.
    save_best
        With ``eval_data_path``: write the weights of the evaluation with the lowest ``eval_loss`` to
        ``output_dir`` (True) or those of the last step (False).
    dataloader_num_workers
        DataLoader worker processes.
    skip_invalid
        Leave out invalid records (the run reports how many) instead of stopping at the first one.
    resume
        Resume from the newest checkpoint in ``output_dir/checkpoints`` when there is one.
    init_from
        Warm start: the output folder of an earlier :func:`train` run (``config.json``, its trained modules and
        LoRA adapter) whose weights training starts from, with a fresh optimiser and schedule. It must have been
        trained with the same method, encoder and LoRA settings. A checkpoint being resumed takes precedence.
    report_to
        ``"auto"`` (TensorBoard when installed, else nothing), ``"none"``, or Trainer integrations by name.
    show_progress
        Show the Trainer's progress bar.
    log_information_level
        For methods with a gap encoder (DiViCo): add ``information_level`` (Eq. 16, the disentanglement of the
        gap vectors g_theta produced since the last log; :class:`divico.training.callbacks.InformationLevelCallback`)
        to every training-loss log entry.
    """

    data_path: str | Path
    output_dir: str | Path
    image_folder: str | Path | None = None
    compression: CompressionConfig = field(
        default_factory=lambda: CompressionConfig(method="divico", keep_ratio=PAPER_KEEP_RATIO, layer=2)
    )
    beta: float = 0.02
    visual_word_weight: float = 0.0
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str | None = None
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    num_epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int | None = None
    save_total_limit: int | None = 2
    dataloader_num_workers: int = 0
    skip_invalid: bool = False
    resume: bool = True
    init_from: str | Path | None = None
    report_to: str | list[str] = "auto"
    show_progress: bool = True
    eval_data_path: str | Path | None = None
    eval_steps: int | None = None
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    save_best: bool = True
    log_information_level: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.compression, CompressionConfig):
            raise TypeError(f"compression must be a divico.CompressionConfig, got {type(self.compression).__name__}.")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a finite number >= 0 (paper: 0.02), got {self.beta!r}.")
        weight = self.visual_word_weight
        if not (isinstance(weight, (int, float)) and weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"visual_word_weight must be a finite number >= 0 (0: off), got {weight!r}.")
        _require_int("lora_r", self.lora_r, minimum=0)
        if self.lora_r and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if not self.num_epochs > 0:
            raise ValueError(f"num_epochs must be > 0, got {self.num_epochs!r}.")
        _require_int("max_steps", self.max_steps, minimum=-1)
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (use num_epochs) or >= 1, got 0.")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps"):
            _require_int(name, getattr(self, name), minimum=1)
        for name in ("save_steps", "eval_steps", "early_stopping_patience"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=1)
        threshold = self.early_stopping_threshold
        if isinstance(threshold, bool) or not (
            isinstance(threshold, (int, float)) and threshold >= 0 and math.isfinite(threshold)
        ):
            raise ValueError(f"early_stopping_threshold must be a finite number >= 0, got {threshold!r}.")
        if self.eval_data_path is None:
            given = {"eval_steps": self.eval_steps, "early_stopping_patience": self.early_stopping_patience}
            given["early_stopping_threshold"] = threshold or None
            for name, value in given.items():
                if value is not None:
                    raise ValueError(f"{name}={value!r} needs validation records: set eval_data_path.")
        elif self.save_best and self.save_steps is not None and self.save_steps != self.eval_interval:
            raise ValueError(
                f"save_steps must be None or equal to eval_steps ({self.eval_interval}) with eval_data_path and "
                f"save_best: the best evaluation's weights must be in a checkpoint; got save_steps={self.save_steps}."
            )
        _require_int("dataloader_num_workers", self.dataloader_num_workers, minimum=0)
        if self.save_total_limit is not None:
            _require_int("save_total_limit", self.save_total_limit, minimum=1)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 (a share of steps if < 1, else a step count), got {self.warmup!r}.")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise FileNotFoundError(
                f"init_from={str(self.init_from)!r} is not the output folder of a divico training run (no config.json)."
            )

    @property
    def eval_interval(self) -> int | None:
        """Optimiser steps between evaluations (None without ``eval_data_path``)."""
        if self.eval_data_path is None:
            return None
        return self.eval_steps if self.eval_steps is not None else self.logging_steps

    @property
    def checkpoint_interval(self) -> int:
        """Optimiser steps between checkpoints (see ``save_steps``)."""
        if self.save_steps is not None:
            return self.save_steps
        if self.eval_data_path is not None and self.save_best:
            assert self.eval_interval is not None
            return self.eval_interval
        return DEFAULT_SAVE_STEPS

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["compression"] = self.compression.to_dict()
        for key in ("data_path", "output_dir", "image_folder", "init_from", "eval_data_path"):
            data[key] = None if data[key] is None else str(data[key])
        return data


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    output_dir
        Folder with the trained parts (load with ``divico.load_compressor(base_model, output_dir)``).
    global_step
        Optimiser steps done in total (including those before a resume).
    train_loss
        Mean total loss of this run's steps (as the Trainer reports it).
    num_samples, num_skipped
        Records used and records skipped as invalid.
    resumed_from
        Checkpoint the run resumed from, or None.
    trainable_parameters
        Number of trained scalars.
    log_history
        The Trainer's log entries (``loss``, ``kl``, ``gap_norm_ratio``, ``sigma_mean``, ``learning_rate``, ...;
        with validation also ``eval_loss``, ``eval_kl``).
    best_step, best_eval_loss
        With validation: the step of the evaluation with the lowest ``eval_loss`` and that loss (else None).
    stopped_early
        Whether early stopping ended training before its last step.
    saved_step
        The step whose weights ``output_dir`` holds (``best_step`` with ``save_best``, else ``global_step``).
    learning_curve
        One entry per logged or evaluated step (:func:`learning_curve`), as in ``learning_curve.json``.
    """

    output_dir: Path
    global_step: int
    train_loss: float
    num_samples: int
    num_skipped: int
    resumed_from: str | None
    trainable_parameters: int
    log_history: list[dict[str, Any]]
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_early: bool = False
    saved_step: int | None = None
    learning_curve: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps_run(self) -> int:
        """Optimiser steps done in total (``global_step``)."""
        return self.global_step


# --- model preparation -------------------------------------------------------------------------------------------
def prepare_model_for_training(model: nn.Module, config: TrainingConfig) -> CompressionRuntime:
    """Freeze the model, add LoRA to its decoder layers, apply compression and unfreeze what the method trains.

    LoRA is injected before the compression hooks so that layer K-1's scoring reads the LoRA-adapted q/k.

    Returns
    -------
    CompressionRuntime
        The runtime of the compressed model (its ``method.trainable_modules`` are trained).

    Raises
    ------
    ValueError
        If the model is already compressed, or nothing would be trained (e.g. ``fastv`` with ``lora_r=0``).
    """
    base = unwrap_model(model)
    if get_runtime(base) is not None:
        raise ValueError(
            "train() applies config.compression itself; pass an uncompressed model (divico.remove_compression)."
        )
    base.requires_grad_(False)
    if config.lora_r > 0:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_target_regex(base, config.lora_target_modules),
            bias="none",
        )
        inject_lora(base, lora)
    apply_compression(base, config.compression)
    runtime = get_runtime(base)
    assert runtime is not None
    for name, parameter in base.named_parameters():
        parameter.requires_grad_("lora_" in name)
    for module in runtime.method.trainable_modules(runtime.adapter, runtime.compressor).values():
        module.requires_grad_(True)
    trained = [p for p in base.parameters() if p.requires_grad]
    if not trained:
        raise ValueError(
            f"Nothing to train: method={config.compression.method!r} (encoder={config.compression.encoder!r}) has "
            f"no trainable module and lora_r={config.lora_r}; set lora_r >= 1."
        )
    # Optimiser state and updates need float32 even when the frozen base runs in bf16.
    for parameter in trained:
        if parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    # ... and without autocast a float32 module cannot take the base's bf16 activations: cast at its boundary.
    for module in runtime.method.trainable_modules(runtime.adapter, runtime.compressor).values():
        run_in_own_dtype(module)
    if hasattr(base.config, "use_cache"):
        base.config.use_cache = False
    return runtime


def _first_floating(values: Any) -> torch.Tensor | None:
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast_floating(item, dtype) for item in value)
    if isinstance(value, list):
        return [_cast_floating(item, dtype) for item in value]
    return value


def run_in_own_dtype(module: nn.Module) -> None:
    """Let ``module`` run in its parameters' dtype inside a model of another dtype (idempotent, in place).

    A forward pre-hook casts floating-point inputs to the dtype of the module's first floating parameter (read at
    every call, so a later ``model.to(dtype)`` is followed), and a forward hook casts floating outputs back to the
    dtype of the first floating input. Under autocast the products still run in the autocast dtype. This is how a
    float32 trained projector runs on a bf16 base with ``bf16=False``, in training and at inference afterwards.
    """
    if getattr(module, "_divico_runs_in_own_dtype", False):
        return
    parameter = next((p for p in module.parameters() if p.is_floating_point()), None)
    if parameter is None:
        return
    arrived: list[torch.dtype] = []  # dtype of the current call's input, from the pre-hook to the hook

    def cast_inputs(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        first = _first_floating([*args, *kwargs.values()])
        arrived.append(first.dtype if first is not None else parameter.dtype)
        dtype = next(p for p in module.parameters() if p.is_floating_point()).dtype
        return _cast_floating(args, dtype), {key: _cast_floating(value, dtype) for key, value in kwargs.items()}

    def cast_outputs(_: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        dtype = arrived.pop() if arrived else parameter.dtype
        return _cast_floating(output, dtype)

    module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    module.register_forward_hook(cast_outputs, with_kwargs=True, always_call=True)
    module._divico_runs_in_own_dtype = True


def warm_start(model: nn.Module, directory: str | Path) -> None:
    """Copy an earlier run's trained weights (trained modules and LoRA) into a model prepared for training.

    The new run's compression config governs: the earlier run may have used another keep ratio, layer or
    ``kl_reduction`` (e.g. DeCo at ``keep_ratio=1.0`` as the testbed's stage 2, or a checkpoint from before
    ``kl_reduction`` existed, read as ``"mean"``); only its weights are taken.

    Raises
    ------
    ValueError
        If the run was trained with another method or encoder, or its LoRA adapter has other layers or rank
        (the messages of :func:`divico.checkpoint.load_compressor`).
    """
    # load_compressor leaves LoRA layers untouched when the run has no adapter: that would be a silent cold start.
    if has_lora(model) and not read_saved_config(directory).get("lora"):
        raise ValueError(f"init_from={str(directory)!r} has no LoRA adapter, but this run trains LoRA layers.")
    load_compressor(model, directory, override_config=True)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)


def visual_word_loss(
    logits: torch.Tensor, visual_mask: torch.Tensor, word_ids: torch.Tensor, word_weights: torch.Tensor
) -> torch.Tensor:
    """Weighted cross-entropy of the LM head at image tokens against the words each token shows.

    Parameters
    ----------
    logits : torch.Tensor
        Shape (B, L, V), the model's output over the full (uncompressed) sequence.
    visual_mask : torch.Tensor
        Shape (B, L) bool, True at image tokens of the input (``ModelAdapter.visual_token_mask``).
    word_ids : torch.Tensor
        Shape (P, W) long, P = number of image tokens in the batch (row-major), -100-padded word token ids.
    word_weights : torch.Tensor
        Shape (P,), weight of each image token (0: no target).

    Returns
    -------
    torch.Tensor
        Scalar: sum over tokens of weight x mean word NLL, divided by the sum of weights (0 when all are 0).

    Raises
    ------
    ValueError
        If the output sequence is shorter than the input (visual tokens were compressed) or P does not match.
    """
    if logits.shape[1] != visual_mask.shape[1]:
        raise ValueError(
            f"The visual word loss needs every visual token at the output, but the output has {logits.shape[1]} "
            f"positions for {visual_mask.shape[1]} inputs; train it uncompressed (e.g. DeCo at keep_ratio=1.0)."
        )
    visual = int(visual_mask.sum())
    if visual != word_ids.shape[0]:
        raise ValueError(f"{word_ids.shape[0]} visual word targets for {visual} visual tokens in the batch.")
    weights = word_weights.to(logits.device, torch.float32)
    chosen = weights > 0
    if not bool(chosen.any()):
        return logits.new_zeros((), dtype=torch.float32)
    log_probs = torch.log_softmax(logits[visual_mask][chosen].float(), dim=-1)  # (P', V)
    ids = word_ids.to(logits.device)[chosen]
    valid = ids != IGNORE_INDEX
    nll = -log_probs.gather(-1, ids.clamp_min(0)) * valid  # (P', W)
    per_token = nll.sum(-1) / valid.sum(-1).clamp_min(1)
    return (per_token * weights[chosen]).sum() / weights[chosen].sum()


# --- Trainer -----------------------------------------------------------------------------------------------------
class DiViCoTrainer(Trainer):
    """``Trainer`` whose loss adds ``beta * KL`` and whose checkpoints hold only the trained tensors.

    In evaluation (inside :meth:`evaluation_loop`) the loss is the causal-LM loss alone, and the means of
    :data:`LOGGED_MEANS` over the evaluation join its metrics as ``eval_kl``, ``eval_gap_norm_ratio``, ...

    Parameters
    ----------
    runtime
        The compression runtime of the model being trained (its last report carries the KL of a forward).
    beta
        KL weight.
    *args, **kwargs
        As for ``transformers.Trainer``.
    """

    def __init__(
        self, *args: Any, runtime: CompressionRuntime, beta: float, visual_word_weight: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.divico_runtime = runtime
        self.beta = float(beta)
        self.visual_word_weight = float(visual_word_weight)
        self._window_sums = dict.fromkeys(LOGGED_MEANS, 0.0)
        self._window_counts = dict.fromkeys(LOGGED_MEANS, 0)
        self._eval_sums = dict.fromkeys(LOGGED_MEANS, 0.0)
        self._eval_counts = dict.fromkeys(LOGGED_MEANS, 0)
        self._evaluating = False

    def record(self, name: str, value: float, evaluating: bool = False) -> None:
        """Add one micro-batch's value of a logged mean (one of :data:`LOGGED_MEANS`) to the current window
        (of the evaluation in progress when ``evaluating``)."""
        sums, counts = (self._eval_sums, self._eval_counts) if evaluating else (self._window_sums, self._window_counts)
        sums[name] += float(value)
        counts[name] += 1

    def _window_means(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Means of a window over every process (sums and counts reduced together); unproduced ones left out."""
        totals = torch.tensor(
            [[sums[name], float(counts[name])] for name in LOGGED_MEANS], dtype=torch.float64, device=self.args.device
        )
        if self.accelerator.num_processes > 1:  # every process logs / evaluates at the same steps: a collective is safe
            totals = self.accelerator.reduce(totals, reduction="sum")
        return {name: round(total / count, 6) for name, (total, count) in zip(LOGGED_MEANS, totals.tolist()) if count}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Causal-LM loss (as ``Trainer`` computes it) + beta * KL + visual_word_weight * visual word loss.

        In the Trainer's evaluation only the causal-LM loss: the validation answer loss.
        """
        evaluating = self._evaluating
        runtime = self.divico_runtime
        runtime.report = None  # a batch without images must not reuse an older KL or statistics
        if runtime.compressor is not None and hasattr(runtime.compressor, "last_stats"):
            runtime.compressor.last_stats = {}
        inputs = dict(inputs)
        word_ids, word_weights = inputs.pop("visual_word_ids", None), inputs.pop("visual_word_weights", None)
        loss, outputs = super().compute_loss(
            model, {**inputs, "use_cache": False}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        # The LM loss above is already divided over the accumulated batch when normalised by num_items_in_batch;
        # the KL and visual word terms are per-micro-batch means, so give them the same share.
        scaled_for_accumulation = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        steps = self.current_gradient_accumulation_steps if scaled_for_accumulation else 1
        if word_ids is not None and word_weights is not None and self.visual_word_weight > 0 and not evaluating:
            visual_mask = self.divico_runtime.adapter.visual_token_mask(inputs["input_ids"], None)
            word_loss = visual_word_loss(outputs.logits, visual_mask, word_ids, word_weights)
            self.record("visual_word_loss", float(word_loss.detach()))
            loss = loss + self.visual_word_weight * word_loss.to(loss.dtype) / steps
        report = self.divico_runtime.report
        kl = report.kl if report is not None else None
        if kl is not None:
            self.record("kl", float(kl.detach()), evaluating)
            if self.beta > 0 and not evaluating:
                loss = loss + self.beta * kl.to(loss.dtype) / steps
        if report is not None:
            for name, value in getattr(runtime.compressor, "last_stats", {}).items():
                if name in self._window_sums:
                    self.record(name, float(value), evaluating)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add to every training-loss entry the means since the last log of :data:`LOGGED_MEANS` (and beta with a KL).

        Each is averaged over the micro-batches that produced it (of every process: sums and counts are reduced
        together, so a process whose micro-batches were all text-only takes part without skewing the mean); a
        quantity no micro-batch produced is left out.
        """
        if "loss" in logs:
            logs.update(self._window_means(self._window_sums, self._window_counts))
            if "kl" in logs:
                logs["beta"] = self.beta
            self._window_sums = dict.fromkeys(LOGGED_MEANS, 0.0)
            self._window_counts = dict.fromkeys(LOGGED_MEANS, 0)
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """The Trainer's evaluation loop, with the evaluation's means of :data:`LOGGED_MEANS` added to its metrics.

        It leaves torch's random state as it found it (a DataLoader draws its base seed from the global generator),
        so validating does not change what training samples: a run with validation trains the same weights.
        """
        self._eval_sums = dict.fromkeys(LOGGED_MEANS, 0.0)
        self._eval_counts = dict.fromkeys(LOGGED_MEANS, 0)
        device = self.args.device
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        self._evaluating = True
        try:
            with torch.random.fork_rng(devices=cuda_devices):
                output = super().evaluation_loop(
                    dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
                )
        finally:
            self._evaluating = False
        for name, mean in self._window_means(self._eval_sums, self._eval_counts).items():
            output.metrics[f"{metric_key_prefix}_{name}"] = mean
        return output

    def _load_best_model(self) -> None:
        """Load the best checkpoint's trained tensors (``load_best_model_at_end``; the checkpoints are ours)."""
        logger.info("Loading the best checkpoint %s (eval_loss %s).", self.state.best_model_checkpoint,
                    self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write only the trained tensors (safetensors) and their names (JSON); no base weights, no pickle."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        names = trainable_parameter_names(self.model)
        if state_dict is None:
            parameters = dict(self.model.named_parameters())
            tensors = {name: parameters[name].detach().contiguous().cpu() for name in names}
        else:
            tensors = {name: state_dict[name].detach().contiguous().cpu() for name in names if name in state_dict}
        save_file(tensors, os.path.join(output_dir, TRAINABLE_WEIGHTS_NAME), metadata={"format": "pt"})
        Path(output_dir, TRAINABLE_INDEX_NAME).write_text(json.dumps({"parameters": sorted(tensors)}, indent=2))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the trained tensors of a checkpoint written by :meth:`_save`."""
        model = model if model is not None else self.model
        path = os.path.join(resume_from_checkpoint, TRAINABLE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"Checkpoint {resume_from_checkpoint} has no {TRAINABLE_WEIGHTS_NAME}.")
        tensors = load_file(path)
        expected = set(trainable_parameter_names(model))
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint} was written for other trained parameters (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); resume with the same method, encoder and LoRA settings."
            )
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                parameters[name].copy_(tensor.to(parameters[name].device))


def _report_to(setting: str | list[str]) -> str | list[str]:
    if setting == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else "none"
    return setting


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """transformers >= 5.2x renamed gradient_checkpointing to activation_checkpointing; support both."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    arguments: dict[str, Any] = {key: enabled}
    if enabled:
        # Non-reentrant checkpointing lets gradients reach LoRA weights although the frozen embeddings' output
        # does not require grad.
        arguments[f"{key}_kwargs"] = {"use_reentrant": False}
    return arguments


def _train_on_cpu(config: TrainingConfig) -> bool:
    """Whether to tell the Trainer explicitly to train on the CPU.

    transformers refuses bf16 without a bf16 accelerator unless told so, and without ``use_cpu`` a run started as
    several processes on a machine without an accelerator (``accelerate launch --multi_gpu --num_processes 2``,
    ``torchrun``) sets up no process group: every process would train alone on all the data and write the same
    output folder.
    """
    no_accelerator = not torch.cuda.is_available() and not is_torch_xla_available()
    if config.bf16 and not is_torch_bf16_gpu_available() and not is_torch_xla_available():
        return True
    launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return no_accelerator and (launched_distributed or _env_flag("ACCELERATE_USE_CPU"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def build_training_arguments(config: TrainingConfig) -> TrainingArguments:
    """The ``TrainingArguments`` for ``config`` (output under ``output_dir/checkpoints``)."""

    validation: dict[str, Any] = {}
    if config.eval_data_path is not None:
        validation = {
            "eval_strategy": "steps",
            "eval_steps": config.eval_interval,
            "per_device_eval_batch_size": config.per_device_batch_size,
            "prediction_loss_only": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
            "load_best_model_at_end": config.save_best,
            # A resumed run continues the early-stopping count where the checkpoint left it.
            "restore_callback_states_from_checkpoint": True,
        }
    return TrainingArguments(
        output_dir=str(Path(config.output_dir) / CHECKPOINT_SUBDIR),
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup,
        lr_scheduler_type=config.lr_scheduler,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        bf16=config.bf16,
        use_cpu=_train_on_cpu(config),
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.checkpoint_interval,
        save_total_limit=config.save_total_limit,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        # A text-only micro-batch runs neither g_theta nor the projector: under DDP their gradients would never be
        # ready on that process and the all-reduce would wait for ever (the Trainer's own default turns the search
        # off with gradient checkpointing).
        ddp_find_unused_parameters=True,
        report_to=_report_to(config.report_to),
        disable_tqdm=not config.show_progress,
        **_checkpointing_arguments(config.gradient_checkpointing),
        **validation,
    )


def learning_curve(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The train and validation points of a Trainer log, one entry per step, in step order.

    Parameters
    ----------
    log_history
        ``TrainerState.log_history`` (what :attr:`TrainResult.log_history` holds).

    Returns
    -------
    list of dict
        ``{"step", "train_loss", "kl", "eval_loss", "eval_kl", "eval_gap_norm_ratio", "eval_sigma_mean"}``; None
        where that step logged no such value (``train_loss`` is the total loss logged at the step, the mean since
        the previous log; ``kl`` its KL term's mean; ``eval_loss`` the validation answer loss; ``eval_kl``,
        ``eval_gap_norm_ratio`` and ``eval_sigma_mean`` the validation KL, mean ||v_c'|| / ||v_s|| and mean sigma
        of a variational encoder).
    """
    points: dict[int, dict[str, Any]] = {}
    sources = {"train_loss": "loss", "kl": "kl", "eval_loss": "eval_loss", "eval_kl": "eval_kl",
               "eval_gap_norm_ratio": "eval_gap_norm_ratio", "eval_sigma_mean": "eval_sigma_mean"}
    for entry in log_history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue  # the run's final summary (train_runtime, train_loss, ...)
        step = int(entry["step"])
        point = points.setdefault(step, {"step": step, **dict.fromkeys(sources)})
        for key, source in sources.items():
            if source in entry and ("eval_loss" in entry) == key.startswith("eval_"):
                point[key] = float(entry[source])
    return [points[step] for step in sorted(points)]


def last_checkpoint(config: TrainingConfig) -> str | None:
    """Newest ``checkpoint-N`` folder of a previous run in ``output_dir/checkpoints`` (None if none)."""

    folder = Path(config.output_dir) / CHECKPOINT_SUBDIR
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def train(
    model: nn.Module,
    processor: Any,
    config: TrainingConfig,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Fine-tune a vision-language model with visual-token compression (Algorithm 1) and save the trained parts.

    Parameters
    ----------
    model
        An uncompressed transformers LVLM (e.g. ``LlavaForConditionalGeneration``), float32 or bf16 weights.
        It is modified in place: LoRA layers and compression hooks are added.
    processor
        Its processor (chat template, fast tokenizer, image processor).
    config
        Data, compression, loss and optimisation settings.
    callbacks
        Extra ``transformers.TrainerCallback`` objects.

    Returns
    -------
    TrainResult
        Where the trained parts are and how the run went. ``output_dir`` also receives
        :data:`LEARNING_CURVE_NAME` (:func:`learning_curve`) and :data:`TRAINING_SUMMARY_NAME` (steps run,
        best step and eval loss, whether training stopped early, the step whose weights were saved).

    Raises
    ------
    divico.training.DataError
        On an invalid record (unless ``config.skip_invalid``).
    ValueError
        On an already-compressed model or a configuration that trains nothing.
    """

    if not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a divico.training.TrainingConfig, got {type(config).__name__}.")
    set_seed(config.seed)
    dataset = LlavaJsonDataset(config.data_path, processor, config.image_folder, skip_invalid=config.skip_invalid)
    if dataset.skipped:
        print(f"divico train: skipped {len(dataset.skipped)} invalid record(s); training on {len(dataset)}.")
    eval_dataset = None
    if config.eval_data_path is not None:
        eval_dataset = LlavaJsonDataset(
            config.eval_data_path, processor, config.image_folder, skip_invalid=config.skip_invalid
        )
        if len(eval_dataset) == 0:
            raise ValueError(f"eval_data_path={str(config.eval_data_path)!r} holds no valid record.")
    callbacks = list(callbacks or [])
    if config.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience, config.early_stopping_threshold))
    runtime = prepare_model_for_training(model, config)
    base = unwrap_model(model)
    if config.init_from is not None:
        warm_start(base, config.init_from)
    trainer = DiViCoTrainer(
        model=base,
        args=build_training_arguments(config),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=LeftPaddingCollator(pad_token_id_of(processor)),
        callbacks=callbacks,
        runtime=runtime,
        beta=config.beta,
        visual_word_weight=config.visual_word_weight,
    )
    if config.log_information_level and InformationLevelCallback.applies_to(runtime.compressor):
        # First in line, so the reporting callbacks (TensorBoard, the progress bar) see the value it adds.
        trainer.callback_handler.callbacks.insert(0, InformationLevelCallback(runtime.compressor))
    resume_from = last_checkpoint(config) if config.resume else None
    if resume_from is not None:
        print(f"divico train: resuming from {resume_from}")
    output = trainer.train(resume_from_checkpoint=resume_from)
    state = trainer.state
    evaluated = eval_dataset is not None and state.best_global_step is not None
    best_step = int(state.best_global_step) if evaluated else None
    best_loss = float(state.best_metric) if evaluated and state.best_metric is not None else None
    restored_best = trainer.args.load_best_model_at_end and state.best_model_checkpoint is not None
    saved_step = best_step if restored_best else int(state.global_step)
    stopped_early = config.early_stopping_patience is not None and state.global_step < state.max_steps
    curve = learning_curve(state.log_history)
    out = Path(config.output_dir)
    if trainer.args.should_save:
        save_compressor(base, out)
        (out / TRAINING_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        summary = {
            "steps_run": int(state.global_step), "max_steps": int(state.max_steps), "stopped_early": stopped_early,
            "best_step": best_step, "best_eval_loss": best_loss, "saved_step": saved_step,
            "eval_steps": config.eval_interval, "early_stopping_patience": config.early_stopping_patience,
            "early_stopping_threshold": config.early_stopping_threshold, "num_samples": len(dataset),
            "num_eval_samples": None if eval_dataset is None else len(eval_dataset),
        }
        (out / TRAINING_SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        (out / LEARNING_CURVE_NAME).write_text(json.dumps({"best_step": best_step, "points": curve}, indent=2))
    return TrainResult(
        output_dir=out,
        global_step=int(trainer.state.global_step),
        train_loss=float(output.training_loss),
        num_samples=len(dataset),
        num_skipped=len(dataset.skipped),
        resumed_from=resume_from,
        trainable_parameters=sum(p.numel() for p in base.parameters() if p.requires_grad),
        log_history=list(state.log_history),
        best_step=best_step,
        best_eval_loss=best_loss,
        stopped_early=stopped_early,
        saved_step=saved_step,
        learning_curve=curve,
    )
