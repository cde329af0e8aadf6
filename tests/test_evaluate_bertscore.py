"""genforge's BERTScore on its own BERT (all-MiniLM-L6-v2, offline) against the bert_score
package on the same model directory and layer."""

import logging

import pytest
import torch

from genforge.encoder import default_encoder_path
from genforge.evaluate import BERTScorer, MetricError, bertscore

bert_score = pytest.importorskip("bert_score")

CANDIDATES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the dog.",
    "It is raining heavily in the city today.",
    "The meeting was moved to Thursday afternoon.",
    "She plays the violin in an orchestra.",
    "Stock prices fell sharply after the announcement.",
    "The recipe needs two eggs and a cup of flour.",
    "Our flight was delayed by three hours.",
    "The museum opens at nine in the morning.",
    "He fixed the bicycle with a borrowed wrench.",
    "Completely unrelated words: turbine, marmalade, sonnet.",
]
REFERENCES = [
    "A cat was sitting on the mat.",
    "The fast brown fox leaped over a lazy dog.",
    "Heavy rain is falling across the city.",
    "The meeting has been rescheduled for Thursday.",
    "She is a violinist in a symphony orchestra.",
    "Shares dropped steeply following the news.",
    "You will need a cup of flour and two eggs.",
    "Our plane left three hours late.",
    "The museum opens its doors at 9 a.m.",
    "Using a wrench he had borrowed, he repaired the bike.",
    "The train arrives at platform four.",
]
MODEL_DIR = str(default_encoder_path())


@pytest.fixture(scope="module")
def scorers():
    """One genforge scorer per layer, loaded once."""
    cache = {}

    def get(layer):
        if layer not in cache:
            cache[layer] = BERTScorer(layer=layer)
        return cache[layer]

    return get


def _reference(cands, refs, layer, idf, **kwargs):
    p, r, f = bert_score.score(
        cands, refs, model_type=MODEL_DIR, num_layers=layer, idf=idf, device="cpu", nthreads=0, batch_size=4, **kwargs
    )
    return p, r, f


@pytest.mark.parametrize("layer, idf", [(6, False), (6, True), (3, True), (0, False)])
def test_equals_bert_score(scorers, layer, idf):
    expected = _reference(CANDIDATES, REFERENCES, layer, idf)
    result = scorers(layer).score(CANDIDATES, REFERENCES, idf=idf)
    for got, want in zip((result.precision, result.recall, result.f1), expected):
        assert torch.tensor(got).sub(want).abs().max() < 1e-4
    assert result.settings["layer"] == layer
    # The scores carry information: the unrelated last pair ranks below every paraphrase.
    assert min(result.f1[:-1]) > result.f1[-1]


def test_idf_changes_the_scores(scorers):
    plain = scorers(6).score(CANDIDATES, REFERENCES)
    weighted = scorers(6).score(CANDIDATES, REFERENCES, idf=True)
    assert max(abs(a - b) for a, b in zip(plain.f1, weighted.f1)) > 1e-3


def test_multiple_references_equal_bert_score(scorers):
    distractor = "Something else entirely about the weather."
    # The best reference comes first for some predictions and second for others.
    refs = [[r] if i % 3 == 0 else [distractor, r] if i % 3 == 1 else [r, distractor] for i, r in enumerate(REFERENCES)]
    expected = _reference(CANDIDATES, refs, 6, True)
    result = scorers(6).score(CANDIDATES, refs, idf=True)
    for got, want in zip((result.precision, result.recall, result.f1), expected):
        assert torch.tensor(got).sub(want).abs().max() < 1e-4


def test_precision_and_recall_take_their_own_best_reference(scorers):
    candidate = ["The cat sat on the mat."]
    long_reference = "The cat sat on the mat and then it went outside to play in the sunny garden."
    short_reference = "A cat."
    both = scorers(6).score(candidate, [[long_reference, short_reference]])
    long_only = scorers(6).score(candidate, [long_reference])
    short_only = scorers(6).score(candidate, [short_reference])
    # The long reference covers the candidate (precision), the short one is covered by it (recall).
    assert long_only.precision[0] > short_only.precision[0] and short_only.recall[0] > long_only.recall[0]
    assert both.precision[0] == pytest.approx(long_only.precision[0])
    assert both.recall[0] == pytest.approx(short_only.recall[0])
    assert both.f1[0] == pytest.approx(max(long_only.f1[0], short_only.f1[0]))


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # inside bert_score's baseline reader
def test_baseline_rescaling_equals_bert_score(scorers, tmp_path):
    baseline = (0.61, 0.62, 0.615)
    # bert_score reads a per-layer CSV and takes the row of the chosen layer.
    rows = ["LAYER,P,R,F"] + [f"{i},{0.5 + i / 100},0.5,0.5" for i in range(6)] + ["6," + ",".join(map(str, baseline))]
    path = tmp_path / "baseline.tsv"
    path.write_text("\n".join(rows) + "\n")
    expected = _reference(
        CANDIDATES, REFERENCES, 6, False, lang="en", rescale_with_baseline=True, baseline_path=str(path)
    )
    result = scorers(6).score(CANDIDATES, REFERENCES, baseline=baseline)
    for got, want in zip((result.precision, result.recall, result.f1), expected):
        assert torch.tensor(got).sub(want).abs().max() < 1e-4
    raw = scorers(6).score(CANDIDATES, REFERENCES)
    assert result.f1[0] == pytest.approx((raw.f1[0] - baseline[2]) / (1 - baseline[2]))


def test_one_call_function_and_mean(scorers):
    result = bertscore(CANDIDATES[:3], REFERENCES[:3])  # default model and layer
    same = scorers(6).score(CANDIDATES[:3], REFERENCES[:3])
    assert result.f1 == pytest.approx(same.f1, abs=1e-6)
    assert result.score == pytest.approx(sum(same.f1) / 3, abs=1e-6)
    assert result.mean["precision"] == pytest.approx(sum(same.precision) / 3, abs=1e-6)


def test_identical_sentences_score_one(scorers):
    result = scorers(6).score(["Exactly the same words."], ["Exactly the same words."])
    assert result.f1[0] == pytest.approx(1.0, abs=1e-5)


def test_idf_from_one_reference_weighs_nothing(scorers, caplog):
    # With one reference every word piece occurs in every document: idf log(2/2) = 0 for all,
    # so there is nothing to average. bert_score returns NaN precision here; genforge gives 0
    # and says why.
    with caplog.at_level(logging.WARNING):
        result = scorers(6).score(["Exactly the same words."], ["Exactly the same words."], idf=True)
    assert (result.precision[0], result.recall[0], result.f1[0]) == (0.0, 0.0, 0.0)
    assert "idf 0" in caplog.text
    # idf taken from other documents gives the words weight again.
    other = scorers(6).score(["Exactly the same words."], ["Exactly the same words."], idf=REFERENCES)
    assert other.f1[0] == pytest.approx(1.0, abs=1e-5)


def test_empty_sentence_scores_zero_with_a_warning(scorers, caplog):
    with caplog.at_level(logging.WARNING):
        result = scorers(6).score(["", "A cat sat on the mat."], ["Some reference.", "A cat sat on a mat."])
    assert (result.precision[0], result.recall[0], result.f1[0]) == (0.0, 0.0, 0.0)
    assert result.f1[1] > 0.9
    assert "empty candidate or reference" in caplog.text


def test_hooks_are_removed(scorers):
    scorer = scorers(3)
    scorer.score(CANDIDATES[:2], REFERENCES[:2])
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in scorer.model.blocks)


def test_bad_input(scorers, hf_model_dir):
    with pytest.raises(MetricError, match="layer 7 is out of range.*accepted: 0 \\(embeddings\\) to 6"):
        BERTScorer(layer=7)
    with pytest.raises(MetricError, match="needs a bidirectional encoder"):
        BERTScorer(hf_model_dir("llama")[1])
    with pytest.raises(MetricError, match="2 predictions but 1 references"):
        scorers(6).score(CANDIDATES[:2], REFERENCES[:1])
    with pytest.raises(MetricError, match="idf must be True, False or a list of documents"):
        scorers(6).score(CANDIDATES[:1], REFERENCES[:1], idf="yes")
    with pytest.raises(MetricError, match="baseline must hold 3 numbers"):
        scorers(6).score(CANDIDATES[:1], REFERENCES[:1], baseline=(0.5, 0.5))
