"""Self-consistency (Wang et al. 2023): answer extraction and the majority vote on hand cases,
then one sampled run on a tiny model with a real tokenizer."""

import re

import pytest

from genforge.checkpoint import load_model
from genforge.generate.sampling import SamplingParams
from genforge.generate.self_consistency import extract_final_answer, majority_vote, self_consistency, vote_on_texts
from genforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Roger has 5 + 6 = 11 balls. The answer is 11.", "11"),
        ("She pays $1,234.50 in total. The answer is $1,234.50.", "1234.5"),
        ("So 36 / 2 = 18.0 The answer is: 18.0", "18"),
        ("The answer is 12. Wait, no: 3 * 5 = 15. So the answer is 15", "15"),  # the last phrase wins
        ("The answer is -3 degrees.", "-3"),
        ("Birds can fly. So the answer is Yes.", "yes"),
        ("the answer is (B).\nQ: next question", "(b)"),
        ("The answer is Paris, France! Anything else?", "paris, france"),
        ("We get 7 apples, then 3 more, so 10", "10"),  # no phrase: the last number
        ("first 1, 2, 3", "3"),
        ("I am not sure about this one.", None),
        ("The answer is", None),  # the phrase with nothing after it, and no number
    ],
)
def test_default_answer_reader(text, answer):
    assert extract_final_answer(text) == answer


def test_majority_vote_counts_shares_and_ties():
    result = majority_vote(["7", None, "5", "7", "5", "9", None])
    assert result.answer == "7"  # 7 and 5 tie with two votes each; 7 appeared first
    assert result.counts == {"7": 2, "5": 2, "9": 1}
    assert list(result.shares) == ["7", "5", "9"]
    assert result.shares == pytest.approx({"7": 0.4, "5": 0.4, "9": 0.2})
    assert result.num_unparsed == 2
    assert majority_vote(["5", "7", "7", "5"]).answer == "5"  # order of first appearance decides
    assert majority_vote(["a", "b", "b"]).answer == "b"
    empty = majority_vote([None, None])
    assert (empty.answer, empty.shares, empty.num_unparsed) == (None, {}, 2)


def test_vote_on_texts_with_default_callable_and_regex_readers():
    texts = ["so the answer is 42.", "I think 41", "The answer is 42", "no idea", "Answer: 41. The answer is 42.0"]
    default = vote_on_texts(texts)
    assert default.answers == ["42", "41", "42", None, "42"]
    assert default.answer == "42" and default.shares == pytest.approx({"42": 0.75, "41": 0.25})
    # A regex reads its last match (group 1 when it has groups); text without a match abstains.
    by_regex = vote_on_texts(texts, r"Answer: (\d+)")
    assert by_regex.answers == [None, None, None, None, "41"] and by_regex.answer == "41"
    assert vote_on_texts(texts, re.compile(r"\d+")).answers == ["42", "41", "42", None, "0"]
    # A callable may return numbers (votes as text) or None.
    by_length = vote_on_texts(["aa", "bbb", "cc", ""], lambda t: len(t) or None)
    assert by_length.counts == {"2": 2, "3": 1} and by_length.num_unparsed == 1


def test_bad_readers_and_arguments_are_rejected():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        vote_on_texts(["x"], "(unclosed")
    with pytest.raises(ValueError, match="must return a str .* got list"):
        vote_on_texts(["x"], lambda t: [t])
    with pytest.raises(ValueError, match="extract_answer must be None .* got int"):
        vote_on_texts(["x"], 3)
    with pytest.raises(ValueError, match="texts must be a sequence of completion texts"):
        vote_on_texts("the answer is 4")


@pytest.fixture(scope="module")
def text_model(text_model_dir):
    return load_model(text_model_dir), Tokenizer.from_dir(text_model_dir)


def test_self_consistency_end_to_end(text_model):
    model, tokenizer = text_model
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    first_word = lambda text: text.split()[0] if text.split() else None  # noqa: E731
    result = self_consistency(model, tokenizer, "the answer is", 6, params, extract_answer=first_word, eos_token_ids=[])
    assert len(result.completions) == len(result.answers) == 6
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in result.completions)
    assert result.answers == [first_word(c.text) for c in result.completions]
    assert sum(result.shares.values()) == pytest.approx(1.0)
    assert sum(result.counts.values()) + result.num_unparsed == 6
    assert result.answer == max(result.counts, key=result.counts.get)
    assert len({tuple(c.token_ids) for c in result.completions}) > 1  # really sampled
    # Seeded: the same run again gives the same completions; batches of 4 use seeds 7 and 8.
    again = self_consistency(
        model, tokenizer, tokenizer.encode("the answer is"), 6, params, extract_answer=first_word, eos_token_ids=[]
    )
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in result.completions]
    chunked = self_consistency(
        model, tokenizer, "the answer is", 6, params, extract_answer=first_word, eos_token_ids=[], batch_size=4
    )
    assert len(chunked.completions) == 6
    # The default reader works on whatever the model wrote (numbers or nothing).
    default = self_consistency(model, tokenizer, "the answer is", 3, params, eos_token_ids=[])
    assert default.num_unparsed + sum(default.counts.values()) == 3


def test_self_consistency_rejects_bad_arguments_before_generating(text_model):
    model, tokenizer = text_model
    with pytest.raises(ValueError, match="temperature is 0 .* n identical completions"):
        self_consistency(model, tokenizer, "q", 4, SamplingParams(temperature=0))
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        self_consistency(model, tokenizer, "q", 0, SamplingParams())
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        self_consistency(model, tokenizer, "q", 4, SamplingParams(), batch_size=0)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        self_consistency(model, None, "q", 4, SamplingParams())
    with pytest.raises(ValueError, match="not a valid regular expression"):
        self_consistency(model, tokenizer, "q", 4, SamplingParams(), extract_answer="[")
    with pytest.raises(ValueError, match="prompt must be a str or a sequence of token ids"):
        self_consistency(model, tokenizer, 3.5, 4, SamplingParams())
