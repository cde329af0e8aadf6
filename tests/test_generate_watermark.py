"""Green-list watermark (Kirchenbauer et al. 2023): the processor's arithmetic, the hash pinned
against a pure-Python recount, detection power on sampled text, the false-positive rate on
unwatermarked text, and bad input."""

import math

import pytest
import torch
from factories import tiny_model
from scipy.stats import norm

from genforge.cache import ContiguousKVCache
from genforge.generate.processors import DecodeContext, Temperature, TopK, apply_processors
from genforge.generate.sampling import sample_next_token
from genforge.generate.watermark import Watermark, detect_watermark, green_token_mask

VOCAB = 2000
NEW_TOKENS = 200


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama with a realistic vocabulary. Its LM head is scaled so that the
    next-token entropy is about 3.4 nats, in the range of real language models on text (a
    random init is near uniform, 7.6 nats, which would make detection too easy)."""
    model = tiny_model(vocab_size=VOCAB, intermediate_size=64, max_position_embeddings=256).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def sample(model, prompts, processors, seed, new_tokens=NEW_TOKENS):
    """Plain ancestral sampling with a list of processors (the generator builds its own list
    from SamplingParams, so the watermark is applied here); returns (batch, prompt + new)."""
    batch, prompt_length = prompts.shape
    cache = ContiguousKVCache(model.config, batch, prompt_length + new_tokens)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.cat([prompts, torch.zeros(batch, new_tokens, dtype=torch.long)], dim=1)
    step_input = prompts
    with torch.inference_mode():
        for i in range(prompt_length, prompt_length + new_tokens):
            logits = model(step_input, cache=cache, logits_to_keep=1).logits[:, -1].float()
            logits = apply_processors(logits, DecodeContext(tokens[:, :i], prompt_length), processors)
            tokens[:, i] = sample_next_token(logits, 1.0, generator)
            step_input = tokens[:, i : i + 1]
    return tokens


def random_prompts(batch, seed, length=4):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def scored_text(row, prompt_length=4):
    """The generated tokens preceded by the last prompt token, which seeds the first one."""
    return row[prompt_length - 1 :].tolist()


# ------------------------------------------------------------------------------ the hash itself
def python_green(key_words, prev, token, gamma):
    """The scheme recomputed with Python integers: what any platform must reproduce."""

    def mix(x):
        x ^= x >> 16
        x = (x * 0x45D9F3B) & 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x45D9F3B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    k0, k1, k2, k3 = key_words
    seed = mix(mix(prev ^ k0) ^ k1)
    code = mix(mix(token ^ k2) ^ k3)
    return mix(seed ^ code) < round(gamma * 2**32)


def test_green_lists_match_a_pure_python_recount_and_are_pinned():
    watermark = Watermark("genforge", gamma=0.25)
    prev = torch.tensor([0, 1, 17, 50256, 2**31 - 1])
    lists = watermark.green_lists(prev, 64)
    for r, p in enumerate(prev.tolist()):
        assert lists[r].tolist() == [python_green(watermark._words, p, v, 0.25) for v in range(64)]
    # Pinned: texts watermarked today must still be detected after any refactoring. A change
    # to the scheme must change the _SCHEME string (and these values) deliberately.
    assert watermark._words == (41952176, 1279674232, 1558060822, 4291540119)
    assert torch.nonzero(lists[2, :64]).flatten().tolist()[:8] == [5, 6, 10, 16, 17, 18, 23, 25]


def test_green_lists_have_the_expected_size_and_are_independent_across_contexts():
    watermark = Watermark(1234, gamma=0.25)
    lists = watermark.green_lists(torch.arange(300), 5000).float()
    assert abs(lists.mean().item() - 0.25) < 0.003
    assert lists.mean(dim=1).std().item() < 0.01  # Binomial(5000, 0.25): sd 0.006
    overlap = (lists @ lists.T / 5000)[~torch.eye(300, dtype=torch.bool)]
    assert abs(overlap.mean().item() - 0.25**2) < 0.001  # two lists share gamma^2 of the vocabulary
    # The same (context, token) pair is green the same way in a whole list and one at a time.
    prev, tokens = torch.randint(0, 300, (100,)), torch.randint(0, 5000, (100,))
    assert green_token_mask(prev, tokens, 1234, 0.25).tolist() == lists[prev, tokens].bool().tolist()


def test_processor_adds_delta_to_green_tokens_only_and_is_pure():
    watermark = Watermark("k", gamma=0.5, delta=1.5)
    logits = torch.randn(3, 100)
    logits[1, :10] = float("-inf")
    before = logits.clone()
    ctx = DecodeContext(torch.tensor([[5, 7], [1, 9], [4, 4]]), prompt_length=1)
    out = watermark(logits, ctx)
    assert torch.equal(logits, before)
    green = watermark.green_lists(torch.tensor([7, 9, 4]), 100)
    assert torch.equal(out, torch.where(green, before + 1.5, before))
    assert torch.isneginf(out[1, :10]).all()  # banned tokens stay banned
    # Per-row delta: 0 switches a row off.
    per_row = Watermark("k", gamma=0.5, delta=torch.tensor([1.5, 0.0, 3.0]))
    out = per_row(logits, ctx)
    assert torch.equal(out[1], before[1]) and torch.equal(out[2], torch.where(green[2], before[2] + 3.0, before[2]))
    assert Watermark("k", delta=0.0)(logits, ctx) is logits


# -------------------------------------------------------------------------------- detection
def test_detection_statistics_are_the_one_proportion_z_test():
    watermark = Watermark("k", gamma=0.25)
    tokens = torch.randint(0, VOCAB, (101,), generator=torch.Generator().manual_seed(3)).tolist()
    result = watermark.detect(tokens, VOCAB, ignore_repeated_pairs=False)
    green = green_token_mask(torch.tensor(tokens[:-1]), torch.tensor(tokens[1:]), "k", 0.25)
    assert result.num_scored == 100 and result.num_green == int(green.sum())
    expected_z = (result.num_green - 25) / math.sqrt(100 * 0.25 * 0.75)
    assert result.z_score == pytest.approx(expected_z)
    assert result.p_value == pytest.approx(norm.sf(expected_z))
    assert result.token_is_green[0] is None and list(result.token_is_green[1:]) == green.tolist()
    assert result.is_watermarked == (expected_z > 4)


def test_repeated_pairs_are_scored_once():
    tokens = [3, 4] * 30 + [5]  # pairs (3,4) and (4,3) repeat, (4,5) once
    result = detect_watermark(tokens, 10, "k", 0.25, min_tokens=3)
    assert result.num_scored == 3
    assert sum(g is not None for g in result.token_is_green) == 3
    assert detect_watermark(tokens, 10, "k", 0.25, ignore_repeated_pairs=False).num_scored == 60


def test_watermarked_samples_are_detected_and_others_are_not(model):
    """Ten watermarked 200-token samples all have z > 4; with the wrong key, or without the
    watermark, z stays near 0: fewer than 1% of 300 model samples and 1000 uniform random
    texts pass the threshold (the expected rate is 3e-5)."""
    key = "correct horse"
    marked = sample(model, random_prompts(10, seed=1), [Watermark(key, gamma=0.25, delta=2.0)], seed=0)
    z = [detect_watermark(scored_text(row), VOCAB, key, 0.25).z_score for row in marked]
    assert min(z) > 4 and sum(z) / len(z) > 8, z
    wrong_key = [detect_watermark(scored_text(row), VOCAB, "battery staple", 0.25).z_score for row in marked]
    assert max(abs(v) for v in wrong_key) < 4, wrong_key

    plain = sample(model, random_prompts(300, seed=2), [], seed=0)
    uniform = torch.randint(0, VOCAB, (1000, NEW_TOKENS + 1), generator=torch.Generator().manual_seed(4))
    texts = [scored_text(row) for row in plain] + [row.tolist() for row in uniform]
    z_plain = torch.tensor([detect_watermark(t, VOCAB, key, 0.25).z_score for t in texts])
    assert (z_plain > 4).float().mean() < 0.01
    assert abs(z_plain.mean().item()) < 0.2 and 0.8 < z_plain.std().item() < 1.2  # roughly N(0, 1)


def test_watermark_composes_after_sampling_filters(model):
    # Placed last, the watermark only reweights what top-k kept: no token outside the top 20.
    processors = [Temperature(0.8), TopK(20), Watermark("k", delta=2.0)]
    marked = sample(model, random_prompts(4, seed=5), processors, seed=1, new_tokens=120)
    for row in marked:
        assert detect_watermark(scored_text(row), VOCAB, "k").z_score > 4


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("gamma", [0, 1, -0.1, 1.5, float("nan")])
def test_gamma_outside_the_open_unit_interval_is_rejected(gamma):
    with pytest.raises(ValueError, match="gamma must be .*between 0 and 1"):
        Watermark("k", gamma=gamma)
    with pytest.raises(ValueError, match="gamma must be .*between 0 and 1"):
        detect_watermark(list(range(50)), 100, "k", gamma)


@pytest.mark.parametrize("delta", [-0.5, float("inf"), float("nan")])
def test_negative_or_infinite_delta_is_rejected(delta):
    with pytest.raises(ValueError, match="delta must be a finite number >= 0"):
        Watermark("k", delta=delta)


def test_bad_keys_texts_and_lengths_are_rejected():
    with pytest.raises(ValueError, match="key must be an int, str or bytes"):
        Watermark(1.5)
    with pytest.raises(ValueError, match="only 9 tokens can be scored .* at least min_tokens=16"):
        detect_watermark(list(range(10)), 100, "k")
    with pytest.raises(ValueError, match="only 2 tokens can be scored after dropping repeated"):
        detect_watermark([1, 2] * 20, 100, "k", min_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        detect_watermark([1, 2, 300] * 10, 100, "k")
    with pytest.raises(ValueError, match="decode text with the model's tokenizer first"):
        detect_watermark(["a", "b"], 100, "k")
    with pytest.raises(ValueError, match="1-D integer tensor"):
        detect_watermark(torch.zeros(2, 30, dtype=torch.long), 100, "k")
    with pytest.raises(ValueError, match="previous token"):
        Watermark("k")(torch.zeros(1, 10), DecodeContext(torch.zeros(1, 0, dtype=torch.long), 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_green_lists_are_identical_on_cuda():
    watermark = Watermark("k")
    prev = torch.randint(0, 50000, (8,))
    cpu = watermark.green_lists(prev, 50257)
    assert torch.equal(watermark.green_lists(prev.cuda(), 50257).cpu(), cpu)
    logits = torch.randn(8, 50257)
    ctx = DecodeContext(prev[:, None], 1)
    cuda_ctx = DecodeContext(prev[:, None].cuda(), 1)
    assert torch.equal(watermark(logits.cuda(), cuda_ctx).cpu(), watermark(logits, ctx))


def test_generate_accepts_a_watermark_as_an_extra_processor(text_model_dir):
    from genforge.checkpoint import load_model
    from genforge.generate.generator import generate
    from genforge.generate.sampling import SamplingParams
    from genforge.generate.watermark import Watermark, detect_watermark

    model = load_model(text_model_dir)
    mark = Watermark(key=1234, gamma=0.25, delta=8.0)
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=64)
    [marked] = generate(model, [[101, 2023]], params, eos_token_ids=[], extra_processors=[mark])
    [plain] = generate(model, [[101, 2023]], params, eos_token_ids=[])
    vocab = model.config.vocab_size
    assert detect_watermark(marked.token_ids, vocab, key=1234, gamma=0.25).z_score > 4
    assert detect_watermark(plain.token_ids, vocab, key=1234, gamma=0.25).z_score < 4
