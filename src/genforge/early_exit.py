"""Early exit: stop a token's forward pass at the first layer confident enough (CALM).

Confident Adaptive Language Modeling (Schuster et al. 2022) lets easy tokens leave the decoder
early. Three pieces:

- a shared head: the model's own final norm and LM head applied to any layer's hidden state
  (`exit_logits`), so an intermediate layer predicts the next token with no new parameters;
- a confidence per token, the softmax's largest probability ("max_prob") or the gap between
  its two largest ("margin"); at decode a token exits at the first layer whose confidence
  reaches the threshold (`early_exit_generate`);
- state propagation: a token that exits at layer e still owes the skipped layers e+1..L their
  keys and values, since later tokens attend to them there. CALM copies the exit layer's hidden
  state upward: each skipped layer's K/V projection is applied to it (one projection per layer
  instead of a whole block).

An intermediate layer predicts well only if it was trained to: `EarlyExitObjective` is the
weighted sum of every layer's next-token loss through the shared head, weights rising with
depth (proportional to the layer's number by default, CALM's choice), as a
`genforge.train.StepObjective` for the existing `Trainer` (batches from `LanguageModelRows`).

A threshold of 1.0 never exits: the model runs whole and decodes exactly its greedy tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import ContiguousKVCache
from .model import Transformer, apply_rope
from .seq2seq import refuse_encoder_decoder
from .train.losses import causal_lm_loss

CONFIDENCE_MEASURES = ("max_prob", "margin")


class EarlyExitError(ValueError):
    """A model or setting early exit cannot run with; the message says what is accepted."""


def check_model(model: Transformer) -> None:
    """Raise an EarlyExitError unless `model` is a pre-norm causal decoder with a plain LM head
    (the head the intermediate layers share)."""
    config = model.config
    refuse_encoder_decoder(config, "early exit", "it reads the intermediate layers of one decoder stack")
    if not config.causal or model.lm_head is None:
        raise EarlyExitError(f"early exit needs a causal decoder with an LM head; {config.family} is an encoder")
    if config.post_norm or model.final_norm is None or model.lm_transform is not None:
        raise EarlyExitError("early exit shares the final norm + LM head of a pre-norm decoder; this model has none")


def confidence(logits: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """Per-position confidence (...,) of next-token `logits` (..., vocab): the largest softmax
    probability, or the gap between the two largest ("margin"). Both lie in [0, 1]."""
    if measure not in CONFIDENCE_MEASURES:
        raise EarlyExitError(
            f"confidence measure {measure!r} is not supported; accepted: {', '.join(CONFIDENCE_MEASURES)}"
        )
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return probs.amax(dim=-1)
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def exit_logits(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """The shared head: the model's final norm and LM head applied to a block's output."""
    return model.lm_head(model.final_norm(hidden))


@contextlib.contextmanager
def captured_layer_states(model: Transformer) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of `model` appends each block's output hidden state
    (batch, seq, hidden) to the yielded list, in layer order."""
    states: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda _m, _i, out: states.append(out)) for block in model.blocks]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def depth_weights(num_layers: int) -> torch.Tensor:
    """CALM's layer weights: proportional to the layer's number (1..L), summing to 1."""
    if num_layers < 1:
        raise EarlyExitError(f"num_layers must be >= 1, got {num_layers}")
    weights = torch.arange(1, num_layers + 1, dtype=torch.float32)
    return weights / weights.sum()


def layer_losses(
    model: Transformer, input_ids: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """(num_layers,) next-token cross-entropy of every layer's prediction through the shared
    head, in one forward pass. `labels` default to `input_ids` (positions equal to
    `train.IGNORE_INDEX` do not count); reduction "mean" per counted token, or "sum"."""
    check_model(model)
    with captured_layer_states(model) as states:
        model(input_ids, compute_logits=False)
    labels = input_ids if labels is None else labels
    return torch.stack([causal_lm_loss(exit_logits(model, h), labels, reduction=reduction) for h in states])


# ------------------------------------------------------------------------------- training
class LanguageModelRows:
    """A `TokenDataset` as the dict batches a `StepObjective` reads: {"input_ids": (n, seq)}."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.seq_len, self.max_token_id = dataset.seq_len, dataset.max_token_id

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.dataset.batch(indices)}


class EarlyExitObjective:
    """The weighted multi-layer loss, sum_l w_l * CE_l, as a `genforge.train.StepObjective`.

    `weights`: one per layer (default `depth_weights`). The step's loss is a mean per predicted
    token, like the plain causal objective's; metrics give each layer's loss (`loss_layer_<l>`,
    1-based) so the intermediate heads' progress is visible in the run's log.
    """

    def __init__(self, num_layers: int, weights: Sequence[float] | torch.Tensor | None = None) -> None:
        weights = depth_weights(num_layers) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (num_layers,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise EarlyExitError(
                f"weights must be {num_layers} non-negative numbers (one per layer) with a positive sum, got "
                f"{weights.tolist()}"
            )
        self.weights = weights

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        ids = batch["input_ids"]
        return int(ids.shape[0] * (ids.shape[1] - 1))

    def micro_loss(self, engine, model, batch, total_weight):
        sums = self._layer_sums(engine, model, batch["input_ids"])
        loss = (self.weights.to(sums.device) * sums).sum() / total_weight
        return loss, {f"loss_layer_{i + 1}": float(s) / total_weight for i, s in enumerate(sums.detach())}

    def _layer_sums(self, engine, model, ids: torch.Tensor) -> torch.Tensor:
        check_model(model)
        with captured_layer_states(model) as states:
            engine(ids, compute_logits=False)
        return torch.stack([causal_lm_loss(exit_logits(model, h), ids, reduction="sum") for h in states])

    @torch.no_grad()
    def evaluate(self, model, data, batch_size: int) -> dict[str, float]:
        device = model.embed_tokens.weight.device
        sums, count = torch.zeros(len(model.blocks)), 0
        for start in range(0, len(data), batch_size):
            ids = data.batch(range(start, min(start + batch_size, len(data))))["input_ids"].to(device)
            sums += self._layer_sums(model, model, ids).float().cpu()
            count += self.weight({"input_ids": ids})
        per_layer = sums / count
        metrics = {"val_loss": float((self.weights * per_layer).sum())}
        metrics.update({f"val_loss_layer_{i + 1}": float(v) for i, v in enumerate(per_layer)})
        return metrics


# ------------------------------------------------------------------------------- decoding
@dataclass
class EarlyExitResult:
    """What `early_exit_generate` produced: the new tokens, the layers each one ran (the
    first comes from the prompt's full pass), and the depth for comparison."""

    tokens: list[int]
    layers_used: list[int] = field(default_factory=list)
    num_layers: int = 0

    @property
    def average_layers(self) -> float:
        return sum(self.layers_used) / len(self.layers_used) if self.layers_used else 0.0


def _embed(model: Transformer, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    # The decoder's embedding step as `Transformer.forward` does it (tokens, learned positions,
    # multiplier, norm), for one decode token of a causal model (no segment types).
    x = model.embed_tokens(ids)
    if model.config.embedding_multiplier != 1.0:
        x = x * torch.tensor(model.config.embedding_multiplier, dtype=x.dtype)
    if model.embed_positions is not None:
        x = x + model.embed_positions(positions)
    if model.embed_norm is not None:
        x = model.embed_norm(x)
    return x


def propagate_kv(model: Transformer, layer: int, hidden: torch.Tensor, rope, cache) -> None:
    """Store in `cache` the keys and values layer `layer` would have made had its input been
    `hidden` (CALM's state propagation for a layer the token skipped)."""
    block = model.blocks[layer]
    attn = block.attn
    batch, seq, _ = hidden.shape
    heads, kv_heads = attn.num_heads, attn.num_kv_heads
    qkv = attn.qkv(block.attn_norm(hidden)).view(batch, seq, heads + 2 * kv_heads, attn.head_dim)
    _, keys, values = qkv.split((heads, kv_heads, kv_heads), dim=2)
    if attn.k_norm is not None:
        keys = attn.k_norm(keys)
    if rope is not None:
        keys = apply_rope(keys, *rope)
    cache.update(layer, keys.transpose(1, 2), values.transpose(1, 2))


@torch.no_grad()
def early_exit_generate(
    model: Transformer,
    prompt: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    threshold: float,
    measure: str = "max_prob",
    min_layers: int = 1,
    eos_token_ids: Sequence[int] = (),
    vocab_limit: int | None = None,
) -> EarlyExitResult:
    """Greedy decoding of one prompt where each new token leaves the decoder at the first layer
    (from `min_layers` on) whose shared-head confidence reaches `threshold`.

    The prompt runs through every layer (it fills the cache); each later token runs layer by
    layer and, on exiting, fills the skipped layers' keys and values from its exit state
    (`propagate_kv`). `threshold` is in (0, 1]; 1.0 never exits (a probability of exactly 1 is
    rounding, not certainty), so the tokens are the full model's greedy ones. `vocab_limit`:
    ids at or past it are never chosen nor counted in the confidence (an embedding table padded
    past the tokenizer's vocabulary).
    """
    check_model(model)
    ids = torch.as_tensor(prompt, dtype=torch.long).flatten()[None].to(model.device)
    num_layers = len(model.blocks)
    if ids.shape[1] == 0:
        raise EarlyExitError("the prompt is empty; give at least one token")
    if not 0 < threshold <= 1:
        raise EarlyExitError(f"threshold must be in (0, 1] (1 never exits), got {threshold}")
    if not 1 <= min_layers <= num_layers:
        raise EarlyExitError(f"min_layers must be in 1..{num_layers}, got {min_layers}")
    if max_new_tokens < 1:
        raise EarlyExitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    confidence(torch.zeros(2), measure)  # checks the measure's name before any work
    model.eval()
    cache = ContiguousKVCache(model.config, 1, ids.shape[1] + max_new_tokens, model.dtype, model.device)
    logits = _limited(model(ids, cache=cache, logits_to_keep=1).logits[:, -1], vocab_limit)
    result = EarlyExitResult(tokens=[], num_layers=num_layers)
    stops = set(eos_token_ids)
    token = int(logits.argmax(dim=-1))
    result.tokens.append(token)
    result.layers_used.append(num_layers)
    while len(result.tokens) < max_new_tokens and token not in stops:
        logits, used = _decode_step(model, token, cache, threshold, measure, min_layers, vocab_limit)
        token = int(logits.argmax(dim=-1))
        result.tokens.append(token)
        result.layers_used.append(used)
    return result


def _limited(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.arange(vocab_limit, logits.shape[-1], device=logits.device), float("-inf"))


def _decode_step(
    model: Transformer, token: int, cache, threshold: float, measure: str, min_layers: int, vocab_limit=None
):
    """One token through the layers until it exits: (its next-token logits (1, vocab), layers run)."""
    past = cache.length
    positions = torch.tensor([[past]], device=model.device)
    x = _embed(model, torch.tensor([[token]], device=model.device), positions)
    rope = model.rotary(positions, x.dtype) if model.rotary is not None else None
    masks = model._masks(None, positions, past, 1, model.device)
    num_layers = len(model.blocks)
    for layer, block in enumerate(model.blocks):
        mask, is_causal = masks[model.config.window_of_layer(layer)]
        x = block(x, rope, mask, is_causal, cache, [])
        last = layer == num_layers - 1
        if last or threshold >= 1 or layer + 1 < min_layers:
            continue
        logits = _limited(exit_logits(model, x[:, -1]), vocab_limit)
        if float(confidence(logits, measure)) >= threshold:
            for skipped in range(layer + 1, num_layers):
                propagate_kv(model, skipped, x, rope, cache)
            cache.advance(1)
            return logits, layer + 1
    cache.advance(1)
    return _limited(exit_logits(model, x[:, -1]), vocab_limit), num_layers


def greedy_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """The share of positions where two token sequences agree, over the shorter's length."""
    length = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:length], b[:length])) / length if length else 1.0


@torch.no_grad()
def early_exit_perplexity(
    model: Transformer,
    input_ids: Sequence[int] | torch.Tensor,
    threshold: float,
    measure: str = "max_prob",
    min_layers: int = 1,
) -> tuple[float, float]:
    """(perplexity, average layers per prediction) of one sequence of token ids read as early
    exit decodes it: token by token through the cache, each prediction from its exit layer, the
    skipped layers' keys and values propagated. Threshold 1.0 gives the full model's perplexity."""
    check_model(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten().to(model.device)
    if ids.numel() < 2:
        raise EarlyExitError("perplexity needs at least two tokens (one to predict)")
    if not 0 < threshold <= 1:
        raise EarlyExitError(f"threshold must be in (0, 1] (1 never exits), got {threshold}")
    model.eval()
    cache = ContiguousKVCache(model.config, 1, ids.numel(), model.dtype, model.device)
    nll, layers = 0.0, 0
    for t in range(ids.numel() - 1):
        logits, used = _decode_step(model, int(ids[t]), cache, threshold, measure, min_layers)
        nll -= float(torch.log_softmax(logits.float(), dim=-1)[0, ids[t + 1]])
        layers += used
    count = ids.numel() - 1
    return float(torch.exp(torch.tensor(nll / count))), layers / count
