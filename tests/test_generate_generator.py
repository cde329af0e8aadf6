"""Generation: greedy parity with transformers, sampling reproducibility, stops, streaming."""

import pytest
import reference_models
import torch

from genforge.checkpoint import load_model
from genforge.generate.generator import generate, stream
from genforge.generate.sampling import SamplingParams

FAMILIES = list(reference_models.FAMILIES)


def prompts(seed=0, lengths=(11, 5, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, reference_models.VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, new_tokens):
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_token_identical_to_transformers(family, hf_model_dir):
    hf, directory = hf_model_dir(family)
    model = load_model(directory)
    batch = prompts()
    params = SamplingParams(temperature=0, max_new_tokens=32)
    # eos_token_ids=[] so that random weights cannot end a row early.
    got = generate(model, batch, params, eos_token_ids=[])
    for prompt, completion in zip(batch, got):
        assert completion.token_ids == hf_greedy(hf, prompt, 32)
        assert completion.finish_reason == "length"


def test_sampling_is_reproducible_with_a_seed(hf_model_dir):
    model = load_model(hf_model_dir("llama")[1])
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7, max_new_tokens=16)
    first = generate(model, prompts(), params, eos_token_ids=[])
    second = generate(model, prompts(), params, eos_token_ids=[])
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    other = generate(model, prompts(), SamplingParams(temperature=0.9, seed=8, max_new_tokens=16), eos_token_ids=[])
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_sampling_with_top_k_1_is_greedy(hf_model_dir):
    model = load_model(hf_model_dir("qwen2")[1])
    greedy = generate(model, prompts(), SamplingParams(temperature=0, max_new_tokens=12), eos_token_ids=[])
    top1 = generate(model, prompts(), SamplingParams(temperature=1.5, top_k=1, max_new_tokens=12), eos_token_ids=[])
    assert [c.token_ids for c in greedy] == [c.token_ids for c in top1]


def test_eos_stops_only_its_row(hf_model_dir):
    model = load_model(hf_model_dir("llama")[1])
    batch = prompts()
    free = generate(model, batch, SamplingParams(temperature=0, max_new_tokens=10), eos_token_ids=[])
    stop_at = free[1].token_ids[3]  # make row 1's fourth token the end-of-sequence token
    stopped = generate(model, batch, SamplingParams(temperature=0, max_new_tokens=10), eos_token_ids=[stop_at])
    first = free[1].token_ids.index(stop_at)
    assert stopped[1].token_ids == free[1].token_ids[: first + 1]
    assert stopped[1].finish_reason == "stop"
    for row in (0, 2):  # other rows continue exactly as before until they meet the same token
        expected = free[row].token_ids
        if stop_at in expected:
            expected = expected[: expected.index(stop_at) + 1]
        assert stopped[row].token_ids == expected


def test_stream_yields_the_same_tokens_as_generate(hf_model_dir):
    model = load_model(hf_model_dir("gpt2")[1])
    params = SamplingParams(temperature=0.8, seed=3, max_new_tokens=9)
    events = list(stream(model, prompts(), params, eos_token_ids=[]))
    by_row = {}
    for event in events:
        by_row.setdefault(event.row, []).append(event.token_id)
    batch = generate(model, prompts(), params, eos_token_ids=[])
    assert [by_row[i] for i in range(3)] == [c.token_ids for c in batch]


def test_bad_input_is_refused_before_work(hf_model_dir):
    model = load_model(hf_model_dir("gpt2")[1])
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        generate(model, [[5] * 200], SamplingParams(max_new_tokens=100))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[5, 1000]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[5], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(model, [[5]], SamplingParams(max_new_tokens=2, stop=["x"]))


# ------------------------------------------------------------------- text: stops and streaming
@pytest.fixture(scope="module")
def text_model(text_model_dir):
    from genforge.tokenizer import Tokenizer

    return load_model(text_model_dir), Tokenizer.from_dir(text_model_dir)


def test_stop_string_cuts_the_text_and_never_streams_part_of_it(text_model):
    model, tokenizer = text_model
    prompt = [tokenizer.encode("paged attention")]
    free = generate(
        model, prompt, SamplingParams(temperature=0, max_new_tokens=30), tokenizer=tokenizer, eos_token_ids=[]
    )[0]
    words = free.text.split()
    stop = " ".join(words[3:5])  # a stop string that spans tokens, in the middle of the text
    params = SamplingParams(temperature=0, max_new_tokens=30, stop=[stop])
    events = list(stream(model, prompt, params, tokenizer=tokenizer, eos_token_ids=[]))
    text = "".join(e.text for e in events)
    # Equality also proves no streamed piece carried the start of the stop string.
    assert text == free.text[: free.text.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert len(events) < 30


def test_streamed_text_is_the_continuation_of_the_prompt(text_model):
    """WordPiece starts a decode without a space: the completion keeps the one it has after
    the prompt, so prompt text + completion text == the whole sequence decoded."""
    model, tokenizer = text_model
    params = SamplingParams(temperature=1.0, seed=11, max_new_tokens=40)
    prompt = tokenizer.encode("hello world", add_special_tokens=False)
    [done] = generate(model, [prompt], params, tokenizer=tokenizer, eos_token_ids=[])
    whole = tokenizer.decode(prompt + done.token_ids, skip_special_tokens=True)
    assert "hello world" + done.text == whole
    assert done.text.startswith(" ")  # a new word after the prompt
    assert done.finish_reason == "length"


def test_padded_embedding_rows_are_never_sampled(text_model):
    model, tokenizer = text_model
    assert model.config.vocab_size > tokenizer.vocab_size
    done = generate(
        model,
        [tokenizer.encode("x")],
        SamplingParams(temperature=0, max_new_tokens=20),
        tokenizer=tokenizer,
        eos_token_ids=[],
    )[0]
    assert all(t < tokenizer.vocab_size for t in done.token_ids)
    # Without the tokenizer the model's own vocabulary is the limit, and a padded row wins.
    raw = generate(model, [tokenizer.encode("x")], SamplingParams(temperature=0, max_new_tokens=1), eos_token_ids=[])[0]
    assert raw.token_ids[0] >= tokenizer.vocab_size


def test_eos_from_the_tokenizer_ends_generation(text_model):
    model, tokenizer = text_model
    params = SamplingParams(temperature=0, max_new_tokens=20, logit_bias={tokenizer.sep_token_id: 100.0})
    [done] = generate(model, [tokenizer.encode("x")], params, tokenizer=tokenizer)
    assert done.token_ids == [tokenizer.sep_token_id]
    assert done.finish_reason == "stop" and done.text == ""
