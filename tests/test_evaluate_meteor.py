"""METEOR against NLTK's meteor_score, hand-computed alignments, and WordNet synonyms when the
WordNet database is installed (Debian: apt-get install wordnet-base)."""

import gzip
import importlib
import re
from pathlib import Path

import pytest
from nltk.tokenize import NLTKWordTokenizer
from nltk.translate.meteor_score import meteor_score as nltk_meteor_score

from genforge.evaluate import MetricError, NoSynonyms, meteor, use_wordnet, wordnet_source

meteor_module = importlib.import_module("genforge.evaluate.meteor")

PREDICTIONS = [
    "It is a guide to action which ensures that the military always obeys the commands of the party.",
    "The cats were sitting quietly on the mats.",
    "Completely unrelated words here.",
    "",
]
REFERENCES = [
    [
        "It is a guide to action that ensures that the military will forever heed Party commands.",
        "It is the practical guide for the army always to heed the directions of the party.",
    ],
    "A cat sat quietly on the mat.",
    "The weather was mild.",
    "Something.",
]


def penalised(matches: int, hyp_len: int, ref_len: int, chunks: int) -> float:
    """Banerjee & Lavie's formula with alpha 0.9, beta 3, gamma 0.5, written out for the tests."""
    precision, recall = matches / hyp_len, matches / ref_len
    fmean = 10 * precision * recall / (recall + 9 * precision)
    return fmean * (1 - 0.5 * (chunks / matches) ** 3)


def test_without_synonyms_equals_nltk_with_the_same_stand_in():
    result = meteor(PREDICTIONS, REFERENCES, synonyms=False)
    split = NLTKWordTokenizer().tokenize
    expected = []
    for prediction, refs in zip(PREDICTIONS, REFERENCES):
        refs = [refs] if isinstance(refs, str) else refs
        expected.append(nltk_meteor_score([split(r) for r in refs], split(prediction), wordnet=NoSynonyms()))
    assert result.score == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert result["meteor"] == result.score
    assert result.settings["synonyms"] is False
    assert result.settings["wordnet"] is None
    assert "switched off" in result.settings["note"]
    assert result.settings["alpha"] == 0.9 and result.settings["beta"] == 3.0 and result.settings["gamma"] == 0.5


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        # identical: 6 matches in one chunk
        ("the cat sat on the mat", "the cat sat on the mat", penalised(6, 6, 6, 1)),
        # a prefix: P 1, R 1/2, one chunk
        ("the cat sat", "the cat sat on a mat", penalised(3, 3, 6, 1)),
        # NLTK's aligner is greedy: it matches "the" to the reference's last "the", giving 2
        # chunks where the fewest-crossings alignment of the paper would give 1.
        ("the cat sat", "the cat sat on the mat", penalised(3, 3, 6, 2)),
        # swapped words: 2 matches in 2 chunks, penalty 0.5
        ("b a", "a b", 0.5),
        # Porter stems: cats -> cat, running/runs -> run
        ("cats running", "cat runs", penalised(2, 2, 2, 1)),
        # nothing in common
        ("alpha beta", "gamma delta", 0.0),
    ],
)
def test_hand_computed_alignments(prediction, reference, expected):
    result = meteor([prediction], [reference], synonyms=False, tokenizer=str.split)
    assert result.score == pytest.approx(expected, abs=1e-12)


def test_nltk_documented_example_and_best_reference():
    # NLTK's own example (hypothesis1 against three references) is 0.6944, and its best
    # reference needs no synonym, so the value holds with or without WordNet.
    hypothesis = PREDICTIONS[0].rstrip(".")
    references = [
        REFERENCES[0][0].rstrip("."),
        REFERENCES[0][1].rstrip("."),
        "It is the guiding principle which guarantees the military forces always being under the command of the Party",
    ]
    result = meteor([hypothesis], [references], synonyms=False, tokenizer=str.split)
    assert round(result.score, 4) == 0.6944
    alone = [meteor([hypothesis], [r], synonyms=False, tokenizer=str.split).score for r in references]
    assert result.score == pytest.approx(max(alone))


def test_case_and_tokenizer_settings():
    assert meteor(["The Cat"], ["the cat"], synonyms=False).score == pytest.approx(penalised(2, 2, 2, 1))
    # the default tokenizer splits punctuation off; whitespace splitting keeps "mat." whole
    assert meteor(["the mat."], ["the mat"], synonyms=False).score == pytest.approx(penalised(2, 3, 2, 1))
    assert meteor(["the mat."], ["the mat"], synonyms=False, tokenizer=str.split).score == pytest.approx(
        penalised(1, 2, 2, 1)
    )
    result = meteor(["a b"], ["a b"], synonyms=False, tokenizer=str.split)
    assert result.settings["tokenizer"] == "split" and result.settings["lowercase"] is True


def test_meteor_bad_input():
    with pytest.raises(MetricError, match="2 predictions but 1 references"):
        meteor(["a", "b"], ["a"])
    with pytest.raises(MetricError, match="alpha .* must lie in \\[0, 1\\]"):
        meteor(["a"], ["a"], alpha=1.5)
    with pytest.raises(MetricError, match="beta .* must be >= 0"):
        meteor(["a"], ["a"], beta=-1)
    with pytest.raises(MetricError, match="synonyms must be None"):
        meteor(["a"], ["a"], synonyms="yes")


def test_synonyms_required_but_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(meteor_module, "_resolve", lambda: (None, None))
    with pytest.raises(MetricError, match="synonyms=True but no WordNet data was found; install it with"):
        meteor(["a"], ["a"], synonyms=True)
    result = meteor(["a"], ["a"])  # default: degrade, and say so
    assert result.settings["synonyms"] is False
    assert "no WordNet data found, so no synonym matching" in result.settings["note"]


def test_use_wordnet_rejects_folders_without_the_database(tmp_path):
    with pytest.raises(MetricError, match="is not a folder"):
        use_wordnet(tmp_path / "absent")
    (tmp_path / "data.noun").write_text("")
    with pytest.raises(MetricError, match="lacks the WordNet 3.0 file\\(s\\) data.verb, .*index.noun"):
        use_wordnet(tmp_path)


def test_environment_variable_naming_a_wrong_folder_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(meteor_module._state, "resolved", False)
    monkeypatch.setenv(meteor_module.WORDNET_ENV, str(tmp_path))
    with pytest.raises(MetricError, match="lacks the WordNet 3.0 file"):
        meteor(["a"], ["a"])


def test_lexnames_matches_the_wordnet_man_page_when_installed():
    lines = meteor_module.lexnames_text().splitlines()
    assert len(lines) == 45 and lines[0] == "00\tadj.all\t3" and lines[44] == "44\tadj.ppl\t3"
    page = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not page.exists():
        pytest.skip("lexnames(5WN) man page not installed (Debian package wordnet-base)")
    documented = re.findall(r"^(\d\d)\t(\S+)\s", gzip.decompress(page.read_bytes()).decode(), re.MULTILINE)
    assert [(n, name) for n, name, _ in (line.split("\t") for line in lines)] == documented


@pytest.fixture(scope="module")
def wordnet_reader():
    source = wordnet_source()
    if source is None:
        pytest.skip("no WordNet data (apt-get install wordnet-base, or set GENFORGE_WORDNET)")
    return meteor_module._resolve()[0]


def test_wordnet_synonyms_match(wordnet_reader):
    # car/auto and quick/fast are WordNet synonyms whose Porter stems are the words themselves
    # (NLTK stems unmatched words before the synonym stage).
    with_synonyms = meteor(["the car is quick"], ["the auto is fast"], synonyms=True)
    assert with_synonyms.score == pytest.approx(penalised(4, 4, 4, 1))
    assert with_synonyms.settings["synonyms"] is True and with_synonyms.settings["wordnet"] == wordnet_source()
    assert "note" not in with_synonyms.settings
    without = meteor(["the car is quick"], ["the auto is fast"], synonyms=False)
    assert without.score == pytest.approx(penalised(2, 4, 4, 2))  # "the" and "is" only, in 2 chunks


def test_wordnet_run_equals_nltk_with_the_same_reader(wordnet_reader):
    result = meteor(PREDICTIONS, REFERENCES)
    split = NLTKWordTokenizer().tokenize
    expected = [
        nltk_meteor_score(
            [split(r) for r in ([refs] if isinstance(refs, str) else refs)], split(p), wordnet=wordnet_reader
        )
        for p, refs in zip(PREDICTIONS, REFERENCES)
    ]
    assert result.score == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert result.settings["synonyms"] is True
