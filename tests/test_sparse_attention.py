"""Sparse attention patterns: masks against their definitions, the banded kernel against masked
SDPA, and models configured with a pattern through training and cached decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_encoder, tiny_model

from genforge.cache import ContiguousKVCache
from genforge.config import Config, ConfigError
from genforge.sparse_attention import (
    PatternError,
    banded_attention,
    check_pattern,
    dense_pattern_mask,
    density,
    random_key_blocks,
)


def definition(pattern: dict, i: int, j: int, causal: bool) -> bool:
    """Each pattern's rule written pair by pair, straight from the papers' descriptions."""
    p = check_pattern(pattern)
    if causal and j > i:
        return False
    d = i - j if causal else abs(i - j)
    kind = p["kind"]
    g = p.get("global_tokens", 0)
    if j < g or (not causal and i < g):
        return True
    if kind in ("local", "longformer"):
        return d < p["window"]
    if kind == "dilated":
        return d < p["window"] * p["dilation"] and d % p["dilation"] == 0
    if kind == "strided":
        return d < p["stride"] or d % p["stride"] == 0
    if kind == "fixed":
        s = p["stride"]
        return i // s == j // s or j % s >= s - p["summary"]
    b = p["block_size"]
    qb, kb = i // b, j // b
    half = p["window_blocks"] // 2
    if (0 <= qb - kb <= half) if causal else abs(qb - kb) <= half:
        return True
    return kb in random_key_blocks(p, qb, causal, 10**6 if causal else -(-LENGTH // b))


LENGTH = 37
PATTERNS = [
    {"kind": "local", "window": 5},
    {"kind": "longformer", "window": 4, "global_tokens": 3},
    {"kind": "bigbird", "block_size": 4, "window_blocks": 3, "global_tokens": 2, "random_blocks": 2, "seed": 7},
    {"kind": "strided", "stride": 6},
    {"kind": "fixed", "stride": 8, "summary": 2},
    {"kind": "dilated", "window": 4, "dilation": 3},
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p["kind"])
def test_mask_matches_definition(pattern, causal):
    mask = dense_pattern_mask(pattern, LENGTH, causal)
    expected = torch.tensor([[definition(pattern, i, j, causal) for j in range(LENGTH)] for i in range(LENGTH)])
    assert torch.equal(mask, expected)
    assert mask.diagonal().all()  # every token sees itself: no empty softmax row
    assert 0 < density(pattern, LENGTH, causal) < 1


def test_bigbird_random_blocks_do_not_depend_on_length():
    pattern = PATTERNS[2]
    short, long = dense_pattern_mask(pattern, 20, True), dense_pattern_mask(pattern, 40, True)
    assert torch.equal(long[:20, :20], short)
    assert random_key_blocks(check_pattern(pattern), 6, True, 10) != []


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"window": 4}, "kind"),
        ({"kind": "butterfly"}, "accepted: local"),
        ({"kind": "local"}, "needs window"),
        ({"kind": "local", "window": 0}, "window must be an integer >= 1"),
        ({"kind": "strided", "stride": 4, "window": 2}, "unknown: window"),
        ({"kind": "fixed", "stride": 4, "summary": 5}, "at most the stride"),
    ],
)
def test_bad_patterns_are_refused(bad, message):
    with pytest.raises(PatternError, match=message):
        check_pattern(bad)


def test_config_refuses_pattern_with_sliding_window():
    with pytest.raises(ConfigError, match="sliding_window"):
        tiny_model(sliding_window=4, attention_pattern={"kind": "local", "window": 4})
    with pytest.raises(ConfigError, match="needs window"):
        tiny_model(attention_pattern={"kind": "local"})


def masked_sdpa(q, k, v, pattern, causal):
    mask = dense_pattern_mask(pattern, q.shape[2], causal)
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "n, window, global_tokens, chunk", [(50, 7, 0, None), (64, 16, 3, None), (33, 5, 2, 4), (6, 9, 8, None)]
)
def test_banded_kernel_equals_masked_sdpa(n, window, global_tokens, chunk, causal):
    torch.manual_seed(0)
    q = torch.randn(2, 4, n, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, n, 8, dtype=torch.float64), torch.randn(2, 2, n, 8, dtype=torch.float64)
    pattern = {"kind": "longformer", "window": window, "global_tokens": global_tokens}
    got = banded_attention(q, k, v, window, causal, global_tokens, chunk=chunk)
    torch.testing.assert_close(got, masked_sdpa(q, k, v, pattern, causal), atol=1e-10, rtol=0)


def test_banded_kernel_float32_and_gradients():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    pattern = {"kind": "longformer", "window": 8, "global_tokens": 2}
    got = banded_attention(q, k, v, 8, True, 2)
    want = masked_sdpa(q, k, v, pattern, True)
    assert (got - want).abs().max() < 1e-5
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    wanted = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(grads, wanted):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p["kind"])
def test_model_with_pattern_trains_and_decodes_through_the_cache(pattern):
    model = tiny_model(attention_pattern=pattern)
    ids = torch.randint(0, 64, (2, 30))
    logits = model(ids).logits
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # The pattern changes the output: a query past the window no longer sees the first keys.
    dense = tiny_model()
    assert not torch.allclose(dense(ids).logits[:, -1], logits[:, -1], atol=1e-4)
    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = ContiguousKVCache(model.config, 2, 30)
        steps = [model(ids[:, :10], cache=cache).logits]
        for t in range(10, 30):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_model_banded_path_equals_mask_path_and_padding(monkeypatch):
    import genforge.model

    calls = []
    kernel = genforge.model.banded_attention
    monkeypatch.setattr(genforge.model, "banded_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = tiny_model(attention_pattern={"kind": "longformer", "window": 6, "global_tokens": 2}).eval()
    ids = torch.randint(0, 64, (1, 25))
    with torch.no_grad():
        banded = model(ids).logits  # no cache, no padding: the kernel
        assert len(calls) == 2  # once per layer
        model(ids, position_ids=torch.arange(3, 28)[None])  # shifted positions: the mask
        assert len(calls) == 2
        cache = ContiguousKVCache(model.config, 1, 25)
        masked = model(ids, cache=cache).logits  # with a cache: the mask
        # A left-padded row gets the logits of the row alone (positions count real tokens).
        padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), dim=1)
        mask = torch.cat((torch.zeros(1, 3), torch.ones(1, 25)), dim=1).long()
        padded_logits = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(banded, masked, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_logits, banded, atol=1e-5, rtol=0)


def test_encoder_with_bidirectional_pattern_reaches_only_as_far_as_its_band():
    ids = torch.randint(0, 64, (1, 20))
    changed = ids.clone()
    changed[0, 19] = (ids[0, 19] + 1) % 64
    # Window 3 (|i - j| <= 2) over 2 layers: a change at token 19 reaches tokens 15..19 only;
    # with a global token 0, it reaches token 0 in layer 1 and everyone through it in layer 2.
    for pattern, reaches_10 in (({"kind": "local", "window": 3}, False), ({"kind": "longformer", "window": 3}, True)):
        encoder = tiny_encoder(attention_pattern=pattern).eval()
        with torch.no_grad():
            a, b = encoder(ids).logits, encoder(changed).logits
        change = (a - b).abs().amax(dim=-1)[0]  # small (random weights) but nonzero where reached
        assert change[15] > 1e-8
        assert bool(change[:15].gt(1e-8).all()) is reaches_10
        assert bool(change[:15].eq(0).all()) is not reaches_10


def test_pattern_round_trips_through_config_json():
    config = tiny_model(attention_pattern={"kind": "strided", "stride": 4}).config
    again = Config.from_hf(config.to_hf())
    assert again.attention_pattern == {"kind": "strided", "stride": 4}
