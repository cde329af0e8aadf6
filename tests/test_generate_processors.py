"""Logits processors: parity with transformers' processors, purity, per-row behaviour, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation import logits_process as hf

from genforge.generate.processors import (
    DecodeContext,
    LogitBias,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    apply_processors,
    build_batch_processors,
    build_processors,
)
from genforge.generate.sampling import SamplingParams, make_generator, sample_next_token, token_logprobs

BATCH, VOCAB, SEQ, PROMPT = 4, 1000, 14, 9
EOS = 3
PAD = 999  # a pad id that occurs nowhere else, so padded n-grams never match real ones


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality, -inf positions included (assert_close treats equal infinities as equal)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(BATCH, VOCAB, generator=g) * 3).round(decimals=1)  # rounding makes many ties
    x[0, :40] = -math.inf  # already-masked tokens
    x[1, [10, 20, 30]] = x[1].max() + 1.0  # a three-way tie at the top (top-k boundary for k = 1, 2)
    x[2, 100:110] = 2.5  # a block of ties in the middle of the distribution
    x[3, 500] = 12.0  # one very confident token (min-p / typical edge case)
    x[3, 5] = -7.3  # a negative logit on a token that is repeated (repetition penalty multiplies)
    return x


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 12, (BATCH, SEQ), generator=g)  # small id range: repeats and repeated n-grams
    ids[3, :] = torch.tensor([6, 7, 5, 6, 7, 5, 6, 7, 8, 5, 6, 8, 5, 6])  # ends "5 6"; "5 6 7", "5 6 8" occurred
    ids[2, 4] = 1005  # outside the LM head's vocab: must be ignored, as transformers does
    return ids


@pytest.fixture
def ctx(input_ids: torch.Tensor) -> DecodeContext:
    return DecodeContext(input_ids, PROMPT)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 1.7])
def test_temperature_matches_transformers(logits, ctx, t):
    exact(Temperature(t)(logits, ctx), hf.TemperatureLogitsWarper(t)(ctx.input_ids, logits))


@pytest.mark.parametrize("k,keep", [(1, 1), (2, 1), (3, 1), (50, 1), (5, 10), (VOCAB, 1), (5000, 1)])
def test_top_k_matches_transformers(logits, ctx, k, keep):
    ours = TopK(k, min_tokens_to_keep=keep)(logits, ctx)
    exact(ours, hf.TopKLogitsWarper(k, min_tokens_to_keep=keep)(ctx.input_ids, logits))
    if k == 2:  # ties at the boundary are kept: row 1 has three tokens tied for first
        assert torch.isfinite(ours[1]).sum() == 3


@pytest.mark.parametrize("p,keep", [(0.05, 1), (0.3, 1), (0.9, 1), (0.999, 1), (0.3, 5)])
def test_top_p_matches_transformers(logits, ctx, p, keep):
    exact(TopP(p, keep)(logits, ctx), hf.TopPLogitsWarper(p, min_tokens_to_keep=keep)(ctx.input_ids, logits))


@pytest.mark.parametrize("p,keep", [(0.0, 1), (0.05, 1), (0.3, 1), (1.0, 1), (0.5, 4)])
def test_min_p_matches_transformers(logits, ctx, p, keep):
    exact(MinP(p, keep)(logits, ctx), hf.MinPLogitsWarper(p, min_tokens_to_keep=keep)(ctx.input_ids, logits))


@pytest.mark.parametrize("mass,keep", [(0.2, 1), (0.9, 1), (0.99, 1), (0.5, 7)])
def test_typical_p_matches_transformers(logits, ctx, mass, keep):
    ours = TypicalP(mass, keep)(logits, ctx)
    exact(ours, hf.TypicalLogitsWarper(mass, min_tokens_to_keep=keep)(ctx.input_ids, logits))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(logits, ctx, penalty):
    exact(RepetitionPenalty(penalty)(logits, ctx), hf.RepetitionPenaltyLogitsProcessor(penalty)(ctx.input_ids, logits))


def test_repetition_penalty_ignores_left_padding_like_generate(logits, input_ids):
    """transformers' generate passes the left-padding length as prompt_ignore_length."""
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    ours = RepetitionPenalty(1.5)(logits, DecodeContext(input_ids, PROMPT, mask))
    padding = (mask != 0).int().argmax(dim=1)
    exact(ours, hf.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=padding)(input_ids, logits))


@pytest.mark.parametrize("n", [1, 2, 3, 4, SEQ, SEQ + 1])
def test_no_repeat_ngram_matches_transformers(logits, ctx, n):
    ours = NoRepeatNGram(n)(logits, ctx)
    exact(ours, hf.NoRepeatNGramLogitsProcessor(n)(ctx.input_ids, logits))
    if n == 3:  # row 3 ends "5 6" and "5 6 7", "5 6 8" occurred before: 7 and 8 are banned
        assert ours[3, 7] == -math.inf


def test_no_repeat_ngram_ignores_padding_where_transformers_does_not(logits):
    # The prompt is left-padded with id 4 (also a real token) and the text ends with "4":
    # transformers bans what followed "4" inside the padding ("4 4" -> 4, "4 8" -> 8); we only
    # look at n-grams made of real tokens, and "4" never occurred before among those.
    ids = torch.tensor([[4, 4, 8, 9, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    row = logits[:1]
    ours = NoRepeatNGram(2)(row, DecodeContext(ids, 3, mask))
    theirs = hf.NoRepeatNGramLogitsProcessor(2)(ids, row)
    assert theirs[0, 4] == -math.inf and theirs[0, 8] == -math.inf
    exact(ours, row)


@pytest.mark.parametrize("min_new", [0, 3, SEQ - PROMPT, SEQ - PROMPT + 1, 50])
@pytest.mark.parametrize("eos", [[EOS], [EOS, 17, 5000]])
def test_min_new_tokens_matches_transformers(logits, ctx, min_new, eos):
    ours = MinNewTokens(min_new, eos)(logits, ctx)
    theirs = hf.MinNewTokensLengthLogitsProcessor(PROMPT, min_new, eos)(ctx.input_ids, logits)
    exact(ours, theirs)


def test_logit_bias_matches_sequence_bias(logits, ctx):
    bias = {7: -3.0, 11: 2.5, 0: -math.inf, 998: 100.0}
    ours = LogitBias(bias, vocab_size=VOCAB)(logits, ctx)
    theirs = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(ctx.input_ids, logits)
    exact(ours, theirs)
    assert (ours[:, 0] == -math.inf).all()


def test_logit_bias_ban_and_json_keys(logits, ctx):
    out = LogitBias.ban([1, 2], vocab_size=VOCAB)(logits, ctx)
    assert (out[:, [1, 2]] == -math.inf).all()
    exact(out[:, 3:], logits[:, 3:])
    assert SamplingParams(logit_bias={"50": -100}).logit_bias == {50: -100.0}  # OpenAI JSON keys are strings


def test_presence_frequency_penalty_matches_openai_formula(logits, input_ids):
    presence, frequency = 0.7, 0.4
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # padding is in the prompt region, which does not count anyway
    out = PresenceFrequencyPenalty(presence, frequency)(logits, DecodeContext(input_ids, PROMPT, mask))
    expected = logits.clone()
    for b in range(BATCH):
        counts: dict[int, int] = {}
        for t in input_ids[b, PROMPT:].tolist():  # generated tokens only (OpenAI / vLLM)
            if t < VOCAB:
                counts[t] = counts.get(t, 0) + 1
        for t, c in counts.items():
            expected[b, t] = logits[b, t] - c * frequency - (1.0 if c > 0 else 0.0) * presence
    torch.testing.assert_close(out, expected)


def test_presence_frequency_penalty_ignores_prompt_and_padding(logits):
    row = logits[1:2]  # all finite, so differences are meaningful
    ids = torch.tensor([[9, 9, 9, 9, 1, 1, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])  # any position with mask 0 is ignored
    delta = PresenceFrequencyPenalty(1.0, 0.5)(row, DecodeContext(ids, 4, mask)) - row
    assert delta[0, 9] == 0  # only in the prompt
    assert delta[0, 1] == pytest.approx(-(2 * 0.5 + 1.0))
    assert delta[0, 2] == pytest.approx(-(1 * 0.5 + 1.0))
    assert (delta[0, 10:] == 0).all()
    # Per-row prompt lengths: columns before prompt_length[i] are prompt, the rest generated.
    ids2 = torch.tensor([[4, 4, 4, 4], [4, 4, 4, 4]])
    out2 = PresenceFrequencyPenalty(0.0, 1.0)(logits[1:3], DecodeContext(ids2, torch.tensor([1, 3])))
    assert (out2 - logits[1:3])[:, 4].tolist() == pytest.approx([-3.0, -1.0])


def _hf_generation_config(**kwargs):
    from transformers import GenerationConfig

    gc = GenerationConfig(eos_token_id=EOS, **kwargs)
    gc._eos_token_tensor = torch.tensor([EOS])  # what generate's _prepare_special_tokens sets
    return gc


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=EOS
    )
    return GPT2LMHeadModel(config).eval()


COMPOSED = [
    dict(
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        min_p=0.05,
        typical_p=0.95,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        min_new_tokens=8,
        logit_bias={7: -3.0, 11: 2.5},
    ),
    dict(temperature=1.3, top_k=2, repetition_penalty=0.8, no_repeat_ngram_size=3),
    dict(temperature=0.5, top_p=0.5, min_new_tokens=2),
    dict(temperature=1.0, typical_p=0.4, logit_bias={500: -math.inf}),
    dict(temperature=0.0, top_k=5, typical_p=0.2, repetition_penalty=1.2, min_new_tokens=8),  # greedy
]


@pytest.mark.parametrize(
    "settings", COMPOSED, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "logit_bias")
)
def test_build_processors_matches_generate_list(tiny_gpt2, logits, input_ids, settings):
    """The composed list equals the LogitsProcessorList that generate() builds, in its order."""
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding on row 0
    ids = input_ids.masked_fill(mask == 0, PAD)
    params = SamplingParams(**settings)
    ours = apply_processors(logits, DecodeContext(ids, PROMPT, mask), build_processors(params, EOS, vocab_size=VOCAB))

    hf_kwargs = {k: v for k, v in settings.items() if k != "logit_bias"}
    greedy = hf_kwargs.pop("temperature") == 0
    if greedy:
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in ("top_k", "top_p", "min_p", "typical_p")}
    else:
        hf_kwargs.update(do_sample=True, temperature=settings["temperature"])
        hf_kwargs.setdefault("top_k", 0)  # GenerationConfig defaults top_k to 50; SamplingParams to off
    if "logit_bias" in settings:
        hf_kwargs["sequence_bias"] = [[[t], b] for t, b in settings["logit_bias"].items()]
    processors = tiny_gpt2._get_logits_processor(
        _hf_generation_config(**hf_kwargs),
        input_ids_seq_length=PROMPT,
        encoder_input_ids=ids[:, :PROMPT],
        logits_processor=None,
        device="cpu",
        model_kwargs={"attention_mask": mask[:, :PROMPT]},
    )
    assert len(processors) == len(build_processors(params, EOS))
    exact(ours, processors(ids, logits))


def test_build_processors_order_and_omissions():
    params = SamplingParams(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        min_p=0.1,
        typical_p=0.9,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=0.2,
        no_repeat_ngram_size=3,
        logit_bias={1: 1.0},
        min_new_tokens=2,
    )
    names = [type(p).__name__ for p in build_processors(params, [EOS])]
    assert names == [
        "LogitBias",
        "RepetitionPenalty",
        "PresenceFrequencyPenalty",
        "NoRepeatNGram",
        "MinNewTokens",
        "Temperature",
        "TopK",
        "TopP",
        "MinP",
        "TypicalP",
    ]
    assert build_processors(SamplingParams()) == []  # every knob neutral: nothing to do
    assert [type(p).__name__ for p in build_processors(SamplingParams(temperature=0, top_k=3))] == []
    # min_new_tokens also keeps the request's stop ids out (vLLM min_tokens semantics)
    (mnt,) = build_processors(SamplingParams(min_new_tokens=2, stop_token_ids=[9]), EOS)
    assert mnt.eos_token_ids == (EOS, 9)


# ----------------------------------------------------------------------------- purity and rows


def _all_processors():
    per_row = dict(
        temperature=torch.tensor([0.5, 1.0, 2.0, 0.9]),
        top_k=torch.tensor([0, 1, 5, 100]),
        top_p=torch.tensor([1.0, 0.5, 0.9, 0.2]),
    )
    return [
        Temperature(0.7),
        TopK(5),
        TopP(0.8),
        MinP(0.1),
        TypicalP(0.9),
        RepetitionPenalty(1.4),
        PresenceFrequencyPenalty(0.5, 0.5),
        NoRepeatNGram(2),
        LogitBias({1: 2.0, 2: -math.inf}),
        MinNewTokens(10, [EOS]),
        Temperature(per_row["temperature"]),
        TopK(per_row["top_k"]),
        TopP(per_row["top_p"]),
        MinP(torch.tensor([0.0, 0.1, 0.5, 1.0])),
        TypicalP(torch.tensor([1.0, 0.9, 0.5, 0.2])),
        RepetitionPenalty(torch.tensor([1.0, 1.2, 0.7, 2.0])),
        NoRepeatNGram(torch.tensor([0, 1, 2, 3])),
        MinNewTokens(torch.tensor([0, 5, 6, 9]), [[EOS], [EOS, 4], [], [8]]),
        LogitBias([{1: 1.0}, None, {5: -2.0, 6: 3.0}, {}]),
    ]


@pytest.mark.parametrize("processor", _all_processors(), ids=lambda p: type(p).__name__)
def test_processors_do_not_modify_inputs(logits, input_ids, processor):
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    ctx = DecodeContext(input_ids, PROMPT, mask)
    before = (logits.clone(), input_ids.clone(), mask.clone())
    out = processor(logits, ctx)
    exact(logits, before[0])
    assert torch.equal(input_ids, before[1]) and torch.equal(mask, before[2])
    assert out.shape == logits.shape and out.dtype == logits.dtype
    assert processor(logits, ctx).equal(out)  # and calling again gives the same answer


@pytest.mark.parametrize("processor", _all_processors()[:10], ids=lambda p: type(p).__name__)
def test_rows_are_independent(logits, ctx, processor):
    """A row's result does not depend on which other rows share its batch."""
    batched = processor(logits, ctx)
    for i in range(BATCH):
        alone = processor(logits[i : i + 1], DecodeContext(ctx.input_ids[i : i + 1], ctx.prompt_length))
        exact(batched[i : i + 1], alone)


ROW_PARAMS = [
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, logit_bias={3: 5.0}, min_new_tokens=9),
    SamplingParams(temperature=0.0, top_k=2, typical_p=0.5, no_repeat_ngram_size=2, presence_penalty=0.5),
    SamplingParams(
        temperature=1.4, min_p=0.2, typical_p=0.8, frequency_penalty=1.0, stop_token_ids=[8], min_new_tokens=9
    ),
    SamplingParams(top_p=0.3, no_repeat_ngram_size=3, repetition_penalty=0.9, logit_bias={7: -math.inf}),
]


def test_batch_processors_equal_per_request_processors(logits, input_ids):
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    ctx = DecodeContext(input_ids, PROMPT, mask)
    batched = apply_processors(logits, ctx, build_batch_processors(ROW_PARAMS, EOS, vocab_size=VOCAB))
    for i, params in enumerate(ROW_PARAMS):
        row_ctx = DecodeContext(input_ids[i : i + 1], PROMPT, mask[i : i + 1])
        alone = apply_processors(logits[i : i + 1], row_ctx, build_processors(params, EOS, vocab_size=VOCAB))
        exact(batched[i : i + 1], alone)


def test_per_row_prompt_length(logits):
    """Rows that started generating at different columns: min_new_tokens counts per row."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    ctx = DecodeContext(ids, torch.tensor([2, 5]))  # 4 and 1 generated tokens
    out = MinNewTokens(3, [EOS])(logits[:2], ctx)
    assert out[0, EOS] == logits[0, EOS] and out[1, EOS] == -math.inf


# ----------------------------------------------------------------------------- sampling


def test_temperature_zero_is_argmax(logits):
    assert torch.equal(sample_next_token(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    assert sample_next_token(logits, 0.0)[1] == 10  # first index among the tied maxima, like transformers


def test_seeded_sampling_is_reproducible_and_matches_transformers_step(logits):
    a = [sample_next_token(logits, 1.0, make_generator(1234)) for _ in range(3)]
    assert all(torch.equal(a[0], x) for x in a)
    # transformers' _sample: probs = softmax(scores); multinomial(probs, 1) with the global RNG
    torch.manual_seed(1234)
    theirs = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)
    assert torch.equal(a[0], theirs)
    g = make_generator(7)
    draws = torch.stack([sample_next_token(logits, 1.0, g) for _ in range(20)])
    assert len({tuple(r) for r in draws.tolist()}) > 1  # the generator advances


def test_per_row_generators_and_mixed_greedy(logits):
    temps = [0.0, 1.0, 1.0, 0.0]
    gens = [None, make_generator(1), make_generator(2), None]
    out = sample_next_token(logits, temps, gens)
    assert out[0] == logits[0].argmax() and out[3] == logits[3].argmax()
    for i, seed in [(1, 1), (2, 2)]:  # each request's draw is what it would draw alone
        assert out[i] == sample_next_token(logits[i : i + 1], 1.0, make_generator(seed))[0]
    tensor_temps = sample_next_token(logits, torch.tensor(temps), make_generator(3))
    assert tensor_temps[0] == logits[0].argmax()


def test_sampling_respects_filters(logits, ctx):
    processed = apply_processors(logits, ctx, [TopK(1)])
    g = make_generator(0)
    for _ in range(5):
        tokens = sample_next_token(processed, 1.0, g)
        assert torch.isfinite(processed.gather(1, tokens[:, None])).all()


def test_sampling_with_nothing_left_raises(logits):
    dead = logits.clone()
    dead[2] = -math.inf
    with pytest.raises(ValueError, match=r"rows \[2\] have every token masked"):
        sample_next_token(dead, 1.0)


def test_token_logprobs(logits):
    tokens = torch.tensor([50, 10, 105, 500])
    out = token_logprobs(logits, tokens, top_n=5)
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, tokens[:, None]).squeeze(1))
    top = ref.topk(5)
    torch.testing.assert_close(out.top_logprobs, top.values)
    assert torch.equal(out.top_token_ids, top.indices)
    assert token_logprobs(logits, tokens).top_logprobs.shape == (BATCH, 0)
    assert token_logprobs(logits, torch.tensor([0, 1, 2, 3])).logprobs[0] == -math.inf  # a masked token
    with pytest.raises(ValueError, match="top_n"):
        token_logprobs(logits, tokens, top_n=VOCAB + 1)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: Temperature(0.0), r"temperature must be a finite number > 0.*greedy.*temperature=0"),
        (lambda: Temperature(-1.0), "temperature"),
        (lambda: Temperature(float("nan")), "temperature"),
        (lambda: Temperature(torch.tensor([1.0, 0.0])), r"rows \[1\]"),
        (lambda: TopK(-1), r"top_k must be .*>= 0"),
        (lambda: TopK(2.5), "top_k must be an integer"),
        (lambda: TopK(5, min_tokens_to_keep=0), "min_tokens_to_keep"),
        (lambda: TopP(0.0), r"top_p must be in \(0, 1\]"),
        (lambda: TopP(1.5), "top_p"),
        (lambda: MinP(-0.1), r"min_p must be in \[0, 1\]"),
        (lambda: TypicalP(0.0), "typical_p"),
        (lambda: RepetitionPenalty(0.0), "repetition_penalty must be a finite number > 0"),
        (lambda: RepetitionPenalty(torch.ones(2, 2)), "1-D tensor"),
        (lambda: PresenceFrequencyPenalty(float("inf")), "presence_penalty must be finite"),
        (lambda: NoRepeatNGram(-2), "no_repeat_ngram_size"),
        (lambda: LogitBias({1000: 1.0}, vocab_size=VOCAB), r"outside the vocabulary of size 1000: \[1000\]"),
        (lambda: LogitBias({-1: 1.0}), "token ids"),
        (lambda: LogitBias({1: math.inf}), "-inf to ban"),
        (lambda: LogitBias("nope"), "mapping"),
        (lambda: MinNewTokens(-1, [EOS]), "min_new_tokens"),
        (lambda: MinNewTokens(1, [-3]), "token ids"),
        (lambda: SamplingParams(temperature=-0.5), r"temperature must be a finite number >= 0 \(0 = greedy\)"),
        (lambda: SamplingParams(top_k=-1), "top_k"),
        (lambda: SamplingParams(top_k=True), "top_k must be an integer"),
        (lambda: SamplingParams(top_p=0), "top_p"),
        (lambda: SamplingParams(top_p=1.01), "top_p"),
        (lambda: SamplingParams(min_p=2), "min_p"),
        (lambda: SamplingParams(typical_p=0), "typical_p"),
        (lambda: SamplingParams(repetition_penalty=0), "repetition_penalty"),
        (lambda: SamplingParams(presence_penalty=3), r"presence_penalty must be in \[-2, 2\]"),
        (lambda: SamplingParams(frequency_penalty=-2.5), "frequency_penalty"),
        (lambda: SamplingParams(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (lambda: SamplingParams(logit_bias={"x": 1.0}), "token ids"),
        (lambda: SamplingParams(max_new_tokens=0), "max_new_tokens"),
        (lambda: SamplingParams(min_new_tokens=5, max_new_tokens=2), "must not exceed"),
        (lambda: SamplingParams(stop=[""]), "non-empty strings"),
        (lambda: SamplingParams(stop_token_ids=[1.5]), "stop_token_ids"),
        (lambda: SamplingParams(seed="42"), "seed"),
        (lambda: build_processors(SamplingParams(logit_bias={5000: 1.0}), EOS, vocab_size=VOCAB), "vocabulary"),
        (lambda: build_processors({"temperature": 1.0}), "SamplingParams"),
        (lambda: DecodeContext(torch.zeros(3, dtype=torch.long), 0), r"\(batch, seq\)"),
        (lambda: DecodeContext(torch.zeros(2, 3, dtype=torch.long), 4), r"prompt_length must be an int in \[0, 3\]"),
        (lambda: DecodeContext(torch.zeros(2, 3, dtype=torch.long), 1, torch.ones(2, 2)), "attention_mask"),
        (lambda: DecodeContext(torch.zeros(2, 3), 1), "integer token ids"),
    ],
)
def test_bad_parameters_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_mismatched_shapes_raise(logits, ctx):
    with pytest.raises(ValueError, match="per-row values but the logits have 4 rows"):
        Temperature(torch.tensor([1.0, 2.0]))(logits, ctx)
    with pytest.raises(ValueError, match="logits have 2 rows but the context has 4"):
        apply_processors(logits[:2], ctx, [])
    with pytest.raises(ValueError, match="outside the vocabulary of size 1000"):
        LogitBias({1200: 1.0})(logits, ctx)  # no vocab_size given: caught at the first call
    with pytest.raises(ValueError, match="generators for 4 rows"):
        sample_next_token(logits, 1.0, [make_generator(0)])


def test_extreme_temperature_and_penalty_stay_finite_and_sample():
    from genforge.generate.processors import RepetitionPenalty, Temperature

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    ctx = DecodeContext(input_ids=torch.tensor([[3, 0]]), prompt_length=0)
    for processor in (Temperature(5e-324), RepetitionPenalty(5e-324)):
        out = processor(logits, ctx)
        assert not out.isnan().any() and not (out == float("inf")).any()
        token = sample_next_token(out, 1.0, torch.Generator().manual_seed(0))
        assert int(token) in (0, 2, 3)  # a positive logit, never the one pushed to -inf
    with pytest.raises(ValueError, match="NaN logits"):
        sample_next_token(torch.tensor([[float("nan"), 0.0]]), 1.0)
