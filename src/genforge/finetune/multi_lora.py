"""Many LoRA adapters over one base model, in the same batch, without merging (Punica: Chen et
al. 2023, "Punica: Multi-Tenant LoRA Serving"; S-LoRA: Sheng et al. 2023, "S-LoRA: Serving
Thousands of Concurrent LoRA Adapters").

A merged adapter (`lora.merge_lora`) costs nothing per token but ties the model to one adapter.
A server hosting many fine-tunes of one base keeps the base weights once and the adapters beside
them instead: each row of a batch names its adapter (or none, the bare base), and each adapted
layer computes the base product once for the whole batch, y = W x + b, then adds to each row its
own adapter's update s B A x. The rows are grouped by adapter, one pair of small products per
adapter present in the batch (Punica's segmented product, SGMV, with torch's products in place
of its kernel): an adapter costs its rank times the rows that use it, and one absent from the
batch costs nothing.

`MultiLora(model)` holds the adapters served over `model`. `load(name, directory)` reads a PEFT
adapter directory with LoRA's own loader (`lora.read_lora_adapter`: rank and alpha per module,
rsLoRA, the parts of fused layers, every name and shape checked) and puts a `MultiLoraLinear` on
each layer it targets, through the Linear seam; a layer no adapter targets stays as it was, and
goes back to it when its last adapter is unloaded. Adapters may differ in rank and in targets.
Which adapter each row uses reaches the layers through a context set around the forward pass,
so the model's forward keeps its signature:

    adapters = MultiLora(model)  # on the model as loaded, before pack_for_cpu_inference
    adapters.load("math", "adapters/math")
    with adapters.rows(["math", None, "math"]):  # one entry per batch row; None: the bare base
        logits = model(ids).logits

Refused, with a message that says so: DoRA adapters (DoRA rescales each adapted output row by
m / ||W + s B A||, norms of each adapter's own merged weight, which a packed base layer no
longer holds; merge such an adapter into its own model instead), adapters that replace base
weights (PEFT's saved `lm_head` base rows: every request would see them), and adapters on the
experts or router of a mixture-of-experts layer (their inputs are tokens routed across rows,
not batch rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import hf_linear_parts
from ..model import MixtureOfExperts, Transformer
from ..quantize.nf4 import NF4Linear
from ..swap import swap_linears
from .lora import LoraError, LoraLinear, adapter_dtype, read_lora_adapter, scaled_block_b, stacked_a

__all__ = [
    "AdapterRows",
    "LayerUpdate",
    "MultiLora",
    "MultiLoraLinear",
    "ReadAdapter",
    "UnknownAdapterError",
]


class UnknownAdapterError(LookupError):
    """A request named an adapter that is not loaded; the message lists those that are."""

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name, self.available = name, tuple(available)
        served = ", ".join(self.available) or "none"
        super().__init__(f"no LoRA adapter named {name!r} is loaded; loaded adapters: {served}")

    def __str__(self) -> str:  # LookupError would quote the whole message
        return self.args[0]


@dataclass(frozen=True)
class LayerUpdate:
    """One adapter's update on one layer: all its parts' A stacked, (sum of r, in), and their
    B times their scales in a block matrix, (out, sum of r), as `LoraLinear` computes them."""

    a: torch.Tensor
    b: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.a.dtype), self.a), self.b)


@dataclass(frozen=True)
class AdapterRows:
    """Which adapter each row of a forward pass uses, grouped: (adapter id, the rows using it,
    or None when every row does). Rows of no adapter are in no group."""

    batch_size: int
    groups: tuple[tuple[int, torch.Tensor | None], ...]


class MultiLoraLinear(nn.Module):
    """A linear layer serving several LoRA adapters at once (see the module doc).

    `base_layer` is the layer it wraps, whatever computes it (`nn.Linear`, a packed or NF4
    linear): its product runs once for the whole batch. `updates` holds each adapter's
    `LayerUpdate` by adapter id; the rows of the current forward pass come from the
    `MultiLora` that owns the layer. Each group of rows on an adapter this layer has gets
    `base + s B A x` for those rows, with the same products as `LoraLinear`, so a row's
    output is its own LoRA's.
    """

    def __init__(self, base_layer: nn.Module, owner: MultiLora) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.updates: dict[int, LayerUpdate] = {}
        self._owner = owner  # not a module: read for the rows of each forward pass

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{adapter}: r={update.a.shape[0]}" for adapter, update in self.updates.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ranks}]"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        rows = self._owner.current_rows
        if rows is None:
            return out
        if x.shape[0] != rows.batch_size:
            raise RuntimeError(
                f"MultiLoraLinear got {x.shape[0]} rows but the adapter rows set with MultiLora.rows name "
                f"{rows.batch_size}; give one adapter (or None) per row of the model's input"
            )
        for adapter, index in rows.groups:
            update = self.updates.get(adapter)
            if update is None:  # this adapter leaves the layer alone
                continue
            if index is None:  # every row: no gathering
                return out + update(x).to(out.dtype)
            # Adding a row's update to its base output in place is the same sum as `base + update`.
            out.index_add_(0, index, update(x.index_select(0, index)).to(out.dtype))
        return out


@dataclass
class ReadAdapter:
    """An adapter read from its directory and checked against the model (`MultiLora.read`),
    ready to be added: its tensors by layer, in the adapters' dtype and on the model's device."""

    name: str
    directory: Path
    rank: int  # the config's r (per-module ranks may differ)
    updates: dict[str, LayerUpdate] = field(repr=False)

    @property
    def num_parameters(self) -> int:
        # The block B holds zeros off each part's rows; count each part's own A and B.
        return sum(update.a.numel() + int(update.b.count_nonzero()) for update in self.updates.values())


@dataclass
class _Served:
    name: str
    directory: Path
    rank: int
    layers: tuple[str, ...]


# The base layers a multi-LoRA layer may wrap as loaded (LoRA's own kinds); any module with
# in_features and out_features once wrapped or packed.
_LINEAR_KINDS = (nn.Linear, NF4Linear)


class MultiLora:
    """The LoRA adapters served over one model, by name, and which one each row of the next
    forward pass uses. Build it on the model as loaded (or NF4-quantized), before
    `inference.pack_for_cpu_inference`: the layer layout it reads (which Hugging Face modules
    each fused layer holds) is gone from packed layers. Adapters may be added and removed
    between forward passes; one forward pass at a time (the engine's thread)."""

    def __init__(self, model: Transformer) -> None:
        if not isinstance(model, Transformer):
            raise LoraError(f"MultiLora serves adapters over a genforge Transformer; got {type(model)}")
        if getattr(model, "packed_for_inference", False):
            raise LoraError(
                "this model was packed for CPU inference; build MultiLora on the model as loaded, then pack it "
                "(genforge.inference.pack_for_cpu_inference packs the layers MultiLora wraps too)"
            )
        if any(isinstance(module, LoraLinear) for module in model.modules()) or hasattr(model, "multi_lora"):
            raise LoraError("this model already has LoRA layers; serve adapters over a freshly loaded model")
        self.model = model
        self.layouts = hf_linear_parts(model, _LINEAR_KINDS)
        self.dtype = adapter_dtype(model.dtype)
        self.device = model.device
        self._in_experts = {
            name
            for name in self.layouts
            if any(
                isinstance(module, MixtureOfExperts)
                for module in _ancestors(model, name)  # the router and every expert's layers
            )
        }
        self._ids: dict[str, int] = {}
        self._served: dict[int, _Served] = {}
        self._next_id = 1
        # Replaced, never mutated: other threads (the HTTP server) read it while the engine's changes it.
        self.names: tuple[str, ...] = ()
        self.current_rows: AdapterRows | None = None
        model.multi_lora = self

    # ------------------------------------------------------------------ adapters
    def read(self, name: str, directory: str | Path) -> ReadAdapter:
        """Read and check the PEFT LoRA adapter in `directory` for this model, changing nothing
        (safe beside forward passes on another thread): `add` then serves it."""
        _check_name(name)
        files = read_lora_adapter(self.model, directory, self.layouts)
        where = files.directory
        if files.config.use_dora:
            raise LoraError(
                f"the adapter in {where} is a DoRA adapter, which multi-adapter serving does not take: DoRA scales "
                "each output row by norms of the adapter's own merged weight, which the served (packed) base layers "
                "do not keep. Merge it into its own model (genforge.finetune.merge_and_unload) and serve that"
            )
        if files.base_rows:
            raise LoraError(
                f"the adapter in {where} replaces base weights ({', '.join(sorted(files.base_rows))}), which every "
                "request over the shared base would see; merge it into its own model and serve that instead"
            )
        in_experts = sorted(set(files.plan) & self._in_experts)
        if in_experts:
            raise LoraError(
                f"the adapter in {where} adapts mixture-of-experts layers ({', '.join(in_experts[:4])}), whose inputs "
                "are tokens routed across the batch's rows; multi-adapter serving adapts the other layers only"
            )
        updates = {}
        for layer_name, parts in files.plan.items():
            lora_A = {key: t.to(self.device, self.dtype) for key, t in files.lora_tensors(layer_name, "lora_A").items()}
            lora_B = {key: t.to(self.device, self.dtype) for key, t in files.lora_tensors(layer_name, "lora_B").items()}
            out_features = self.model.get_submodule(layer_name).out_features
            updates[layer_name] = LayerUpdate(stacked_a(parts, lora_A), scaled_block_b(parts, lora_B, out_features))
        return ReadAdapter(name, where, files.config.r, updates)

    def add(self, adapter: ReadAdapter) -> int:
        """Serve an adapter `read` returned, under its name; returns its id (never reused, so a
        reloaded adapter gets a new one)."""
        if adapter.name in self._ids:
            raise LoraError(
                f"an adapter named {adapter.name!r} is already loaded; unload it first or pick another name"
            )
        adapter_id = self._next_id
        self._next_id += 1
        unwrapped = [
            name for name in adapter.updates if not isinstance(self.model.get_submodule(name), MultiLoraLinear)
        ]
        if unwrapped:
            swap_linears(
                self.model, lambda layer, name: MultiLoraLinear(layer, self), include=unwrapped, kinds=(nn.Module,)
            )
        for layer_name, update in adapter.updates.items():
            self.model.get_submodule(layer_name).updates[adapter_id] = update
        self._served[adapter_id] = _Served(adapter.name, adapter.directory, adapter.rank, tuple(adapter.updates))
        self._ids[adapter.name] = adapter_id
        self.names = tuple(self._ids)
        return adapter_id

    def load(self, name: str, directory: str | Path, replace: bool = False) -> int:
        """Read the PEFT LoRA adapter in `directory` and serve it as `name`; returns its id.
        `replace`: an adapter already loaded under `name` is unloaded once the new one is read."""
        adapter = self.read(name, directory)
        if replace and name in self._ids:
            self.unload(name)
        return self.add(adapter)

    def retire(self, name: str) -> int:
        """Take `name` out of the served names (new rows cannot pick it) but keep its tensors for
        rows already using it; returns its id, for `drop` once they finish."""
        adapter_id = self.id_of(name)
        del self._ids[name]
        self.names = tuple(self._ids)
        return adapter_id

    def drop(self, adapter_id: int) -> None:
        """Free a retired adapter's tensors; a layer left with no adapter is unwrapped."""
        served = self._served.pop(adapter_id)
        bare = []
        for layer_name in served.layers:
            layer: MultiLoraLinear = self.model.get_submodule(layer_name)
            del layer.updates[adapter_id]
            if not layer.updates:
                bare.append(layer_name)
        if bare:
            swap_linears(self.model, lambda layer, name: layer.base_layer, include=bare, kinds=(MultiLoraLinear,))

    def unload(self, name: str) -> None:
        """Stop serving `name` and free its tensors at once."""
        self.drop(self.retire(name))

    def id_of(self, name: str) -> int:
        """The id of the adapter served as `name`; UnknownAdapterError (listing them) if none."""
        if name not in self._ids:
            raise UnknownAdapterError(name, self.names)
        return self._ids[name]

    def directory_of(self, name: str) -> Path:
        return self._served[self.id_of(name)].directory

    def rank_of(self, name: str) -> int:
        return self._served[self.id_of(name)].rank

    @property
    def loaded_ids(self) -> frozenset[int]:
        """Ids whose tensors are held: served names and retired ones not yet dropped."""
        return frozenset(self._served)

    # ---------------------------------------------------------------------- rows
    @contextmanager
    def rows(self, adapters: Sequence[str | int | None]) -> Iterator[None]:
        """Within this context, row i of the model's input uses `adapters[i]`: a served name, an
        adapter id (`id_of`, or one retired and not yet dropped) or None (the bare base)."""
        ids = []
        for entry in adapters:
            if entry is None or isinstance(entry, int):
                if entry is not None and entry not in self._served:
                    raise UnknownAdapterError(f"#{entry}", self.names)
                ids.append(entry)
            else:
                ids.append(self.id_of(entry))
        self.current_rows = self.group_rows(ids)
        try:
            yield
        finally:
            self.current_rows = None

    def group_rows(self, ids: Sequence[int | None]) -> AdapterRows | None:
        """The rows of each adapter id in `ids` (None: no adapter); None when no row has one."""
        rows: dict[int, list[int]] = {}
        for row, adapter_id in enumerate(ids):
            if adapter_id is not None:
                rows.setdefault(adapter_id, []).append(row)
        if not rows:
            return None
        groups = tuple(
            (adapter_id, None if len(members) == len(ids) else torch.tensor(members, device=self.device))
            for adapter_id, members in rows.items()
        )
        return AdapterRows(len(ids), groups)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or ":" in name or name != name.strip():
        raise LoraError(
            f"an adapter name must be a non-empty string without ':' or surrounding spaces (requests name it as "
            f"'base:name'); got {name!r}"
        )


def _ancestors(model: nn.Module, name: str) -> Iterator[nn.Module]:
    parts = name.split(".")
    for end in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:end]))
