"""Calibration observers: the fixed input range of a static INT8 layer, measured on sample data.

Static quantization (`w8a8.StaticInt8Linear`) fixes each layer's input grid before inference,
from the activations the layer sees on a few calibration rows. Where the grid ends is a trade:
a wide range wastes codes on values that almost never occur (rounding error everywhere), a
narrow one clips the rare large values (clipping error on those). Three observers pick it:

- **min-max**: the whole observed range. No clipping; one outlier widens the step for all.
- **percentile**: the range holding `percentile` percent of the values (99.99 by default), as
  NVIDIA's TensorRT / pytorch-quantization calibrators do: a few outliers are clipped.
- **MSE**: the range that minimises the squared quantization error over the observed
  distribution: the clipping error of the values outside plus the rounding error of the
  values inside (Banner et al. 2019, "Post-training 4-bit quantization of convolutional
  networks for rapid-deployment", treat the same trade in closed form for known densities).

Percentile and MSE read a histogram of the values. It has 2 x 16384 bins of width w over
[-16384 w, 16384 w); when a value falls outside, w doubles and neighbouring bins merge, which is
exact, so the histogram never needs a second pass over the data and never re-bins by guesswork.

`calibrate(model, rows, observer=...)` runs a model over calibration token rows with a forward
hook on each selected linear layer and returns an observer per layer. `channel_absmax` gives
the per-channel max |x| of chosen modules' outputs (SmoothQuant's statistic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..swap import linear_names
from .w8a8 import ActivationQuantError

__all__ = [
    "OBSERVERS",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "calibrate",
    "channel_absmax",
    "check_calibration_rows",
    "make_observer",
]

_HALF_BINS = 16384


class Observer:
    """Accumulates statistics of the values it is shown and turns them into an input range.

    `symmetric=True` gives (-a, a), the range of a grid with zero point 0; False gives
    (low, high) for a grid with a zero point. `values` counts what was observed."""

    name = ""

    def __init__(self, symmetric: bool = True) -> None:
        self.symmetric = bool(symmetric)
        self.values = 0
        self.low = float("inf")
        self.high = float("-inf")

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ActivationQuantError("calibration activations hold inf or NaN; the model overflowed on these rows")
        low, high = torch.aminmax(x)
        self.low, self.high = min(self.low, float(low)), max(self.high, float(high))
        self.values += x.numel()
        self._observe(x)

    def _observe(self, x: torch.Tensor) -> None:
        """Whatever else a subclass keeps of x (flat fp32, finite, non-empty)."""

    def range(self) -> tuple[float, float]:
        """The input range (low, high) to quantize over."""
        if not self.values:
            raise ActivationQuantError(f"the {self.name} observer has seen no values; calibrate it on some data first")
        return self._range()

    def _range(self) -> tuple[float, float]:
        raise NotImplementedError

    def settings(self) -> dict:
        return {"observer": self.name, "symmetric": self.symmetric}

    def _symmetric_or(self, absmax: float, low: float, high: float) -> tuple[float, float]:
        return (-absmax, absmax) if self.symmetric else (low, high)


class MinMaxObserver(Observer):
    """The whole observed range: (min, max), or (-max|x|, max|x|) when symmetric."""

    name = "minmax"

    def _range(self) -> tuple[float, float]:
        return self._symmetric_or(max(-self.low, self.high), self.low, self.high)


class HistogramObserver(Observer):
    """An observer that also keeps a histogram of the values: `2 * 16384` bins of equal width,
    symmetric about 0, whose width doubles (merging bin pairs exactly) when a value falls
    outside."""

    def __init__(self, symmetric: bool = True) -> None:
        super().__init__(symmetric)
        self.width = 0.0
        self.counts = torch.zeros(2 * _HALF_BINS, dtype=torch.int64)

    def _observe(self, x: torch.Tensor) -> None:
        absmax = float(x.abs().max())
        if absmax == 0.0 and self.width == 0.0:
            self.counts[_HALF_BINS] += x.numel()  # all zeros: the bin [0, w) whatever w becomes
            return
        if self.width == 0.0:
            self.width = absmax / _HALF_BINS
        while absmax >= _HALF_BINS * self.width:
            self._double_width()
        index = torch.floor(x / self.width).long().clamp(-_HALF_BINS, _HALF_BINS - 1) + _HALF_BINS
        self.counts += torch.bincount(index, minlength=2 * _HALF_BINS)

    def _double_width(self) -> None:
        # Bin i covers [(i - H) w, (i - H + 1) w); with width 2w, bins 2m and 2m + 1 (counted
        # from the middle) become bin m: an exact merge.
        middle = self.counts.view(-1, 2).sum(dim=1)
        merged = torch.zeros_like(self.counts)
        merged[_HALF_BINS // 2 : _HALF_BINS // 2 + _HALF_BINS] = middle
        self.counts, self.width = merged, self.width * 2

    def edges(self) -> torch.Tensor:
        """The 2 * 16384 + 1 bin edges (fp64)."""
        return (torch.arange(-_HALF_BINS, _HALF_BINS + 1, dtype=torch.float64)) * self.width

    def absolute_counts(self) -> torch.Tensor:
        """Counts of |x| per bin [j w, (j + 1) w), j = 0 .. 16383."""
        return self.counts[_HALF_BINS:] + self.counts[:_HALF_BINS].flip(0)

    def _quantile(self, counts: torch.Tensor, edges: torch.Tensor, fraction: float) -> float:
        """The value below which `fraction` of the histogram's mass lies, interpolated linearly
        within its bin."""
        cumulative = counts.cumsum(0).double()
        target = fraction * float(cumulative[-1])
        index = int(
            torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).clamp(max=len(counts) - 1)
        )
        before = float(cumulative[index - 1]) if index else 0.0
        inside = float(counts[index]) or 1.0
        return float(edges[index] + (edges[index + 1] - edges[index]) * min(max((target - before) / inside, 0.0), 1.0))


class PercentileObserver(HistogramObserver):
    """The range holding `percentile` percent of the values: symmetric, that percentile of |x|;
    asymmetric, the (100 - p)th and pth percentiles of x. Never wider than the values seen."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, symmetric: bool = True) -> None:
        if not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
            raise ActivationQuantError(f"percentile must be in (50, 100]; got {percentile!r}")
        super().__init__(symmetric)
        self.percentile = float(percentile)

    def _range(self) -> tuple[float, float]:
        fraction = self.percentile / 100
        if self.width == 0.0:
            return (0.0, 0.0)
        if self.symmetric:
            edges = torch.arange(_HALF_BINS + 1, dtype=torch.float64) * self.width
            absmax = min(self._quantile(self.absolute_counts(), edges, fraction), max(-self.low, self.high))
            return -absmax, absmax
        edges = self.edges()
        low = max(self._quantile(self.counts, edges, 1 - fraction), self.low)
        high = min(self._quantile(self.counts, edges, fraction), self.high)
        return low, high

    def settings(self) -> dict:
        return super().settings() | {"percentile": self.percentile}


def _rounding_error_integral(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The integral from 0 to x of (t - step * round(t / step))^2 dt: whole steps contribute
    step^3 / 12 each, the part r past the nearest grid point r^3 / 3."""
    nearest = torch.floor(x / step + 0.5)
    past = x - nearest * step
    return nearest * step**3 / 12 + past**3 / 3


class MSEObserver(HistogramObserver):
    """The range, among `steps` shrinkings of the min-max range (fractions 1/steps .. 1 of it),
    with the least squared error over the histogram: a value outside costs its squared
    distance to the range, values inside the mean rounding error over their bin (values taken
    as spread evenly within each bin, so a step wider than the whole distribution costs what
    it really does rather than step^2 / 12)."""

    name = "mse"

    def __init__(self, steps: int = 200, symmetric: bool = True) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ActivationQuantError(f"steps must be a positive int; got {steps!r}")
        super().__init__(symmetric)
        self.steps = steps

    def _range(self) -> tuple[float, float]:
        if self.width == 0.0:
            return (0.0, 0.0)
        edges = self.edges()
        occupied = self.counts > 0
        left, right = edges[:-1][occupied], edges[1:][occupied]
        counts, centres = self.counts[occupied].double(), (left + right) / 2
        fractions = torch.arange(1, self.steps + 1, dtype=torch.float64) / self.steps
        if self.symmetric:
            absmax = max(-self.low, self.high)
            lows, highs, codes = -fractions * absmax, fractions * absmax, 254
        else:
            lows, highs, codes = fractions * min(self.low, 0.0), fractions * max(self.high, 0.0), 255
        step = ((highs - lows) / codes)[:, None]
        # (candidates, occupied bins): grid points lie at low + k * step.
        rounding = (
            _rounding_error_integral(right - lows[:, None], step) - _rounding_error_integral(left - lows[:, None], step)
        ) / (right - left)
        outside = (lows[:, None] - centres).clamp(min=0) + (centres - highs[:, None]).clamp(min=0)
        error = (torch.where(outside > 0, outside**2, rounding) * counts).sum(dim=1)
        best = int(torch.argmin(error))
        return float(lows[best]), float(highs[best])

    def settings(self) -> dict:
        return super().settings() | {"steps": self.steps}


OBSERVERS: dict[str, type[Observer]] = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(observer: str | Callable[[], Observer] = "minmax", **options) -> Observer:
    """An observer by name ("minmax", "percentile", "mse") with its options (symmetric,
    percentile, steps), or from a callable that returns one."""
    if callable(observer) and not isinstance(observer, str):
        made = observer(**options)
        if not isinstance(made, Observer):
            raise ActivationQuantError(f"the observer factory returned {type(made).__name__}, not an Observer")
        return made
    if observer not in OBSERVERS:
        raise ActivationQuantError(f"observer must be one of {sorted(OBSERVERS)} or a callable; got {observer!r}")
    try:
        return OBSERVERS[observer](**options)
    except TypeError as err:
        raise ActivationQuantError(f"observer {observer!r} does not take these options: {err}") from None


def check_calibration_rows(model: nn.Module, rows) -> list[torch.Tensor]:
    """The calibration rows as (batch, seq) LongTensors, refused when they are not token ids
    the model can take."""
    if rows is None or isinstance(rows, torch.Tensor) or not isinstance(rows, Iterable):
        raise ActivationQuantError(
            "calibration takes a list of token-id rows (LongTensor, 1-D (seq,) or 2-D (batch, seq)); "
            f"got {type(rows).__name__}"
        )
    rows = list(rows)
    if not rows:
        raise ActivationQuantError("calibration needs at least one row of token ids; got an empty list")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    checked = []
    for i, row in enumerate(rows):
        if not isinstance(row, torch.Tensor) or row.dtype != torch.long or row.dim() not in (1, 2) or row.numel() == 0:
            raise ActivationQuantError(
                f"calibration row {i} must be a non-empty LongTensor of token ids, 1-D or 2-D; got "
                f"{getattr(row, 'dtype', type(row).__name__)} {tuple(getattr(row, 'shape', ()))}"
            )
        if int(row.min()) < 0 or (vocab is not None and int(row.max()) >= vocab):
            raise ActivationQuantError(
                f"calibration row {i} holds token ids outside [0, {vocab}): {int(row.min())}..{int(row.max())}"
            )
        checked.append(row if row.dim() == 2 else row[None])
    return checked


def _run(model: nn.Module, rows: list[torch.Tensor]) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for row in rows:
                model(row.to(device))
    finally:
        model.train(was_training)


def calibrate(
    model: nn.Module,
    rows: Sequence[torch.Tensor],
    observer: str | Callable[[], Observer] = "minmax",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = ("lm_head",),
    **options,
) -> dict[str, Observer]:
    """Run `model` (in eval mode, without gradients) over calibration `rows` (a list of
    LongTensors of token ids, (seq,) or (batch, seq)) and return, for each linear layer
    `swap.linear_names(model, include, exclude)` selects, an observer of its inputs:
    `make_observer(observer, **options)`. A layer no token reached (an expert the router never
    chose) has an observer with `values == 0`."""
    checked = check_calibration_rows(model, rows)
    names = linear_names(model, include, exclude)
    if not names:
        raise ActivationQuantError("no linear layer is selected for calibration; check include and exclude")
    observers = {name: make_observer(observer, **options) for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _, args, seen=observers[name]: seen.observe(args[0]))
        for name in names
    ]
    try:
        _run(model, checked)
    finally:
        for handle in handles:
            handle.remove()
    return observers


def channel_absmax(model: nn.Module, rows: Sequence[torch.Tensor], modules: Sequence[str]) -> dict[str, torch.Tensor]:
    """max |x| per channel (last dimension, fp32) of each named module's output over the
    calibration rows: SmoothQuant's activation statistic."""
    checked = check_calibration_rows(model, rows)
    found: dict[str, torch.Tensor] = {}

    def keep(name: str, output: torch.Tensor) -> None:
        current = output.detach().float().abs().reshape(-1, output.shape[-1]).amax(dim=0)
        found[name] = current if name not in found else torch.maximum(found[name], current)

    handles = [
        model.get_submodule(name).register_forward_hook(lambda _, __, out, name=name: keep(name, out))
        for name in modules
    ]
    try:
        _run(model, checked)
    finally:
        for handle in handles:
            handle.remove()
    return found
