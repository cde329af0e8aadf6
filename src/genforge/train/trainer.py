"""The training loop: pretraining today, and the loop fine-tuning will reuse.

One optimizer step = `grad_accum` micro-batches, each forward/backward, their losses
weighted by their share of the step's target tokens so that accumulation equals one large
batch; then global-norm clipping, AdamW and the warmup-cosine schedule (see `optim.py`).
Checkpoints hold everything a step depends on (weights, optimizer, scheduler, sampler
position, RNG states), so `resume=True` continues the same run bit for bit on CPU.
Gradient checkpointing (Chen et al. 2016) recomputes each block's activations in backward.
MFU (model FLOPs utilisation, Chowdhery et al. 2022) uses the 6 * parameters FLOPs per token
estimate of Kaplan et al. 2020.

The model stops at its final hidden states and the LM head is applied inside the loss,
slice by slice (`fused_linear_cross_entropy`, after Wijmans et al. 2024), so the step never
holds the (tokens x vocabulary) logits; under FSDP, whose parameters are whole only inside the
sharded forward, the model computes the logits and the unfused loss scores them.

Knowledge distillation (Hinton, Vinyals & Dean 2015): given a frozen `teacher` sharing the
vocabulary, a decoder's step loss becomes alpha * KD + (1 - alpha) * cross-entropy, the KD term
a divergence between the teacher's and the student's next-token distributions at a
temperature (`losses.distillation_loss`; forward KL, reverse KL, total variation distance as in
DistillSpec, Zhou et al. 2024, or GKD's generalized JSD, Agarwal et al. 2024). The teacher runs in
eval mode without gradients and is no part of the checkpoints.

Decoders train on the causal LM objective; a BERT encoder with a masked-LM head trains on
masked LM (Devlin et al. 2019), its batches corrupted by `mask_tokens` with a generator
seeded by (seed, step, micro-batch), so the masks need no saved state to resume exactly.

An `objective` replaces the token-level loss for trainers built on this loop (the preference
trainer of `genforge.align`): its batches are dicts of tensors with one row per example, the
step's loss is the mean over the step's examples (`StepObjective.weight`), and the rest of the
step (accumulation, clipping, schedule, checkpoints, resume, metrics) is this loop's.

A `privacy` seam (`GradientPrivacy`; DP-SGD, Abadi et al. 2016, is
`genforge.safety.privacy.DPSGD`) replaces how a step draws its batch and makes its gradient:
per-example gradients, clipped and noised, in place of the batch's backward and the global
clipping; the optimizer, schedule, checkpoints (which carry its accountant) and metrics stay
this loop's.

Under `torchrun` (see `distributed.py`) every rank draws the same global batch from the same
sampler and trains on its own contiguous slice; each rank's loss is its share of the global
token sum, scaled by the world size because DDP/FSDP average gradients, so the step equals
the single-process step on the whole batch. Rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from safetensors.torch import save_model as save_weights

from ..atomic import atomic_path, atomic_write_text, staged_directory
from ..checkpoint import save_model
from ..model import Transformer, dropped_token_share
from ..onednn import use_onednn
from ..ops.hooks import publish_metrics
from .data import ShuffleSampler, TokenDataset
from .distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    broadcast_object,
    no_gradient_sync,
    rank_slice,
    wrap_model,
)
from .exposure import DECAYS as SCHEDULED_SAMPLING_DECAYS
from .exposure import mix_in_predictions, own_token_probability
from .losses import (
    DISTILLATION_KINDS,
    FUSED_CHUNK_ELEMENTS,
    IGNORE_INDEX,
    causal_lm_loss,
    count_masked_targets,
    count_target_tokens,
    distillation_loss,
    fused_linear_cross_entropy,
    mask_tokens,
    masked_lm_loss,
    moe_auxiliary_loss,
    moe_router_z_loss,
    shift_labels,
)
from .optim import build_optimizer, build_scheduler, clip_gradients

PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_FILES = ("model.safetensors", "trainer_state.pt", "state.json")
# Settings that decide which data each step sees; a resume must not change them.
_RESUME_INVARIANTS = ("batch_size", "grad_accum", "seed", "seq_len")
_MASKED_RESUME_INVARIANTS = ("mlm_probability", "mask_token_id")


class TrainError(ValueError):
    """A training run that cannot start or resume as asked."""


@dataclass
class TrainConfig:
    """Everything a run's numbers depend on, plus where its files go."""

    out_dir: str | Path
    max_steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    # Scheduled sampling (train/exposure.py): the share of input tokens replaced by the model's own
    # predictions rises from 0 to this by the last step, along `scheduled_sampling_decay`.
    scheduled_sampling: float = 0.0
    scheduled_sampling_decay: str = "linear"
    aux_loss_coef: float = 0.01  # MoE load balancing; Switch Transformer uses 1e-2
    eval_every: int = 0  # 0: evaluate only at the end (when there is validation data)
    eval_batches: int = 4
    save_every: int = 0  # 0: checkpoint only at the end
    seed: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    peak_flops: float | None = None  # the device's peak FLOP/s, for MFU; None: MFU not shown
    progress: bool = True
    export: bool = True  # write the final model as a Hugging Face directory
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    fsdp_cpu_offload: bool = False  # with fsdp: keep the shards and the optimizer state in host memory
    # Masked LM (encoders): the share of tokens chosen, the [MASK] id (default: the
    # tokenizer's), and ids never chosen (default: the tokenizer's special tokens).
    mlm_probability: float = 0.15
    mask_token_id: int | None = None
    special_token_ids: tuple[int, ...] | None = None
    # Knowledge distillation, used only when the Trainer is given a teacher: the loss is
    # distill_alpha * KD + (1 - distill_alpha) * cross-entropy (see `losses.distillation_loss`;
    # distill_beta is the generalized JSD's mixing weight).
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0
    distill_kind: str = "forward_kl"
    distill_beta: float = 0.5
    seq_len: int | None = field(default=None, init=False)  # taken from the dataset

    def validate(self) -> None:
        positive = {
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "eval_batches": self.eval_batches,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise TrainError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise TrainError(f"{name} must be an integer >= 0, got {value!r}")
        if self.warmup_steps > self.max_steps:
            raise TrainError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision {self.precision!r} is not supported; accepted: {', '.join(PRECISIONS)}")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise TrainError("fsdp_cpu_offload keeps FSDP's shards in host memory; it needs fsdp=True")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise TrainError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise TrainError(f"peak_flops must be > 0 or None, got {self.peak_flops}")
        if not 0.0 <= self.scheduled_sampling <= 1.0:
            raise TrainError(f"scheduled_sampling must be in [0, 1], got {self.scheduled_sampling}")
        if self.scheduled_sampling_decay not in SCHEDULED_SAMPLING_DECAYS:
            raise TrainError(
                f"scheduled_sampling_decay {self.scheduled_sampling_decay!r} is not supported; accepted: "
                + ", ".join(SCHEDULED_SAMPLING_DECAYS)
            )
        if not 0.0 < self.mlm_probability < 1.0:
            raise TrainError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not isinstance(self.distill_alpha, (int, float)) or not 0.0 <= self.distill_alpha <= 1.0:
            raise TrainError(
                f"distill_alpha (the soft-target share of the loss) must be in [0, 1], got {self.distill_alpha!r}"
            )
        if (
            not isinstance(self.distill_temperature, (int, float))
            or not math.isfinite(self.distill_temperature)
            or self.distill_temperature <= 0
        ):
            raise TrainError(f"distill_temperature must be a finite number > 0, got {self.distill_temperature!r}")
        if self.distill_kind not in DISTILLATION_KINDS:
            raise TrainError(
                f"distill_kind {self.distill_kind!r} is not supported; accepted: {', '.join(DISTILLATION_KINDS)}"
            )
        if not isinstance(self.distill_beta, (int, float)) or not 0.0 < self.distill_beta < 1.0:
            raise TrainError(
                f"distill_beta (the generalized JSD's mixing weight) must be in (0, 1), got {self.distill_beta!r}"
            )


class StepObjective(Protocol):
    """A training objective other than next-token cross-entropy (see the module doc).

    Batches (from the data's `batch(indices)`) are dicts of tensors whose first dimension is
    the example, so the loop can split them over ranks and move them to the device.
    """

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many examples `batch` holds: the step's loss is averaged over the step's total."""
        ...

    def micro_loss(
        self, engine: torch.nn.Module, model: torch.nn.Module, batch: dict[str, torch.Tensor], total_weight: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step's loss (its summed loss / `total_weight`), computed
        through `engine` (the model or its DDP wrapper; `model` is the plain module, for its
        head), and its shares of the metrics to log, which the loop adds up over micro-batches
        and ranks."""
        ...

    def evaluate(self, model: torch.nn.Module, data, batch_size: int) -> dict[str, float]:
        """Held-out metrics of `model` (in eval mode, without gradients) over all of `data`,
        "val_loss" among them."""
        ...


class GradientPrivacy(Protocol):
    """A private way to make each step's gradient (see the module doc): it draws the step's
    batches and leaves the step's gradient in the trainable parameters' `.grad`."""

    def check(self, trainer: Trainer) -> None:
        """Raise a ValueError if this trainer's setup is not covered, before any work."""
        ...

    def draw_batches(self, trainer: Trainer) -> list:
        """The step's batches (each from `trainer.train_data.batch`), the same on every rank."""
        ...

    def backward(self, trainer: Trainer, batches: list) -> tuple[float, int, dict[str, float]]:
        """Set `.grad` for the step: (its loss, its input tokens, metrics to log)."""
        ...

    def state_dict(self) -> dict:
        """What a resumed run needs (JSON-serialisable): the accountant's history."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def report(self) -> dict:
        """The guarantee so far, for the run's result."""
        ...


@dataclass
class TrainResult:
    step: int
    losses: list[tuple[int, float]]  # (step, training loss) for every step this call ran
    evals: list[dict]  # {"step", "val_loss", "val_ppl"}
    export_dir: Path | None
    privacy: dict | None = None  # the `privacy` seam's report (DP-SGD: epsilon, delta, ...)


class Trainer:
    """Train a genforge `Transformer` on a `TokenDataset`: a decoder on the causal LM
    objective, an encoder built with `masked_lm_head=True` on masked LM (the tokenizer, or
    `config.mask_token_id`, gives the [MASK] id).

    Files under `config.out_dir`: `checkpoints/step-XXXXXXXX/` (+ `checkpoints/latest.json`),
    `metrics.jsonl` (one JSON object per step and per evaluation), `loss_curve.png`, and at
    the end `model/`, a Hugging Face directory with the tokenizer when one is given.

    `teacher`: a frozen decoder over the same vocabulary whose next-token distributions the
    model is distilled towards (knowledge distillation, see `TrainConfig.distill_*`). It is put
    in eval mode with its parameters frozen, runs without gradients, and is never saved;
    `evaluate()` still reports the plain validation loss.

    `regularizer`: a function of the model whose value is added to each step's loss (a
    fine-tuning run's elastic weight consolidation, `finetune.continual.EWCPenalty`).

    `distributed`: this process's place in a torchrun job (default: the process group already
    joined, see `distributed.init_distributed`, else a single process). Every rank builds the
    same Trainer; rank 0 writes the files.

    `objective`: a `StepObjective` that replaces the token-level loss and evaluation (not with a
    teacher, a masked-LM encoder or FSDP).

    `privacy`: a `GradientPrivacy` (DP-SGD) that draws each step's batches and makes its gradient.

    `sampler`: what draws each batch's example indices (`take(n)`, `state_dict`, `load_state_dict`);
    default a reshuffle per epoch, or a `curriculum.CurriculumSampler` (easy examples first).
    """

    def __init__(
        self,
        model: Transformer,
        train_data: TokenDataset,
        config: TrainConfig,
        val_data: TokenDataset | None = None,
        tokenizer=None,
        distributed: DistributedContext | None = None,
        teacher: Transformer | None = None,
        regularizer: Callable[[torch.nn.Module], torch.Tensor] | None = None,
        objective: StepObjective | None = None,
        privacy: GradientPrivacy | None = None,
        sampler=None,
    ) -> None:
        config.validate()
        if config.scheduled_sampling and (teacher is not None or not model.config.causal or objective is not None):
            raise TrainError(
                "scheduled sampling feeds a causal model its own next-token predictions; it is not supported with "
                "a teacher (distillation), a masked-LM encoder or a custom objective"
            )
        if objective is not None and (teacher is not None or not model.config.causal or config.fsdp):
            raise TrainError(
                "a custom objective trains a causal decoder without a teacher, under a single process or DDP; "
                "distillation, masked LM and FSDP are not supported with it"
            )
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            if data is not None and not all(hasattr(data, a) for a in ("batch", "seq_len", "max_token_id", "__len__")):
                raise TrainError(
                    f"{name} must be a genforge.train.TokenDataset or a batch source like "
                    f"genforge.finetune.SFTRows, got {type(data).__name__}"
                )
        self.distributed = distributed if distributed is not None else DistributedContext.current()
        world = self.distributed.world_size
        if config.batch_size % world:
            raise TrainError(
                f"batch_size {config.batch_size} is the global micro-batch and must split evenly over the "
                f"{world} processes; use a multiple of {world}"
            )
        if config.fsdp and not self.distributed.enabled:
            raise TrainError(
                "fsdp=True shards the model over several processes; launch with torchrun "
                "(WORLD_SIZE > 1) or leave fsdp off"
            )
        self.masked = not model.config.causal
        if self.masked:
            self._setup_masking(model, config, tokenizer)
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            if data is None:
                continue
            if data.max_token_id >= model.config.vocab_size:
                raise TrainError(
                    f"{name} has token id {data.max_token_id} but the model's vocab_size is "
                    f"{model.config.vocab_size}; ids must be < vocab_size"
                )
            if data.seq_len > model.config.max_position_embeddings:
                raise TrainError(
                    f"{name} seq_len {data.seq_len} exceeds the model's max_position_embeddings "
                    f"{model.config.max_position_embeddings}"
                )
        if teacher is not None:
            self._check_teacher(model, teacher, train_data)
        config.seq_len = train_data.seq_len
        self.model, self.train_data, self.val_data, self.config, self.tokenizer = (
            model,
            train_data,
            val_data,
            config,
            tokenizer,
        )
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.device = torch.device(config.device)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.model.to(self.device)
        self.teacher = teacher
        self.regularizer = regularizer
        self.objective = objective
        self.privacy = privacy
        if privacy is not None:
            privacy.check(self)
        self._distill_parts = [0.0, 0.0]  # a step's cross-entropy and KD shares (with a teacher), for the metrics
        if teacher is not None:
            teacher.to(self.device).eval().requires_grad_(False)
        if self.device.type == "cpu" and privacy is None:  # per-example gradients run under vmap: plain linears
            # torch's CPU fp32 matmul is MKL's AVX2 code on AMD CPUs; oneDNN's is about twice as
            # fast on a step's products (docs/training.md). Same parameters, same state dict.
            for module in (model, teacher):
                if module is not None:
                    use_onednn(module)
        # The module the step calls: the model itself, its DDP wrapper, or the model sharded
        # in place by FSDP. `self.model` stays the plain module (checkpointing, evaluation).
        self.engine = wrap_model(self.model, self.distributed, fsdp=config.fsdp, cpu_offload=config.fsdp_cpu_offload)
        self.optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas, config.adam_eps)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        self.sampler = sampler if sampler is not None else ShuffleSampler(len(train_data), seed=config.seed)
        # fp16's five exponent bits underflow small gradients: scale the loss up, and let the scaler
        # skip the steps whose scaled gradients overflow (Micikevicius et al. 2018).
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.step = 0

    @staticmethod
    def _check_teacher(model: Transformer, teacher: Transformer, train_data: TokenDataset) -> None:
        """Everything distillation needs of the teacher, checked before any work is done."""
        if not isinstance(teacher, Transformer):
            raise TrainError(f"teacher must be a genforge Transformer, got {type(teacher).__name__}")
        if teacher is model:
            raise TrainError("the teacher must be another model than the one being trained")
        if not model.config.causal or not teacher.config.causal or teacher.lm_head is None:
            raise TrainError(
                "knowledge distillation here trains a causal decoder from a causal decoder with an LM "
                "head; masked-LM encoders are not supported as student or teacher"
            )
        if teacher.config.vocab_size != model.config.vocab_size:
            raise TrainError(
                f"the teacher's vocab_size ({teacher.config.vocab_size}) differs from the model's "
                f"({model.config.vocab_size}); distillation compares distributions over one shared vocabulary"
            )
        if train_data.seq_len > teacher.config.max_position_embeddings:
            raise TrainError(
                f"train_data seq_len {train_data.seq_len} exceeds the teacher's max_position_embeddings "
                f"{teacher.config.max_position_embeddings}"
            )

    def _setup_masking(self, model: Transformer, config: TrainConfig, tokenizer) -> None:
        if model.lm_head is None:
            raise TrainError(
                "this encoder has no masked-LM head to train; build it with Config(masked_lm_head=True) or load "
                "a BertForMaskedLM checkpoint"
            )
        if config.mask_token_id is None:
            config.mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if config.mask_token_id is None:
            raise TrainError(
                "masked-LM training needs a [MASK] id: pass a tokenizer with a mask token or set "
                "TrainConfig.mask_token_id"
            )
        if not 0 <= config.mask_token_id < model.config.vocab_size:
            raise TrainError(f"mask_token_id {config.mask_token_id} is not below vocab_size {model.config.vocab_size}")
        if config.special_token_ids is None:
            config.special_token_ids = tuple(getattr(tokenizer, "all_special_ids", None) or ())
        config.special_token_ids = tuple(int(i) for i in config.special_token_ids)

    # ------------------------------------------------------------------------------ steps
    def _autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _count_targets(self, labels: torch.Tensor) -> int:
        return count_masked_targets(labels) if self.masked else count_target_tokens(labels)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        objective = masked_lm_loss if self.masked else causal_lm_loss
        return objective(logits, labels, label_smoothing=label_smoothing, reduction="sum")

    @property
    def _fused_head(self) -> bool:
        """Whether the step applies the LM head inside the loss (`fused_linear_cross_entropy`).
        Not under FSDP: its parameters are whole only inside the sharded module's forward, so
        there the model computes the logits and the unfused loss scores them. Nor when the head
        is not a plain linear layer (a LoRA on lm_head): the fused loss reads `weight` alone."""
        return not self.config.fsdp and isinstance(self.model.lm_head, torch.nn.Linear)

    def _head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """The summed loss from the final hidden states: the LM head and cross-entropy fused,
        never holding the (tokens x vocab) logits. Labels are aligned with the inputs, as
        for `_loss`."""
        model = self.model
        if self.masked:
            # Only the ~15% chosen positions are scored: the masked-LM transform (dense, GELU,
            # LayerNorm) runs on those alone instead of on every position.
            chosen = labels != IGNORE_INDEX
            hidden, labels = hidden[chosen], labels[chosen]
            if model.lm_transform is not None:
                hidden = model.lm_transform(hidden)
        else:
            labels = shift_labels(labels)
        return fused_linear_cross_entropy(
            hidden,
            model.lm_head.weight,
            labels,
            bias=model.lm_head.bias,
            label_smoothing=label_smoothing,
            reduction="sum",
        )

    def _micro_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, total_tokens: int, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This micro-batch's share of the step's loss: sum over its tokens / the step's tokens.
        `document_ids` marks the examples of packed rows (see `Transformer.forward`)."""
        if self.teacher is not None:
            return self._distill_micro_loss(inputs, labels, total_tokens, document_ids)
        packed = {} if document_ids is None else {"document_ids": document_ids}
        if self.config.scheduled_sampling:
            inputs = self._with_own_predictions(inputs, packed)
        with self._autocast():
            if self._fused_head:
                # The wrapped forward (DDP) stops at the final hidden states; the head's
                # weights are used in the loss, and their gradients reach DDP's hooks by the
                # ordinary accumulation, as the embedding's do.
                output = self.engine(inputs, compute_logits=False, **packed)
                loss = self._head_loss(output.hidden_states, labels, self.config.label_smoothing) / total_tokens
            else:
                output = self.engine(inputs, **packed)
                loss = self._loss(output.logits, labels, self.config.label_smoothing) / total_tokens
            return self._with_router_loss(loss, output, labels, total_tokens)

    @torch.no_grad()
    def _with_own_predictions(self, inputs: torch.Tensor, packed: dict) -> torch.Tensor:
        """Scheduled sampling's first pass: some gold inputs swapped for the model's predictions.
        The draw is seeded by (seed, step, the batch's first ids), so a resumed run repeats it."""
        probability = own_token_probability(
            self.step, self.config.max_steps, self.config.scheduled_sampling, self.config.scheduled_sampling_decay
        )
        if probability == 0.0:
            return inputs
        with self._autocast():
            predictions = self.engine(inputs, **packed).logits.argmax(-1)
        seed = hash((self.config.seed, self.step, tuple(inputs[0, :4].tolist()))) % 2**62
        return mix_in_predictions(inputs, predictions, probability, torch.Generator().manual_seed(seed))

    def _with_router_loss(self, loss: torch.Tensor, output, labels: torch.Tensor, total_tokens: int) -> torch.Tensor:
        """`loss` plus this micro-batch's share of the MoE load-balancing loss (if any)."""
        aux = moe_auxiliary_loss(output, self.model.config)
        if aux is None:
            return loss
        z_loss = moe_router_z_loss(output, self.model.config)  # Switch/ST-MoE: its own coefficient, in the config
        router_loss = self.config.aux_loss_coef * aux + (z_loss if z_loss is not None else 0.0)
        return loss + router_loss * (self._count_targets(labels) / total_tokens)

    def _distill_micro_loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, total_tokens: int, document_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """alpha * KD + (1 - alpha) * cross-entropy for this micro-batch, each summed over its
        target positions and divided by the step's tokens. A term whose weight is 0 is still
        computed, without gradients, for the metrics (so alpha = 0 is the plain step exactly).
        Adds the two terms' shares to `self._distill_parts` (cross-entropy, KD)."""
        config = self.config
        alpha = float(config.distill_alpha)
        grad = torch.is_grad_enabled()
        targets = shift_labels(labels)
        packed = {} if document_ids is None else {"document_ids": document_ids}
        with self._autocast():
            with torch.no_grad():
                teacher_out = self.teacher(inputs, compute_logits=not self._fused_head, **packed)
            if self._fused_head:
                output = self.engine(inputs, compute_logits=False, **packed)
                with torch.set_grad_enabled(grad and alpha < 1.0):
                    hard = self._head_loss(output.hidden_states, labels, config.label_smoothing)
                with torch.set_grad_enabled(grad and alpha > 0.0):
                    soft = self._kd_from_hidden(output.hidden_states, teacher_out.hidden_states, targets)
            else:  # FSDP: the sharded forward makes the student's logits
                output = self.engine(inputs, **packed)
                with torch.set_grad_enabled(grad and alpha < 1.0):
                    hard = self._loss(output.logits, labels, config.label_smoothing)
                with torch.set_grad_enabled(grad and alpha > 0.0):
                    soft = self._kd(output.logits, teacher_out.logits, targets)
            loss = self._with_router_loss(
                ((1.0 - alpha) * hard + alpha * soft) / total_tokens, output, labels, total_tokens
            )
        self._distill_parts[0] += float(hard.detach()) / total_tokens
        self._distill_parts[1] += float(soft.detach()) / total_tokens
        return loss

    def _kd(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets=None) -> torch.Tensor:
        config = self.config
        return distillation_loss(
            student_logits,
            teacher_logits,
            targets,
            temperature=config.distill_temperature,
            kind=config.distill_kind,
            beta=config.distill_beta,
            reduction="sum",
        )

    def _kd_slice(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher.lm_head(teacher_hidden)
        return self._kd(self.model.lm_head(student_hidden), teacher_logits)

    def _kd_from_hidden(
        self, hidden: torch.Tensor, teacher_hidden: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The summed KD term from both models' final hidden states, through their LM heads a
        slice of counted positions at a time (`FUSED_CHUNK_ELEMENTS` logits per slice). With
        more than one slice each is checkpointed (its logits remade in backward), so the step
        holds one slice of (positions x vocabulary) logits, not all of them."""
        counted = targets != IGNORE_INDEX
        student, teacher = hidden[counted], teacher_hidden[counted]
        rows = student.shape[0]
        chunk = max(1, FUSED_CHUNK_ELEMENTS // self.model.config.vocab_size)
        if rows <= chunk:
            return self._kd_slice(student, teacher)
        total = None
        for start in range(0, rows, chunk):
            part_s, part_t = student[start : start + chunk], teacher[start : start + chunk]
            if torch.is_grad_enabled():
                part = torch.utils.checkpoint.checkpoint(self._kd_slice, part_s, part_t, use_reentrant=False)
            else:
                part = self._kd_slice(part_s, part_t)
            total = part if total is None else total + part
        return total

    def mask_batch(self, batch: torch.Tensor, stream: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-LM inputs and labels for `batch`, from a generator seeded by (seed, stream,
        index): the same batch at the same step gets the same masks on every rank and on resume."""
        key = ((self.config.seed * 1_000_003 + stream) * 1_000_003 + index) % (2**63)
        generator = torch.Generator().manual_seed(key)
        return mask_tokens(
            batch,
            self.config.mask_token_id,
            self.model.config.vocab_size,
            self.config.mlm_probability,
            self.config.special_token_ids,
            generator,
        )

    def _micro_batches(self, batches) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(inputs, labels, document_ids) per micro-batch. A bare tensor is its own labels (causal
        LM) or is masked here; a dict is a fine-tuning batch (`input_ids`, `labels` and, for
        packed rows, `document_ids`); a pair is (inputs, labels)."""
        pairs = []
        for micro, batch in enumerate(batches):
            if isinstance(batch, torch.Tensor):
                batch = self.mask_batch(batch, self.step, micro) if self.masked else (batch, batch)
            if isinstance(batch, dict):
                batch = (batch["input_ids"], batch["labels"], batch.get("document_ids"))
            inputs, labels, *documents = batch
            pairs.append((inputs, labels, documents[0] if documents else None))
        return pairs

    def train_step(self, batches: list) -> dict:
        """One optimizer step over `batches`, the micro-batches of this step: tensors of ids,
        (inputs, labels) pairs or fine-tuning dicts (see `_micro_batches`). Under torchrun they are
        the global micro-batches (every rank passes the same ones) and each rank trains on its
        slice. The `regularizer` (if any) adds its penalty once per step."""
        self.engine.train()
        if self.privacy is not None:
            return self._update(*self.privacy.backward(self, batches))
        if self.objective is not None:
            step_loss, tokens, extra = self._objective_backward(batches)
            return self._update(step_loss, tokens, extra)
        pairs = self._micro_batches(batches)
        total_tokens = sum(self._count_targets(labels) for _, labels, _ in pairs)
        if total_tokens == 0:
            raise TrainError("this step's batches have no target tokens (every label is ignored); nothing to learn")
        world = self.distributed.world_size
        share = rank_slice(pairs[0][0].shape[0], self.distributed)
        step_loss = 0.0
        self._distill_parts = [0.0, 0.0]  # cross-entropy and KD shares, for the metrics
        dropped_token_share(self.model)  # forget tokens counted outside this step (evaluation)
        for micro, (inputs, labels, documents) in enumerate(pairs):
            last = micro == len(pairs) - 1
            inputs, labels = inputs[share].to(self.device), labels[share].to(self.device)
            documents = documents[share].to(self.device) if documents is not None else None
            with (
                contextlib.nullcontext() if last else no_gradient_sync(self.engine, self.distributed, self.config.fsdp)
            ):
                loss = self._micro_loss(inputs, labels, total_tokens, documents)
                if last and self.regularizer is not None:
                    # Every rank holds the whole model (DDP), so each adds 1/world of the penalty.
                    loss = loss + self.regularizer(self.model) / world
                # DDP and FSDP average gradients over ranks; scaling by the world size turns
                # that average into the sum of the ranks' shares, the whole batch's gradient.
                scaled = loss * world if world > 1 else loss
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            step_loss += float(loss.detach())
        parts = self._distill_parts if self.teacher is not None else []
        if world > 1:
            step_loss, *parts = all_reduce_sum([step_loss, *parts], self.distributed, self.device)
        # Throughput counts every input token of the global batch, as tokens/s and MFU are usually reported.
        tokens = sum(inputs.numel() for inputs, _, _ in pairs)
        extra = dict(zip(("ce_loss", "kd_loss"), parts)) if self.teacher is not None else {}
        dropped = dropped_token_share(self.model)  # Switch routing: tokens over an expert's capacity
        if dropped is not None:
            extra["dropped_tokens"] = dropped
        if self.config.scheduled_sampling:
            extra["own_token_probability"] = own_token_probability(
                self.step, self.config.max_steps, self.config.scheduled_sampling, self.config.scheduled_sampling_decay
            )
        return self._update(step_loss, tokens, extra)

    def _objective_backward(self, batches: list[dict]) -> tuple[float, int, dict[str, float]]:
        """Forward and backward of the `objective` over the step's micro-batches (each rank its
        slice of every one): (the step's loss, its input tokens, its summed metrics)."""
        total = sum(self.objective.weight(batch) for batch in batches)
        if total == 0:
            raise TrainError("this step's batches hold no examples; nothing to learn")
        world = self.distributed.world_size
        step_loss, metrics = 0.0, {}
        for micro, batch in enumerate(batches):
            last = micro == len(batches) - 1
            share = rank_slice(next(iter(batch.values())).shape[0], self.distributed)
            mine = {name: tensor[share].to(self.device) for name, tensor in batch.items()}
            with (
                contextlib.nullcontext() if last else no_gradient_sync(self.engine, self.distributed, self.config.fsdp)
            ):
                with self._autocast():
                    loss, parts = self.objective.micro_loss(self.engine, self.model, mine, total)
                if last and self.regularizer is not None:
                    loss = loss + self.regularizer(self.model) / world
                scaled = loss * world if world > 1 else loss
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            step_loss += float(loss.detach())
            for name, value in parts.items():
                metrics[name] = metrics.get(name, 0.0) + value
        names = sorted(metrics)
        if world > 1:
            step_loss, *values = all_reduce_sum(
                [step_loss, *(metrics[n] for n in names)], self.distributed, self.device
            )
            metrics = dict(zip(names, values))
        tokens = sum(int(batch["input_ids"].numel()) if "input_ids" in batch else 0 for batch in batches)
        return step_loss, tokens, metrics

    def _update(self, step_loss: float, tokens: int, extra: dict[str, float]) -> dict:
        """The optimizer step after the step's backward passes: clipping, AdamW, the schedule."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # A private gradient is bounded per example already; clipping its noise too would only shrink it.
        grad_norm = clip_gradients(self.model, None if self.privacy is not None else self.config.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # The scaler lowers its scale only when it found inf/NaN gradients and skipped the update.
            extra = extra | {"loss_scale": scale, "skipped": int(self.scaler.get_scale() < scale)}
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, **extra}

    def _next_batches(self) -> list[torch.Tensor]:
        """The step's global micro-batches; every rank draws the same ones from its own sampler copy."""
        if self.privacy is not None:
            return self.privacy.draw_batches(self)
        return [self.train_data.batch(self.sampler.take(self.config.batch_size)) for _ in range(self.config.grad_accum)]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss per target token over the first `eval_batches` batches of the validation
        data (in order, and for masked LM with fixed masks, so every evaluation scores the same
        targets) and its perplexity. Under torchrun each rank scores its rows and the sums
        are added up."""
        if self.val_data is None:
            raise TrainError("no val_data was given to this Trainer, so there is nothing to evaluate")
        was_training = self.engine.training
        self.engine.eval()
        if self.objective is not None:  # every rank scores all of the held-out data
            result = self.objective.evaluate(self.model, self.val_data, self.config.batch_size)
            self.engine.train(was_training)
            return {"step": self.step, **result}
        total, tokens = 0.0, 0
        size, rank, world = self.config.batch_size, self.distributed.rank, self.distributed.world_size
        for number, start in enumerate(range(0, min(len(self.val_data), size * self.config.eval_batches), size)):
            batch = self.val_data.batch(range(start, min(start + size, len(self.val_data))))
            if self.masked:
                batch = self.mask_batch(batch, -1, number)
            ((inputs, labels, documents),) = self._micro_batches([batch])
            rows = slice(rank, None, world)  # a short last batch may leave a rank nothing
            mine_in, mine_labels = inputs[rows].to(self.device), labels[rows].to(self.device)
            packed = {} if documents is None else {"document_ids": documents[rows].to(self.device)}
            if mine_in.shape[0] == 0:
                if not self.config.fsdp:
                    continue
                # FSDP gathers weights collectively: this rank must still run a forward.
                mine_in = inputs[:1].to(self.device)
                mine_labels = torch.full_like(mine_in, IGNORE_INDEX)
                packed = {} if documents is None else {"document_ids": documents[:1].to(self.device)}
            counted = self._count_targets(mine_labels)
            with self._autocast():
                if self._fused_head:
                    hidden = self.model(mine_in, compute_logits=False, **packed).hidden_states
                    loss = self._head_loss(hidden, mine_labels) if counted else None
                else:  # FSDP: every rank joins the sharded forward, even with nothing to score
                    logits = self.engine(mine_in, **packed).logits
                    loss = self._loss(logits, mine_labels) if counted else None
            if loss is not None:
                total += float(loss)
                tokens += counted
        total, tokens = all_reduce_sum([total, float(tokens)], self.distributed, self.device)
        self.engine.train(was_training)
        if tokens == 0:
            raise TrainError("the validation batches hold no target tokens to score")
        val_loss = total / tokens
        return {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}

    # ---------------------------------------------------------------------------- the loop
    def train(self, resume: bool = False, on_checkpoint: Callable[[int, Path], None] | None = None) -> TrainResult:
        """Run until `max_steps`. resume=True first restores the latest checkpoint in
        `out_dir`; resume=False refuses an `out_dir` that already holds a run, so nothing
        earlier is overwritten. `on_checkpoint(step, path)` runs after each checkpoint."""
        main = self.distributed.is_main
        if resume:
            self.load_checkpoint()
        else:
            taken = self.checkpoint_dir.exists() or self.metrics_path.exists()
            # Rank 0's view decides for all, so every rank raises or none does.
            if broadcast_object(taken, self.distributed):
                raise TrainError(
                    f"{self.out_dir} already holds a training run; pass resume=True to continue it, "
                    "or choose an empty out_dir"
                )
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        config = self.config
        losses, evals = [], []
        restore = self._enable_gradient_checkpointing() if config.gradient_checkpointing else None
        try:
            with self._progress() as (progress, task):
                progress.update(task, completed=self.step)
                while self.step < config.max_steps:
                    started = time.perf_counter()
                    record = self.train_step(self._next_batches())
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    record["tokens_per_s"] = record["tokens"] / elapsed
                    if config.peak_flops:  # peak_flops is per device; the job has world_size of them
                        record["mfu"] = (
                            6
                            * self.num_parameters
                            * record["tokens_per_s"]
                            / (config.peak_flops * self.distributed.world_size)
                        )
                    losses.append((self.step, record["loss"]))
                    self._append_metrics(record)
                    mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
                    progress.update(
                        task,
                        completed=self.step,
                        status=f"loss {record['loss']:.4f} {record['tokens_per_s']:,.0f} tok/s{mfu}",
                    )
                    last = self.step == config.max_steps
                    if self.val_data is not None and (
                        (config.eval_every and self.step % config.eval_every == 0) or last
                    ):
                        result = self.evaluate()
                        evals.append(result)
                        self._append_metrics(result)
                    if (config.save_every and self.step % config.save_every == 0) or last:
                        path = self.save_checkpoint()
                        if main:
                            self.write_loss_curve()
                        if on_checkpoint is not None:
                            on_checkpoint(self.step, path)
        finally:
            if restore is not None:
                restore()
        export_dir = self.out_dir / "model" if config.export else None
        if config.export:
            full = self._full_state_dict() if config.fsdp else None  # collective: every rank joins
            if main:
                save_model(self._plain_model(full), export_dir, self.tokenizer)
            barrier(self.distributed)
        report = self.privacy.report() if self.privacy is not None else None
        return TrainResult(step=self.step, losses=losses, evals=evals, export_dir=export_dir, privacy=report)

    def _full_state_dict(self, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter whole (FSDP gathers the shards; a collective all ranks join): on CPU
        and on rank 0 only, the others getting {}, or with every_rank=True on every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
        return get_model_state_dict(self.model, options=options)

    def _plain_model(self, full_state: dict | None) -> Transformer:
        """The model with ordinary tensors: itself, or (FSDP) a CPU copy built from the gathered weights."""
        if full_state is None:
            return self.model
        plain = Transformer(self.model.config)
        state = dict(full_state)
        if plain.lm_head is not None and self.model.config.tie_word_embeddings:
            state.setdefault("lm_head.weight", state["embed_tokens.weight"])
        plain.load_state_dict(state, strict=True)
        plain.tie_weights()
        return plain

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from ..console import console

        progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=console,  # stderr: stdout carries the command's result
            disable=not (self.config.progress and self.distributed.is_main),
        )

        @contextlib.contextmanager
        def running():
            with progress:
                yield progress, progress.add_task("train", total=self.config.max_steps, status="")

        return running()

    def _enable_gradient_checkpointing(self) -> Callable[[], None]:
        """Wrap each block's forward in non-reentrant activation checkpointing; returns an undo.

        Non-reentrant checkpointing keeps the autograd graph of the block's outputs, so the
        router logits a MoE block appends to its list still carry gradients; the RNG state is
        stashed and replayed, so dropout masks match between forward and recompute.
        """
        blocks = list(self.model.blocks)
        for block in blocks:
            original = block.forward

            def checkpointed(*args, _original=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

            block.forward = checkpointed

        def restore() -> None:
            for block in blocks:
                block.__dict__.pop("forward", None)

        return restore

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-XXXXXXXX/` atomically (assembled beside it, then renamed),
        then point `checkpoints/latest.json` at it (also by rename). Under torchrun rank 0
        writes; with FSDP every rank first joins in gathering the shards."""
        final = self.checkpoint_dir / f"step-{self.step:08d}"
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            full = self._full_state_dict()
            model_to_save = self._plain_model(full) if self.distributed.is_main else None
            optimizer_state = get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            model_to_save, optimizer_state = self.model, self.optimizer.state_dict()
        if self.distributed.is_main:
            self._write_checkpoint(final, model_to_save, optimizer_state)
        barrier(self.distributed)  # no rank runs ahead of a checkpoint it might need to resume from
        return final

    def _write_checkpoint(self, final: Path, model: Transformer, optimizer_state: dict) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with staged_directory(final) as staging:  # a re-run of the same step swaps, never deletes first
            if self._frozen_part:
                save_file(self._checkpointed_tensors(model), str(staging / "model.safetensors"))
            else:
                save_weights(model, str(staging / "model.safetensors"))
            trainer_state = {
                "optimizer": optimizer_state,
                "optimizer_format": "fsdp-full" if self.config.fsdp else "torch",
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python_rng": random.getstate(),
            }
            torch.save(trainer_state, staging / "trainer_state.pt")
            state = {
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "config": {k: getattr(self.config, k) for k in self._resume_invariants()},
                "world_size": self.distributed.world_size,
            }
            if self.privacy is not None:
                state["privacy"] = self.privacy.state_dict()
            (staging / "state.json").write_text(json.dumps(state, indent=2))
            for path in staging.iterdir():
                _fsync(path)
        atomic_write_text(self.checkpoint_dir / "latest.json", json.dumps({"step": self.step, "dir": final.name}))

    @property
    def _frozen_part(self) -> bool:
        return any(not p.requires_grad for p in self.model.parameters())

    def _checkpointed_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: the whole state dict, or, when part of the model is
        frozen (a PEFT run's base), only the trainable parameters, since the frozen part is the
        checkpoint the run started from and never changes."""
        if not self._frozen_part:
            return model.state_dict()
        return {name: param for name, param in model.named_parameters() if param.requires_grad}

    def _resume_invariants(self) -> tuple[str, ...]:
        return _RESUME_INVARIANTS + (_MASKED_RESUME_INVARIANTS if self.masked else ())

    def load_checkpoint(self) -> int:
        """Restore the latest checkpoint; every file is read and checked before anything
        in the trainer changes, so a bad checkpoint leaves the run as it was."""
        latest = self.checkpoint_dir / "latest.json"
        if not latest.exists():
            raise TrainError(
                f"cannot resume: no checkpoint in {self.checkpoint_dir} (expected latest.json); "
                "train with resume=False to start a new run"
            )
        try:
            pointer = json.loads(latest.read_text())
            directory = self.checkpoint_dir / pointer["dir"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise TrainError(f"cannot resume: {latest} is corrupt ({err})") from None
        absent = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
        if absent:
            raise TrainError(f"cannot resume: checkpoint {directory} is missing {', '.join(absent)}")
        try:
            weights = load_file(directory / "model.safetensors", device=str(self.device))
            trainer_state = torch.load(directory / "trainer_state.pt", map_location=self.device, weights_only=True)
            state = json.loads((directory / "state.json").read_text())
        # Any failure to read means the files are damaged; the readers raise many types
        # (SafetensorError, UnpicklingError, zipfile and JSON errors), so all are caught here.
        except Exception as err:
            raise TrainError(
                f"cannot resume: checkpoint {directory} is corrupt ({type(err).__name__}: {err})"
            ) from None
        fsdp = self.config.fsdp
        saved_format = trainer_state.get("optimizer_format", "torch")
        if saved_format != ("fsdp-full" if fsdp else "torch"):
            raise TrainError(
                f"cannot resume: checkpoint {directory} was written "
                f"{'with' if saved_format == 'fsdp-full' else 'without'} FSDP; resume the same way"
            )
        # FSDP: the gathered weights, in a plain copy whose tied names share one tensor as here.
        current = (
            self._plain_model(self._full_state_dict(every_rank=True)).state_dict()
            if fsdp
            else self._checkpointed_tensors(self.model)
        )
        # A tied head and embedding are one tensor stored once; either name may hold it.
        by_storage: dict[int, set[str]] = {}
        for name, tensor in current.items():
            by_storage.setdefault(tensor.data_ptr(), set()).add(name)
        missing = sorted(n for names in by_storage.values() if not names & set(weights) for n in names)
        unexpected = sorted(set(weights) - set(current))
        if missing or unexpected:
            raise TrainError(
                f"cannot resume: checkpoint {directory} does not fit this model "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        mismatched = [n for n, t in current.items() if n in weights and weights[n].shape != t.shape]
        if mismatched:
            raise TrainError(f"cannot resume: checkpoint {directory} has other shapes for {mismatched[:4]}")
        saved = state.get("config", {})
        changed = [
            f"{k}: {saved.get(k)} -> {getattr(self.config, k)}"
            for k in self._resume_invariants()
            if saved.get(k) != getattr(self.config, k)
        ]
        if changed:
            raise TrainError(f"cannot resume: settings that decide the data order changed ({'; '.join(changed)})")
        if ("privacy" in state) != (self.privacy is not None):
            raise TrainError(
                f"cannot resume: checkpoint {directory} was written "
                f"{'with' if 'privacy' in state else 'without'} DP-SGD; resume the same way"
            )
        if int(state["step"]) > self.config.max_steps:
            raise TrainError(
                f"cannot resume: checkpoint is at step {state['step']}, beyond max_steps={self.config.max_steps}"
            )
        if self.privacy is not None:  # checks its own state before taking it
            self.privacy.load_state_dict(state["privacy"])
        # Everything read and checked: apply.
        self.sampler.load_state_dict(state["sampler"])
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = {name: weights[min(names & set(weights))] for names in by_storage.values() for name in names}
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, full, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, trainer_state["optimizer"], options=options)
        else:
            with torch.no_grad():
                for names in by_storage.values():
                    source = weights[min(names & set(weights))]
                    for name in names:
                        current[name].copy_(source)
            self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        if self.scaler is not None and trainer_state.get("scaler"):
            self.scaler.load_state_dict(trainer_state["scaler"])
        torch.set_rng_state(trainer_state["torch_rng"].cpu())
        if trainer_state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer_state["cuda_rng"])
        random.setstate(_as_python_rng_state(trainer_state["python_rng"]))
        self.step = int(state["step"])
        if self.distributed.is_main:
            self._truncate_metrics(self.step)
        barrier(self.distributed)
        return self.step

    # ---------------------------------------------------------------------------- metrics
    def _append_metrics(self, record: dict) -> None:
        if not self.distributed.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        publish_metrics(record)  # to a tracker, when a command subscribed one (`ops.tracking`)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint, so the log has each step once."""
        if not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_loss_curve(self) -> Path | None:
        """Plot training (and validation) loss from metrics.jsonl to loss_curve.png, atomically."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        records = self.read_metrics()
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if not train:
            return None
        # Figure + the Agg canvas directly: no pyplot global state, no display needed.
        figure = Figure(figsize=(6, 4))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.plot(*zip(*train), label="train")
        if val:
            axes.plot(*zip(*val), marker="o", label="val")
        axes.set_xlabel("step")
        axes.set_ylabel("loss (nats/token)")
        axes.legend()
        figure.tight_layout()
        path = self.out_dir / "loss_curve.png"
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png")
        return path


def _as_python_rng_state(state) -> tuple:
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


__all__ = ["PRECISIONS", "GradientPrivacy", "StepObjective", "TrainConfig", "TrainError", "TrainResult", "Trainer"]
