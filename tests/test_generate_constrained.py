"""Constrained decoding: every sampled output of a random-weight model is in the language."""

import json
import re

import pytest
import torch

from genforge.checkpoint import save_model
from genforge.generate.constrained import (
    ChoiceConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
)
from genforge.generate.generator import generate
from genforge.generate.processors import DecodeContext
from genforge.generate.sampling import SamplingParams
from genforge.tokenizer import Tokenizer

SEEDS = range(3)
ROWS = 10  # 3 seeds x 10 rows = 30 sampled generations per constraint

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
PATTERN = r"[a-z]{2,6}-[0-9]{1,4}(\.[0-9]{2})?"
CHOICES = ["yes", "no", "maybe", "yes!", "don't know"]


def _sample(model, tokenizer, constraint, seed):
    # Sampling composes: temperature and top-k from SamplingParams run after the constraint.
    prompt = [tokenizer.bos_token_id] + tokenizer.encode("answer:", add_special_tokens=False)
    sampling = SamplingParams(temperature=(0.7, 1.0, 1.5)[seed % 3], top_k=8, max_new_tokens=150, seed=seed)
    return generate(model, [prompt] * ROWS, sampling, tokenizer=tokenizer, extra_processors=[constraint])


def _texts(model, tokenizer, constraint):
    texts = []
    for seed in SEEDS:
        for completion in _sample(model, tokenizer, constraint, seed):
            assert completion.finish_reason == "stop", completion
            assert completion.token_ids[-1] == tokenizer.eos_token_id
            texts.append(tokenizer.decode(completion.token_ids[:-1]))
    assert len(texts) == len(SEEDS) * ROWS
    return texts


def test_json_schema_outputs_always_validate(bpe_model, bpe_tokenizer):
    jsonschema = pytest.importorskip("jsonschema")
    texts = _texts(bpe_model, bpe_tokenizer, JsonSchemaConstraint(SCHEMA, bpe_tokenizer))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 5  # sampling, not one forced answer


def test_regex_outputs_always_fullmatch(bpe_model, bpe_tokenizer):
    texts = _texts(bpe_model, bpe_tokenizer, RegexConstraint(PATTERN, bpe_tokenizer))
    assert all(re.fullmatch(PATTERN, t) for t in texts), texts
    assert len(set(texts)) > 5


def test_choice_outputs_are_always_a_choice(bpe_model, bpe_tokenizer):
    texts = _texts(bpe_model, bpe_tokenizer, ChoiceConstraint(CHOICES, bpe_tokenizer))
    assert set(texts) <= set(CHOICES)
    assert len(set(texts)) > 1


def test_greedy_decoding_is_constrained_too(bpe_model, bpe_tokenizer):
    constraint = RegexConstraint(r"[0-9]{3}", bpe_tokenizer)
    prompt = [bpe_tokenizer.bos_token_id]
    [completion] = generate(
        bpe_model,
        [prompt],
        SamplingParams(temperature=0, max_new_tokens=20),
        tokenizer=bpe_tokenizer,
        extra_processors=[constraint],
    )
    assert re.fullmatch(r"[0-9]{3}", completion.text)
    # The same processor object serves a second generation (its memo is rebuilt as needed).
    [again] = generate(
        bpe_model,
        [prompt],
        SamplingParams(temperature=0, max_new_tokens=20),
        tokenizer=bpe_tokenizer,
        extra_processors=[constraint],
    )
    assert again.token_ids == completion.token_ids


def test_mask_semantics(bpe_tokenizer):
    """EOS only once complete, nothing but EOS once the grammar is done, padded rows masked."""
    tok = bpe_tokenizer
    eos = tok.eos_token_id
    constraint = ChoiceConstraint(["ab", "abc"], tok)
    width = tok.vocab_size + 13  # padded embedding rows
    logits = torch.zeros(3, width)
    rows = [[], tok.encode("ab", add_special_tokens=False), tok.encode("abc", add_special_tokens=False)]
    longest = max(map(len, rows))
    # Rows generated different amounts: per-row prompt lengths, as the engine lays batches out.
    ids = torch.tensor([[7] * (longest - len(r) + 1) + r for r in rows])
    ctx = DecodeContext(ids, prompt_length=torch.tensor([longest - len(r) + 1 for r in rows]))
    out = constraint(logits, ctx)
    allowed = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in out]
    assert eos not in allowed[0] and allowed[0]
    assert eos in allowed[1] and len(allowed[1]) > 1  # "ab" is complete but "abc" may follow
    assert allowed[2] == {eos}
    assert not torch.isfinite(out[:, tok.vocab_size :]).any()
    for token in allowed[0]:
        assert "abc".startswith(tok.decode([token])), tok.decode([token])
    assert torch.equal(logits, torch.zeros(3, width))  # input untouched


def test_rejects_tokens_outside_the_grammar(bpe_tokenizer):
    constraint = RegexConstraint("[0-9]+", bpe_tokenizer)
    ids = torch.tensor([[1] + bpe_tokenizer.encode("x", add_special_tokens=False)])
    with pytest.raises(ValueError, match="do not fit"):
        constraint(torch.zeros(1, bpe_tokenizer.vocab_size), DecodeContext(ids, prompt_length=1))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda t: RegexConstraint("[0-9", t), "unclosed character class"),
        (lambda t: RegexConstraint(r"a[^\s\S]", t), "matches no text"),
        (lambda t: RegexConstraint(42, t), "regular expression string"),
        (lambda t: JsonSchemaConstraint({"type": "frobnicate"}, t), "frobnicate"),
        (lambda t: JsonSchemaConstraint({"type": "string", "minLength": 5, "maxLength": 2}, t), "nsatisfiable"),
        (lambda t: JsonSchemaConstraint({"allOf": [{"type": "string"}, {"type": "integer"}]}, t), "nsatisfiable"),
        (lambda t: JsonSchemaConstraint("{not json", t), "not JSON text"),
        (lambda t: JsonSchemaConstraint(["type"], t), "JSON Schema object"),
        (lambda t: ChoiceConstraint([], t), "non-empty list"),
        (lambda t: ChoiceConstraint(["a", ""], t), "non-empty strings"),
        (lambda t: ChoiceConstraint("abc", t), "list of strings"),
        (lambda t: RegexConstraint("a", t, eos_token_ids=[10**6]), "outside the tokenizer"),
    ],
)
def test_bad_input_fails_at_construction(bpe_tokenizer, build, message):
    with pytest.raises(ValueError, match=message):
        build(bpe_tokenizer)


def test_wordpiece_tokenizer_is_refused_clearly(text_model_dir):
    tokenizer = Tokenizer.from_dir(text_model_dir)
    with pytest.raises(ValueError, match="WordPiece"):
        RegexConstraint("[0-9]+", tokenizer, eos_token_ids=[tokenizer.sep_token_id])


def test_tokenizer_without_eos_needs_eos_token_ids():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    with pytest.raises(ValueError, match="eos_token_ids="):
        RegexConstraint("a+", Tokenizer(backend))


def test_sampling_filters_in_params_run_after_the_constraint(bpe_model, bpe_tokenizer):
    """top_k in SamplingParams must not strip every token the grammar allows: generate runs
    the constraint before it."""
    prompt = [bpe_tokenizer.bos_token_id] + bpe_tokenizer.encode("answer:", add_special_tokens=False)
    params = SamplingParams(temperature=1.0, top_k=2, seed=0, max_new_tokens=40)
    outs = generate(
        bpe_model,
        [prompt] * ROWS,
        params,
        tokenizer=bpe_tokenizer,
        extra_processors=[ChoiceConstraint(CHOICES, bpe_tokenizer)],
    )
    assert all(o.text in CHOICES for o in outs)


def test_cli_choices_and_regex(bpe_model, bpe_tokenizer, tmp_path, capsys):
    from genforge.cli import main

    directory = save_model(bpe_model, tmp_path / "m", tokenizer=bpe_tokenizer)
    base = ["generate", "--model", str(directory), "--prompt", "answer:", "--max-new-tokens", "40", "--seed", "1"]
    assert main(base + ["--choices", *CHOICES]) == 0
    assert capsys.readouterr().out.strip() in CHOICES
    assert main(base + ["--regex", "[0-9]{3}"]) == 0
    assert re.fullmatch("[0-9]{3}", capsys.readouterr().out.strip())
    assert main(base + ["--regex", "a", "--choices", "x"]) == 2
    assert "one output constraint at a time" in capsys.readouterr().err
