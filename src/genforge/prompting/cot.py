"""Chain-of-thought prompting: ask for the reasoning before the answer, then read the answer out.

- Zero-shot (Kojima et al. 2022, "Large Language Models are Zero-Shot Reasoners"): the question
  followed by "Let's think step by step."; when the reasoning does not end in a readable answer,
  a second turn asks for it ("Therefore, the answer is"), as the paper's answer-extraction stage.
- Few-shot (Wei et al. 2022, "Chain-of-Thought Prompting Elicits Reasoning in Large Language
  Models"): worked examples whose answers are a rationale followed by "The answer is X.", chosen
  by any few-shot selector under a token budget (`fewshot.FewShotPrompt`).
- Self-consistency (Wang et al. 2023): sample several chains and take the majority answer; the
  vote is `genforge.generate.self_consistency.vote_on_texts`, the one the in-process decoder
  uses, so answers are read and normalised the same way ("$1,234.50" and "1234.5" vote together).

Answers are read by an extractor: "final" (the last "the answer is X", else the last number;
`extract_final_answer`), "number" (the last number), a list of choices (`extract_choice`), a
regular expression (its last match), or any function `text -> answer or None`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from ..chat_models import ChatModel
from ..generate.self_consistency import SelfConsistencyResult, extract_final_answer, vote_on_texts
from .fewshot import FewShotPrompt, FixedSelector

__all__ = [
    "ZERO_SHOT_TRIGGER",
    "CoTResult",
    "CoTVote",
    "answer_extractor",
    "chain_of_thought",
    "cot_examples_prompt",
    "extract_choice",
    "extract_number",
    "self_consistent_cot",
]

ZERO_SHOT_TRIGGER = "Let's think step by step."
ANSWER_PROMPT = "Therefore, the answer is"
COT_EXAMPLE_TEMPLATE = "Q: {{ question }}\nA: {{ rationale }} The answer is {{ answer }}."
COT_QUESTION_TEMPLATE = "Q: {{ question }}\nA:"

Extractor = Callable[[str], "str | None"]

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_ANSWER_PHRASE = re.compile(r"\banswer\s+is\b\s*:?\s*", re.IGNORECASE)


def extract_number(text: str) -> str | None:
    """The last number in `text`, normalised so equal values compare equal ("1,200.0" -> "1200")."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    try:
        value = format(Decimal(numbers[-1].replace(",", "")).normalize(), "f")
    except InvalidOperation:  # pragma: no cover - a _NUMBER match always parses
        return numbers[-1]
    return "0" if value == "-0" else value


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """Which of `choices` (option letters such as "A".."E", or words) the text answers.

    The choice right after the last "answer is" wins; otherwise the last choice named in the
    text. A choice is matched as a whole word, case-insensitively, with or without parentheses
    ("(B)", "B)", "b").
    """
    if isinstance(choices, str) or not choices:
        raise ValueError(f"choices must be a non-empty list of strings, got {choices!r}")
    pattern = re.compile(
        r"(?<![\w])\(?(" + "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True)) + r")\)?(?![\w])",
        re.IGNORECASE,
    )
    canonical = {c.casefold(): c for c in choices}
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        after = pattern.match(text, phrases[-1].end())
        if after:
            return canonical[after.group(1).casefold()]
    matches = list(pattern.finditer(text))
    return canonical[matches[-1].group(1).casefold()] if matches else None


def answer_extractor(spec: str | Sequence[str] | re.Pattern | Extractor | None = "final") -> Extractor:
    """An answer reader from `spec`: "final", "number", a list of choices, a regular expression
    (a compiled pattern, or a string that is none of the names: its last match's first group, or
    the whole match), or a function."""
    if spec is None or spec == "final":
        return extract_final_answer
    if spec == "number":
        return extract_number
    if isinstance(spec, (str, re.Pattern)):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(
                f"answer extractor {spec!r} is not 'final', 'number' or a valid regular expression ({err})"
            ) from None

        def read(text: str) -> str | None:
            matches = list(pattern.finditer(text))
            if not matches:
                return None
            return (matches[-1].group(1) if pattern.groups else matches[-1].group(0)).strip()

        return read
    if callable(spec):
        return spec
    if isinstance(spec, Sequence) and all(isinstance(c, str) for c in spec):
        choices = list(spec)
        return lambda text: extract_choice(text, choices)
    raise ValueError(
        "an answer extractor is 'final', 'number', a list of choices, a regular expression or a function; "
        f"got {type(spec).__name__}"
    )


def cot_examples_prompt(
    examples: Sequence[Mapping[str, Any]],
    *,
    selector=None,
    k: int = 8,
    prefix: str = "",
    max_tokens: int | None = None,
    tokenizer=None,
) -> FewShotPrompt:
    """A few-shot chain-of-thought prompt over examples with `question`, `rationale` and
    `answer` fields: "Q: ...\\nA: <rationale> The answer is <answer>." each, then the question."""
    return FewShotPrompt(
        examples=examples,
        example_template=COT_EXAMPLE_TEMPLATE,
        suffix=COT_QUESTION_TEMPLATE,
        prefix=prefix,
        selector=selector or FixedSelector(),
        k=k,
        query_key="question",
        max_tokens=max_tokens,
        tokenizer=tokenizer,
    )


@dataclass
class CoTResult:
    """One chain of thought: the reasoning reply, the answer read from it (None if unreadable),
    and the second-stage reply when the answer had to be asked for."""

    answer: str | None
    reasoning: str
    answer_reply: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)


def _question_messages(question: str, prompt: FewShotPrompt | None, trigger: str) -> list[dict[str, str]]:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"a chain-of-thought question must be non-empty text, got {question!r:.60}")
    if prompt is None:
        return [{"role": "user", "content": f"Q: {question}\nA: {trigger}".rstrip()}]
    return prompt.build(question=question).messages()


def chain_of_thought(
    model: ChatModel,
    question: str,
    *,
    examples: FewShotPrompt | None = None,
    trigger: str = ZERO_SHOT_TRIGGER,
    extract: str | Sequence[str] | re.Pattern | Extractor | None = "final",
    answer_prompt: str | None = ANSWER_PROMPT,
    max_tokens: int = 256,
    temperature: float = 0.0,
) -> CoTResult:
    """Reason, then answer.

    examples: a few-shot CoT prompt (`cot_examples_prompt`); without it, zero-shot with `trigger`.
    answer_prompt: when the reasoning has no readable answer, asked as a second turn after it
        (Kojima et al.'s answer extraction); None to skip.
    """
    reader = answer_extractor(extract)  # a bad extractor fails before the model is called
    messages = _question_messages(question, examples, trigger)
    reasoning = model.chat(messages, max_tokens=max_tokens, temperature=temperature).content
    answer = reader(reasoning) or None
    answer_reply = None
    if answer is None and answer_prompt:
        follow_up = [*messages, {"role": "assistant", "content": reasoning}, {"role": "user", "content": answer_prompt}]
        answer_reply = model.chat(follow_up, max_tokens=32, temperature=0.0).content
        # The reply to "the answer is" is the answer itself, so read it as if it followed the phrase.
        answer = reader(f"{answer_prompt} {answer_reply}") or None
    return CoTResult(answer=answer, reasoning=reasoning, answer_reply=answer_reply, messages=messages)


@dataclass
class CoTVote:
    """Self-consistency over sampled chains of thought: the vote and every chain."""

    answer: str | None
    vote: SelfConsistencyResult
    chains: list[str]


def self_consistent_cot(
    model: ChatModel,
    question: str,
    n: int = 5,
    *,
    examples: FewShotPrompt | None = None,
    trigger: str = ZERO_SHOT_TRIGGER,
    extract: str | Sequence[str] | re.Pattern | Extractor | None = "final",
    max_tokens: int = 256,
    temperature: float = 0.7,
    seed: int | None = None,
) -> CoTVote:
    """Self-consistency (Wang et al. 2023): `n` chains sampled at `temperature`, majority answer.

    Chains with no readable answer are left out of the vote (counted in `vote.num_unparsed`).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (the number of sampled chains), got {n!r}")
    if not temperature > 0:
        raise ValueError(f"self-consistency samples chains, so temperature must be > 0 (got {temperature!r})")
    reader = answer_extractor(extract)
    messages = _question_messages(question, examples, trigger)
    replies = model.sample_replies(messages, n, max_tokens=max_tokens, temperature=temperature, seed=seed)
    chains = [reply.content for reply in replies]
    vote = vote_on_texts(chains, reader)
    return CoTVote(answer=vote.answer, vote=vote, chains=chains)
