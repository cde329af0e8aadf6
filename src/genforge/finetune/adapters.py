"""Adapters that add small modules to a frozen model: BitFit, bottleneck adapters and AdapterFusion.

BitFit (Ben Zaken et al. 2021, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models") trains only the model's bias terms. Llama-style
decoders have none on their linear layers, so `apply_bitfit` gives the targeted layers zero
biases through the Linear seam (the model computes exactly what it did) and sets the config's
bias flags, so the biases are ordinary weights that `checkpoint.save_model` exports and
transformers loads. It adds only biases the family's Hugging Face format can hold (Llama: the
attention layers together, `attention_bias`, and the MLP, `mlp_bias`; Gemma and Qwen3: the
attention layers); elsewhere it trains the biases the model has and refuses a target it would
have to invent one for, since the result could not be exported.

A bottleneck adapter (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP")
maps a sublayer's output h to h + up(act(down(h))): a down-projection to `bottleneck_size`
features, a nonlinearity, an up-projection back, and a residual. The up-projection starts at
zero, so a fresh adapter leaves the model unchanged. Houlsby placement puts one after the
attention output projection and one after the MLP of each targeted block; Pfeiffer placement
(Pfeiffer et al. 2020, "AdapterHub" / 2021, "AdapterFusion") only the one after the MLP. Both
act on the projection's output before the block's residual add (and before a post-norm
model's LayerNorm), installed by wrapping `attn.o` and `mlp.down` in `AdapterLinear`. The
papers' further variants (Pfeiffer's adapter reading the pre-norm residual, trainable layer
norms inside the adapter) are not reproduced: in both placements the adapter is the formula
above.

AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning") combines N adapters trained separately at the same places. With h the
sublayer output and z_n = adapter_n(h), each token attends over the adapters:
s = softmax_n((h Q) . (z_n K)), output = sum_n s_n (z_n V), with Q and K random and V the
identity at the start (the paper's initialisation, so with one adapter the output is that
adapter's), and only Q, K, V training. `fusion_regularization` is the penalty ||V - I||^2
that keeps V near its start.

A bottleneck adapter is nonlinear, so it cannot be folded into the linear layer's weight:
`merge_adapters` refuses it. PEFT has no bottleneck adapters, so they save in genforge's own
directory format (see `save_adapters`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MixtureOfExperts, Transformer
from ..swap import linear_names, swap_linears
from .ia3 import IA3Linear
from .lora import LoraLinear
from .peft_format import (
    ADAPTER_CONFIG,
    adapter_weights_path,
    check_adapter_fits,
    check_adapter_shapes,
    read_adapter_config,
    read_adapter_tensors,
    write_adapter,
)

__all__ = [
    "ADAPTER_ACTIVATIONS",
    "ADAPTER_FORMAT",
    "ADAPTER_PLACEMENTS",
    "FUSION",
    "AdapterConfig",
    "AdapterError",
    "AdapterFusion",
    "AdapterLinear",
    "BottleneckAdapter",
    "adapter_state_dict",
    "apply_adapter_fusion",
    "apply_adapters",
    "apply_bitfit",
    "fusion_regularization",
    "load_adapters",
    "merge_adapters",
    "save_adapters",
    "set_active_adapter",
]

ADAPTER_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}
# Which linear layer of a block each placement wraps: the adapter acts on that projection's output.
ADAPTER_PLACEMENTS = {"houlsby": ("attn.o", "mlp.down"), "pfeiffer": ("mlp.down",)}
# The `peft_type` of genforge's adapter directories: PEFT's own loaders refuse it by that name.
ADAPTER_FORMAT = "GENFORGE_BOTTLENECK_ADAPTERS"
FORMAT_VERSION = 1
# set_active_adapter's name for the fusion layer; no adapter may be called this.
FUSION = "fusion"
_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Weights sampled per wrapped base layer into a saved adapter's record of its base, and the
# tolerance they are compared with: loose enough for a base loaded in another dtype, tight
# enough to tell another checkpoint of the same shape.
_SAMPLES = 8
_SAMPLE_RTOL, _SAMPLE_ATOL = 1e-2, 1e-6


class AdapterError(ValueError):
    """An adapter configuration, model or adapter directory that does not fit; the message says what was wrong."""


# ---------------------------------------------------------------------------------- config
@dataclass
class AdapterConfig:
    """A bottleneck adapter's shape and places.

    bottleneck_size: the adapter's inner width, 1 to the hidden size; or
    reduction_factor: hidden size / bottleneck size (the AdapterHub convention; 16 when neither is given).
    activation: a name in `ADAPTER_ACTIVATIONS`.
    placement: "houlsby" (after the attention output projection and after the MLP) or
        "pfeiffer" (after the MLP only).
    target_layers: the block indices that get adapters (negative counts from the end); None: every block.
    """

    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    placement: str = "houlsby"
    target_layers: list[int] | None = None

    def __post_init__(self) -> None:
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise AdapterError(
                f"give bottleneck_size ({self.bottleneck_size}) or reduction_factor ({self.reduction_factor}), not both"
            )
        if self.bottleneck_size is not None:
            if isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int):
                raise AdapterError(f"bottleneck_size must be an integer; got {self.bottleneck_size!r}")
            if self.bottleneck_size < 1:
                raise AdapterError(f"bottleneck_size must be at least 1; got {self.bottleneck_size}")
        else:
            if self.reduction_factor is None:
                self.reduction_factor = 16
            factor = self.reduction_factor
            if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor >= 1:
                raise AdapterError(
                    f"reduction_factor must be a number of at least 1 (hidden size / bottleneck size); got {factor!r}"
                )
        if self.activation not in ADAPTER_ACTIVATIONS:
            raise AdapterError(
                f"unknown activation {self.activation!r}; accepted: {', '.join(sorted(ADAPTER_ACTIVATIONS))}"
            )
        if self.placement not in ADAPTER_PLACEMENTS:
            raise AdapterError(
                f"unknown placement {self.placement!r}; accepted: 'houlsby' (after attention and MLP) or "
                "'pfeiffer' (after the MLP)"
            )
        if self.target_layers is not None:
            layers = self.target_layers
            if (
                isinstance(layers, str | int)
                or not isinstance(layers, Sequence)
                or not layers
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            ):
                raise AdapterError(f"target_layers must be a non-empty list of block indices or None; got {layers!r}")
            self.target_layers = list(layers)

    def size_for(self, hidden_size: int) -> int:
        """The bottleneck width on a model of `hidden_size`, refused outside 1..hidden_size."""
        if self.bottleneck_size is not None:
            size = self.bottleneck_size
            what = f"bottleneck_size {size}"
        else:
            size = int(hidden_size // self.reduction_factor)
            what = f"reduction_factor {self.reduction_factor} gives a bottleneck of {size}, which"
        if not 1 <= size <= hidden_size:
            raise AdapterError(
                f"{what} does not fit this model: a bottleneck must be 1 to the hidden size ({hidden_size})"
            )
        return size

    def blocks(self, num_layers: int) -> list[int]:
        """The targeted block indices, in order, refused when one is not a block of the model."""
        if self.target_layers is None:
            return list(range(num_layers))
        unknown = [i for i in self.target_layers if not -num_layers <= i < num_layers]
        if unknown:
            raise AdapterError(
                f"target_layers {unknown} name no block of this model; it has {num_layers} blocks "
                f"(0 to {num_layers - 1}, or -{num_layers} to -1 from the end)"
            )
        return sorted({i % num_layers for i in self.target_layers})


# --------------------------------------------------------------------------------- modules
class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))) (Houlsby et al. 2019). `down` keeps nn.Linear's initialisation;
    `up` starts at zero, so the adapter starts as the identity."""

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str, dtype=None, device=None) -> None:
        super().__init__()
        self.activation = activation
        self.act = ADAPTER_ACTIVATIONS[activation]
        self.down = nn.Linear(hidden_size, bottleneck_size, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck_size, hidden_size, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdapterFusion(nn.Module):
    """Attention over several adapters' outputs per token (Pfeiffer et al. 2021): the query
    from the sublayer output h, keys and values from each adapter's output z_n;
    softmax_n((h Q) . (z_n K)) weighs the z_n V. V starts as the identity (see the module doc)."""

    def __init__(self, hidden_size: int, adapter_names: Sequence[str], dtype=None, device=None) -> None:
        super().__init__()
        self.adapter_names = tuple(adapter_names)
        self.query = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype, device=device)
        self.key = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype, device=device)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(hidden_size, dtype=self.value.weight.dtype))

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapter_names)}"

    def forward(self, h: torch.Tensor, adapter_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        z = torch.stack(tuple(adapter_outputs), dim=-2)  # (..., adapters, hidden)
        scores = (self.key(z) @ self.query(h).unsqueeze(-1)).squeeze(-1)  # (..., adapters)
        weights = torch.softmax(scores, dim=-1)
        return (weights.unsqueeze(-2) @ self.value(z)).squeeze(-2)


class AdapterLinear(nn.Module):
    """A linear layer followed by bottleneck adapters on its output, one active at a time or
    all combined by an `AdapterFusion`. `weight` and `bias` stay the layer's own (frozen), so
    the base model's state-dict keys are unchanged; adapter `name` is `adapters.<name>`."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.adapters = nn.ModuleDict()
        self.fusion: AdapterFusion | None = None
        self.active: str | None = None  # an adapter's name, FUSION, or None for the bare layer
        # Adapters of a half-precision model train in float32, as PEFT keeps its adapters.
        self.adapter_dtype = (
            torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, active={self.active!r}"

    def add_adapter(self, name: str, bottleneck_size: int, activation: str) -> BottleneckAdapter:
        adapter = BottleneckAdapter(
            self.out_features, bottleneck_size, activation, dtype=self.adapter_dtype, device=self.weight.device
        )
        self.adapters[name] = adapter
        return adapter

    def add_fusion(self, adapter_names: Sequence[str]) -> AdapterFusion:
        self.fusion = AdapterFusion(
            self.out_features, adapter_names, dtype=self.adapter_dtype, device=self.weight.device
        )
        return self.fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.active is None:
            return out
        h = out.to(self.adapter_dtype)
        if self.active == FUSION:
            fused = self.fusion(h, [self.adapters[name](h) for name in self.fusion.adapter_names])
            return fused.to(out.dtype)
        if self.active not in self.adapters:  # this adapter does not reach this layer
            return out
        return self.adapters[self.active](h).to(out.dtype)


# ------------------------------------------------------------------------------- install
def _check_model(model: nn.Module, what: str) -> None:
    if not isinstance(model, Transformer):
        raise AdapterError(f"{what} go on a genforge Transformer (genforge.checkpoint.load_model); got {type(model)}")
    if getattr(model, "packed_for_inference", False):
        raise AdapterError(f"this model was packed for CPU inference; apply {what} to the model as loaded, first")


def _adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLinear)}


def _placed_layers(model: Transformer, config: AdapterConfig) -> list[str]:
    """The linear layers `config` puts an adapter after, checked to be plain or adapter linears."""
    blocks = config.blocks(model.config.num_layers)
    moe = [i for i in blocks if isinstance(model.blocks[i].mlp, MixtureOfExperts)]
    if moe and "mlp.down" in ADAPTER_PLACEMENTS[config.placement]:
        raise AdapterError(
            f"block {moe[0]}'s MLP is a mixture of experts: an adapter after the MLP would need the mixed "
            "output, which no single linear layer produces; bottleneck adapters support dense MLPs only"
        )
    names = [f"blocks.{i}.{leaf}" for i in blocks for leaf in ADAPTER_PLACEMENTS[config.placement]]
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear | AdapterLinear):
            raise AdapterError(
                f"{name} is a {type(module).__name__}, not a plain linear layer; bottleneck adapters go on the "
                "model as loaded (not on top of LoRA, IA3 or quantized layers)"
            )
    return names


def _check_name(name: str, model: nn.Module) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == FUSION:
        raise AdapterError(
            f"adapter name {name!r} must be letters, digits, '_' or '-' (and not {FUSION!r}, the fusion layer's name)"
        )
    if name in getattr(model, "adapter_configs", {}):
        raise AdapterError(f"this model already has an adapter named {name!r}; choose another name")


def _wrap(model: Transformer, names: Sequence[str]) -> dict[str, AdapterLinear]:
    """AdapterLinear at each of `names`, wrapping the plain linear layers through the Linear seam."""
    plain = [name for name in names if not isinstance(model.get_submodule(name), AdapterLinear)]
    if plain:
        swap_linears(model, lambda layer, name: AdapterLinear(layer), include=plain)
    return {name: model.get_submodule(name) for name in names}


def _train_only(model: nn.Module, modules: Sequence[nn.Module]) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(True)


def apply_adapters(model: Transformer, config: AdapterConfig, name: str = "default") -> Transformer:
    """Put bottleneck adapter `name` where `config` says, in place, make it the active one, and
    freeze everything else (earlier adapters too: only this one trains). Returns `model`.

    A model may hold several adapters (at the same or different places) for AdapterFusion or
    switching (`set_active_adapter`); each is saved and loaded by name.
    """
    _check_model(model, "bottleneck adapters")
    _check_name(name, model)
    names = _placed_layers(model, config)
    size = config.size_for(model.config.hidden_size)
    layers = _wrap(model, names)
    adapters = [layer.add_adapter(name, size, config.activation) for layer in layers.values()]
    _train_only(model, adapters)
    # Kept for save_adapters and set_active_adapter: each adapter's config, by name.
    model.adapter_configs = {**getattr(model, "adapter_configs", {}), name: config}
    set_active_adapter(model, name)
    return model


def set_active_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Which adapter the model computes with: an adapter's name, `FUSION` (the fusion layer
    over its adapters) or None (the base model). Trainability is left as it is."""
    layers = _adapter_layers(model)
    known = set(getattr(model, "adapter_configs", {}))
    fused = any(layer.fusion is not None for layer in layers.values())
    if name is not None and name not in known and not (name == FUSION and fused):
        accepted = sorted(known) + ([FUSION] if fused else []) + ["None"]
        raise AdapterError(f"this model has no adapter {name!r}; accepted: {', '.join(map(repr, accepted))}")
    for layer in layers.values():
        layer.active = name
    return model


def apply_adapter_fusion(model: Transformer, adapters: Sequence[str | Path] | Mapping[str, str | Path]) -> Transformer:
    """Fuse several adapters with an AdapterFusion layer at each place they share, in place;
    only the fusion layers train. Returns `model`.

    `adapters` lists adapter names already on the model and adapter directories (loaded under
    the directory's name), or maps names to directories; a directory must hold one adapter.
    All of them must sit at the same layers, and a directory saved for another base is
    refused as `load_adapters` refuses it. Everything is checked before the model changes.
    """
    _check_model(model, "adapters")
    if any(layer.fusion is not None for layer in _adapter_layers(model).values()):
        raise AdapterError("this model already has a fusion layer; fuse into a model without one")
    entries = list(adapters.items()) if isinstance(adapters, Mapping) else [(None, entry) for entry in adapters]
    if not entries:
        raise AdapterError("give at least one adapter (a name on the model or a saved adapter directory) to fuse")
    present = getattr(model, "adapter_configs", {})
    layers = _adapter_layers(model)
    names: list[str] = []
    places: dict[str, list[str]] = {}
    to_load: list[_SavedAdapters] = []
    for name, entry in entries:
        if name is None and isinstance(entry, str) and entry in present:
            names.append(entry)
            places[entry] = sorted(ln for ln, layer in layers.items() if entry in layer.adapters)
            continue
        directory = Path(entry)
        if not directory.is_dir():
            raise AdapterError(
                f"{str(entry)!r} is neither an adapter on this model ({', '.join(map(repr, present)) or 'none'}) "
                "nor an adapter directory"
            )
        name = name if name is not None else directory.name
        if name in present or name in names:
            raise AdapterError(
                f"an adapter named {name!r} is already {'on this model' if name in present else 'to be fused'}; "
                f"pass a mapping {{new_name: directory}} to load {directory} under another name"
            )
        saved = _read_saved(model, directory, name, check_base_weights=True)
        if saved.fusion:
            raise AdapterError(f"{directory} holds a fusion already; fuse adapter directories that hold one adapter")
        (old,) = saved.configs
        names.append(name)
        places[name] = sorted(saved.places[old])
        to_load.append(saved)
    if len(set(names)) != len(names):
        raise AdapterError(f"each adapter may be fused once; got {names}")
    first = names[0]
    for name in names[1:]:
        if places[name] != places[first]:
            raise AdapterError(
                f"adapters to fuse must sit at the same layers: {first!r} is at {', '.join(places[first])}; "
                f"{name!r} is at {', '.join(places[name])}"
            )
    # Everything checked: now the model changes.
    for saved in to_load:
        _install_saved(model, saved)
    layers = _adapter_layers(model)
    fusions = [layers[layer_name].add_fusion(names) for layer_name in places[first]]
    _train_only(model, fusions)
    set_active_adapter(model, FUSION)
    model.adapter_fusion = tuple(names)
    return model


def fusion_regularization(model: nn.Module) -> torch.Tensor:
    """sum over fusion layers of ||V - I||_F^2, to add (times a small weight) to the loss so
    the value projections stay near their identity start."""
    fusions = [layer.fusion for layer in _adapter_layers(model).values() if layer.fusion is not None]
    if not fusions:
        raise AdapterError("this model has no fusion layer; call apply_adapter_fusion first")
    total = 0
    for fusion in fusions:
        weight = fusion.value.weight
        total = total + (weight - torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)).pow(2).sum()
    return total


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter and fusion tensors alone, by genforge name (`blocks.0.mlp.down.adapters.default.up.weight`)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".adapters." in name or ".fusion." in name}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold adapters into the base weights where that is defined.

    BitFit's biases are already the model's own weights: the model is returned with every
    parameter trainable again, ready for `checkpoint.save_model`. A bottleneck adapter (and a
    fusion over adapters) puts a nonlinearity between its two projections, so no change of
    the linear layer's weight computes it: refused with AdapterError.
    """
    layers = _adapter_layers(model)
    if layers:
        raise AdapterError(
            f"bottleneck adapters cannot be merged: an adapter computes h + up(act(down(h))), nonlinear in h, "
            f"which no change of {next(iter(layers))}'s weight reproduces. Keep the adapters (save_adapters / "
            "load_adapters), or train LoRA or IA3 where a merged model is needed"
        )
    if not getattr(model, "bitfit_biases", None):
        raise AdapterError("this model has no adapters and no BitFit biases to merge")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    del model.bitfit_biases
    return model


# --------------------------------------------------------------------------------- BitFit
# The linear layers a family's Hugging Face format can give a bias, as groups that share one
# config flag (genforge's flags, then the layers): adding a bias to one layer of a group adds
# zero biases to all of them, so the exported config's flag describes the weights exactly.
_BIAS_GROUPS = {
    "llama": (
        (("qkv_bias", "attn_out_bias"), ("attn.qkv", "attn.o")),
        (("mlp_bias",), ("mlp.gate_up", "mlp.up", "mlp.down")),
    ),
    "gemma": ((("qkv_bias", "attn_out_bias"), ("attn.qkv", "attn.o")),),
    "qwen3": ((("qkv_bias", "attn_out_bias"), ("attn.qkv", "attn.o")),),
}


def _bias_group(family: str, layer_name: str):
    for group in _BIAS_GROUPS.get(family, ()):
        if any(layer_name.endswith("." + leaf) for leaf in group[1]):
            return group
    return None


def _zero_bias_linear(layer: nn.Linear, name: str) -> nn.Linear:
    """The same layer with a zero bias: a new nn.Linear sharing the weight."""
    biased = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    biased.weight = layer.weight
    biased.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device))
    return biased


def apply_bitfit(model: Transformer, targets: Sequence[str] | None = None) -> Transformer:
    """BitFit (Ben Zaken et al. 2021): freeze everything but bias terms, in place. Returns `model`.

    targets None: every bias of the model trains (linear layers, LayerNorms, the masked-LM
    head), and the blocks' linear layers without one get zero biases where the family's
    Hugging Face format can hold them (see the module doc). targets, linear-layer name patterns
    as `swap_linears` takes them (`["qkv", "down"]`): only those layers' biases train, each
    added (zero) if missing, refused if the format cannot hold it.

    The biases are ordinary parameters (`blocks.0.attn.qkv.bias`) and the config's bias flags
    follow them, so `checkpoint.save_model` exports the fine-tuned model as it is.
    `lora.trainable_parameter_count(model)` gives the trainable share.
    """
    _check_model(model, "BitFit biases")
    wrapped = [name for name, m in model.named_modules() if isinstance(m, AdapterLinear | LoraLinear | IA3Linear)]
    if wrapped:
        raise AdapterError(
            f"{wrapped[0]} already carries an adapter; apply BitFit to a model as loaded, without other adapters"
        )
    family = model.config.family
    block_linears = linear_names(model, include=["blocks.*"], exclude=["router"])
    if targets is None:
        chosen = [n for n in block_linears if model.get_submodule(n).bias is not None or _bias_group(family, n)]
    else:
        chosen = linear_names(model, include=targets)
        impossible = [n for n in chosen if model.get_submodule(n).bias is None and _bias_group(family, n) is None]
        if impossible:
            holders = sorted({leaf for group in _BIAS_GROUPS.get(family, ()) for leaf in group[1]})
            raise AdapterError(
                f"{', '.join(impossible[:4])} has no bias and a {family} model's Hugging Face format cannot hold one, "
                "so the fine-tuned model could not be exported; "
                + (
                    f"layers that can take a bias here: {', '.join(holders)}"
                    if holders
                    else "choose layers with biases"
                )
            )
    groups = {_bias_group(family, n) for n in chosen if model.get_submodule(n).bias is None}
    added = [n for n in block_linears if model.get_submodule(n).bias is None and _bias_group(family, n) in groups]
    if targets is None and not added and not any(name.endswith(".bias") for name, _ in model.named_parameters()):
        raise AdapterError(
            f"this {family} model has no bias terms and its Hugging Face format cannot hold any: BitFit has "
            "nothing to train; use LoRA or IA3"
        )
    if added:
        swap_linears(model, _zero_bias_linear, include=added)
        for flags, _ in groups:
            for flag in flags:
                setattr(model.config, flag, True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if targets is None:
        trained = [name for name, _ in model.named_parameters() if name.endswith(".bias")]
    else:
        trained = [f"{n}.bias" for n in chosen]
    for name in trained:
        model.get_parameter(name).requires_grad_(True)
    # The trained biases' names, for the report; merge_adapters drops it.
    model.bitfit_biases = trained
    model.bitfit_added = [f"{n}.bias" for n in added]
    return model


# ------------------------------------------------------------------------------ save/load
def _base_record(model: Transformer, layer_names: Sequence[str]) -> dict:
    """What an adapter was trained on: the model's shape and, per wrapped layer, its weight's
    shape and a few of its values (to tell another checkpoint of the same shape)."""
    layers = {}
    for name in layer_names:
        weight = model.get_submodule(name).weight.detach()
        flat = weight.reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, _SAMPLES).long().to(flat.device)
        layers[name] = {"shape": list(weight.shape), "sample": [float(v) for v in flat[index].float().cpu()]}
    config = model.config
    return {
        "family": config.family,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "layers": layers,
    }


def save_adapters(
    model: nn.Module,
    directory: str | Path,
    names: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapters (`names`, or every adapter on the model and its fusion layer) to
    `directory`, assembled beside it and renamed into place.

    genforge's adapter format: `adapter_config.json` holds `peft_type`
    "GENFORGE_BOTTLENECK_ADAPTERS", `format_version`, `adapters` (per name: the
    `AdapterConfig` fields, the resolved `bottleneck_size` and the wrapped `layers`),
    `fusion` (the fused adapter names and layers, or null) and `base_model` (family, hidden
    size, blocks, and per wrapped layer its weight shape and sampled values);
    `adapter_model.safetensors` holds `adapters.<name>.<layer>.{down,up}.{weight,bias}` and
    `fusion.<layer>.{query,key,value}.weight`.
    """
    layers = _adapter_layers(model)
    configs: dict[str, AdapterConfig] = getattr(model, "adapter_configs", {})
    if not layers or not configs:
        raise AdapterError("this model has no bottleneck adapters; call apply_adapters or load_adapters first")
    if isinstance(names, str):
        raise AdapterError(f"names takes a list of adapter names, e.g. [{names!r}]")
    chosen = list(configs) if names is None else list(names)
    unknown = [name for name in chosen if name not in configs]
    if unknown or not chosen:
        raise AdapterError(f"no adapter {unknown or chosen} on this model; it has {', '.join(map(repr, configs))}")
    fused = getattr(model, "adapter_fusion", None)
    save_fusion = fused is not None and set(fused) <= set(chosen)
    tensors: dict[str, torch.Tensor] = {}
    adapters = {}
    every_layer: set[str] = set()
    for name in chosen:
        placed = [layer_name for layer_name, layer in layers.items() if name in layer.adapters]
        every_layer.update(placed)
        adapter_config = asdict(configs[name])
        adapter_config["bottleneck_size"] = layers[placed[0]].adapters[name].down.out_features
        adapter_config["layers"] = placed
        adapters[name] = adapter_config
        for layer_name in placed:
            for key, tensor in layers[layer_name].adapters[name].state_dict().items():
                tensors[f"adapters.{name}.{layer_name}.{key}"] = tensor
    fusion = None
    if save_fusion:
        fused_layers = [layer_name for layer_name, layer in layers.items() if layer.fusion is not None]
        fusion = {"adapters": list(fused), "layers": fused_layers}
        for layer_name in fused_layers:
            for key, tensor in layers[layer_name].fusion.state_dict().items():
                tensors[f"fusion.{layer_name}.{key}"] = tensor
    adapter_config = {
        "peft_type": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": base_model_name_or_path,
        "adapters": adapters,
        "fusion": fusion,
        "base_model": _base_record(model, sorted(every_layer, key=list(layers).index)),
    }
    tensors = {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
    return write_adapter(directory, adapter_config, tensors)


def _check_base(model: Transformer, directory: Path, record: dict, check_base_weights: bool) -> None:
    """Refuse an adapter saved for another base, saying what it was saved for and what this model is."""
    config = model.config
    saved = f"{record.get('family')}, hidden {record.get('hidden_size')}, {record.get('num_layers')} blocks"
    here = f"{config.family}, hidden {config.hidden_size}, {config.num_layers} blocks"
    if saved != here:
        raise AdapterError(f"the adapter in {directory} was saved for a different base model ({saved}); this is {here}")
    for name, layer in record.get("layers", {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear | AdapterLinear):
            raise AdapterError(
                f"the adapter in {directory} was saved for a model with a linear layer {name}; this model has none"
            )
        shape = list(module.weight.shape)
        if shape != layer["shape"]:
            raise AdapterError(
                f"the adapter in {directory} was saved for {name} of shape {tuple(layer['shape'])}; "
                f"this model's is {tuple(shape)}"
            )
    if not check_base_weights:
        return
    # Values after every shape passed: a different architecture is the clearer message.
    for name, layer in record.get("layers", {}).items():
        flat = model.get_submodule(name).weight.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, len(layer["sample"])).long().to(flat.device)
        here_sample = flat[index].float().cpu()
        saved_sample = torch.tensor(layer["sample"], dtype=torch.float32)
        if not torch.allclose(here_sample, saved_sample, rtol=_SAMPLE_RTOL, atol=_SAMPLE_ATOL):
            raise AdapterError(
                f"the adapter in {directory} was trained on other base weights: sampled weights of {name} were "
                f"{[round(v, 5) for v in saved_sample.tolist()[:4]]}..., this model's are "
                f"{[round(v, 5) for v in here_sample.tolist()[:4]]}... (check_base_weights=False loads it anyway)"
            )


def _saved_config(directory: Path, name: str, fields: dict) -> AdapterConfig:
    known = {"bottleneck_size", "reduction_factor", "activation", "placement", "target_layers"}
    try:
        return AdapterConfig(
            bottleneck_size=fields["bottleneck_size"],
            activation=fields.get("activation", "relu"),
            placement=fields.get("placement", "houlsby"),
            target_layers=fields.get("target_layers"),
        )
    except (KeyError, TypeError) as err:
        raise AdapterError(
            f"{directory / ADAPTER_CONFIG}: adapter {name!r} is malformed ({err}); expected the fields {sorted(known)}"
        ) from None


@dataclass
class _SavedAdapters:
    """A genforge adapter directory, read and checked against a model, not yet installed."""

    directory: Path
    configs: dict[str, AdapterConfig]  # by the name saved
    renamed: dict[str, str]  # saved name -> the name on the model
    places: dict[str, list[str]]  # saved name -> the layers it wraps
    fusion: dict | None
    stored: dict[str, torch.Tensor]


def _read_saved(model: Transformer, directory: Path, name: str | None, check_base_weights: bool) -> _SavedAdapters:
    saved = read_adapter_config(
        directory,
        ADAPTER_FORMAT,
        "load_adapters",
        AdapterError,
        " (LoRA: genforge.finetune.load_adapter; IA3: genforge.finetune.load_ia3_adapter)",
    )
    if saved.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{directory / ADAPTER_CONFIG} has format_version {saved.get('format_version')!r}; "
            f"this genforge reads {FORMAT_VERSION}"
        )
    weights = adapter_weights_path(directory, AdapterError)
    saved_adapters: dict = saved.get("adapters") or {}
    if not saved_adapters:
        raise AdapterError(f"{directory / ADAPTER_CONFIG} names no adapters")
    if name is not None and len(saved_adapters) != 1:
        raise AdapterError(
            f"{directory} holds {len(saved_adapters)} adapters ({', '.join(saved_adapters)}); name= renames only one"
        )
    renamed = {old: (name if name is not None else old) for old in saved_adapters}
    for new in renamed.values():
        _check_name(new, model)
    _check_base(model, directory, saved.get("base_model") or {}, check_base_weights)
    configs = {old: _saved_config(directory, old, fields) for old, fields in saved_adapters.items()}
    # Each adapter's expected tensors and shapes, from its config and this model.
    hidden = model.config.hidden_size
    expected: dict[str, tuple[int, ...]] = {}
    places = {}
    for old, config in configs.items():
        places[old] = _placed_layers(model, config)
        if sorted(places[old]) != sorted(saved_adapters[old].get("layers", places[old])):
            raise AdapterError(
                f"adapter {old!r} in {directory} lists layers {saved_adapters[old].get('layers')}, but its config "
                f"places it at {places[old]}"
            )
        size = config.size_for(hidden)
        for layer_name in places[old]:
            prefix = f"adapters.{old}.{layer_name}"
            expected |= {
                f"{prefix}.down.weight": (size, hidden),
                f"{prefix}.down.bias": (size,),
                f"{prefix}.up.weight": (hidden, size),
                f"{prefix}.up.bias": (hidden,),
            }
    fusion = saved.get("fusion")
    if fusion:
        fused = fusion.get("adapters") or []
        missing = [n for n in fused if n not in saved_adapters]
        if missing or not fused:
            raise AdapterError(f"the fusion in {directory} fuses {missing or fused}, which the directory does not hold")
        if sorted(fusion.get("layers") or []) != sorted(places[fused[0]]):
            raise AdapterError(
                f"the fusion in {directory} lists layers {fusion.get('layers')}, but its adapters sit at "
                f"{places[fused[0]]}"
            )
        for layer_name in fusion["layers"]:
            for key in ("query", "key", "value"):
                expected[f"fusion.{layer_name}.{key}.weight"] = (hidden, hidden)
    stored = read_adapter_tensors(weights)
    check_adapter_fits(directory, expected, stored, "adapter tensors", AdapterError)
    check_adapter_shapes(directory, expected, stored, AdapterError)
    return _SavedAdapters(directory, configs, renamed, places, fusion or None, stored)


def _install_saved(model: Transformer, saved: _SavedAdapters) -> None:
    stored = saved.stored
    for old, config in saved.configs.items():
        apply_adapters(model, config, saved.renamed[old])
        with torch.no_grad():
            for layer_name in saved.places[old]:
                adapter = model.get_submodule(layer_name).adapters[saved.renamed[old]]
                for key, parameter in adapter.state_dict().items():
                    parameter.copy_(stored[f"adapters.{old}.{layer_name}.{key}"])
    if saved.fusion:
        apply_adapter_fusion(model, [saved.renamed[old] for old in saved.fusion["adapters"]])
        with torch.no_grad():
            for layer_name in saved.fusion["layers"]:
                for key, parameter in model.get_submodule(layer_name).fusion.state_dict().items():
                    parameter.copy_(stored[f"fusion.{layer_name}.{key}"])


def load_adapters(
    model: Transformer, directory: str | Path, name: str | None = None, check_base_weights: bool = True
) -> Transformer:
    """Put the adapters saved in `directory` by `save_adapters` onto `model`, in place, after
    checking the whole directory against the model (layer names, shapes and sampled base
    weights: an adapter saved for another base is refused, naming both). `name` renames the
    adapter of a directory that holds one. The last adapter loaded is active and trainable;
    with a saved fusion layer, the fusion is. Returns `model`."""
    _check_model(model, "adapters")
    _install_saved(model, _read_saved(model, Path(directory), name, check_base_weights))
    return model
