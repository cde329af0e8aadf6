"""Calibration: what a model's linear layers see on sample text, for quantizers that use it.

GPTQ (Frantar et al. 2023) needs, per linear layer, the Hessian of its layer-wise squared
error, H = 2 X^T X / n over the n calibration tokens' inputs X; AWQ (Lin et al. 2024) needs
each input channel's mean magnitude, mean |x|. Both are sums over tokens, so they are
accumulated batch by batch in forward hooks (`accumulate_statistics`): no activation is kept
beyond the batch that produced it.

Both quantize sequentially, block after block, as GPTQ does: block k is calibrated on the
outputs of blocks 0..k-1 already quantized, so it learns to correct the error that reaches
it. `capture_block_inputs` runs the embeddings once and keeps the first block's inputs (the
hidden states and the mask, positions and rotary tables the block takes); `run_block` turns
one block's inputs into the next one's. Those hidden states (rows x tokens x hidden) are the
one thing held in full: what one block needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model import Transformer

__all__ = [
    "BlockCall",
    "CalibrationError",
    "LinearStatistics",
    "accumulate_statistics",
    "block_linear_names",
    "capture_block_inputs",
    "check_calibration_rows",
    "collect_linear_statistics",
    "run_block",
]


class CalibrationError(ValueError):
    """Calibration input a quantizer cannot use; the message says what was wrong and what is accepted."""


@dataclass
class LinearStatistics:
    """Running statistics of one linear layer's inputs over the calibration tokens seen so far.

    `hessian` is 2 X^T X / n (in_features x in_features, float64 sums for many tokens), and
    `mean_abs` the mean of |x| per input channel; either is None when not asked for.
    """

    count: int = 0
    hessian: torch.Tensor | None = None
    mean_abs: torch.Tensor | None = None
    want_hessian: bool = True
    want_mean_abs: bool = True

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs (..., in_features) into the running means."""
        x = x.detach().reshape(-1, x.shape[-1])
        new = x.shape[0]
        if new == 0:
            return
        total = self.count + new
        # Running means (old * count + new sum) / total: the same as one pass over all tokens,
        # without keeping them.
        if self.want_hessian:
            xd = x.double()
            batch_sum = 2.0 * (xd.T @ xd)
            if self.hessian is None:
                self.hessian = batch_sum / total
            else:
                self.hessian.mul_(self.count / total).add_(batch_sum / total)
        if self.want_mean_abs:
            batch_sum = x.double().abs().sum(dim=0)
            if self.mean_abs is None:
                self.mean_abs = batch_sum / total
            else:
                self.mean_abs.mul_(self.count / total).add_(batch_sum / total)
        self.count = total


@contextlib.contextmanager
def accumulate_statistics(
    modules: dict[str, nn.Module], hessian: bool = True, mean_abs: bool = True
) -> Iterator[dict[str, LinearStatistics]]:
    """Inside the `with`, every forward of a module in `modules` adds its input to that
    module's `LinearStatistics` (the yielded dict, by the same names). The hooks are removed
    on leaving, also after an error."""
    statistics = {name: LinearStatistics(want_hessian=hessian, want_mean_abs=mean_abs) for name in modules}
    handles = []
    for name, module in modules.items():

        def record(module, args, stats=statistics[name]):
            stats.add(args[0])

        handles.append(module.register_forward_pre_hook(record))
    try:
        yield statistics
    finally:
        for handle in handles:
            handle.remove()


def check_calibration_rows(rows, model: Transformer) -> list[torch.Tensor]:
    """Calibration rows as a list of 1-D LongTensors, checked against `model`: a (rows, seq)
    tensor or a sequence of 1-D token-id tensors/lists, each of 1 to max_position_embeddings
    ids below vocab_size."""
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 2:
            raise CalibrationError(
                f"calibration rows as a tensor must be 2-D (rows, seq); got shape {tuple(rows.shape)}"
            )
        rows = list(rows)
    if not isinstance(rows, Sequence) or isinstance(rows, str) or len(rows) == 0:
        raise CalibrationError("calibration needs at least one row of token ids (a list of 1-D LongTensors)")
    config = model.config
    checked = []
    for index, row in enumerate(rows):
        row = torch.as_tensor(row)
        if row.dim() != 1 or row.numel() == 0 or row.dtype.is_floating_point or row.dtype == torch.bool:
            raise CalibrationError(
                f"calibration row {index} must be a non-empty 1-D tensor of integer token ids; "
                f"got dtype {row.dtype}, shape {tuple(row.shape)}"
            )
        if row.numel() > config.max_position_embeddings:
            raise CalibrationError(
                f"calibration row {index} has {row.numel()} tokens, more than the model's "
                f"{config.max_position_embeddings} positions; cut the text into shorter rows"
            )
        if int(row.min()) < 0 or int(row.max()) >= config.vocab_size:
            raise CalibrationError(
                f"calibration row {index} holds token id {int(row.max()) if int(row.min()) >= 0 else int(row.min())}, "
                f"outside the model's vocabulary [0, {config.vocab_size})"
            )
        checked.append(row.long())
    return checked


def _batches(rows: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Consecutive rows of equal length stacked, at most `batch_size` per batch."""
    batches, current = [], []
    for row in rows:
        if current and (len(current) == batch_size or current[0].numel() != row.numel()):
            batches.append(torch.stack(current))
            current = []
        current.append(row)
    if current:
        batches.append(torch.stack(current))
    return batches


@torch.no_grad()
def collect_linear_statistics(
    model: Transformer,
    rows,
    names: Sequence[str],
    hessian: bool = True,
    mean_abs: bool = True,
    batch_size: int = 8,
) -> dict[str, LinearStatistics]:
    """Input statistics of the linear layers `names` over `rows`, in one pass of the whole
    model as it is (not sequential: every layer sees the unquantized layers before it)."""
    rows = check_calibration_rows(rows, model)
    modules = {name: model.get_submodule(name) for name in names}
    was_training = model.training
    model.eval()
    try:
        with accumulate_statistics(modules, hessian, mean_abs) as statistics:
            for batch in _batches(rows, batch_size):
                model(batch.to(model.device), compute_logits=False)
    finally:
        model.train(was_training)
    return statistics


@dataclass
class BlockCall:
    """One batch's input to a block: the hidden states and the other arguments `Block.forward`
    takes (rotary tables, mask, causal flag; no cache), which are the same for every block."""

    hidden: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    is_causal: bool
    extra: dict = field(default_factory=dict)

    def run(self, block: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`block` on these inputs (or on `hidden` in their place)."""
        x = self.hidden if hidden is None else hidden
        return block(x, self.rope, self.mask, self.is_causal, None, [])


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the model is not needed."""


@torch.no_grad()
def capture_block_inputs(model: Transformer, rows, batch_size: int = 8) -> list[BlockCall]:
    """The first block's inputs for each batch of calibration `rows`: the embeddings' output
    and the arguments every block takes. The forward stops at the first block."""
    rows = check_calibration_rows(rows, model)
    if len(model.blocks) == 0:
        raise CalibrationError("the model has no transformer blocks to calibrate")
    windows = {model.config.window_of_layer(i) for i in range(model.config.num_layers)}
    if len(windows) > 1:
        # Each window has its own mask; one captured mask would serve only some blocks.
        raise CalibrationError(
            "sequential calibration needs one attention mask for all blocks; this model mixes sliding "
            f"windows {sorted(map(str, windows))} between layers"
        )
    calls: list[BlockCall] = []

    def capture(module, args):
        x, rope, mask, is_causal, _cache, _router_logits = args
        calls.append(BlockCall(x.detach(), rope, mask, is_causal))
        raise _StopForward

    handle = model.blocks[0].register_forward_pre_hook(capture)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(rows, batch_size):
            try:
                model(batch.to(model.device), compute_logits=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    return calls


@torch.no_grad()
def run_block(block: nn.Module, calls: list[BlockCall]) -> list[BlockCall]:
    """The next block's inputs: `block` run on each call's hidden states, other arguments kept."""
    return [BlockCall(call.run(block), call.rope, call.mask, call.is_causal) for call in calls]


def block_linear_names(
    model: Transformer,
    include: Sequence[str] | None,
    exclude: Sequence[str],
    what: str,
) -> list[list[str]]:
    """The selected linear layers of each block (names relative to the model), in execution
    order, for a quantizer that works block by block. A layer outside the blocks (the LM head)
    is refused: calibrated quantizers here quantize the blocks and leave the head in fp."""
    from ..swap import linear_names

    names = linear_names(model, include, exclude)
    outside = [name for name in names if not name.startswith("blocks.")]
    if outside and include is not None:
        raise CalibrationError(
            f"{what} quantizes the transformer blocks' linear layers; {', '.join(outside)} lies outside them "
            "(the head stays in fp). Select layers inside blocks, e.g. include=['qkv', 'o', 'gate_up', 'down']"
        )
    per_block: list[list[str]] = [[] for _ in model.blocks]
    for name in names:
        if name.startswith("blocks."):
            per_block[int(name.split(".")[1])].append(name)
    return per_block
