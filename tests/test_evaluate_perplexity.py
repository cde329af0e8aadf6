"""Strided perplexity of genforge models against transformers on the same tiny random models."""

import math

import pytest
import reference_models
import torch

from genforge.checkpoint import load_model
from genforge.evaluate import MetricError, perplexity, perplexity_of_text, strided_windows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (transformers model, genforge model), with logits sharpened so perplexity
    depends strongly on which tokens are scored with which context (a near-uniform random
    model would score every token about log(vocab) and hide such mistakes)."""
    built = {}

    def get(family):
        if family not in built:
            hf = reference_models.build(family, seed=3)
            final_norm = hf.model.norm if family != "gpt2" else hf.transformer.ln_f
            with torch.no_grad():
                final_norm.weight.mul_(8.0)
            directory = tmp_path_factory.mktemp(f"ppl-{family}")
            hf.save_pretrained(directory)
            built[family] = (hf, load_model(directory))
        return built[family]

    return get


def transformers_strided_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The strided loop of transformers' perplexity guide: labels outside the new tokens are
    -100 and each window's mean loss is weighted by the number of labels it scored."""
    seq_len = ids.size(1)
    nll_sum, n_scored, previous_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        target_length = end - previous_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())  # the model shifts labels left by one
        nll_sum += float(loss) * scored
        n_scored += scored
        previous_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_scored), n_scored


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, reference_models.VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("max_length, stride", [(64, 24), (64, 63), (64, 64), (50, 1)])
def test_equals_transformers_strided_evaluation(models, family, max_length, stride):
    hf, model = models(family)
    ids = _tokens(301 if stride > 1 else 66)  # longer than the window
    expected, expected_count = transformers_strided_perplexity(hf, ids, max_length, stride)
    result = perplexity(model, ids[0].tolist(), max_length=max_length, stride=stride)
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.num_scored_tokens == expected_count
    assert result.settings == {"max_length": max_length, "stride": stride, "num_tokens": ids.size(1)}


def test_stride_changes_the_result(models):
    # The test above can fail: different strides give clearly different perplexities here.
    _, model = models("llama")
    ids = _tokens(301)
    overlapping = perplexity(model, ids, max_length=64, stride=16).perplexity
    disjoint = perplexity(model, ids, max_length=64, stride=64).perplexity
    assert abs(math.log(overlapping) - math.log(disjoint)) > 0.01


def test_one_window_equals_the_plain_causal_lm_loss(models):
    hf, model = models("llama")
    ids = _tokens(40)
    with torch.no_grad():
        expected = math.exp(float(hf(ids, labels=ids).loss))
    result = perplexity(model, ids, max_length=64)
    assert result.num_windows == 1 and result.num_scored_tokens == 39
    assert result.perplexity == pytest.approx(expected, rel=1e-4)


def test_windows_score_every_token_once():
    for n, max_length, stride in [(301, 64, 24), (10, 4, 4), (100, 100, 7), (17, 5, 1)]:
        windows = strided_windows(n, max_length, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        first_tokens = {begin for begin, _, _ in windows} if stride == max_length else {0}
        assert sorted(scored) == [t for t in range(n) if t not in first_tokens]
        assert all(end - begin <= max_length and first > begin for begin, end, first in windows)
        assert windows[-1][1] == n


def test_defaults_use_the_model_context(models):
    _, model = models("llama")
    result = perplexity(model, _tokens(300))  # context 256: two windows of 256, stride 128
    assert result.settings["max_length"] == 256 and result.settings["stride"] == 128
    assert result.num_windows == 2 and result.num_scored_tokens == 299


def test_perplexity_of_text(text_model_dir):
    from genforge.tokenizer import Tokenizer

    model, tokenizer = load_model(text_model_dir), Tokenizer.from_dir(text_model_dir)
    text = "Evaluation reads a long text in overlapping windows so each token keeps some context. " * 6
    result = perplexity_of_text(model, tokenizer, text, max_length=32, stride=16)
    direct = perplexity(model, tokenizer.encode(text), max_length=32, stride=16)
    assert result.perplexity == direct.perplexity and result.num_windows > 1


def test_training_mode_is_restored(models):
    _, model = models("gpt2")
    model.train()
    try:
        perplexity(model, _tokens(20), max_length=16, stride=8)
        assert model.training
    finally:
        model.eval()


def test_bad_input(models, text_model_dir):
    _, model = models("llama")
    with pytest.raises(MetricError, match="at least 2 tokens"):
        perplexity(model, [5])
    with pytest.raises(MetricError, match="at least 2 tokens"):
        perplexity(model, [])
    with pytest.raises(MetricError, match="stride must be an integer from 1 to max_length \\(32\\), got 40"):
        perplexity(model, _tokens(100), max_length=32, stride=40)
    with pytest.raises(MetricError, match="stride must be"):
        perplexity(model, _tokens(100), max_length=32, stride=0)
    with pytest.raises(MetricError, match="max_length must be an integer from 2 to the model's context of 256"):
        perplexity(model, _tokens(100), max_length=512)
    with pytest.raises(MetricError, match="token id 96 is outside the model's vocabulary \\(0..95\\)"):
        perplexity(model, [1, 2, 96])
    with pytest.raises(MetricError, match="one sequence"):
        perplexity(model, _tokens(10).expand(2, 10))
    with pytest.raises(MetricError, match="perplexity_of_text"):
        perplexity(model, "some text")
    from genforge.encoder import default_encoder_path

    with pytest.raises(MetricError, match="needs a causal language model"):
        perplexity(load_model(default_encoder_path()), [101, 2023, 102])
