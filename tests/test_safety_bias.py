"""Bias measurement: WEAT by hand, permutation p-values, counterfactual log-likelihoods and
CrowS-Pairs pseudo-log-likelihoods against explicit loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import tiny_encoder, tiny_model

from genforge.safety.bias import (
    AssociationTest,
    BiasError,
    association,
    counterfactual_loglikelihoods,
    crows_pairs,
    masked_token_logprobs,
    run_association_test,
    seat_sentences,
    shared_positions,
    weat,
    weat_effect_size,
)


def test_weat_effect_size_by_hand():
    x = np.array([[1.0, 0.0], [1.0, 1.0]])
    y = np.array([[0.0, 1.0], [-1.0, 1.0]])
    a = np.array([[1.0, 0.0]])
    b = np.array([[0.0, 1.0]])
    # s(w) = cos(w, a) - cos(w, b): x -> 1, 0; y -> -1, -1/sqrt2 - 1/sqrt2
    r = 1 / np.sqrt(2)
    s = [1.0, 0.0, -1.0, -2 * r]
    expected = (np.mean(s[:2]) - np.mean(s[2:])) / np.std(s, ddof=1)
    assert association(x, a, b) == pytest.approx([1.0, 0.0])
    assert weat_effect_size(x, y, a, b) == pytest.approx(expected, abs=1e-12)
    assert weat_effect_size(y, x, a, b) == pytest.approx(-expected, abs=1e-12)
    # exact permutation p over the C(4, 2) = 6 splits: only the observed split reaches the statistic
    result = weat(x, y, a, b)
    assert result.exact and result.permutations == 6 and result.p_value == pytest.approx(1 / 6)
    assert result.statistic == pytest.approx(sum(s[:2]) - sum(s[2:]))


def test_permutation_p_value_planted_and_null():
    rng = np.random.default_rng(0)
    dim = 16
    a_dir, b_dir = np.eye(dim)[0], np.eye(dim)[1]
    a = a_dir + 0.1 * rng.normal(size=(10, dim))
    b = b_dir + 0.1 * rng.normal(size=(10, dim))
    noise = rng.normal(size=(40, dim))
    planted = weat(noise[:20] + 1.5 * a_dir, noise[20:] + 1.5 * b_dir, a, b, permutations=2000)
    assert not planted.exact and planted.p_value < 0.01 and planted.effect_size > 1.0
    null = [weat(*rng.normal(size=(2, 20, dim)), a, b, permutations=500, seed=s).p_value for s in range(20)]
    assert 0.2 < np.mean(null) < 0.8  # p is uniform under no effect
    assert min(null) > 0  # the observed split is counted
    with pytest.raises(BiasError, match="zero vector"):
        weat(np.zeros((2, dim)), noise[:2], a, b)


def test_seat_with_an_embedding_function():
    seen = []

    def embed(texts):
        seen.extend(texts)
        # one direction for sentences about the first word of each set, another otherwise
        return np.array([[1.0, 0.1] if ("rose" in t or "good" in t) else [0.1, 1.0] for t in texts])

    test = AssociationTest("toy", ("x", ("rose", "tulip")), ("y", ("ant", "fly")), ("a", ("good",)), ("b", ("bad",)))
    result = run_association_test(test, embed, templates=("This is {}.", "{} is here."), permutations=100)
    assert seen[:4] == ["This is rose.", "rose is here.", "This is tulip.", "tulip is here."]
    assert result.sizes == {"x": 4, "y": 4, "a": 2, "b": 2} and result.effect_size > 0
    assert seat_sentences(["w"], ["A {}."]) == ["A w."]
    with pytest.raises(BiasError, match="template"):
        seat_sentences(["w"], ["no slot"])


def test_masked_token_logprobs_equal_a_masked_loop():
    model = tiny_encoder(seed=1).eval()
    ids, mask_id = [2, 10, 11, 12, 13, 3], 4
    positions = [1, 2, 3, 4]
    batched = masked_token_logprobs(model, ids, positions, mask_id)
    with torch.no_grad():
        for position, got in zip(positions, batched):
            masked = list(ids)
            masked[position] = mask_id
            logits = model(torch.tensor([masked])).logits[0, position]
            assert got == pytest.approx(torch.log_softmax(logits, -1)[ids[position]].item(), abs=1e-5)
    with pytest.raises(BiasError, match="masked-LM"):
        masked_token_logprobs(tiny_model(), ids, positions, mask_id)


@pytest.mark.slow  # a 30,522-token tiny encoder for MiniLM's real tokenizer: about 5 s on 2 busy cores
def test_crows_pairs_scores_only_shared_tokens():
    from genforge.encoder import default_encoder_path
    from genforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(default_encoder_path())
    model = tiny_encoder(seed=2, vocab_size=tokenizer.vocab_size).eval()
    pairs = [("The nurse said she was late.", "The nurse said he was late.")]
    result = crows_pairs(model, tokenizer, pairs)
    first, second = (tokenizer.encode(s) for s in pairs[0])
    in_first, in_second = shared_positions(first, second)
    special = set(tokenizer.all_special_ids)
    keep = [(i, j) for i, j in zip(in_first, in_second) if first[i] not in special]
    assert [first[i] for i, _ in keep] == [second[j] for _, j in keep]
    assert len(keep) == len(first) - 3  # [CLS], [SEP] and the swapped pronoun left out
    expected = []
    for ids, where in ((first, [i for i, _ in keep]), (second, [j for _, j in keep])):
        total = 0.0
        for position in where:
            masked = list(ids)
            masked[position] = tokenizer.mask_token_id
            with torch.no_grad():
                logits = model(torch.tensor([masked])).logits[0, position]
            total += torch.log_softmax(logits, -1)[ids[position]].item()
        expected.append(total)
    assert result.scores[0] == pytest.approx(tuple(expected), abs=1e-4)
    assert result.stereotype_preference == float(expected[0] > expected[1])


def test_counterfactual_loglikelihoods_match_the_harness(tmp_path):
    from finetune_shared import tiny_chat_model_dir

    from genforge.evaluate.harness import loglikelihood
    from genforge.loading import load_for_inference

    loaded = load_for_inference(tiny_chat_model_dir(tmp_path / "model"))
    items = [("{person} worked as a", " nurse"), ("Then {person} said", " yes")]
    groups = {"male": "The man", "female": "The woman"}
    result = counterfactual_loglikelihoods(loaded.model, loaded.tokenizer, items, groups)
    direct = loglikelihood(loaded.model, loaded.tokenizer, [("The woman worked as a", " nurse")])[0][0]
    assert result.loglikelihoods[0]["female"] == pytest.approx(direct, abs=1e-5)
    assert result.gaps[1] == pytest.approx(abs(result.loglikelihoods[1]["male"] - result.loglikelihoods[1]["female"]))
    assert sum(result.preferred_counts().values()) == 2
    with pytest.raises(BiasError, match="slot"):
        counterfactual_loglikelihoods(loaded.model, loaded.tokenizer, [("no slot", " x")], groups)


def test_bias_cli(tmp_path, capsys):
    import argparse
    import json

    from genforge.safety import bias_cli

    parser = argparse.ArgumentParser()
    bias_cli.add_arguments(parser)
    out = tmp_path / "weat.json"
    args = parser.parse_args(["weat", "--tests", "weat7_math_arts_gender", "--permutations", "200", "--out", str(out)])
    assert bias_cli.run(args) == 0
    data = json.loads(out.read_text())
    result = data["tests"]["weat7_math_arts_gender"]
    assert result["sizes"] == {"x": 8, "y": 8, "a": 8, "b": 8} and -2 <= result["effect_size"] <= 2
    assert json.loads(capsys.readouterr().out) == data
    with pytest.raises(ValueError, match="unknown"):
        bias_cli.run(parser.parse_args(["seat", "--tests", "weat99"]))
    with pytest.raises(ValueError, match="needs --model"):
        bias_cli.run(parser.parse_args(["crows-pairs"]))
