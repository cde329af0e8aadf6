"""Pipeline parallelism: consecutive layers on consecutive processes, micro-batches in flight.

A model too deep for one device is cut by layer into `num_stages` stages, one per process:
the first also holds the embeddings, the last the final norm and the LM head. A batch is cut
into micro-batches that flow through the stages; stage s works on micro-batch m while stage
s + 1 works on m - 1. Only the hidden states between stages (and their gradients backward)
cross process boundaries.

Two schedules, both from `torch.distributed.pipelining`:

- GPipe (Huang et al. 2019): every micro-batch forward, then every one backward. Simple, but
  each stage keeps the activations of all m micro-batches until their backward.
- 1F1B (PipeDream-Flush, Narayanan et al. 2019/2021): after a warm-up, each stage alternates
  one forward and one backward, so it holds at most p micro-batches' activations.

Both leave the same idle "bubble": of the m + p - 1 time slots a stage spends on a step, p - 1
are waiting, a fraction (p - 1) / (m + p - 1) that more micro-batches shrink.

The step's loss is the batch's token-mean cross-entropy: each micro-batch adds its summed
cross-entropy divided by the batch's target tokens (the schedule leaves the gradients
unscaled), so the gradients equal those of one process on the whole batch whatever the
micro-batches' token counts. A model with tied embeddings holds the table twice, on the first
stage (embeddings) and on the last (LM head); their gradients are summed after each step so the
two copies stay equal, as in Megatron-LM.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..model import Transformer, build_attention_mask
from .losses import causal_lm_loss, count_target_tokens

SCHEDULES = ("gpipe", "1f1b")


class PipelineError(ValueError):
    """A pipeline split or schedule that cannot work for this model or batch."""


def check_pipeline(
    config: Config,
    num_stages: int,
    batch_size: int | None = None,
    microbatches: int | None = None,
    schedule: str = "1f1b",
) -> None:
    """Refuse a split, a micro-batch count or a schedule that cannot work, before any work."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 2:
        raise PipelineError(f"a pipeline needs at least 2 stages (one per process), got {num_stages!r}")
    if config.num_layers % num_stages:
        accepted = [d for d in range(2, config.num_layers + 1) if config.num_layers % d == 0]
        raise PipelineError(
            f"{num_stages} pipeline stages do not divide the model's {config.num_layers} layers; each stage holds an "
            f"equal run of layers; accepted stage counts: {', '.join(map(str, accepted)) or 'none (one layer)'}"
        )
    if not config.causal:
        raise PipelineError(
            f"pipeline training here is for causal language models; {config.family} is a bidirectional encoder"
        )
    if config.num_experts:
        raise PipelineError(
            "a mixture-of-experts model's load-balancing loss needs the router logits of every stage, which a "
            "pipeline does not pass between stages; train it with data parallelism or FSDP"
        )
    if schedule not in SCHEDULES:
        raise PipelineError(f"schedule {schedule!r} is not supported; accepted: {', '.join(SCHEDULES)}")
    if microbatches is not None:
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise PipelineError(f"micro-batches must be a positive integer, got {microbatches!r}")
        if batch_size is not None and batch_size % microbatches:
            raise PipelineError(
                f"{microbatches} micro-batches do not divide the batch of {batch_size} sequences; accepted: "
                f"{', '.join(str(d) for d in range(1, batch_size + 1) if batch_size % d == 0)}"
            )
        if schedule == "1f1b" and microbatches < num_stages:
            raise PipelineError(
                f"the 1F1B schedule needs at least as many micro-batches as stages ({num_stages}), got {microbatches}"
            )


def bubble_fraction(num_stages: int, microbatches: int) -> float:
    """The share of a step a stage sits idle in GPipe or 1F1B: (p - 1) / (m + p - 1)."""
    return (num_stages - 1) / (microbatches + num_stages - 1)


def stage_layers(num_layers: int, num_stages: int, stage_index: int) -> range:
    """The layers stage `stage_index` runs: an equal, contiguous run."""
    per_stage = num_layers // num_stages
    return range(stage_index * per_stage, (stage_index + 1) * per_stage)


class PipelineStageModule(nn.Module):
    """One stage of a causal `Transformer`: its run of blocks, plus the embeddings on the first
    stage and the final norm and LM head on the last. Takes token ids (first stage) or hidden
    states and returns hidden states, or logits on the last stage.

    Sequences are whole, unpadded rows (pretraining's packed text), so each stage rebuilds the
    positions, RoPE tables and causal (or sliding-window) masks from the sequence length alone.
    """

    def __init__(self, model: Transformer, stage_index: int, num_stages: int) -> None:
        super().__init__()
        config = model.config
        check_pipeline(config, num_stages)
        if not 0 <= stage_index < num_stages:
            raise PipelineError(f"stage index {stage_index} is outside 0..{num_stages - 1}")
        self.config = config
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.layers = stage_layers(config.num_layers, num_stages, stage_index)
        self.blocks = nn.ModuleList(model.blocks[i] for i in self.layers)
        self.rotary = model.rotary  # buffers only: every stage computes its own tables
        if self.is_first:
            self.embed_tokens = model.embed_tokens
            self.embed_positions = model.embed_positions
            self.embed_norm = model.embed_norm
        if self.is_last:
            self.final_norm = model.final_norm
            self.lm_head = model.lm_head
            if self.is_first is False and model.lm_head.weight is model.embed_tokens.weight:
                # Tied: the last stage gets its own copy of the table; `PipelineRunner` sums the
                # two copies' gradients after each step.
                self.lm_head = copy.deepcopy(model.lm_head)
        self.tied_head = config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        batch, seq = x.shape[:2]
        positions = torch.arange(seq, device=x.device).expand(batch, seq)
        if self.is_first:
            if config.position == "learned" and seq > config.max_position_embeddings:
                raise ValueError(
                    f"sequences of {seq} tokens exceed this model's {config.max_position_embeddings} learned positions"
                )
            x = self.embed_tokens(x)
            if config.embedding_multiplier != 1.0:
                x = x * torch.tensor(config.embedding_multiplier, dtype=x.dtype)
            if self.embed_positions is not None:
                x = x + self.embed_positions(positions)
            if self.embed_norm is not None:
                x = self.embed_norm(x)
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        masks = self._masks(seq, x)
        for layer, block in zip(self.layers, self.blocks):
            mask, is_causal = masks[config.window_of_layer(layer)]
            x = block(x, rope, mask, is_causal, None, [])
        if self.is_last:
            if self.final_norm is not None:
                x = self.final_norm(x)
            x = self.lm_head(x)
        return x

    def _masks(self, seq: int, x: torch.Tensor) -> dict:
        """(mask, is_causal) per window among this stage's layers, as `Transformer._masks`
        builds them for unpadded rows without a cache."""
        masks = {}
        for window in {self.config.window_of_layer(i) for i in self.layers}:
            if window is None or seq <= window:
                masks[window] = (None, True)
                continue
            positions = torch.arange(seq, device=x.device)[None]
            allowed = build_attention_mask(positions, positions, None, True, window)
            bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
            masks[window] = (bias, False)
        return masks


class _BatchMeanLoss:
    """A micro-batch's summed cross-entropy over the whole batch's target tokens, so that the
    micro-batches' losses (and gradients) add up to the batch's token mean."""

    def __init__(self) -> None:
        self.batch_targets = 1

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(logits, labels, reduction="sum") / self.batch_targets


class PipelineRunner:
    """This process's stage of a pipeline over every process of the job, and the schedule that
    drives it. Every rank builds the same whole `model` (same seed or checkpoint) and keeps only
    its stage (`module`): drop the caller's reference to `model` and the other stages' layers
    are freed. `step` runs one forward and backward over a batch.

    schedule: "gpipe" or "1f1b". microbatches: how many pieces each batch is cut into.
    """

    def __init__(self, model: Transformer, microbatches: int, schedule: str = "1f1b") -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if not (dist.is_available() and dist.is_initialized()):
            raise PipelineError(
                "pipeline parallelism runs one process per stage: launch with torchrun "
                "(torchrun --nproc-per-node N ...) and join the process group first "
                "(genforge.train.distributed.init_distributed)"
            )
        num_stages, rank = dist.get_world_size(), dist.get_rank()
        check_pipeline(model.config, num_stages, microbatches=microbatches, schedule=schedule)
        self.num_stages, self.stage_index, self.microbatches = num_stages, rank, microbatches
        self.schedule_name = schedule
        self.device = model.device
        self.module = PipelineStageModule(model, rank, num_stages)
        self.stage = PipelineStage(self.module, rank, num_stages, self.device)
        self._loss = _BatchMeanLoss()
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        # scale_grads=False: the loss already divides by the batch's tokens.
        self.schedule = kind(self.stage, microbatches, loss_fn=self._loss, scale_grads=False)
        # The first and the last stage share a tied embedding table's gradient; every rank
        # must take part in creating the group, even those outside it.
        self._tied_group = dist.new_group([0, num_stages - 1]) if self.module.tied_head else None

    @property
    def is_first(self) -> bool:
        return self.module.is_first

    @property
    def is_last(self) -> bool:
        return self.module.is_last

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """Forward and backward over `input_ids` (batch, seq), the causal LM loss scoring each
        position against the next label (`labels`, default the ids; IGNORE_INDEX where a
        token does not count); gradients accumulate into this stage's parameters. Every rank
        passes the same batch (the first stage reads the ids, the last the labels). Returns
        the batch's token-mean loss on every rank."""
        batch = input_ids.shape[0]
        check_pipeline(self.module.config, self.num_stages, batch, self.microbatches, self.schedule_name)
        labels = (input_ids if labels is None else labels).to(self.device)
        if labels.shape != input_ids.shape:
            raise PipelineError(f"labels have shape {tuple(labels.shape)}; expected the ids' {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        self._loss.batch_targets = max(count_target_tokens(labels), 1)
        losses: list[torch.Tensor] = []
        if self.is_first:
            self.schedule.step(input_ids)
        elif self.is_last:
            self.schedule.step(target=labels, losses=losses)
        else:
            self.schedule.step()
        if self._tied_group is not None and (self.is_first or self.is_last):
            weight = self.module.embed_tokens.weight if self.is_first else self.module.lm_head.weight
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=self._tied_group)
        total = torch.tensor(
            [float(sum(loss.item() for loss in losses))] if self.is_last else [0.0], dtype=torch.float64
        )
        # gloo moves CPU tensors; NCCL needs them on the device.
        total = total.to(self.device) if dist.get_backend() == "nccl" else total
        dist.broadcast(total, src=self.num_stages - 1)
        return float(total.item())

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        """This stage's parameters under the whole model's state-dict names."""
        for name, parameter in self.module.named_parameters():
            yield self.whole_model_name(name), parameter

    def whole_model_name(self, name: str) -> str:
        """`blocks.0.attn.qkv.weight` of stage s -> its name in the whole model."""
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            return f"blocks.{self.module.layers[int(index)]}.{rest}"
        return name


__all__ = [
    "SCHEDULES",
    "PipelineError",
    "PipelineRunner",
    "PipelineStageModule",
    "bubble_fraction",
    "check_pipeline",
    "stage_layers",
]
