"""Fill-in-the-middle prompts (Bavarian et al. 2022, "Efficient Training of Language Models to
Fill in the Middle").

A FIM-trained code model completes the *middle* of a document given its prefix and suffix.
Training moves the middle to the end behind three sentinel tokens, so at inference the
prompt is built the same way and the model's ordinary left-to-right continuation is the
middle:

- PSM (prefix-suffix-middle): ``<PRE> prefix <SUF> suffix <MID>`` -> middle
- SPM (suffix-prefix-middle), in the paper's variant that StarCoder and CodeLlama use:
  ``<PRE> <SUF> suffix <MID> prefix`` -> middle, continuing the prefix directly, which
  suits token-level completion inside a line.

Model families spell the sentinels differently; :func:`find_fim_tokens` looks them up in
the tokenizer's vocabulary (see ``FIM_STYLES``). Generation should stop at the model's end
token; CodeLlama also ends a middle with ``<EOT>``, returned as ``FimTokens.end``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FimTokens", "FIM_STYLES", "find_fim_tokens", "fim_prompt"]

# style -> (prefix, suffix, middle, end-of-middle) token spellings, searched in this order.
# CodeLlama's SentencePiece vocabulary stores its sentinels with the word-start marker "▁".
FIM_STYLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "starcoder": (("<fim_prefix>",), ("<fim_suffix>",), ("<fim_middle>",), ()),
    "qwen": (("<|fim_prefix|>",), ("<|fim_suffix|>",), ("<|fim_middle|>",), ()),
    "codellama": (("<PRE>", "▁<PRE>"), ("<SUF>", "▁<SUF>"), ("<MID>", "▁<MID>"), ("<EOT>", "▁<EOT>")),
    # DeepSeek-Coder: begin/hole/end play the prefix/suffix/middle roles.
    "deepseek": (("<｜fim▁begin｜>",), ("<｜fim▁hole｜>",), ("<｜fim▁end｜>",), ()),
}
MODES = ("psm", "spm")


@dataclass(frozen=True)
class FimTokens:
    """The ids of one tokenizer's FIM sentinels, and the style they were found under."""

    style: str
    prefix: int
    suffix: int
    middle: int
    end: int | None = None  # a dedicated end-of-middle token (CodeLlama's <EOT>), if any


def find_fim_tokens(tokenizer: Any) -> FimTokens:
    """The first style in ``FIM_STYLES`` whose prefix, suffix and middle tokens all exist.

    Raises ValueError naming every spelling looked for when the tokenizer has none.
    """
    if not callable(getattr(tokenizer, "token_to_id", None)):
        raise TypeError(f"tokenizer must be a genforge.tokenizer.Tokenizer, got {type(tokenizer).__name__}")

    def first_id(spellings: tuple[str, ...]) -> int | None:
        for spelling in spellings:
            token_id = tokenizer.token_to_id(spelling)
            if token_id is not None:
                return token_id
        return None

    for style, (prefix, suffix, middle, end) in FIM_STYLES.items():
        ids = [first_id(prefix), first_id(suffix), first_id(middle)]
        if None not in ids:
            return FimTokens(style, *ids, end=first_id(end))
    looked_for = "; ".join(f"{style}: {', '.join(s[0] for s in names[:3])}" for style, names in FIM_STYLES.items())
    raise ValueError(
        "this tokenizer defines no fill-in-the-middle tokens, so the model was not trained for FIM "
        f"(looked for a full set of one style: {looked_for}; CodeLlama's also with a leading '▁')"
    )


def fim_prompt(tokenizer: Any, prefix: str, suffix: str, mode: str = "psm") -> list[int]:
    """Token ids of a fill-in-the-middle prompt; the model's continuation is the middle.

    ``mode`` is ``"psm"`` or ``"spm"`` (see the module docstring). The special tokens the
    tokenizer puts before any text (Llama's BOS; none for StarCoder or Qwen) lead the prompt.
    Prefix and suffix are encoded separately, without special tokens, so the sentinels are
    exact ids whatever the text contains.
    """
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError(f"prefix and suffix must be strings, got {type(prefix).__name__} and {type(suffix).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fim = find_fim_tokens(tokenizer)
    head = _leading_special_ids(tokenizer)
    pre = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    suf = tokenizer.encode(suffix, add_special_tokens=False) if suffix else []
    if mode == "psm":
        return [*head, fim.prefix, *pre, fim.suffix, *suf, fim.middle]
    return [*head, fim.prefix, fim.suffix, *suf, fim.middle, *pre]


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer's post-processor adds in front of a text (e.g. BOS)."""
    plain = tokenizer.encode("x", add_special_tokens=False)
    full = tokenizer.encode("x", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []
