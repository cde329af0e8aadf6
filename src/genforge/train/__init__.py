"""Training: tokenizers, data preparation, optimiser and schedule, losses, the training loop,
distributed launch and sizing tools (see docs/training.md)."""

from .data import DataError, ShuffleSampler, TokenDataset, load_prepared
from .distributed import DistributedContext, init_distributed
from .losses import (
    DISTILLATION_KINDS,
    IGNORE_INDEX,
    causal_lm_loss,
    count_target_tokens,
    distillation_loss,
    fused_linear_cross_entropy,
    mask_tokens,
    masked_lm_loss,
    moe_auxiliary_loss,
    shift_labels,
)
from .optim import build_optimizer, build_scheduler, clip_gradients, split_parameter_groups, warmup_cosine_lr
from .sizing import chinchilla_optimal, fit_power_law, gradient_noise_scale, training_flops
from .trainer import TrainConfig, Trainer, TrainError, TrainResult

__all__ = [
    "DataError",
    "ShuffleSampler",
    "TokenDataset",
    "load_prepared",
    "DistributedContext",
    "init_distributed",
    "DISTILLATION_KINDS",
    "IGNORE_INDEX",
    "causal_lm_loss",
    "count_target_tokens",
    "distillation_loss",
    "fused_linear_cross_entropy",
    "mask_tokens",
    "masked_lm_loss",
    "moe_auxiliary_loss",
    "shift_labels",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "split_parameter_groups",
    "warmup_cosine_lr",
    "chinchilla_optimal",
    "fit_power_law",
    "gradient_noise_scale",
    "training_flops",
    "TrainConfig",
    "Trainer",
    "TrainError",
    "TrainResult",
]
