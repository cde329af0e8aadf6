"""Training: data, optimiser and schedule, losses, and the training loop (see docs/training.md)."""

from .data import DataError, ShuffleSampler, TokenDataset
from .losses import IGNORE_INDEX, causal_lm_loss, count_target_tokens, moe_auxiliary_loss
from .optim import build_optimizer, build_scheduler, clip_gradients, split_parameter_groups, warmup_cosine_lr
from .trainer import TrainConfig, Trainer, TrainError, TrainResult

__all__ = [
    "DataError", "ShuffleSampler", "TokenDataset",
    "IGNORE_INDEX", "causal_lm_loss", "count_target_tokens", "moe_auxiliary_loss",
    "build_optimizer", "build_scheduler", "clip_gradients", "split_parameter_groups", "warmup_cosine_lr",
    "TrainConfig", "Trainer", "TrainError", "TrainResult",
]
