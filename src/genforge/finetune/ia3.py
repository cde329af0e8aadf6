"""IA3: learned scaling vectors over a model's linear layers (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"), in PEFT's
format both ways.

An IA3 layer keeps W and b frozen and learns one vector l, starting at ones: it scales the
layer's output, y = l * (W x + b), or, for a module named in `feedforward_modules`, its input,
y = W (l * x) + b, as PEFT's `IA3Config` does. As with LoRA (`lora.py`), a fused genforge
layer (`qkv`, `gate_up`) holds one vector per targeted Hugging Face part, saved under that
module's name (`...k_proj.ia3_l`), and untargeted parts are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import LinearParts, hf_linear_parts
from ..model import Transformer
from ..swap import name_matches, plain_linear, swap_linears
from .lora import LoraLinear, _leaf_names, _saved_targets, _targeted
from .peft_format import (
    ADAPTER_CONFIG,
    PEFT_PREFIX,
    adapter_weights_path,
    check_adapter_fits,
    check_adapter_shapes,
    read_adapter_config,
    read_adapter_tensors,
    write_adapter,
)

__all__ = [
    "IA3Config",
    "IA3Error",
    "IA3Linear",
    "apply_ia3",
    "ia3_peft_names",
    "load_ia3_adapter",
    "merge_ia3",
    "save_ia3_adapter",
    "unmerge_ia3",
]


class IA3Error(ValueError):
    """An IA3 configuration, model or adapter that does not fit; the message says what was wrong."""


@dataclass
class IA3Config:
    """What to scale, with PEFT's `IA3Config` field names and meanings.

    target_modules: Hugging Face module names as PEFT takes them (`["k_proj", "v_proj",
        "down_proj"]`), genforge layer names (`["qkv", "down"]`, globs), or one regular
        expression over whole names in either convention, as `LoraConfig.target_modules`.
    feedforward_modules: which targets scale their input instead of their output: a list (a
        module whose Hugging Face name ends in an entry, PEFT's rule, or whose genforge name
        matches it) or one regular expression over whole names. `apply_ia3` refuses an entry
        that selects no targeted module; `load_ia3_adapter` ignores one, as PEFT does with the
        default feedforward_modules it saves (Llama's down_proj, whatever the targets).
    """

    target_modules: list[str] | str
    feedforward_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        for what in ("target_modules", "feedforward_modules"):
            value = getattr(self, what)
            if value is None and what == "feedforward_modules":
                self.feedforward_modules = []
            elif isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise IA3Error(f"{what} {value!r} is not a regular expression: {err}") from None
            elif not isinstance(value, Sequence) or not all(isinstance(name, str) and name for name in value):
                raise IA3Error(f"{what} must be a list of module names or one regular expression; got {value!r}")
            else:
                setattr(self, what, list(value))
        if not self.target_modules:
            raise IA3Error("target_modules must name at least one module (e.g. ['k_proj', 'v_proj', 'down_proj'])")

    def is_feedforward(self, hf_name: str, genforge_name: str) -> bool:
        modules = self.feedforward_modules
        if isinstance(modules, str):
            return bool(re.fullmatch(modules, hf_name) or re.fullmatch(modules, genforge_name))
        return any(hf_name.endswith(key) or name_matches(genforge_name, [key]) for key in modules)


@dataclass(frozen=True)
class IA3Part:
    """One Hugging Face module's vector inside a genforge layer: output rows start..start+rows."""

    hf_name: str
    key: str
    start: int
    rows: int
    feedforward: bool


class IA3Linear(nn.Module):
    """A linear layer whose targeted parts scale their output rows, or their input where
    feedforward (see the module doc). `weight` and `bias` stay this layer's own, frozen; each
    part's vector is `ia3_l.<part>`, shaped as PEFT's: (rows, 1), or (1, in) if feedforward."""

    def __init__(self, base: nn.Linear, parts: Sequence[IA3Part]) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.parts = tuple(parts)
        self.merged = False
        # PEFT keeps adapters of a half-precision model in float32 (autocast_adapter_dtype).
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        self.ia3_l = nn.ParameterDict(
            {
                part.key: nn.Parameter(
                    torch.ones(
                        (1, self.in_features) if part.feedforward else (part.rows, 1),
                        dtype=dtype,
                        device=base.weight.device,
                    )
                )
                for part in self.parts
            }
        )

    def extra_repr(self) -> str:
        parts = ", ".join(f"{p.key}{' (feedforward)' if p.feedforward else ''}" for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, ia3=[{parts}]"

    def _segments(self):
        """(rows, part or None) over the whole output, in order; None for rows no part targets."""
        row = 0
        for part in self.parts:
            if part.start > row:
                yield slice(row, part.start), None
            yield slice(part.start, part.start + part.rows), part
            row = part.start + part.rows
        if row < self.out_features:
            yield slice(row, self.out_features), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dtype = self.ia3_l[self.parts[0].key].dtype
        if not any(part.feedforward for part in self.parts):
            # Output scaling only: one product, then each row scaled (1 where untargeted).
            result = F.linear(x, self.weight, self.bias)
            scale = torch.cat(
                [
                    self.ia3_l[part.key].flatten()
                    if part
                    else self.weight.new_ones(rows.stop - rows.start, dtype=dtype)
                    for rows, part in self._segments()
                ]
            )
            return (result * scale).to(result.dtype)
        # A feedforward part scales the input of its own rows only: one product per segment.
        pieces = []
        for rows, part in self._segments():
            bias = None if self.bias is None else self.bias[rows]
            if part is None:
                pieces.append(F.linear(x, self.weight[rows], bias))
            elif part.feedforward:
                scaled = (x.to(dtype) * self.ia3_l[part.key].flatten()).to(x.dtype)
                pieces.append(F.linear(scaled, self.weight[rows], bias))
            else:
                out = F.linear(x, self.weight[rows], bias)
                pieces.append((out * self.ia3_l[part.key].flatten()).to(out.dtype))
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merge(self) -> None:
        """Scale the weight (columns of a feedforward part's rows, else its rows and their bias), as PEFT merges."""
        if not self.merged:
            self._rescale(lambda tensor, vector: tensor * vector)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        # Exact division (PEFT adds 1e-8 to the vector, which float32 rounding hides near 1).
        if self.merged:
            self._rescale(lambda tensor, vector: tensor / vector)
            self.merged = False

    def _rescale(self, operation) -> None:
        for part in self.parts:
            rows = slice(part.start, part.start + part.rows)
            vector = self.ia3_l[part.key]
            weight = self.weight[rows]
            weight.copy_(operation(weight.to(vector.dtype), vector).to(weight.dtype))
            if not part.feedforward and self.bias is not None:
                bias = self.bias[rows]
                bias.copy_(operation(bias.to(vector.dtype), vector.flatten()).to(bias.dtype))


# ---------------------------------------------------------------------------------- apply
def _plan(
    model: Transformer, config: IA3Config, every_target: bool = True
) -> tuple[dict[str, list[IA3Part]], dict[str, LinearParts]]:
    """Which parts of which layers get a vector, checked before anything changes."""
    if not isinstance(model, Transformer):
        raise IA3Error(f"IA3 goes on a genforge Transformer (genforge.checkpoint.load_model); got {type(model)}")
    if getattr(model, "packed_for_inference", False):
        raise IA3Error("this model was packed for CPU inference; apply IA3 to the model as loaded, before packing")
    if any(isinstance(module, IA3Linear | LoraLinear) for module in model.modules()):
        raise IA3Error("this model already has adapter layers; apply or load one adapter into a freshly loaded model")
    layouts = hf_linear_parts(model)
    plan: dict[str, list[IA3Part]] = {}
    used: set[str] = set()
    feedforward_used: set[str] = set()
    for genforge_name, layout in layouts.items():
        start = 0
        for hf_name, rows in zip(layout.names, layout.sizes, strict=True):
            matched = _targeted(config, genforge_name, hf_name)
            if matched:
                used.update(matched)
                feedforward = config.is_feedforward(hf_name, genforge_name)
                if feedforward and isinstance(config.feedforward_modules, list):
                    feedforward_used.update(
                        key
                        for key in config.feedforward_modules
                        if hf_name.endswith(key) or name_matches(genforge_name, [key])
                    )
                key = hf_name.rsplit(".", 1)[-1]
                plan.setdefault(genforge_name, []).append(IA3Part(hf_name, key, start, rows, feedforward))
            start += rows
    if isinstance(config.target_modules, str):
        unmatched = [] if plan else [config.target_modules]
    elif not every_target:  # as PEFT loads adapters: one match is enough
        unmatched = [] if plan else list(config.target_modules)
    else:
        unmatched = [t for t in config.target_modules if t not in used]
    if unmatched:
        raise IA3Error(
            f"target_modules {', '.join(map(repr, unmatched))} match no linear layer of this "
            f"{model.config.family} model; its linear layers end in {', '.join(_leaf_names(layouts))}"
        )
    if every_target and isinstance(config.feedforward_modules, list):
        idle = [key for key in config.feedforward_modules if key not in feedforward_used]
        if idle:
            raise IA3Error(
                f"feedforward_modules {', '.join(map(repr, idle))} select no module of target_modules "
                f"{config.target_modules!r}; a feedforward module must also be a target"
            )
    head = model.lm_head
    if "lm_head" in plan and head is not None and head.weight is model.embed_tokens.weight:
        raise IA3Error(
            "lm_head shares its weight with embed_tokens (tied embeddings): a merged IA3 vector would change the "
            "embeddings too; leave lm_head out of target_modules"
        )
    return plan, layouts


def apply_ia3(model: Transformer, config: IA3Config) -> Transformer:
    """Put IA3 layers on the linear layers `config.target_modules` selects, in place, and
    freeze everything else (only the vectors train). Returns `model`."""
    plan, layouts = _plan(model, config)
    return _install(model, config, plan, layouts)


def _install(
    model: Transformer, config: IA3Config, plan: dict[str, list[IA3Part]], layouts: dict[str, LinearParts]
) -> Transformer:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    swap_linears(model, lambda layer, name: IA3Linear(layer, plan[name]), include=list(plan))
    # Kept for save_ia3_adapter (every layer's Hugging Face names); lora.py also reads ia3_config to refuse stacking.
    model.ia3_config = config
    model.ia3_layouts = layouts
    return model


def _ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    layers = {name: module for name, module in model.named_modules() if isinstance(module, IA3Linear)}
    if not layers:
        raise IA3Error("this model has no IA3 layers; call apply_ia3 or load_ia3_adapter first")
    return layers


def merge_ia3(model: nn.Module) -> nn.Module:
    """Fold every vector into its base weight (and a scaled output's bias)."""
    for layer in _ia3_layers(model).values():
        layer.merge()
    return model


def merge_and_unload_ia3(model: nn.Module) -> nn.Module:
    """Fold every vector into its base weight and put plain `nn.Linear` layers back: the model
    is then the adapted base model, which `checkpoint.save_model` exports and inference packs."""
    merge_ia3(model)
    swap_linears(model, plain_linear, kinds=(IA3Linear,))
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    del model.ia3_config, model.ia3_layouts
    return model


def unmerge_ia3(model: nn.Module) -> nn.Module:
    """Take merged vectors out of the base weights again."""
    for layer in _ia3_layers(model).values():
        layer.unmerge()
    return model


def ia3_peft_names(model: nn.Module) -> dict[str, str]:
    """Each vector's genforge name (`blocks.0.attn.qkv.ia3_l.k_proj`) -> the key PEFT saves it
    under (`base_model.model.model.layers.0.self_attn.k_proj.ia3_l`)."""
    return {
        f"{layer_name}.ia3_l.{part.key}": f"{PEFT_PREFIX}{part.hf_name}.ia3_l"
        for layer_name, layer in _ia3_layers(model).items()
        for part in layer.parts
    }


# ----------------------------------------------------------------------------- PEFT format
def save_ia3_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's IA3 vectors as a PEFT adapter directory that
    `peft.PeftModel.from_pretrained` loads onto the transformers model."""
    layers = _ia3_layers(model)
    layouts: dict[str, LinearParts] = model.ia3_layouts
    parts = [part for layer in layers.values() for part in layer.parts]
    every_hf_name = [name for layout in layouts.values() for name in layout.names]
    targets = _saved_targets(parts, every_hf_name)
    # PEFT wants feedforward_modules inside target_modules: by last name where the targets are last
    # names and every part of that name is feedforward, else both by full name.
    feedforward = sorted({p.key for p in parts if p.feedforward})
    if any(p.key in feedforward and not p.feedforward for p in parts) or not set(feedforward) <= set(targets):
        targets = sorted(p.hf_name for p in parts)
        feedforward = sorted(p.hf_name for p in parts if p.feedforward)
    adapter_config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM" if model.config.causal else None,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": any(layouts[name].transposed for name in layers),
        "init_ia3_weights": True,
        "inference_mode": True,
    }
    tensors = {
        peft_name: model.get_parameter(name).detach().contiguous().cpu()
        for name, peft_name in ia3_peft_names(model).items()
    }
    return write_adapter(directory, adapter_config, tensors)


def load_ia3_adapter(model: Transformer, directory: str | Path) -> Transformer:
    """Put the PEFT IA3 adapter saved in `directory` (safetensors) onto `model`, in place,
    after checking it against the model."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    saved = read_adapter_config(directory, "IA3", "load_ia3_adapter", IA3Error)
    unsupported = [key for key in ("exclude_modules", "modules_to_save") if saved.get(key) not in (None, [], "")]
    if unsupported:
        raise IA3Error(f"{path} uses {', '.join(unsupported)}, which genforge's IA3 does not support yet")
    if saved.get("target_modules") in (None, [], ""):
        raise IA3Error(f"{path} names no target_modules")
    config = IA3Config(saved["target_modules"], saved.get("feedforward_modules"))
    weights = adapter_weights_path(directory, IA3Error)
    try:
        plan, layouts = _plan(model, config, every_target=False)
    except IA3Error as err:
        raise IA3Error(f"the adapter in {directory} does not fit this model: {err}") from None
    expected = {
        f"{PEFT_PREFIX}{part.hf_name}.ia3_l": (1, model.get_submodule(name).in_features)
        if part.feedforward
        else (part.rows, 1)
        for name, parts in plan.items()
        for part in parts
    }
    stored = read_adapter_tensors(weights)
    check_adapter_fits(directory, expected, stored, "IA3 vectors", IA3Error)
    check_adapter_shapes(directory, expected, stored, IA3Error)
    _install(model, config, plan, layouts)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, peft_name in ia3_peft_names(model).items():
            parameters[name].copy_(stored[peft_name])
    return model
