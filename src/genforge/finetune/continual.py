"""Continual learning: training on a new task without forgetting an earlier one.

Fine-tuning a network on task B moves the weights that task A relied on, and A's loss climbs:
catastrophic forgetting (McCloskey & Cohen 1989; Goodfellow et al. 2013 measure it for modern
networks). Two remedies, both usable in a `genforge finetune` run (see `finetune.run`):

- Experience replay (Rolnick et al. 2019, "Experience Replay for Continual Learning"; Chaudhry
  et al. 2019, "On Tiny Episodic Memories in Continual Learning"): keep some of A's examples and
  mix a share of them into B's training data (`with_replay`).
- Elastic weight consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
  neural networks"): after A, estimate how much A's loss depends on each weight with the
  diagonal of the Fisher information (`diagonal_fisher`), and while training on B add the
  quadratic penalty (strength / 2) * sum_i F_i (theta_i - theta*_i)^2 that holds each weight
  near its value after A (theta*) in proportion to its importance (`EWCPenalty`). The Fisher
  and the anchor theta* are saved as safetensors (`save_ewc` / `load_ewc`), so that task B can
  be a later, separate run.

`task_loss` scores a task's held-out examples, the number a forgetting report compares before
and after.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path
from ..train.losses import causal_lm_loss, count_target_tokens
from .sft import SFTExample

__all__ = [
    "EWC_FORMAT",
    "ContinualError",
    "EWCPenalty",
    "EWC_STRENGTH",
    "as_paths",
    "check_continual",
    "diagonal_fisher",
    "example_batches",
    "fisher_sample",
    "load_ewc",
    "save_ewc",
    "task_loss",
    "trainable_snapshot",
    "with_replay",
]

EWC_FORMAT = "genforge-ewc"
# The default penalty strength of a fine-tuning run. It multiplies a Fisher of the mean token
# loss, so it is the weight given to A's curvature against B's mean token loss. On
# benchmarks/forgetting.py's small model it avoids 96% of the forgetting at no cost to B.
EWC_STRENGTH = 1000.0


class ContinualError(ValueError):
    """Replay or elastic weight consolidation that cannot run as asked."""


# ------------------------------------------------------------------------------------- replay
def with_replay(new: Sequence[SFTExample], old: Sequence[SFTExample], share: float, seed: int = 0) -> list[SFTExample]:
    """The new task's examples with earlier examples mixed in (experience replay): every new
    example once, plus round(share * n / (1 - share)) old ones, so that old examples make up
    `share` of the result; then shuffled. The new task keeps its whole epoch, the replayed
    examples come on top. Old examples are drawn each once before any twice (more than
    len(old) repeats them), the draw and the shuffle seeded. share = 0 gives `new` unchanged."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ContinualError(f"the replay share must be a number in [0, 1), got {share!r}")
    if not new:
        raise ContinualError("replay needs at least one example of the new task")
    if share == 0:
        return list(new)
    if not old:
        raise ContinualError(f"a replay share of {share} needs earlier examples to replay; none were given")
    count = round(share * len(new) / (1 - share))
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < count:
        epoch = list(range(len(old)))
        rng.shuffle(epoch)
        order.extend(epoch)
    mixed = list(new) + [old[i] for i in order[:count]]
    rng.shuffle(mixed)
    return mixed


# ------------------------------------------------------------------------------ batches, loss
def example_batches(examples: Iterable[SFTExample]) -> Iterable[dict[str, torch.Tensor]]:
    """One batch per example (`input_ids`, `labels`, shape (1, length)), no padding: the unit
    `diagonal_fisher` squares gradients over when the Fisher is to be per example."""
    for example in examples:
        yield {"input_ids": torch.tensor([example.input_ids]), "labels": torch.tensor([example.labels])}


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels, document_ids) of a fine-tuning dict, an (inputs, labels) pair or a
    tensor of ids that is its own labels (causal LM)."""
    if isinstance(batch, torch.Tensor):
        return batch, batch, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch or "labels" not in batch:
            raise ContinualError(f"a batch dict needs 'input_ids' and 'labels', got keys {sorted(batch)}")
        return batch["input_ids"], batch["labels"], batch.get("document_ids")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], None
    raise ContinualError(
        "a batch must be a dict with input_ids and labels (and document_ids for packed rows), an "
        f"(input_ids, labels) pair or a tensor of ids; got {type(batch).__name__}"
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _summed_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """The batch's summed next-token loss over its target tokens, and how many there are."""
    inputs, labels, documents = _unpack(batch)
    device = _device(model)
    packed = {} if documents is None else {"document_ids": documents.to(device)}
    logits = model(inputs.to(device), **packed).logits
    return causal_lm_loss(logits.float(), labels.to(device), reduction="sum"), count_target_tokens(labels)


@torch.no_grad()
def task_loss(model: nn.Module, batches: Iterable) -> dict[str, float]:
    """Mean loss per target token over `batches` (the measure of how well the model still does
    a task: lower is better), its perplexity, and the tokens scored. The model is scored in
    eval mode (no dropout) and left in the mode it was in."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            loss, counted = _summed_loss(model, batch)
            total, tokens = total + float(loss), tokens + counted
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ContinualError("the batches hold no target tokens to score")
    loss = total / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}


# ----------------------------------------------------------------------------------------- EWC
def trainable_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable parameter by name: EWC's anchor theta*."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """The diagonal of the Fisher information of a task's loss, for each trainable parameter of
    `model` (by name): EWC's measure of how much the task relies on each weight.

    The estimator is the empirical Fisher: with the data's own labels (not labels sampled from
    the model, which is the true Fisher), F = mean over batches of g_b ** 2, g_b the gradient
    of batch b's log-likelihood taken as the mean over its target tokens (the training loss's
    scale, so the penalty's strength means the same whatever the examples' lengths). The
    squares are per batch: give one example per batch (`example_batches`, or rows of batch size
    one) for the per-example Fisher Kirkpatrick et al. use. Per example is the better estimate
    at a task's optimum, where the mean gradient is near zero: squaring the mean gradient of a
    batch of n examples shrinks it by about n, so a per-batch Fisher depends on the batch size;
    larger batches are the cheaper, flatter approximation. The model runs in eval mode (no
    dropout, the network that will be anchored), and its `.grad` fields are not touched.
    `max_batches` stops after that many.
    """
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not parameters:
        raise ContinualError("the model has no trainable parameters to estimate a Fisher for")
    if max_batches is not None and max_batches < 1:
        raise ContinualError(f"max_batches must be at least 1 (or None for every batch), got {max_batches}")
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            loss, tokens = _summed_loss(model, batch)
            if tokens == 0:
                raise ContinualError(f"batch {count} has no target tokens; its log-likelihood has no gradient")
            gradients = torch.autograd.grad(loss / tokens, list(parameters.values()), allow_unused=True)
            for total, gradient in zip(sums.values(), gradients):
                if gradient is not None:  # a parameter this loss never reaches has a zero Fisher
                    total.add_(gradient.float().square())
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ContinualError("no batches were given to estimate the Fisher from")
    return {name: total / count for name, total in sums.items()}


def save_ewc(
    path: str | os.PathLike,
    fisher: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
    **metadata: str,
) -> Path:
    """Write an EWC state, the Fisher diagonal and the anchor parameters, as one safetensors
    file (tensors `fisher.<name>` and `anchor.<name>`, fp32), atomically. `metadata`: strings
    kept in the file's header (e.g. how the Fisher was estimated and over how many examples)."""
    _check_ewc_tensors(fisher, anchor, str(path))
    tensors = {}
    for name in fisher:
        tensors[f"fisher.{name}"] = fisher[name].detach().float().cpu().contiguous()
        tensors[f"anchor.{name}"] = anchor[name].detach().float().cpu().contiguous()
    metadata = {**{key: str(value) for key, value in metadata.items()}, "format": EWC_FORMAT}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return path


def load_ewc(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fisher, anchor) from a file `save_ewc` wrote (a `genforge finetune --save-fisher` run)."""
    path = Path(path)
    if not path.is_file():
        raise ContinualError(f"EWC file {path} does not exist; write one with a --save-fisher run or save_ewc")
    fisher, anchor = {}, {}
    with safe_open(path, framework="pt") as handle:
        if (handle.metadata() or {}).get("format") != EWC_FORMAT:
            raise ContinualError(
                f"{path} is not an EWC file (no metadata format={EWC_FORMAT!r}); write it with save_ewc"
            )
        for key in handle.keys():
            kind, _, name = key.partition(".")
            if kind not in ("fisher", "anchor") or not name:
                raise ContinualError(f"{path}: unexpected tensor {key!r}; expected fisher.<name> and anchor.<name>")
            (fisher if kind == "fisher" else anchor)[name] = handle.get_tensor(key)
    _check_ewc_tensors(fisher, anchor, str(path))
    return fisher, anchor


def _check_ewc_tensors(fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], where: str) -> None:
    if not fisher:
        raise ContinualError(f"{where}: the Fisher names no parameters")
    if fisher.keys() != anchor.keys():
        only = sorted(set(fisher) ^ set(anchor))[:5]
        raise ContinualError(f"{where}: the Fisher and the anchor name different parameters (e.g. {only})")
    for name in fisher:
        if fisher[name].shape != anchor[name].shape:
            raise ContinualError(
                f"{where}: {name} has Fisher shape {tuple(fisher[name].shape)} but anchor shape "
                f"{tuple(anchor[name].shape)}"
            )
        if not torch.isfinite(fisher[name]).all() or (fisher[name] < 0).any():
            raise ContinualError(f"{where}: the Fisher of {name} has negative or non-finite values")


class EWCPenalty:
    """Elastic weight consolidation's penalty (Kirkpatrick et al. 2017): called with the model,
    (strength / 2) * sum_i F_i (theta_i - theta*_i) ** 2 over the parameters the Fisher names,
    a scalar tensor whose gradient is strength * F * (theta - theta*). It is what
    `genforge.train.Trainer(regularizer=...)` adds to each optimizer step's loss.

    fisher, anchor: name -> tensor, as `diagonal_fisher` / `trainable_snapshot` or `load_ewc`
    give them. Every named parameter must be in the model with the same shape and be trained
    in this run (`check(model)` says which are not, and runs on the first call).
    """

    def __init__(self, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], strength: float) -> None:
        _check_ewc_tensors(fisher, anchor, "EWCPenalty")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ContinualError(f"the EWC strength must be a finite number >= 0, got {strength!r}")
        if strength < 0:
            raise ContinualError(f"the EWC strength must be >= 0, got {strength}")
        self.fisher = {name: t.detach().float() for name, t in fisher.items()}
        self.anchor = {name: t.detach().float() for name, t in anchor.items()}
        self.strength = float(strength)
        self._checked: int | None = None  # id of the model last checked

    @classmethod
    def from_file(cls, path: str | os.PathLike, strength: float) -> EWCPenalty:
        return cls(*load_ewc(path), strength)

    def check(self, model: nn.Module) -> None:
        """Refuse a model this penalty does not fit: a named parameter missing, of another
        shape, or frozen (a frozen weight cannot move, so its penalty would do nothing)."""
        parameters = dict(model.named_parameters())
        missing = [name for name in self.fisher if name not in parameters]
        if missing:
            trainable = [name for name, p in parameters.items() if p.requires_grad]
            raise ContinualError(
                f"the EWC Fisher names {len(missing)} parameters this model does not have (e.g. {missing[:3]}); "
                f"its trainable parameters are e.g. {trainable[:3]}. The Fisher must come from a run that trained "
                "the same parameters (the same method and, for adapters, the same targets)"
            )
        for name, fisher in self.fisher.items():
            parameter = parameters[name]
            if parameter.shape != fisher.shape:
                raise ContinualError(
                    f"EWC: {name} is {tuple(parameter.shape)} in the model but {tuple(fisher.shape)} in the Fisher"
                )
            if not parameter.requires_grad:
                raise ContinualError(
                    f"EWC: {name} is frozen in this model, so a penalty on it does nothing; the Fisher must "
                    "name parameters this run trains (the same method as the run it came from)"
                )
        self._checked = id(model)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        if self._checked != id(model):
            self.check(model)
        parameters = dict(model.named_parameters())
        device = parameters[next(iter(self.fisher))].device
        if next(iter(self.fisher.values())).device != device:  # moved once, where the model trains
            self.fisher = {name: t.to(device) for name, t in self.fisher.items()}
            self.anchor = {name: t.to(device) for name, t in self.anchor.items()}
        total = torch.zeros((), device=device)
        for name, fisher in self.fisher.items():
            total = total + (fisher * (parameters[name].float() - self.anchor[name]).square()).sum()
        return 0.5 * self.strength * total


# ----------------------------------------------------------------------------- run options
def check_continual(config) -> None:
    """The replay and EWC options of a `finetune.run.FinetuneConfig`, checked before work."""
    replay = as_paths(config.replay_data)
    for path in replay + as_paths(config.ewc_data) + as_paths(config.ewc_fisher):
        if not path.is_file():
            raise ContinualError(f"{path} does not exist")
    if replay and not 0 < config.replay_share < 1:
        raise ContinualError(f"replay_share must be in (0, 1) when replay data is given, got {config.replay_share}")
    if config.ewc_fisher is not None and config.ewc_data is not None:
        raise ContinualError(
            "give the EWC Fisher as a file (ewc_fisher) or the data to compute it from (ewc_data), not both"
        )
    uses_ewc = config.ewc_fisher is not None or config.ewc_data is not None
    if uses_ewc and not (math.isfinite(config.ewc_strength) and config.ewc_strength > 0):
        raise ContinualError(f"ewc_strength must be a finite number > 0, got {config.ewc_strength}")
    if (uses_ewc or config.save_fisher) and config.fisher_examples < 1:
        raise ContinualError(f"fisher_examples must be at least 1, got {config.fisher_examples}")


def as_paths(value) -> list[Path]:
    """One path, several, or None (no paths) as a list of paths."""
    if value is None:
        return []
    return [Path(value)] if isinstance(value, (str, os.PathLike)) else [Path(v) for v in value]


def fisher_sample(examples: Sequence[SFTExample], limit: int, seed: int) -> list[SFTExample]:
    """At most `limit` of `examples`, a seeded sample, for a per-example Fisher of bounded cost."""
    if len(examples) <= limit:
        return list(examples)
    return random.Random(seed).sample(list(examples), limit)
