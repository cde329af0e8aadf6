"""Self-consistency: sample several reasoning paths, answer by majority vote.

Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning in Language Models":
a question with one correct answer can be reasoned out along many paths, and wrong paths
tend to scatter over different wrong answers while right ones agree. So instead of one greedy
chain of thought, sample `n` completions at a moderate temperature, read the final answer of
each, and return the most frequent. The paper found the plain (unweighted) majority vote as
good as weighting paths by their probability; they sampled up to 40 paths, and accuracy
rose with their number before levelling off.

The extraction and the vote are pure functions (`extract_final_answer`, `majority_vote`,
`vote_on_texts`) so they can be tested and reused without a model; `self_consistency` adds
the sampling, through `generator.generate` as one seeded batch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from numbers import Integral, Real

from ..model import Transformer
from .generator import Completion, generate
from .request import DecodeRequest
from .sampling import SamplingParams

__all__ = [
    "SelfConsistencyResult",
    "extract_final_answer",
    "majority_vote",
    "vote_on_texts",
    "self_consistency",
]

Extractor = Callable[[str], "str | None"]

# "... the answer is 42." / "The answer is: (b)" -- the phrase Wang et al.'s few-shot prompts
# end every exemplar with, so sampled chains of thought end with it too.
_ANSWER_PHRASE = re.compile(r"\banswer\s+is\b\s*:?\s*", re.IGNORECASE)
# Integers and decimals, with optional thousands separators ("1,234.5"); a comma not followed
# by exactly three digits separates numbers ("1, 2, 3" is three numbers).
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_LEADING_NUMBER = re.compile(r"[$€£]?\s*(" + _NUMBER.pattern + r")(?![\w.]*[A-Za-z])")
# A text answer ends at the first sentence end or line break.
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")


@dataclass
class SelfConsistencyResult:
    """A majority vote over sampled completions."""

    answer: str | None  # the winning answer; None when no completion had a readable answer
    shares: dict[str, float]  # answer -> fraction of the readable answers, most votes first
    counts: dict[str, int]  # answer -> votes, same order
    answers: list[str | None]  # the answer read from each completion, None where unreadable
    num_unparsed: int  # completions with no readable answer (left out of the shares)
    completions: list[Completion] = field(default_factory=list)  # empty for a model-free vote


def extract_final_answer(text: str) -> str | None:
    """The default answer reader: the last "the answer is X" in `text`, else its last number.

    A number (after "answer is" or anywhere) is normalised so that equal values vote
    together: "$1,234.50" -> "1234.5", "18.0" -> "18". Any other answer after "answer is" is
    read up to the end of its sentence and case-folded ("Paris." -> "paris"). Returns None when
    there is neither an "answer is" phrase nor a number.
    """
    if not isinstance(text, str):
        raise ValueError(f"extract_final_answer takes the completion's text (str), got {type(text).__name__}")
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        rest = text[phrases[-1].end() :]
        number = _LEADING_NUMBER.match(rest)
        if number:
            return _normalise_number(number.group(1))
        end = _SENTENCE_END.search(rest)
        answer = " ".join(rest[: end.start() if end else len(rest)].split()).strip(" \"'*`").casefold()
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return _normalise_number(numbers[-1]) if numbers else None


def _normalise_number(number: str) -> str:
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:  # cannot happen for a _NUMBER match; kept as text if it does
        return number
    text = format(value.normalize(), "f")
    return "0" if text == "-0" else text


def majority_vote(answers: Sequence[str | None]) -> SelfConsistencyResult:
    """The most frequent answer of `answers` (None = unreadable, left out).

    Ties go to the answer that appeared first, so the result depends only on the order of
    `answers` (for `self_consistency`, on the seed). Shares are fractions of the readable
    answers and sum to 1, or the dict is empty when none is readable.
    """
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise ValueError(f"answers must be a sequence of answers (str or None), got {type(answers).__name__}")
    counts: dict[str, int] = {}  # insertion order = order of first appearance
    for answer in answers:
        if answer is not None:
            if not isinstance(answer, str):
                raise ValueError(f"answers must be str or None, got {answer!r}")
            counts[answer] = counts.get(answer, 0) + 1
    # sorted() is stable: equal counts keep their order of first appearance.
    ranked = dict(sorted(counts.items(), key=lambda item: -item[1]))
    parsed = sum(ranked.values())
    return SelfConsistencyResult(
        answer=next(iter(ranked), None),
        shares={answer: count / parsed for answer, count in ranked.items()},
        counts=ranked,
        answers=list(answers),
        num_unparsed=len(answers) - parsed,
    )


def vote_on_texts(
    texts: Sequence[str], extract_answer: Extractor | str | re.Pattern | None = None
) -> SelfConsistencyResult:
    """Read an answer from each completion text with `extract_answer` and vote (no model).

    `extract_answer` is None (`extract_final_answer`), a callable `text -> answer or None`, or
    a regular expression whose *last* match in a text is the answer (its first group if it has
    groups, else the whole match).
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a sequence of completion texts (str)")
    reader = _answer_reader(extract_answer)
    return majority_vote([_checked_answer(reader(text), text) for text in texts])


def self_consistency(
    model: Transformer,
    tokenizer,
    prompt: str | Sequence[int],
    n: int,
    params: SamplingParams | None = None,
    extract_answer: Extractor | str | re.Pattern | None = None,
    *,
    eos_token_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> SelfConsistencyResult:
    """Self-consistency (Wang et al. 2023): sample `n` completions of `prompt`, read each
    one's answer, return the majority answer with its vote shares and the completions.

    prompt: text (encoded with the tokenizer's special tokens) or token ids (used as given,
        e.g. the output of a chat template). A few-shot chain-of-thought prompt whose exemplars
        end in "The answer is X." suits the default reader.
    params: how to sample; must sample (temperature > 0). Default temperature 0.7 with no
        token limit (the model's context). Wang et al. used temperatures 0.5-0.7, with top-k
        40 for most models.
        With `params.seed` the run is reproducible.
    extract_answer: see `vote_on_texts`.
    batch_size: completions generated together (default all n). With a seed, batch b is
        sampled with seed + b, so results depend on batch_size as well as the seed.
    """
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the number of sampled completions), got {n!r}")
    params = params if params is not None else SamplingParams(temperature=0.7)
    if isinstance(params, SamplingParams) and params.greedy:
        raise ValueError(
            "self-consistency needs sampled completions, but params.temperature is 0 (greedy), which would give "
            "n identical completions; use a temperature such as 0.5-0.7"
        )
    if tokenizer is None:
        raise ValueError("self-consistency reads answers from text, so it needs the model's tokenizer")
    batch_size = n if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 or None (all n at once), got {batch_size!r}")
    reader = _answer_reader(extract_answer)  # a bad extractor fails here, before any generation
    if isinstance(prompt, str):
        prompt_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, Sequence) and all(isinstance(t, Integral) and not isinstance(t, bool) for t in prompt):
        prompt_ids = [int(t) for t in prompt]
    else:
        raise ValueError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")

    request = DecodeRequest.resolve(
        model, [prompt_ids] * min(batch_size, n), params, tokenizer=tokenizer, eos_token_ids=eos_token_ids
    )
    completions: list[Completion] = []
    for batch_index, start in enumerate(range(0, n, batch_size)):
        # Every batch repeats the one prompt, so the checked request holds for each: only
        # its size and seed change.
        size = min(batch_size, n - start)
        batch_params = params
        if params.seed is not None and batch_index > 0:
            batch_params = dataclasses.replace(params, seed=params.seed + batch_index)
        completions += generate(model, dataclasses.replace(request, prompts=[prompt_ids] * size, params=batch_params))
    result = majority_vote([_checked_answer(reader(c.text), c.text) for c in completions])
    result.completions = completions
    return result


def _answer_reader(extract_answer) -> Extractor:
    if extract_answer is None:
        return extract_final_answer
    if isinstance(extract_answer, (str, re.Pattern)):
        try:
            pattern = re.compile(extract_answer)
        except re.error as err:
            raise ValueError(f"extract_answer is not a valid regular expression ({err}): {extract_answer!r}") from None

        def read(text: str) -> str | None:
            matches = list(pattern.finditer(text))
            if not matches:
                return None
            last = matches[-1]
            return (last.group(1) if pattern.groups else last.group(0)).strip()

        return read
    if callable(extract_answer):
        return extract_answer
    raise ValueError(
        "extract_answer must be None (the default reader), a callable text -> answer, or a regular expression; "
        f"got {type(extract_answer).__name__}"
    )


def _checked_answer(answer, text: str) -> str | None:
    """An extractor's result as a vote: str, numbers as text, None or "" for no answer."""
    if answer is None or answer == "":
        return None
    if isinstance(answer, str):
        return answer
    if isinstance(answer, Real) and not isinstance(answer, bool):
        return str(answer)
    raise ValueError(
        f"extract_answer must return a str (or a number, or None for no answer), got {type(answer).__name__} "
        f"{answer!r} for the completion {text[:80]!r}"
    )
