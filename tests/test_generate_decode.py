"""decode(): every strategy through one entry point, equal to calling the strategy itself."""

import dataclasses

import pytest
import torch

from genforge.config import Config
from genforge.generate.beam import BeamOptions, beam_search
from genforge.generate.contrastive import (
    ContrastiveDecodingOptions,
    ContrastiveSearchOptions,
    contrastive_decoding,
    contrastive_search,
)
from genforge.generate.decode import (
    STRATEGIES,
    SampleOptions,
    check_strategy,
    decode,
    decode_stream,
    encode_prompts,
)
from genforge.generate.generator import continuation_text, generate
from genforge.generate.processors import VocabularyLimit, build_processors
from genforge.generate.request import DecodeRequestError
from genforge.generate.sampling import SamplingParams
from genforge.generate.speculative import (
    PromptLookupOptions,
    SpeculativeOptions,
    prompt_lookup_generate,
    speculative_generate,
)
from genforge.generate.watermark import Watermark
from genforge.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the parser reads", "json"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


def small_model(vocab_size, seed, eos_token_id=None):
    """A second model over the same vocabulary: a draft or an amateur."""
    config = Config(
        family="llama",
        vocab_size=vocab_size,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=256,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def bpe(bpe_model, bpe_tokenizer):
    return bpe_model, bpe_tokenizer, encode_prompts(bpe_tokenizer, TEXTS)


def eos_of(model, tokenizer):
    return sorted({model.config.eos_token_id, tokenizer.eos_token_id})


def test_sample_is_generate(bpe):
    model, tokenizer, prompts = bpe
    params = SamplingParams(temperature=0.8, top_k=20, seed=5, max_new_tokens=10)
    got = decode("sample", model, tokenizer, TEXTS, params)
    expected = generate(model, prompts, params, tokenizer=tokenizer)
    assert [(d.prompt_index, d.token_ids, d.text, d.finish_reason) for d in got] == [
        (i, c.token_ids, c.text, c.finish_reason) for i, c in enumerate(expected)
    ]
    by_ids = decode("sample", model, tokenizer, prompts, params)  # token ids in, the same out
    assert [d.token_ids for d in by_ids] == [d.token_ids for d in got]
    events = list(decode_stream("sample", model, tokenizer, TEXTS, params))
    assert [[e.token_id for e in events if e.row == i] for i in range(2)] == [d.token_ids for d in got]


def test_sample_with_a_constraint_and_a_watermark(bpe):
    model, tokenizer, _ = bpe
    choices = ["yes", "no", "maybe"]
    params = SamplingParams(temperature=1.0, seed=1, max_new_tokens=20)
    options = SampleOptions(choices=choices, watermark=Watermark(key=7))
    for done in decode("sample", model, tokenizer, TEXTS, params, options):
        assert done.finish_reason == "stop" and done.text in choices


def test_beam_is_beam_search(bpe):
    model, tokenizer, prompts = bpe
    params = SamplingParams(temperature=0.7, repetition_penalty=1.3, max_new_tokens=8)
    options = BeamOptions(num_beams=3, num_return_sequences=2, length_penalty=0.8)
    got = decode("beam", model, tokenizer, TEXTS, params, options)
    eos = eos_of(model, tokenizer)
    # What the command line did: only the penalties and bans of the processors, no warpers.
    bans = build_processors(dataclasses.replace(params, temperature=0.0), eos, vocab_size=model.config.vocab_size)
    expected = beam_search(
        model,
        prompts,
        3,
        8,
        num_return_sequences=2,
        length_penalty=0.8,
        eos_token_ids=eos,
        processors=bans,
        tokenizer=tokenizer,
    )
    assert [(d.prompt_index, d.token_ids, d.text, d.score) for d in got] == [
        (i, h.token_ids, h.text, h.score) for i, hypotheses in enumerate(expected) for h in hypotheses
    ]


def test_diverse_beam_and_beam_sampling(bpe):
    model, tokenizer, prompts = bpe
    options = BeamOptions(num_beams=4, num_beam_groups=2, diversity_penalty=0.5)
    got = decode("diverse-beam", model, tokenizer, prompts, GREEDY, options)
    expected = beam_search(
        model,
        prompts,
        4,
        8,
        num_beam_groups=2,
        diversity_penalty=0.5,
        eos_token_ids=eos_of(model, tokenizer),
        tokenizer=tokenizer,
    )
    assert [d.token_ids for d in got] == [h[0].token_ids for h in expected]
    sampled = SamplingParams(temperature=0.9, seed=4, max_new_tokens=8)
    first, again = (
        decode("beam", model, tokenizer, prompts, sampled, BeamOptions(num_beams=3, do_sample=True)) for _ in range(2)
    )
    assert [d.token_ids for d in first] == [d.token_ids for d in again]


def test_contrastive_search_is_contrastive_search(bpe):
    model, tokenizer, prompts = bpe
    got = decode("contrastive", model, tokenizer, prompts, GREEDY, ContrastiveSearchOptions(penalty_alpha=0.6))
    # Without a tokenizer, the strategy itself knows of no limit past the model's vocabulary.
    text_only = [VocabularyLimit(tokenizer.vocab_size)]
    expected = contrastive_search(
        model, prompts, 0.6, 4, 8, eos_token_ids=eos_of(model, tokenizer), processors=text_only
    )
    assert [d.token_ids for d in got] == [c.token_ids for c in expected]
    assert [d.text for d in got] == [continuation_text(tokenizer, p, c.token_ids) for p, c in zip(prompts, expected)]
    # top_k None takes params.top_k.
    wider = decode("contrastive", model, tokenizer, prompts, dataclasses.replace(GREEDY, top_k=6))
    assert [d.token_ids for d in wider] == [
        c.token_ids
        for c in contrastive_search(
            model, prompts, 0.6, 6, 8, eos_token_ids=eos_of(model, tokenizer), processors=text_only
        )
    ]


def test_contrastive_decoding_is_contrastive_decoding(bpe):
    model, tokenizer, prompts = bpe
    amateur = small_model(model.config.vocab_size, seed=3)
    params = SamplingParams(temperature=0.8, seed=2, max_new_tokens=8)
    got = decode("contrastive-decoding", model, tokenizer, prompts, params, ContrastiveDecodingOptions(amateur))
    expected = contrastive_decoding(
        model,
        amateur,
        prompts,
        max_new_tokens=8,
        temperature=0.8,
        seed=2,
        eos_token_ids=eos_of(model, tokenizer),
        processors=[VocabularyLimit(tokenizer.vocab_size)],
    )
    assert [d.token_ids for d in got] == [c.token_ids for c in expected]


def test_speculative_and_prompt_lookup_give_the_greedy_tokens(bpe):
    model, tokenizer, prompts = bpe
    draft = small_model(model.config.vocab_size, seed=4)
    expected = generate(model, prompts[:1], GREEDY, tokenizer=tokenizer)[0]
    [speculative] = decode("speculative", model, tokenizer, TEXTS[:1], GREEDY, SpeculativeOptions(draft))
    [lookup] = decode("prompt-lookup", model, tokenizer, TEXTS[:1], GREEDY, PromptLookupOptions(num_draft_tokens=3))
    for done in (speculative, lookup):
        assert (done.token_ids, done.text) == (expected.token_ids, expected.text)
        assert done.stats.generated == len(done.token_ids) and done.stats.target_forwards >= 1
    direct = speculative_generate(model, draft, prompts[0], GREEDY, tokenizer=tokenizer)
    assert direct.stats == speculative.stats
    assert (
        prompt_lookup_generate(model, prompts[0], GREEDY, num_draft_tokens=3, tokenizer=tokenizer).stats == lookup.stats
    )


def test_no_strategy_chooses_an_id_past_the_tokenizer(text_model_dir):
    """The text model's padded embedding rows are its most likely outputs after "x"; the
    request's vocabulary limit keeps every strategy off them."""
    from genforge.checkpoint import load_model
    from genforge.tokenizer import Tokenizer

    model, tokenizer = load_model(text_model_dir), Tokenizer.from_dir(text_model_dir)
    other = small_model(model.config.vocab_size, seed=5)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    runs = {
        "sample": None,
        "beam": BeamOptions(num_beams=2),
        "diverse-beam": BeamOptions(num_beams=2, num_beam_groups=2, diversity_penalty=1.0),
        "contrastive": ContrastiveSearchOptions(top_k=3),
        "contrastive-decoding": ContrastiveDecodingOptions(other),
        "speculative": SpeculativeOptions(other),
        "prompt-lookup": None,
    }
    assert set(runs) == set(STRATEGIES)
    for strategy, options in runs.items():
        for done in decode(strategy, model, tokenizer, ["x"], params, options, eos_token_ids=[]):
            assert done.token_ids and all(t < tokenizer.vocab_size for t in done.token_ids), strategy


@pytest.mark.parametrize(
    "strategy, params, options, prompts, message",
    [
        ("greedy", GREEDY, None, 1, "unknown strategy 'greedy'; accepted: sample, beam"),
        ("beam", GREEDY, SampleOptions(), 1, "strategy 'beam' takes BeamOptions, got SampleOptions"),
        (
            "beam",
            GREEDY,
            BeamOptions(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
            1,
            "use strategy 'diverse-beam'",
        ),
        ("diverse-beam", GREEDY, None, 1, r"needs BeamOptions\(num_beam_groups > 1"),
        (
            "contrastive",
            SamplingParams(stop=["."]),
            None,
            1,
            "stop strings are not supported by strategy 'contrastive'",
        ),
        ("speculative", GREEDY, SpeculativeOptions(), 2, "decodes one prompt at a time, got 2"),
        ("prompt-lookup", GREEDY, None, 3, "decodes one prompt at a time"),
        ("sample", {"temperature": 0}, None, 1, "params must be a SamplingParams"),
    ],
)
def test_bad_combinations_are_refused_before_any_model_is_loaded(strategy, params, options, prompts, message):
    with pytest.raises(DecodeRequestError, match=message):
        check_strategy(strategy, params, options, prompts)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SampleOptions(regex="a+", choices=["a"]), "one output constraint at a time, got regex and choices"),
        (lambda: BeamOptions(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) must not exceed"),
        (lambda: BeamOptions(num_beams=4, num_beam_groups=2, do_sample=True), "do not combine"),
        (lambda: ContrastiveSearchOptions(penalty_alpha=2.0), r"penalty_alpha must be a number in \[0, 1\]"),
        (lambda: ContrastiveDecodingOptions(alpha=-1.0), r"alpha must be a number in \[0, 1\]"),
        (lambda: SpeculativeOptions(num_draft_tokens=0), "num_draft_tokens must be an integer >= 1"),
        (lambda: SpeculativeOptions(draft_confidence=2.0), "draft_confidence must be a probability"),
        (lambda: PromptLookupOptions(max_ngram_size=1, min_ngram_size=2), "must not exceed max_ngram_size"),
    ],
)
def test_options_are_checked_when_built(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_refusals_that_need_the_models(bpe):
    model, tokenizer, prompts = bpe
    with pytest.raises(DecodeRequestError, match="speculative decoding needs a draft model"):
        decode("speculative", model, tokenizer, TEXTS[:1], GREEDY, SpeculativeOptions())
    with pytest.raises(DecodeRequestError, match="contrastive decoding needs an amateur model"):
        decode("contrastive-decoding", model, tokenizer, TEXTS, GREEDY, ContrastiveDecodingOptions())
    with pytest.raises(DecodeRequestError, match="output constraints need the tokenizer"):
        decode("sample", model, None, prompts, GREEDY, SampleOptions(regex="a+"))
    with pytest.raises(DecodeRequestError, match="prompts given as text need a tokenizer"):
        decode("sample", model, None, TEXTS, GREEDY)
    with pytest.raises(DecodeRequestError, match="only strategy 'sample' streams tokens"):
        decode_stream("beam", model, tokenizer, TEXTS, GREEDY)
    with pytest.raises(DecodeRequestError, match="the draft model's vocabulary"):
        decode("speculative", model, tokenizer, TEXTS[:1], GREEDY, SpeculativeOptions(small_model(100, seed=0)))


def test_chat_prompts_use_the_template(bpe_tokenizer):
    import copy

    tokenizer = copy.copy(bpe_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    [ids] = encode_prompts(tokenizer, ["hi"], chat=True)
    assert ids == tokenizer.encode("<user>hi<assistant>", add_special_tokens=False)
    with pytest.raises(DecodeRequestError, match="no chat template"):
        encode_prompts(bpe_tokenizer, ["hi"], chat=True)
