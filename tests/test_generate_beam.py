"""Beam search: token and score parity with transformers' beam search, diverse beam search
properties, bad input."""

import pytest
import reference_models
import torch

from genforge.checkpoint import load_model
from genforge.generate.beam import beam_search
from genforge.generate.generator import generate
from genforge.generate.processors import NoRepeatNGram, RepetitionPenalty
from genforge.generate.sampling import SamplingParams

NEW_TOKENS = 16


def prompts(seed=0, lengths=(7, 4, 10)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, reference_models.VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_beam(hf, prompt, **kwargs):
    """transformers' beam search on one prompt: (generated token lists, sequences_scores)."""
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        max_new_tokens=NEW_TOKENS,
        **kwargs,
    )
    # beam_indices is -1 past each hypothesis' end: it gives the generated lengths.
    lengths = (out.beam_indices >= 0).sum(dim=-1).tolist()
    sequences = [out.sequences[i, len(prompt) : len(prompt) + n].tolist() for i, n in enumerate(lengths)]
    return sequences, out.sequences_scores.tolist()


def eos_that_occurs(model, prompt):
    """A token greedy decoding produces early, so that hypotheses really end on eos."""
    greedy = generate(model, [prompt], SamplingParams(temperature=0, max_new_tokens=6), eos_token_ids=[])
    return greedy[0].token_ids[3]


# num_beams, length_penalty, early_stopping, num_return_sequences, eos ("one", "two" or None)
SETTINGS = [
    (4, 1.0, False, 2, "one"),
    (3, 0.5, True, 3, "one"),
    (5, 2.0, "never", 1, "one"),
    (4, -1.0, False, 4, "two"),
    (2, 1.0, "never", 2, None),
]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_beam_search_matches_transformers(family, hf_model_dir):
    hf, directory = hf_model_dir(family)
    model = load_model(directory)
    batch = prompts()
    first_eos = eos_that_occurs(model, batch[0])
    second_eos = eos_that_occurs(model, batch[2])
    stopped_on_eos = 0
    for num_beams, length_penalty, early_stopping, num_return, eos_kind in SETTINGS:
        eos = {"one": [first_eos], "two": sorted({first_eos, second_eos}), None: []}[eos_kind]
        # Our whole batch at once (left-padded) against transformers one prompt at a time.
        ours = beam_search(
            model,
            batch,
            num_beams,
            NEW_TOKENS,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            num_return_sequences=num_return,
            eos_token_ids=eos,
        )
        for prompt, hypotheses in zip(batch, ours):
            expected, expected_scores = hf_beam(
                hf,
                prompt,
                num_beams=num_beams,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                num_return_sequences=num_return,
                eos_token_id=eos or None,
            )
            setting = (num_beams, length_penalty, early_stopping, num_return, eos)
            assert [h.token_ids for h in hypotheses] == expected, setting
            # Scores to 1e-4; relative 1e-6 for length_penalty < 0, where scores grow with length.
            torch.testing.assert_close(
                torch.tensor([h.score for h in hypotheses]),
                torch.tensor(expected_scores),
                rtol=1e-6,
                atol=1e-4,
                msg=str(setting),
            )
            for h in hypotheses:
                assert h.finish_reason == ("stop" if h.token_ids[-1] in eos else "length")
                assert h.finish_reason == "stop" or len(h.token_ids) == NEW_TOKENS
                stopped_on_eos += h.finish_reason == "stop"
    assert stopped_on_eos > 0  # the finished-hypothesis logic was exercised


@pytest.mark.parametrize(
    "processor, hf_kwargs",
    [
        (NoRepeatNGram(2), dict(no_repeat_ngram_size=2)),
        (RepetitionPenalty(1.5), dict(repetition_penalty=1.5)),
    ],
)
def test_processors_apply_to_log_probs_as_in_transformers(processor, hf_kwargs, hf_model_dir):
    hf, directory = hf_model_dir("llama")
    model = load_model(directory)
    prompt = [5, 9, 33, 12, 7, 9]
    [ours] = beam_search(model, prompt, 4, NEW_TOKENS, num_return_sequences=4, eos_token_ids=[], processors=[processor])
    expected, expected_scores = hf_beam(hf, prompt, num_beams=4, num_return_sequences=4, eos_token_id=None, **hf_kwargs)
    assert [h.token_ids for h in ours] == expected
    torch.testing.assert_close(torch.tensor([h.score for h in ours]), torch.tensor(expected_scores), rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_sampling_matches_transformers_with_the_same_seed(seed, hf_model_dir):
    from genforge.generate.processors import Temperature, TopK

    hf, directory = hf_model_dir("llama")
    model = load_model(directory)
    prompt = prompts(seed)[0]
    eos = eos_that_occurs(model, prompt)
    torch.manual_seed(seed)  # transformers draws from the global generator
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        num_beams=3,
        temperature=0.7,
        top_k=20,
        top_p=1.0,
        pad_token_id=0,
        eos_token_id=eos,
        num_return_sequences=3,
        output_scores=True,
        return_dict_in_generate=True,
        max_new_tokens=NEW_TOKENS,
    )
    lengths = (out.beam_indices >= 0).sum(dim=-1).tolist()
    expected = [out.sequences[i, len(prompt) : len(prompt) + n].tolist() for i, n in enumerate(lengths)]
    ours = beam_search(
        model,
        [prompt],
        3,
        NEW_TOKENS,
        num_return_sequences=3,
        eos_token_ids=[eos],
        processors=[Temperature(0.7), TopK(20)],
        do_sample=True,
        generator=torch.Generator().manual_seed(seed),
    )[0]
    assert [h.token_ids for h in ours] == expected
    assert [h.score for h in ours] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)


def test_extra_candidates_keep_beams_running_when_eos_ids_crowd_the_top(hf_model_dir):
    # With the three likeliest first tokens all eos, 2 * num_beams candidates would leave too
    # few running beams; transformers keeps (1 + eos ids) * num_beams candidates instead.
    hf, directory = hf_model_dir("gpt2")
    model = load_model(directory)
    prompt = [40, 2, 17, 88, 3]
    with torch.inference_mode():
        eos = model(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist()
    # "never": the two one-token hypotheses must not end the search at once.
    [ours] = beam_search(
        model, prompt, 2, NEW_TOKENS, num_return_sequences=2, early_stopping="never", eos_token_ids=eos
    )
    expected, expected_scores = hf_beam(
        hf, prompt, num_beams=2, num_return_sequences=2, early_stopping="never", eos_token_id=eos
    )
    assert [h.token_ids for h in ours] == expected
    torch.testing.assert_close(torch.tensor([h.score for h in ours]), torch.tensor(expected_scores), rtol=0, atol=1e-4)


def test_early_stopping_ends_the_search_once_enough_hypotheses_finished(hf_model_dir):
    model = load_model(hf_model_dir("gpt2")[1])
    prompt = [5, 9, 33, 12, 7, 9]
    eos = [eos_that_occurs(model, prompt)]
    forwards = []
    original_forward = model.forward
    model.forward = lambda *args, **kwargs: forwards.append(1) or original_forward(*args, **kwargs)
    [hypotheses] = beam_search(
        model, prompt, 2, NEW_TOKENS, num_return_sequences=2, early_stopping=True, eos_token_ids=eos
    )
    assert all(h.finish_reason == "stop" for h in hypotheses)
    assert len(forwards) < NEW_TOKENS


def test_a_batch_gives_the_same_hypotheses_as_each_prompt_alone(hf_model_dir):
    model = load_model(hf_model_dir("qwen2")[1])
    batch = prompts(seed=3, lengths=(3, 9, 6))
    eos = [eos_that_occurs(model, batch[1])]
    together = beam_search(model, batch, 3, NEW_TOKENS, num_return_sequences=3, early_stopping=True, eos_token_ids=eos)
    for prompt, hypotheses in zip(batch, together):
        [alone] = beam_search(
            model, prompt, 3, NEW_TOKENS, num_return_sequences=3, early_stopping=True, eos_token_ids=eos
        )
        assert [h.token_ids for h in hypotheses] == [h.token_ids for h in alone]
        torch.testing.assert_close([h.score for h in hypotheses], [h.score for h in alone], rtol=0, atol=1e-5)


def test_diverse_beam_search_without_penalty_repeats_plain_beam_search_per_group(hf_model_dir):
    model = load_model(hf_model_dir("llama")[1])
    prompt = [5, 9, 33, 12, 7, 9]
    plain = beam_search(model, prompt, 2, 12, num_return_sequences=2, eos_token_ids=[])[0]
    grouped = beam_search(model, prompt, 4, 12, num_return_sequences=4, eos_token_ids=[], num_beam_groups=2)[0]
    # Unpenalised groups are independent copies of a 2-beam search: each hypothesis twice.
    assert [h.token_ids for h in grouped] == [h.token_ids for h in plain for _ in range(2)]
    torch.testing.assert_close([h.score for h in grouped], [h.score for h in plain for _ in range(2)])


def test_diversity_penalty_pushes_later_groups_to_other_tokens(hf_model_dir):
    model = load_model(hf_model_dir("llama")[1])
    prompt = [5, 9, 33, 12, 7, 9]
    plain = [h.token_ids for h in beam_search(model, prompt, 2, 12, num_return_sequences=2, eos_token_ids=[])[0]]
    diverse = beam_search(
        model, prompt, 4, 12, num_return_sequences=4, eos_token_ids=[], num_beam_groups=2, diversity_penalty=10.0
    )[0]
    found = [h.token_ids for h in diverse]
    # Group 0 is never penalised, so it is the plain 2-beam search; group 1 had to start elsewhere.
    assert all(p in found for p in plain)
    others = [seq for seq in found if seq not in plain]
    assert len(others) == 2
    assert not {seq[0] for seq in others} & {seq[0] for seq in plain}
    assert [h.score for h in diverse] == sorted((h.score for h in diverse), reverse=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=0), "num_beams must be an integer >= 1"),
        (dict(num_beams=2.0), "num_beams must be an integer >= 1"),
        (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) must not exceed num_beams \(2\)"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=300), "exceeds the model's context of 256"),
        (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
        (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
        (dict(num_beams=4, num_beam_groups=3), r"num_beams \(4\) must be a multiple of num_beam_groups \(3\)"),
        (dict(diversity_penalty=1.0), "diversity_penalty needs num_beam_groups > 1"),
        (dict(num_beam_groups=2, diversity_penalty=-1.0), "diversity_penalty must be a finite number >= 0"),
        (dict(eos_token_ids=[96]), r"eos_token_ids \[96\] are outside the vocabulary"),
        (dict(prompt_ids=[[3, 4], [5, 200]]), "prompt 1 has token ids outside the vocabulary"),
        (dict(prompt_ids=[[3, 4], []]), "prompt 1 is empty"),
    ],
)
def test_bad_arguments_are_rejected_before_any_work(kwargs, message, hf_model_dir):
    model = load_model(hf_model_dir("llama")[1])
    arguments = dict(prompt_ids=[3, 4, 5], num_beams=4, max_new_tokens=8) | kwargs
    with pytest.raises(ValueError, match=message):
        beam_search(model, **arguments)


def test_stop_strings_end_hypotheses_and_cut_their_text(text_model_dir):
    from genforge.tokenizer import Tokenizer

    model, tokenizer = load_model(text_model_dir), Tokenizer.from_dir(text_model_dir)
    prompt = tokenizer.encode("the weather today is", add_special_tokens=False)
    free = beam_search(model, [prompt], 3, NEW_TOKENS, eos_token_ids=[], tokenizer=tokenizer)[0][0]
    assert free.finish_reason == "length" and free.text
    stop = free.text.split()[len(free.text.split()) // 2]
    stopped = beam_search(
        model,
        [prompt],
        3,
        NEW_TOKENS,
        eos_token_ids=[],
        tokenizer=tokenizer,
        stop_strings=[stop],
        num_return_sequences=3,
    )[0]
    for hypothesis in stopped:
        full = tokenizer.decode(hypothesis.token_ids, skip_special_tokens=True)
        if hypothesis.finish_reason == "stop":  # ended at the token that completed the stop string
            assert stop in full and stop not in tokenizer.decode(hypothesis.token_ids[:-1], skip_special_tokens=True)
            assert stop not in hypothesis.text
        else:
            assert len(hypothesis.token_ids) == NEW_TOKENS and stop not in full
    assert any(h.finish_reason == "stop" for h in stopped)
    with pytest.raises(ValueError, match="need a tokenizer"):
        beam_search(model, [prompt], 3, 4, stop_strings=["x"])
