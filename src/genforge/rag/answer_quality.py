"""Answer-level evaluation: does an answer address its question, and is each of its claims
supported by the passages it cites.

- Answer relevance, as in RAGAS (Es et al. 2023, "RAGAS: Automated Evaluation of Retrieval
  Augmented Generation"): a language model writes the questions that the answer would answer,
  and relevance is the mean cosine between the asked question and those questions (an answer
  that drifts off topic or says nothing generates questions about something else). Without a
  generator, the embedding-only fallback is the cosine between the question and the answer
  itself. `Relevance.method` says which was used: "generated_questions" or "embedding".
- Faithfulness as claim-level support (FActScore, Min et al. 2023, splits text into atomic
  facts; RAGAS's faithfulness is the share of claims the context supports): the answer is cut
  into claims, by a rule (sentences, cut again at clause boundaries such as "; " and ", but ")
  or by a language model asked to list them, and each claim is checked against the passages:
  by `answer.SupportChecker` (MiniLM cosine plus content-word overlap, with a guard that a
  number the claim states must occur in the passage, since embeddings barely see a changed
  number), or by a judge model asked whether the passages support the claim (the entailment
  step of RAGAS and ALCE, with a chat model standing in for the NLI model).
  Faithfulness = supported claims / claims; `mean_support` keeps the continuous scores.

Models are anything with `complete(prompt, max_tokens)`: a `genforge.chat_models` ChatModel
(local or an endpoint) or a scripted stand-in in a test.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .answer import _CITE, DEFAULT_SUPPORT_THRESHOLD, Answer, SupportChecker, chunk_units, content_words
from .chunking import Chunk, sentence_spans

RELEVANCE_METHODS = ("generated_questions", "embedding")

QUESTIONS_PROMPT = """Write {n} different questions that the answer below answers. Write one question per line and nothing else.

Answer: {answer}
Questions:"""

CLAIMS_PROMPT = """List every factual claim that the answer below makes. Write each claim as a short standalone sentence, one per line, and nothing else.

Answer: {answer}
Claims:"""

JUDGE_PROMPT = """Passages:
{passages}

Claim: {claim}
Do the passages above state or directly imply the claim? Reply with one word: yes or no."""

# Clause boundaries at which one sentence makes two claims.
_CLAUSE = re.compile(r";\s+|,\s+(?=(?:and|but|so|while|whereas|which|although)\s)")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_LIST_MARK = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|Q\d*[:.)])\s*")


def _numbers(text: str) -> set[str]:
    # 384,400 and 384400 are one number; a full stop that ends a sentence is not a decimal point.
    return {m.replace(",", "").rstrip(".") for m in _NUMBER.findall(text)}


def _lines(reply: str) -> list[str]:
    """A model's list reply as items: one per line, list markers and quotes stripped."""
    items = []
    for line in reply.splitlines():
        item = _LIST_MARK.sub("", line).strip().strip('"').strip()
        if item:
            items.append(item)
    return items


def split_claims(text: str, generator=None, max_tokens: int = 256) -> list[str]:
    """The claims an answer makes. With `generator`, the lines it lists; else (or when it lists
    nothing) the answer's sentences, cut again at clause boundaries where both sides still say
    something (two content words or more). Citation marks [n] are removed."""
    text = re.sub(r"\s+([.!?,;:])", r"\1", _CITE.sub("", text or "")).strip()
    if not text:
        return []
    if generator is not None:
        claims = _lines(generator.complete(CLAIMS_PROMPT.format(answer=text), max_tokens=max_tokens))
        if claims:
            return claims
    claims = []
    for start, end in sentence_spans(text):
        sentence = " ".join(text[start:end].split())
        pieces: list[str] = []
        for piece in _CLAUSE.split(sentence):
            if pieces and len(content_words(piece)) >= 2 and len(content_words(pieces[-1])) >= 2:
                pieces.append(piece)
            elif pieces:
                pieces[-1] = f"{pieces[-1]}, {piece}"
            else:
                pieces.append(piece)
        claims += [p.strip(" ,;") for p in pieces if p.strip(" ,;")]
    return claims


def _as_chunks(passages: Sequence[str | Chunk]) -> list[Chunk]:
    return [p if isinstance(p, Chunk) else Chunk(str(p), f"passage{n}", 0, len(str(p))) for n, p in enumerate(passages)]


@dataclass
class ClaimVerdict:
    claim: str
    supported: bool
    score: float  # support score (checker) or 1/0 (judge)
    passage: int | None  # index of the best-supporting passage; None when there was none
    reason: str = ""  # why it is unsupported: "low support", "number not in the passage", the judge's reply, ...


class SupportClaimChecker:
    """A claim is supported when `SupportChecker` scores some passage at or over the threshold and
    every number the claim states occurs in that passage."""

    method = "support_checker"

    def __init__(self, embedder, threshold: float = DEFAULT_SUPPORT_THRESHOLD) -> None:
        self.support = SupportChecker(embedder, threshold)

    def prepare(self, claims: Sequence[str], passages: Sequence[Chunk]) -> None:
        """Embed the claims and the passages' units in one batch (the checker caches vectors)."""
        units = [p.text[s:e] for p in passages for s, e in chunk_units(p)] + [p.text for p in passages]
        self.support.vectors([*claims, *units])

    def check(self, claim: str, passages: Sequence[Chunk]) -> ClaimVerdict:
        if not passages:
            return ClaimVerdict(claim, False, 0.0, None, "no passage")
        scores = [self.support.score(claim, p) for p in passages]
        best = int(np.argmax(scores))
        missing = _numbers(claim) - _numbers(passages[best].text)
        if scores[best] < self.support.threshold:
            return ClaimVerdict(claim, False, scores[best], best, "low support")
        if missing:
            return ClaimVerdict(
                claim, False, scores[best], best, f"number not in the passage: {', '.join(sorted(missing))}"
            )
        return ClaimVerdict(claim, True, scores[best], best)


class JudgeClaimChecker:
    """A judge model reads the passages and the claim and says yes or no. A reply that is
    neither counts as unsupported, with the reply kept as the reason."""

    method = "judge"

    def __init__(self, judge, max_tokens: int = 8, passage_chars: int = 1200) -> None:
        if not callable(getattr(judge, "complete", None)):
            raise TypeError(
                f"the judge needs a complete(prompt, max_tokens) method (a ChatModel); got {type(judge).__name__}"
            )
        self.judge, self.max_tokens, self.passage_chars = judge, max_tokens, passage_chars

    def check(self, claim: str, passages: Sequence[Chunk]) -> ClaimVerdict:
        if not passages:
            return ClaimVerdict(claim, False, 0.0, None, "no passage")
        shown = "\n\n".join(f"[{n}] {p.text[: self.passage_chars]}" for n, p in enumerate(passages, 1))
        reply = self.judge.complete(JUDGE_PROMPT.format(passages=shown, claim=claim), max_tokens=self.max_tokens)
        words = re.findall(r"[a-z]+", reply.lower())
        verdict = words[0] if words else ""
        if verdict == "yes":
            return ClaimVerdict(claim, True, 1.0, None)
        if verdict == "no":
            return ClaimVerdict(claim, False, 0.0, None, "judge: no")
        return ClaimVerdict(claim, False, 0.0, None, f"unclear judge reply: {reply.strip()[:80]!r}")


@dataclass
class Faithfulness:
    score: float  # supported claims / claims
    claims: list[ClaimVerdict]
    method: str  # "support_checker" or "judge"

    @property
    def mean_support(self) -> float:
        return float(np.mean([c.score for c in self.claims])) if self.claims else 0.0

    @property
    def unsupported(self) -> list[ClaimVerdict]:
        return [c for c in self.claims if not c.supported]


@dataclass
class Relevance:
    score: float  # mean cosine (generated questions) or the question-answer cosine
    method: str  # one of RELEVANCE_METHODS
    questions: list[str] = field(default_factory=list)  # what the generator wrote


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


def answer_relevance(question: str, answer: str, embedder, generator=None, n_questions: int = 3) -> Relevance:
    """How well `answer` addresses `question` (see the module docstring for both methods)."""
    if not question or not question.strip() or not answer or not answer.strip():
        raise ValueError("answer relevance needs a non-empty question and a non-empty answer")
    if n_questions < 1:
        raise ValueError(f"n_questions must be >= 1, got {n_questions}")
    answer = _CITE.sub("", answer).strip()
    if generator is not None:
        reply = generator.complete(QUESTIONS_PROMPT.format(n=n_questions, answer=answer), max_tokens=64 * n_questions)
        questions = _lines(reply)[:n_questions]
        if questions:
            vectors = _unit(embedder.embed([question, *questions]))
            return Relevance(float((vectors[1:] @ vectors[0]).mean()), "generated_questions", questions)
    vectors = _unit(embedder.embed([question, answer]))
    return Relevance(float(vectors[0] @ vectors[1]), "embedding")


def faithfulness(answer: str, passages: Sequence[str | Chunk], checker, claim_writer=None) -> Faithfulness:
    """The share of the answer's claims that `checker` (`SupportClaimChecker` or
    `JudgeClaimChecker`) finds supported by some passage. `claim_writer`, a model, lists the
    claims; without one they are cut by rule."""
    claims = split_claims(answer, claim_writer)
    if not claims:
        raise ValueError("the answer is empty: there are no claims to check")
    chunks = _as_chunks(passages)
    if hasattr(checker, "prepare"):
        checker.prepare(claims, chunks)
    verdicts = [checker.check(c, chunks) for c in claims]
    return Faithfulness(sum(v.supported for v in verdicts) / len(verdicts), verdicts, checker.method)


class AnswerEvaluator:
    """Answer relevance and claim-level faithfulness with one embedder and optional models:
    `generator` writes questions (relevance) and lists claims, `judge` checks claims (else the
    support checker does)."""

    def __init__(
        self,
        embedder,
        generator=None,
        judge=None,
        threshold: float = DEFAULT_SUPPORT_THRESHOLD,
        n_questions: int = 3,
    ) -> None:
        self.embedder, self.generator, self.n_questions = embedder, generator, n_questions
        self.checker = JudgeClaimChecker(judge) if judge is not None else SupportClaimChecker(embedder, threshold)

    def evaluate(self, question: str, answer: str, passages: Sequence[str | Chunk]) -> dict:
        """{"answer_relevance", "relevance_method", "faithfulness", "mean_support", "claims",
        "unsupported_claims", "faithfulness_method"} for one answer."""
        relevance = answer_relevance(question, answer, self.embedder, self.generator, self.n_questions)
        faith = faithfulness(answer, passages, self.checker, self.generator)
        return {
            "answer_relevance": relevance.score,
            "relevance_method": relevance.method,
            "faithfulness": faith.score,
            "mean_support": faith.mean_support,
            "claims": len(faith.claims),
            "unsupported_claims": [(c.claim, c.reason) for c in faith.unsupported],
            "faithfulness_method": faith.method,
        }

    def evaluate_answers(self, answers: Sequence[Answer], chunks: Mapping[str, Chunk]) -> dict[str, float]:
        """Mean answer relevance and claim faithfulness over genforge `Answer`s that were given
        (not "not covered"); each sentence's claims are checked against the passages that
        sentence cites (`chunks` maps chunk ids, e.g. of `retriever.index.chunks`)."""
        given = [a for a in answers if a.covered and a.sentences]
        if not given:
            raise ValueError("no answered questions to evaluate (every answer was 'not covered' or empty)")
        relevance, faith = [], []
        for a in given:
            relevance.append(
                answer_relevance(
                    a.question, " ".join(s.text for s in a.sentences), self.embedder, self.generator, self.n_questions
                ).score
            )
            by_number = {c.number: c.chunk_id for c in a.citations}
            verdicts = []
            for s in a.sentences:
                cited = [chunks[by_number[n]] for n in s.citations if by_number.get(n) in chunks]
                verdicts += [self.checker.check(c, cited) for c in split_claims(s.text, self.generator)]
            faith.append(sum(v.supported for v in verdicts) / len(verdicts) if verdicts else 0.0)
        return {"answer_relevance": float(np.mean(relevance)), "claim_faithfulness": float(np.mean(faith))}
