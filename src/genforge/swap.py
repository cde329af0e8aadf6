"""The Linear seam: replace a model's linear layers by name pattern.

`model.py` builds plain `nn.Linear` layers. Everything that changes how a linear layer computes
(oneDNN products for training, packed weights for CPU inference, adapter wrappers such as LoRA,
quantized linears) is installed afterwards by `swap_linears`, which puts the factory's module
where the layer was. The replacement sits at the same attribute path, so its parameters keep
the state-dict keys of the layer it replaces (`blocks.0.attn.qkv.weight`) as long as it names
them `weight` and `bias`, as an `nn.Linear` subclass does: weight maps, checkpoints and
adapter files written by name stay right.

Patterns are shell-style globs (`fnmatch`) over the dotted module name. A pattern without a dot
also matches the last part of the name, the way PEFT's `target_modules` are written: `"qkv"`
selects every `blocks.N.attn.qkv`, `"blocks.0.*"` the linear layers of the first block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

from torch import nn

__all__ = ["linear_names", "name_matches", "plain_linear", "swap_linears"]


def name_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether dotted module `name` matches a glob of `patterns` (a bare one matches the last part)."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatchcase(name, p) or ("." not in p and fnmatchcase(leaf, p)) for p in patterns)


def linear_names(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    kinds: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[str]:
    """The dotted names of `model`'s `nn.Linear` layers (subclasses included; other module
    types too when `kinds` names them, as LoRA does `NF4Linear`) that match a pattern of
    `include` (every one when None) and none of `exclude`, in module order.

    Raises ValueError when an `include` pattern matches no linear layer: a misspelt target
    would otherwise change nothing, silently.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include and exclude take a list of patterns, e.g. ['qkv', 'o']; got a single string")
    every = [name for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, kinds)]
    if include is not None:
        unmatched = [p for p in include if not any(name_matches(name, [p]) for name in every)]
        if unmatched:
            shown = sorted({name.rsplit(".", 1)[-1] for name in every})
            raise ValueError(
                f"no linear layer matches {', '.join(map(repr, unmatched))}; this model's linear layers end in "
                f"{', '.join(shown)} (patterns are globs over names like {every[0]!r})"
            )
        every = [name for name in every if name_matches(name, include)]
    return [name for name in every if not name_matches(name, exclude)]


def plain_linear(layer: nn.Module, name: str = "") -> nn.Linear:
    """An `nn.Linear` holding `layer`'s own `weight` and `bias` Parameters (no copy): the factory
    that takes a wrapper (LoRA or IA3 after merging) out again with `swap_linears(..., kinds=)`."""
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight, plain.bias = layer.weight, layer.bias
    return plain


def swap_linears(
    model: nn.Module,
    factory: Callable[[nn.Linear, str], nn.Module],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    kinds: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[str]:
    """Replace each linear layer `linear_names(model, include, exclude, kinds)` selects with
    `factory(layer, name)`, in place, and return the names replaced.

    The factory decides what the new layer holds: sharing the old layer's `weight` and `bias`
    parameters (as `onednn.OneDNNLinear.wrapping` does) keeps optimizers, tied weights and the
    state dict as they were. A layer shared by several parents (tied modules) is replaced
    once, by the same new module in every place.
    """
    names = linear_names(model, include, exclude, kinds)
    replaced: dict[int, nn.Module] = {}
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attribute)
        if id(old) not in replaced:
            replaced[id(old)] = factory(old, name)
        setattr(parent, attribute, replaced[id(old)])
    return names
