"""Few-shot example selection (fixed, random, nearest, MMR) and the token budget."""

from __future__ import annotations

import numpy as np
import pytest

from genforge.prompting import (
    FewShotError,
    FewShotPrompt,
    FixedSelector,
    MMRSelector,
    RandomSelector,
    SemanticSelector,
    mmr_order,
)

EXAMPLES = [
    {"input": "open a file and read it", "output": "open(path).read()"},
    {"input": "open the file and read it all", "output": "Path(path).read_text()"},
    {"input": "sort a list of numbers", "output": "sorted(xs)"},
    {"input": "send an email message", "output": "smtplib.SMTP(host).send_message(msg)"},
    {"input": "parse command line options", "output": "argparse.ArgumentParser()"},
]


class WordVectors:
    """Bag-of-words vectors over a fixed vocabulary: a transparent embedder for exact tests."""

    def __init__(self, texts):
        self.vocabulary = sorted({w for t in texts for w in t.split()})

    def embed(self, texts):
        return np.array([[t.split().count(w) for w in self.vocabulary] for t in texts], dtype=float)


def _prompt(**options):
    return FewShotPrompt(
        examples=EXAMPLES,
        example_template="Task: {{ input }}\nCode: {{ output }}",
        suffix="Task: {{ input }}\nCode:",
        **options,
    )


def test_fixed_and_random_selection():
    fixed = _prompt(k=2).build(input="x")
    assert fixed.indices == [0, 1] and fixed.dropped == 0
    assert fixed.text == (
        "Task: open a file and read it\nCode: open(path).read()\n\n"
        "Task: open the file and read it all\nCode: Path(path).read_text()\n\nTask: x\nCode:"
    )
    assert _prompt(k=2, selector=FixedSelector([4, 2])).build(input="x").indices == [4, 2]
    with pytest.raises(FewShotError, match=r"indices \[9\] are outside the 5 examples"):
        _prompt(selector=FixedSelector([9])).build(input="x")
    seeded = [_prompt(k=3, selector=RandomSelector(seed=s)).build(input="x").indices for s in (1, 1, 2)]
    assert seeded[0] == seeded[1] != seeded[2]
    assert len(set(seeded[0])) == 3


def test_semantic_selection_is_nearest_by_cosine():
    selector = SemanticSelector(WordVectors([e["input"] for e in EXAMPLES] + ["email a message"]))
    assert _prompt(k=2, selector=selector).build(input="send an email message").indices[0] == 3


def test_mmr_skips_a_near_duplicate_for_a_diverse_example():
    embedder = WordVectors([e["input"] for e in EXAMPLES])
    query = "open a file and read it"
    nearest = _prompt(k=2, selector=SemanticSelector(embedder)).build(input=query).indices
    diverse = _prompt(k=2, selector=MMRSelector(embedder, diversity=0.7)).build(input=query).indices
    assert nearest == [0, 1]  # the two "open a file" near-duplicates
    # Second pick: example 1 scores 0.3*0.77 - 0.7*0.77 < 0, while 3 (nothing in common with
    # the query or example 0) scores 0, and wins its tie with 4 by coming first.
    assert diverse == [0, 3]
    assert _prompt(k=2, selector=MMRSelector(embedder, diversity=0.0)).build(input=query).indices == [0, 1]


def test_mmr_order_follows_the_formula():
    relevance = np.array([0.9, 0.85, 0.5])
    similarity = np.array([[1.0, 0.95, 0.1], [0.95, 1.0, 0.2], [0.1, 0.2, 1.0]])
    # Second pick: 0.5*0.85 - 0.5*0.95 = -0.05 for item 1, 0.5*0.5 - 0.5*0.1 = 0.2 for item 2.
    assert mmr_order(relevance, similarity, 0.5, 3) == [0, 2, 1]
    assert mmr_order(relevance, similarity, 1.0, 3) == [0, 1, 2]
    with pytest.raises(FewShotError, match=r"diversity must be in \[0, 1\]"):
        MMRSelector(diversity=1.5)


def test_the_budget_drops_whole_examples_least_preferred_first_and_says_how_many():
    words = lambda text: len(text.split())  # noqa: E731 - a tokenizer that counts words
    full = _prompt(k=4, tokenizer=words).build(input="sort numbers")
    budget = full.tokens - 3  # the last example (5 words) no longer fits; the others still do
    trimmed = _prompt(k=4, tokenizer=words, max_tokens=budget).build(input="sort numbers")
    assert trimmed.indices == [0, 1, 2] and trimmed.dropped == 1 and trimmed.tokens <= budget
    assert trimmed.text.endswith("Task: sort numbers\nCode:")
    with pytest.raises(FewShotError, match="without any example, over the budget of 2"):
        _prompt(tokenizer=words, max_tokens=2).build(input="sort numbers")
    with pytest.raises(FewShotError, match="needs a tokenizer"):
        _prompt(max_tokens=10)


def test_examples_must_fit_the_example_template():
    with pytest.raises(FewShotError, match=r"example 1 does not fit the example template: .*needs 'output'"):
        FewShotPrompt([{"input": "a", "output": "b"}, {"input": "c"}], "{{ input }} {{ output }}", "{{ input }}")


@pytest.mark.slow
def test_semantic_selection_through_genforge_encoder_and_a_real_tokenizer():
    """all-MiniLM-L6-v2 (offline weights) picks the example about the same task in other words,
    and the budget is counted with its WordPiece tokenizer."""
    from genforge.encoder import SentenceEncoder, default_encoder_path
    from genforge.tokenizer import Tokenizer

    encoder = SentenceEncoder(default_encoder_path())
    prompt = _prompt(k=3, selector=SemanticSelector(encoder), tokenizer=Tokenizer.from_dir(default_encoder_path()))
    result = prompt.build(input="mail a note to my colleague")
    assert result.indices[0] == 3
    assert result.tokens == len(prompt.tokenizer.encode(result.text, add_special_tokens=False))
    assert MMRSelector(encoder).select("read the contents of a text file", EXAMPLES, 1)[0] in (0, 1)
