"""Model merging: several fine-tuned models (or LoRA adapters) of one base made into one model,
without training.

Each method combines the tensors of one parameter across models; the state-dict, model and
checkpoint-directory functions apply it parameter by parameter.

- linear: the weighted average of the models, weights normalised to sum to 1 (model soups,
  Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
  accuracy without increasing inference time").
- task_arithmetic: base + sum_i lambda_i (theta_i - base) (Ilharco et al. 2023, "Editing Models
  with Task Arithmetic"); theta_i - base is model i's task vector, and a negative lambda
  subtracts a task.
- ties: TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
  Models"): trim each task vector to its `density` share of largest magnitudes, elect each
  entry's sign (by total mass, or PEFT's variant by how many task vectors point each way), and
  average, entry by entry, only the weighted values that agree with the elected sign.
- dare_linear / dare_ties: DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing
  Abilities from Homologous Models as a Free Lunch"): drop each task-vector entry with
  probability p = 1 - density and rescale the kept ones by 1 / (1 - p), so each entry keeps its
  expected value; then task arithmetic or the TIES sign election and disjoint mean.
- slerp: spherical linear interpolation between two models, tensor by tensor (Shoemake 1985,
  as mergekit applies it), falling back to linear interpolation where the two tensors are nearly
  colinear (the angle, and the sine divided by, near zero).

The task-vector methods give what `peft.utils.merge_utils` gives on the same tensors (its
conventions: the sign is elected on the trimmed task vectors before the weights scale them; the
disjoint mean divides by how many task vectors agree, at least 1; DARE's mask is one Bernoulli
draw per tensor, in model order, from the generator); the tests check it.

LoRA adapters over one base (`combine_lora_adapters`, `merge_lora_adapters`): each adapter's
update of a Hugging Face module is its delta weight s B A. The "cat" combination stacks the
adapters' A (scaled by weight times scale) and B into one adapter of the summed rank, which is
their weighted sum exactly, as PEFT's `add_weighted_adapter(combination_type="cat")`; the "svd"
combination merges the delta weights with any task-vector method and factors the result back
to a chosen rank, as PEFT's `svd` combinations do. `merge_lora_adapters` adds the merged deltas
into the base weights instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint import (
    hf_linear_parts,
    load_model,
    read_config,
    read_generation_config,
    resolve_dtype,
    save_model,
)
from ..config import ConfigError
from ..model import Transformer
from ..swap import plain_linear, swap_linears
from .attach import adapter_kind, merge_adapter_dir
from .lora import DoraLinear, LoraConfig, LoraLinear, apply_lora, load_adapter, save_adapter
from .peft_format import ADAPTER_WEIGHTS, PEFT_PREFIX

__all__ = [
    "ADAPTER_COMBINATIONS",
    "MERGE_METHODS",
    "SIGN_METHODS",
    "MergeConfig",
    "MergeError",
    "combine_lora_adapters",
    "dare_linear",
    "dare_ties",
    "disjoint_mean",
    "linear",
    "magnitude_prune",
    "majority_sign_mask",
    "merge_adapters_into_checkpoint",
    "merge_checkpoints",
    "merge_lora_adapters",
    "merge_models",
    "merge_state_dicts",
    "random_drop",
    "slerp",
    "task_arithmetic",
    "ties",
]

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
SIGN_METHODS = ("total", "frequency")
ADAPTER_COMBINATIONS = ("cat", "svd")
# The methods that combine task vectors (model minus base), and those of them that trim first.
_TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
# Above this |cosine| two tensors count as colinear for SLERP (mergekit's threshold): the sine
# of the angle is then too small to divide by.
SLERP_COLINEAR = 0.9995


class MergeError(ValueError):
    """Models, adapters or merge settings that do not fit; the message says what was wrong."""


# ----------------------------------------------------------------------------- tensor methods
def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        raise MergeError("nothing to merge: give at least one tensor")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise MergeError(f"tensors to merge must share one shape; got {', '.join(map(str, sorted(shapes)))}")
    return torch.stack(list(tensors))


def _weights_like(weights: Sequence[float] | torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """The weights as a float32 column broadcasting over a stack of tensors (one per model)."""
    weights = torch.as_tensor(weights, dtype=torch.float32, device=stacked.device).reshape(-1)
    if weights.numel() != stacked.shape[0]:
        raise MergeError(f"{weights.numel()} weight(s) for {stacked.shape[0]} tensor(s); give one weight per tensor")
    return weights.view(-1, *([1] * (stacked.dim() - 1)))


def _check_density(density: float, method: str) -> float:
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise MergeError(f"{method} needs a density in (0, 1] (the share of each task vector kept); got {density!r}")
    return float(density)


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the int(density * numel) entries of largest magnitude, zero the rest."""
    density = _check_density(density, "magnitude_prune")
    if density == 1:
        return tensor
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(keep).indices] = 1
    return tensor * mask.view_as(tensor)


def random_drop(
    tensor: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE's drop: keep each entry with probability `density` (one Bernoulli draw per entry
    from `generator`, torch's default one when None) and divide the kept ones by `density`."""
    density = _check_density(density, "DARE")
    if density == 1:
        return tensor
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return kept / density if rescale else kept


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' sign election over task vectors stacked on dim 0: True where an entry's sign is the
    elected one. "total": the sign of the entries' sum (the paper's mass); "frequency": the sign
    more task vectors have (PEFT's variant). Ties elect +; zero entries never agree."""
    if method not in SIGN_METHODS:
        raise MergeError(f"unknown sign election {method!r}; accepted: {', '.join(SIGN_METHODS)}")
    signs = stacked.sign()
    mass = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(mass >= 0, 1, -1)
    return signs == elected


def disjoint_mean(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the mean of the values the mask keeps (0 where none)."""
    agreeing = mask.sum(dim=0).clamp(min=1)
    return (stacked * mask).sum(dim=0) / agreeing


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """The weighted average (a model soup): sum_i w_i t_i / sum_i w_i; equal weights when None.
    Weights must be positive."""
    stacked = _stacked(tensors)
    if weights is None:
        weights = [1.0] * stacked.shape[0]
    column = _weights_like(weights, stacked)
    if not bool((column > 0).all()):
        raise MergeError(f"linear averaging needs positive weights; got {column.flatten().tolist()}")
    return (stacked * (column / column.sum())).sum(dim=0)


def task_arithmetic(task_vectors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """sum_i lambda_i tau_i over task vectors tau_i (model minus base)."""
    stacked = _stacked(task_vectors)
    return (stacked * _weights_like(weights, stacked)).sum(dim=0)


def _elect_and_average(trimmed: torch.Tensor, weights, majority_sign: str) -> torch.Tensor:
    mask = majority_sign_mask(trimmed, majority_sign)  # elected on the unweighted trimmed vectors, as PEFT
    return disjoint_mean(trimmed * _weights_like(weights, trimmed), mask)


def ties(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    majority_sign: str = "total",
) -> torch.Tensor:
    """TIES-merging: trim each task vector to `density` by magnitude, elect signs, disjoint mean."""
    _check_density(density, "ties")
    trimmed = _stacked([magnitude_prune(t, density) for t in task_vectors])
    return _elect_and_average(trimmed, weights, majority_sign)


def dare_linear(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE, then task arithmetic."""
    _check_density(density, "dare_linear")
    dropped = _stacked([random_drop(t, density, generator=generator) for t in task_vectors])
    return (dropped * _weights_like(weights, dropped)).sum(dim=0)


def dare_ties(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE, then TIES' sign election and disjoint mean."""
    _check_density(density, "dare_ties")
    dropped = _stacked([random_drop(t, density, generator=generator) for t in task_vectors])
    return _elect_and_average(dropped, weights, majority_sign)


def slerp(start: torch.Tensor, end: torch.Tensor, t: float, colinear: float = SLERP_COLINEAR) -> torch.Tensor:
    """Spherical interpolation from `start` (t=0) to `end` (t=1) along the great circle through
    the two tensors seen as vectors: sin((1-t) w) / sin w * start + sin(t w) / sin w * end, w the
    angle between them. Where |cos w| > `colinear` (or either is zero) it is the straight line
    (1-t) start + t end. Computed in float32, returned in `start`'s dtype."""
    if tuple(start.shape) != tuple(end.shape):
        raise MergeError(f"slerp needs tensors of one shape; got {tuple(start.shape)} and {tuple(end.shape)}")
    _check_fraction(t)
    a, b = start.float(), end.float()
    norms = a.norm() * b.norm()
    cosine = float((a * b).sum() / norms) if norms > 0 else 1.0
    if abs(cosine) > colinear:
        merged = (1 - t) * a + t * b
    else:
        angle = math.acos(max(-1.0, min(1.0, cosine)))
        sine = math.sin(angle)
        merged = (math.sin((1 - t) * angle) / sine) * a + (math.sin(t * angle) / sine) * b
    return merged.to(start.dtype)


def _check_fraction(t) -> float:
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1:
        raise MergeError(f"slerp's t must be in [0, 1] (0: the first model, 1: the second); got {t!r}")
    return float(t)


# ----------------------------------------------------------------------------- the settings
@dataclass(frozen=True)
class MergeConfig:
    """How to merge.

    method: one of `MERGE_METHODS`.
    weights: one per model. linear: positive, normalised to sum to 1 (default equal);
        task_arithmetic, ties, dare_*: each task vector's lambda, any sign (default 1 each);
        slerp takes `t` instead.
    density: ties and dare_*: the share of each task vector kept, in (0, 1].
    majority_sign: ties and dare_ties: "total" (the paper) or "frequency" (PEFT's variant).
    t: slerp's position between the two models (0: the first, 1: the second; default 0.5).
    seed: dare_*: the seed of the drop masks (the same seed, the same merge).
    """

    method: str
    weights: tuple[float, ...] | None = None
    density: float | None = None
    majority_sign: str = "total"
    t: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise MergeError(f"unknown merge method {self.method!r}; accepted: {', '.join(MERGE_METHODS)}")
        if self.weights is not None:
            weights = tuple(self.weights)
            if not weights or not all(
                isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in weights
            ):
                raise MergeError(f"weights must be finite numbers, one per model; got {self.weights!r}")
            if self.method == "slerp":
                raise MergeError("slerp takes t (where between the two models), not weights")
            if self.method == "linear" and not all(w > 0 for w in weights):
                raise MergeError(f"linear averaging needs positive weights (they are normalised); got {list(weights)}")
            object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        if self.method in _DENSITY_METHODS:
            if self.density is None:
                raise MergeError(f"{self.method} needs a density: the share of each task vector kept, in (0, 1]")
            _check_density(self.density, self.method)
        elif self.density is not None:
            raise MergeError(
                f"{self.method} takes no density; density applies to {', '.join(_DENSITY_METHODS)} (trimming)"
            )
        if self.majority_sign not in SIGN_METHODS:
            raise MergeError(f"unknown majority_sign {self.majority_sign!r}; accepted: {', '.join(SIGN_METHODS)}")
        if self.t is not None:
            if self.method != "slerp":
                raise MergeError(f"t is slerp's position between two models; {self.method} takes no t")
            _check_fraction(self.t)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MergeError(f"seed must be an integer; got {self.seed!r}")

    @property
    def needs_base(self) -> bool:
        return self.method in _TASK_VECTOR_METHODS

    def check_inputs(self, num_models: int, has_base: bool) -> None:
        """Refuse a number of models, of weights, or a base that the method cannot take."""
        if self.method == "slerp" and num_models != 2:
            raise MergeError(f"slerp interpolates between exactly two models; got {num_models}")
        if self.method == "linear" and num_models < 2:
            raise MergeError(f"linear averaging needs at least two models; got {num_models}")
        if num_models < 1:
            raise MergeError(f"{self.method} needs at least one model besides the base; got none")
        if self.weights is not None and len(self.weights) != num_models:
            raise MergeError(f"{len(self.weights)} weight(s) for {num_models} model(s); give one weight per model")
        if self.needs_base and not has_base:
            raise MergeError(f"{self.method} merges task vectors (model minus base): it needs the base model")
        if not self.needs_base and has_base:
            raise MergeError(
                f"{self.method} combines the models themselves and takes no base; "
                f"a base is for {', '.join(_TASK_VECTOR_METHODS)}"
            )

    def model_weights(self, num_models: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * num_models

    def combine(self, tensors: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply the method to one parameter's tensors (task vectors for the task-vector methods)."""
        weights = self.model_weights(len(tensors))
        if self.method == "linear":
            return linear(tensors, weights)
        if self.method == "task_arithmetic":
            return task_arithmetic(tensors, weights)
        if self.method == "ties":
            return ties(tensors, weights, self.density, self.majority_sign)
        if self.method == "dare_linear":
            return dare_linear(tensors, weights, self.density, generator)
        if self.method == "dare_ties":
            return dare_ties(tensors, weights, self.density, self.majority_sign, generator)
        return slerp(tensors[0], tensors[1], 0.5 if self.t is None else self.t)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ----------------------------------------------------------------------------- state dicts
def merge_state_dicts(
    models: Sequence[Mapping[str, torch.Tensor]],
    config: MergeConfig,
    base: Mapping[str, torch.Tensor] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge state dicts of one architecture, parameter by parameter (in the first model's key
    order, which is the order of DARE's random draws). Floating tensors are merged in float32
    and returned in the first model's dtype; other tensors (integer buffers) must be equal in
    every model and are kept. `names` name the models in errors (default "model 1", ...).
    """
    config.check_inputs(len(models), base is not None)
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(models))]
    every = [("base", base)] if base is not None else []
    every += list(zip(names, models, strict=True))
    _check_same_tensors(every)
    reference = models[0]
    generator = None
    merged = {}
    for key, first in reference.items():
        if not first.is_floating_point():
            differing = [name for name, state in every if not torch.equal(state[key], first)]
            if differing:
                raise MergeError(f"{key} is not a floating tensor and differs between models ({', '.join(differing)})")
            merged[key] = first
            continue
        tensors = [state[key].float() for state in models]
        if config.needs_base:
            origin = base[key].float()
            if config.method.startswith("dare") and generator is None:
                generator = _generator(config.seed, origin.device)
            merged[key] = (origin + config.combine([t - origin for t in tensors], generator)).to(first.dtype)
        else:
            merged[key] = config.combine(tensors).to(first.dtype)
    return merged


def _check_same_tensors(states: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> None:
    """Every state dict has the first's names and shapes; else say which differ, with both shapes."""
    (first_name, first), rest = states[0], states[1:]
    for name, state in rest:
        missing = [key for key in first if key not in state]
        extra = [key for key in state if key not in first]
        if missing or extra:
            raise MergeError(
                f"{name} and {first_name} have different parameters"
                + (f"; {name} lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "")
                + (f"; {name} has extra {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "")
                + "; merging needs models of one architecture"
            )
        wrong = [
            f"{key} is {tuple(first[key].shape)} in {first_name} but {tuple(state[key].shape)} in {name}"
            for key in first
            if tuple(first[key].shape) != tuple(state[key].shape)
        ]
        if wrong:
            more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
            raise MergeError(f"shapes differ: {'; '.join(wrong[:3])}{more}; merging needs models of one architecture")


# ----------------------------------------------------------------------------- models
def merge_models(
    models: Sequence[nn.Module],
    config: MergeConfig,
    base: nn.Module | None = None,
    names: Sequence[str] | None = None,
) -> nn.Module:
    """Merge models of one architecture into the first of `models`, in place, and return it.
    Parameters shared inside a model (a tied head) are merged once."""
    config.check_inputs(len(models), base is not None)
    states = [dict(model.named_parameters()) for model in models]
    merged = merge_state_dicts(
        [{k: v.detach() for k, v in s.items()} for s in states],
        config,
        None if base is None else {k: v.detach() for k, v in base.named_parameters()},
        names,
    )
    with torch.no_grad():
        for key, parameter in states[0].items():
            parameter.copy_(merged[key])
    return models[0]


def merge_checkpoints(
    model_dirs: Sequence[str | Path],
    out: str | Path,
    config: MergeConfig,
    base_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Merge Hugging Face checkpoint directories of one architecture into a new one at `out`.

    The configs are compared before any weights load (a difference is named with both values);
    the models load through genforge's loader in float32, merge, and are written with
    `checkpoint.save_model` (assembled beside `out`, then renamed into place) in `dtype`, by
    default the dtype the base (or first model) was saved in. The tokenizer and
    generation_config.json of the base (or first model) go with it.
    """
    config.check_inputs(len(model_dirs), base_dir is not None)
    dirs = [Path(d) for d in model_dirs]
    reference_dir = Path(base_dir) if base_dir is not None else dirs[0]
    labelled = ([("base", reference_dir)] if base_dir is not None else []) + [(str(d), d) for d in dirs]
    if Path(out).resolve() in {d.resolve() for _, d in labelled}:
        raise MergeError(f"--out {out} is one of the input models; write the merge to a new directory")
    configs = []
    for label, directory in labelled:
        try:
            configs.append((label, directory, read_config(directory)))
        except ConfigError as err:
            raise MergeError(f"{directory}: {err}") from None
    _check_same_configs(configs)
    out_dtype = resolve_dtype(dtype if dtype is not None else "auto", configs[0][2].hf_extra)
    models = [load_model(d) for d in dirs]
    base = load_model(reference_dir) if base_dir is not None else None
    merged = merge_models(models, config, base, names=[str(d) for d in dirs])
    tokenizer = _tokenizer_of(reference_dir)
    generation = read_generation_config(reference_dir)
    return save_model(merged.to(out_dtype), out, tokenizer=tokenizer, generation_config=generation or None)


def _check_same_configs(configs: Sequence[tuple[str, Path, object]]) -> None:
    label, _, first = configs[0]
    for other_label, _, other in configs[1:]:
        if other == first:
            continue
        differing = [
            f"{f.name} {getattr(first, f.name)!r} in {label} but {getattr(other, f.name)!r} in {other_label}"
            for f in dataclasses.fields(first)
            if f.compare and getattr(first, f.name) != getattr(other, f.name)
        ]
        raise MergeError(
            f"the models differ in architecture: {'; '.join(differing[:4])}; merging needs one architecture and base"
        )


def _tokenizer_of(directory: Path):
    from ..tokenizer import TOKENIZER_FILE, Tokenizer

    return Tokenizer.from_dir(directory) if (directory / TOKENIZER_FILE).is_file() else None


# ----------------------------------------------------------------------------- LoRA adapters
@dataclass(frozen=True)
class _ModuleLora:
    """One adapter's LoRA on one Hugging Face module: where its rows sit in a genforge layer,
    A (r, in), B (rows, r) and the scale s, so that its delta weight is s B A."""

    layer: str
    start: int
    rows: int
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return (self.b @ self.a) * self.scaling


@dataclass(frozen=True)
class _Adapter:
    directory: Path
    modules: dict[str, _ModuleLora]  # by Hugging Face module name
    max_rank: int  # PEFT's count for "cat": max(r, every rank_pattern value)
    config: LoraConfig
    order: list[str]  # every Hugging Face linear module of the model, in the model's order


def _read_lora(model: Transformer, directory: Path) -> _Adapter:
    """One LoRA adapter's tensors on `model`'s modules, checked as `load_adapter` checks them;
    the model is left as it was."""
    layouts = hf_linear_parts(model)
    # PEFT saves the base weight of a targeted lm_head; loading puts it in place: keep the
    # model's own to put back, and refuse an adapter whose copy differs (another base).
    replaced = _base_layer_names(directory)
    kept = {
        name: model.get_submodule(name).weight.detach().clone()
        for name, layout in layouts.items()
        if replaced & set(layout.names)
    }
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    load_adapter(model, directory)
    try:
        modules, layer_dora = {}, []
        for layer_name, layer in model.named_modules():
            if not isinstance(layer, LoraLinear):
                continue
            if isinstance(layer, DoraLinear):
                layer_dora.append(layer_name)
            for part in layer.parts:
                modules[part.hf_name] = _ModuleLora(
                    layer_name,
                    part.start,
                    part.rows,
                    layer.lora_A[part.key].detach().clone(),
                    layer.lora_B[part.key].detach().clone(),
                    part.scaling,
                )
        config = model.lora_config
    finally:
        _remove_lora(model, grads)
    changed = [name for name, weight in kept.items() if not torch.equal(model.get_submodule(name).weight, weight)]
    with torch.no_grad():
        for name, weight in kept.items():
            model.get_submodule(name).weight.copy_(weight)
    if changed:
        raise MergeError(
            f"the adapter in {directory} carries base weights for {', '.join(changed)} that differ from this "
            "model's: it was trained on another base"
        )
    if layer_dora:
        raise MergeError(
            f"the adapter in {directory} is DoRA: its learned magnitudes do not add across adapters; "
            "merge it alone (merge_and_unload) instead"
        )
    max_rank = max([config.r, *config.rank_pattern.values()])
    order = [name for layout in layouts.values() for name in layout.names]
    return _Adapter(directory, modules, max_rank, config, order)


def _base_layer_names(directory: Path) -> set[str]:
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        return set()  # load_adapter says what is missing
    suffix = ".base_layer.weight"
    with safe_open(weights, framework="pt", device="cpu") as reader:
        return {key[len(PEFT_PREFIX) : -len(suffix)] for key in reader.keys() if key.endswith(suffix)}


def _remove_lora(model: nn.Module, requires_grad: Mapping[str, bool]) -> None:
    """Put plain linear layers (the unchanged base weights) back where LoRA layers are."""
    swap_linears(model, plain_linear, kinds=(LoraLinear,))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, True))
    for attribute in ("lora_config", "lora_layouts"):
        if hasattr(model, attribute):
            delattr(model, attribute)


def _check_adapter_merge(config: MergeConfig, count: int) -> None:
    if config.method == "slerp":
        raise MergeError(
            "slerp interpolates two whole models; adapters merge with linear, task arithmetic, ties or dare"
        )
    if count < 1:
        raise MergeError("give at least one adapter directory")
    if config.weights is not None and len(config.weights) != count:
        raise MergeError(f"{len(config.weights)} weight(s) for {count} adapter(s); give one weight per adapter")


def _read_adapters(model: Transformer, adapter_dirs: Sequence[str | Path], config: MergeConfig) -> list[_Adapter]:
    _check_adapter_merge(config, len(adapter_dirs))
    if any(isinstance(module, LoraLinear) for module in model.modules()):
        raise MergeError("the model already has LoRA layers; merge adapters onto the base model as loaded")
    return [_read_lora(model, Path(d)) for d in adapter_dirs]


def _adapter_weights(config: MergeConfig, count: int) -> list[float]:
    weights = config.model_weights(count)
    if config.method == "linear":  # a weighted average of the adapters' updates
        total = sum(weights)
        weights = [w / total for w in weights]
    return weights


def _module_order(adapters: Sequence[_Adapter]) -> list[str]:
    """The modules any adapter targets, in the model's order (PEFT's, and so the order of
    DARE's random draws)."""
    return sorted({name for adapter in adapters for name in adapter.modules}, key=adapters[0].order.index)


def _merged_deltas(adapters: Sequence[_Adapter], config: MergeConfig) -> dict[str, tuple[_ModuleLora, torch.Tensor]]:
    """Per Hugging Face module, the adapters' delta weights merged by `config` (only the
    adapters that target the module take part, with their own weights, as in PEFT)."""
    weights = _adapter_weights(config, len(adapters))
    delta_config = config if config.method != "linear" else dataclasses.replace(config, method="task_arithmetic")
    generator = None
    merged = {}
    for hf_name in _module_order(adapters):
        present = [(adapter.modules[hf_name], w) for adapter, w in zip(adapters, weights) if hf_name in adapter.modules]
        deltas = [module.delta() for module, _ in present]
        if config.method.startswith("dare") and generator is None:
            generator = _generator(config.seed, deltas[0].device)
        module_config = dataclasses.replace(delta_config, weights=tuple(w for _, w in present))
        merged[hf_name] = (present[0][0], module_config.combine(deltas, generator))
    return merged


def merge_lora_adapters(
    model: Transformer, adapter_dirs: Sequence[str | Path], config: MergeConfig | None = None
) -> Transformer:
    """Merge LoRA adapters of one base into the model's own weights, in place: each module's
    adapter delta weights s B A are combined by `config` (default: task arithmetic, weight 1
    each: all adapters added) and added to its base weight. The model stays a plain model,
    exportable with `checkpoint.save_model`."""
    config = config or MergeConfig("task_arithmetic")
    adapters = _read_adapters(model, adapter_dirs, config)
    with torch.no_grad():
        for module, delta in _merged_deltas(adapters, config).values():
            weight = model.get_submodule(module.layer).weight
            weight[module.start : module.start + module.rows] += delta.to(weight.dtype)
    return model


def combine_lora_adapters(
    model: Transformer,
    adapter_dirs: Sequence[str | Path],
    out: str | Path,
    config: MergeConfig | None = None,
    combination: str = "cat",
    svd_rank: int | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Combine LoRA adapters of one base (`model`, left unchanged) into one adapter, written in
    PEFT's format at `out`; its scale is 1 (lora_alpha = r).

    combination "cat": exact. Each module's A is the adapters' lambda_i s_i A_i stacked, B their
    B_i side by side, so B A = sum_i lambda_i s_i B_i A_i; the rank is the sum of the adapters'
    ranks (PEFT's count: each adapter's largest rank), zero-padded where an adapter leaves a
    module out, as PEFT's `add_weighted_adapter(combination_type="cat")`. `config` may be
    task_arithmetic (lambda = its weights) or linear (weights normalised).
    combination "svd": each module's delta weights merged by `config` (any method but slerp),
    then the best rank-`svd_rank` factorisation (default: the largest adapter rank), as PEFT's
    `svd`, `ties_svd`, `dare_linear_svd` and `dare_ties_svd`.
    """
    config = config or MergeConfig("task_arithmetic")
    if combination not in ADAPTER_COMBINATIONS:
        raise MergeError(f"unknown combination {combination!r}; accepted: {', '.join(ADAPTER_COMBINATIONS)}")
    if combination == "cat" and config.method not in ("task_arithmetic", "linear"):
        raise MergeError(
            f"the cat combination is a weighted sum (task_arithmetic or linear); {config.method} needs "
            "combination 'svd' (merged delta weights factored to a rank)"
        )
    if combination == "cat" and svd_rank is not None:
        raise MergeError("svd_rank applies to combination 'svd'; cat's rank is the sum of the adapters' ranks")
    adapters = _read_adapters(model, adapter_dirs, config)
    if combination == "cat":
        rank = sum(adapter.max_rank for adapter in adapters)
        factors = _cat_factors(adapters, _adapter_weights(config, len(adapters)), rank)
    else:
        rank = svd_rank if svd_rank is not None else max(adapter.max_rank for adapter in adapters)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MergeError(f"svd_rank must be a positive integer; got {svd_rank!r}")
        factors = {
            hf_name: _svd_factors(delta, rank) for hf_name, (_, delta) in _merged_deltas(adapters, config).items()
        }
    layouts = hf_linear_parts(model)
    for hf_name in factors:
        layer = next(name for name, layout in layouts.items() if hf_name in layout.names)
        rows = layouts[layer].sizes[layouts[layer].names.index(hf_name)]
        limit = min(model.get_submodule(layer).in_features, rows)
        if rank > limit:
            raise MergeError(
                f"the combined rank {rank} exceeds {hf_name}'s min(in, out) = {limit}"
                + ("; use combination 'svd' with svd_rank <= that" if combination == "cat" else "; lower svd_rank")
            )
    first = adapters[0].config
    combined = LoraConfig(target_modules=sorted(factors), r=rank, lora_alpha=rank, lora_dropout=first.lora_dropout)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    apply_lora(model, combined)
    try:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, LoraLinear):
                    for part in layer.parts:
                        a, b = factors[part.hf_name]
                        layer.lora_A[part.key].copy_(a)
                        layer.lora_B[part.key].copy_(b)
        return save_adapter(model, out, base_model_name_or_path)
    finally:
        _remove_lora(model, grads)


def _cat_factors(
    adapters: Sequence[_Adapter], weights: Sequence[float], rank: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors = {}
    for hf_name in _module_order(adapters):
        present = [(adapter.modules[hf_name], w) for adapter, w in zip(adapters, weights) if hf_name in adapter.modules]
        a = torch.cat([module.a * (w * module.scaling) for module, w in present])
        b = torch.cat([module.b for module, _ in present], dim=1)
        padded_a = a.new_zeros(rank, a.shape[1])
        padded_b = b.new_zeros(b.shape[0], rank)
        padded_a[: a.shape[0]], padded_b[:, : b.shape[1]] = a, b
        factors[hf_name] = (padded_a, padded_b)
    return factors


def _svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, in) and B (out, rank) with B A the best rank-`rank` approximation of `delta`."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, s.numel())
    return vh[:rank], u[:, :rank] * s[:rank]


# ----------------------------------------------------------------------------- adapters into a checkpoint
def merge_adapters_into_checkpoint(
    model_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    out: str | Path,
    config: MergeConfig | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Merge PEFT adapters into the base model in `model_dir` and write the result as a Hugging
    Face checkpoint at `out` (atomically, with the base's tokenizer and generation config), in
    `dtype`, by default the dtype the base was saved in.

    One LoRA (DoRA included) or IA3 adapter without `config` merges exactly (`merge_and_unload`,
    `merge_ia3`). Several LoRA adapters, or a `config`, merge by `merge_lora_adapters` (default
    task arithmetic with weight 1: the adapters' updates added).
    """
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise MergeError("give at least one adapter directory")
    if Path(out).resolve() in {Path(model_dir).resolve(), *(d.resolve() for d in dirs)}:
        raise MergeError(f"--out {out} is one of the inputs; write the merged model to a new directory")
    kinds = {str(d): adapter_kind(d) for d in dirs}
    unknown = {d: k for d, k in kinds.items() if k not in ("LORA", "IA3")}
    if unknown:
        shown = ", ".join(f"{d} ({k})" for d, k in unknown.items())
        raise MergeError(f"cannot merge {shown}: genforge merges LoRA, DoRA and IA3 adapters")
    several = len(dirs) > 1 or config is not None
    if several and "IA3" in kinds.values():
        raise MergeError("IA3 adapters merge one at a time, without merge settings (their scales multiply, not add)")
    if config is not None:
        _check_adapter_merge(config, len(dirs))
    try:
        base_config = read_config(model_dir)
    except ConfigError as err:
        raise MergeError(f"{model_dir}: {err}") from None
    out_dtype = resolve_dtype(dtype if dtype is not None else "auto", base_config.hf_extra)
    model = load_model(model_dir)
    if several:
        merge_lora_adapters(model, dirs, config)
    else:
        merge_adapter_dir(model, dirs[0])
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for attribute in ("lora_config", "lora_layouts", "ia3_config", "ia3_layouts"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    model_dir = Path(model_dir)
    generation = read_generation_config(model_dir)
    return save_model(
        model.to(out_dtype), out, tokenizer=_tokenizer_of(model_dir), generation_config=generation or None
    )
