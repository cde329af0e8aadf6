"""Uncertainty estimation for generators: how far to trust one generated answer.

Four families of measures, each turned into a confidence in [0, 1] so that the calibration
tools of `classification.py` (ECE, reliability diagrams) and AUROC apply to all alike:

- Token entropy: the entropy H_t of the model's next-token distribution at each generated
  position, reduced by the mean or the max over the answer. Confidence exp(-H): 1 when every
  step was certain, 1/k when every step hesitated evenly between k tokens.
- Sequence log-probability log p(y | x) = sum_t log p(y_t | x, y_<t): its sum (confidence
  p(y | x)) or its mean over tokens (confidence exp(mean) = the geometric-mean token
  probability, which does not punish long answers for their length).
- Sample agreement (self-consistency, Wang et al. 2023): sample n answers and take the vote
  share of the answer being judged (`self_consistency.majority_vote`).
- Semantic entropy (Kuhn, Gal & Farquhar 2023, "Semantic Uncertainty: Linguistic Invariances
  for Uncertainty Estimation in Natural Language Generation"): sampled answers are clustered
  by meaning (bidirectional entailment; offline, embedding similarity or exact match after
  normalisation), and the entropy is taken over the clusters, so paraphrases of one answer
  do not count as disagreement. The discrete variant gives each cluster its share of the
  samples (Farquhar et al. 2024); the likelihood-weighted one the summed sequence
  probability of its distinct members, renormalised. Confidence exp(-SE).

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides
logits by one scalar T > 0 fitted to minimise the negative log-likelihood on a held-out
split. `fit_temperature` fits it on (N, C) logits; `fit_confidence_temperature` applies it
to a confidence c through its binary logit log(c / (1 - c)). It is monotone, so it changes
calibration (ECE) but never the ranking (AUROC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..generate.self_consistency import majority_vote
from .base import MetricError
from .metrics import normalize_answer

__all__ = [
    "ENTROPY_REDUCTIONS",
    "TokenScores",
    "auroc",
    "cluster_answers",
    "embedding_equivalence",
    "entailment_equivalence",
    "entropy_confidence",
    "exact_match_equivalence",
    "fit_confidence_temperature",
    "fit_temperature",
    "score_completions",
    "semantic_entropy",
    "sequence_logprob_confidence",
    "agreement_confidence",
    "AnswerConfidence",
    "MEASURES",
    "answer_confidences",
    "temperature_scaled_confidence",
    "token_entropy",
]

ENTROPY_REDUCTIONS = ("mean", "max")
Equivalence = Callable[[str, str], bool]


# ---------------------------------------------------------------------------- token scores
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats, -sum_v p_v log p_v with p = softmax(logits), over the last axis."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
        raise MetricError("token_entropy takes a logits tensor whose last axis is the vocabulary")
    logp = F.log_softmax(logits.float(), dim=-1)
    # p log p is 0 where p is 0 (a -inf logit): xlogy-style, without the nan of 0 * -inf.
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


@dataclass(frozen=True)
class TokenScores:
    """What the model thought at each generated token of one completion.

    logprobs: (T,) log p(y_t | x, y_<t) of the tokens generated.
    entropies: (T,) entropy (nats) of the next-token distribution at each of those positions.
    """

    logprobs: torch.Tensor
    entropies: torch.Tensor

    @property
    def sum_logprob(self) -> float:
        return float(self.logprobs.sum())

    @property
    def mean_logprob(self) -> float:
        return float(self.logprobs.mean()) if self.logprobs.numel() else 0.0


@torch.inference_mode()
def score_completions(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> list[TokenScores]:
    """Log-probability and entropy of every completion token, by one forward pass over
    prompt + completion (right-padded, batched) of the causal genforge `model`.

    temperature: divides the logits first (1 = the model's own distribution; a fitted
        temperature-scaling T gives the calibrated one). The full vocabulary row is needed for
        the entropy, so this suits the short answers uncertainty is measured on.
    """
    if len(prompts) != len(completions):
        raise MetricError(f"{len(prompts)} prompts but {len(completions)} completions; pass one completion each")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise MetricError(f"temperature must be a finite number > 0, got {temperature!r}")
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        if len(prompt) < 1 or len(completion) < 1:
            raise MetricError(f"row {index}: prompt and completion each need at least one token")
    device = next(model.parameters()).device
    scores: list[TokenScores] = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            list(p) + list(c)
            for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size])
        ]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        logits = model(ids.to(device), attention_mask=mask.to(device)).logits.float() / temperature
        for i, (prompt, completion) in enumerate(
            zip(prompts[start : start + batch_size], completions[start : start + batch_size])
        ):
            # The logits at position t predict token t + 1.
            positions = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
            row_logits = logits[i, positions]
            logp = F.log_softmax(row_logits, dim=-1)
            targets = torch.tensor(list(completion), device=logp.device)
            scores.append(
                TokenScores(logp.gather(-1, targets[:, None]).squeeze(-1).cpu(), token_entropy(row_logits).cpu())
            )
    return scores


# ----------------------------------------------------------------- confidences per measure
def entropy_confidence(entropies: Sequence[float] | torch.Tensor, reduce: str = "mean") -> float:
    """exp(-reduce(H_t)) over a completion's token entropies: 1 for a certain answer."""
    if reduce not in ENTROPY_REDUCTIONS:
        raise MetricError(f"reduce {reduce!r} is unknown; accepted: {', '.join(ENTROPY_REDUCTIONS)}")
    values = torch.as_tensor(entropies, dtype=torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise MetricError("entropies must be a non-empty 1-D sequence (one entropy per generated token)")
    if bool((values < -1e-9).any()):
        raise MetricError("entropies must be >= 0 (nats)")
    reduced = values.mean() if reduce == "mean" else values.max()
    return float(torch.exp(-reduced.clamp(min=0)))


def sequence_logprob_confidence(logprobs: Sequence[float] | torch.Tensor, normalise: bool = True) -> float:
    """exp(mean log p) (normalise=True: geometric-mean token probability) or exp(sum log p)
    = p(y | x) (normalise=False) of a completion's token log-probabilities."""
    values = torch.as_tensor(logprobs, dtype=torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise MetricError("logprobs must be a non-empty 1-D sequence (one log-probability per generated token)")
    if bool((values > 1e-9).any()):
        raise MetricError("logprobs must be <= 0 (log-probabilities, not probabilities or logits)")
    return float(torch.exp((values.mean() if normalise else values.sum()).clamp(max=0)))


def agreement_confidence(answer: str | None, sampled_answers: Sequence[str | None]) -> float:
    """Vote share of `answer` among `sampled_answers` (self-consistency's majority vote; None
    = unreadable, left out). 0 when `answer` is None or no sample agrees with it."""
    vote = majority_vote(list(sampled_answers))
    if not vote.counts:
        raise MetricError("agreement needs at least one readable sampled answer; all were None")
    return 0.0 if answer is None else vote.shares.get(answer, 0.0)


# ------------------------------------------------------------------------ semantic entropy
def exact_match_equivalence() -> Equivalence:
    """Two answers mean the same when they are equal after SQuAD normalisation (lower case,
    no punctuation or articles, single spaces): enough for short answers such as numbers."""
    return lambda first, second: normalize_answer(first) == normalize_answer(second)


def embedding_equivalence(encode: Callable[[list[str]], torch.Tensor], threshold: float = 0.9) -> Equivalence:
    """Two answers mean the same when the cosine similarity of their sentence embeddings is
    at least `threshold`. `encode` maps texts to (n, d) vectors, e.g.
    `genforge.encoder.SentenceEncoder().encode`. Embeddings are cached per text."""
    if not -1.0 <= threshold <= 1.0:
        raise MetricError(f"threshold is a cosine similarity, so it must lie in [-1, 1]; got {threshold}")
    cache: dict[str, torch.Tensor] = {}

    def vector(text: str) -> torch.Tensor:
        if text not in cache:
            cache[text] = F.normalize(torch.as_tensor(encode([text]), dtype=torch.float32).reshape(-1), dim=0)
        return cache[text]

    return lambda first, second: float(vector(first) @ vector(second)) >= threshold


def entailment_equivalence(entails: Callable[[str, str], bool]) -> Equivalence:
    """Kuhn et al.'s criterion: two answers mean the same when each entails the other.
    `entails(premise, hypothesis)` is an NLI model or a judge (e.g. DeBERTa-MNLI's "entailment"
    label, or a chat model asked the question)."""
    return lambda first, second: bool(entails(first, second)) and bool(entails(second, first))


def cluster_answers(answers: Sequence[str], equivalent: Equivalence) -> list[int]:
    """Cluster id of each answer: an answer joins the first cluster whose first member it is
    `equivalent` to, or starts a new one (Kuhn et al.'s algorithm 1). Identical texts are
    one meaning without asking `equivalent` (an NLI call saved). Ids count from 0 in order
    of first appearance."""
    if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
        raise MetricError("answers must be a sequence of answer texts (str)")
    representatives: list[str] = []
    labels = []
    for answer in answers:
        for cluster, representative in enumerate(representatives):
            if answer == representative or equivalent(answer, representative):
                labels.append(cluster)
                break
        else:
            labels.append(len(representatives))
            representatives.append(answer)
    return labels


def semantic_entropy(
    answers: Sequence[str],
    equivalent: Equivalence | None = None,
    *,
    logprobs: Sequence[float] | None = None,
    sample_ids: Sequence[object] | None = None,
) -> float:
    """Semantic entropy (nats) of sampled `answers`: -sum_c p(c) log p(c) over meaning clusters.

    equivalent: when two answers mean the same (default `exact_match_equivalence()`).
    logprobs: None for the discrete estimate, p(c) = share of the samples in c. Given (each
        sample's sequence log-probability log p(s | x)), the likelihood-weighted estimate:
        p(c) proportional to sum of p(s | x) over the distinct samples s in c. Two samples
        are the same sequence when their `sample_ids` are equal (default: their text), so a
        sequence drawn twice is counted once, as a sum over the sequences of c requires.
    """
    answers = list(answers)
    if not answers:
        raise MetricError("semantic entropy needs at least one sampled answer")
    labels = cluster_answers(answers, equivalent or exact_match_equivalence())
    count = max(labels) + 1
    if logprobs is None:
        mass = np.bincount(labels, minlength=count).astype(np.float64)
    else:
        values = np.asarray(logprobs, dtype=np.float64)
        if values.shape != (len(answers),) or not np.all(np.isfinite(values)):
            raise MetricError(f"logprobs must hold one finite log-probability per answer ({len(answers)})")
        keys = answers if sample_ids is None else list(sample_ids)
        if len(keys) != len(answers):
            raise MetricError(f"sample_ids must name each of the {len(answers)} answers")
        seen, mass = set(), np.zeros(count)
        shift = values.max()  # log-sum-exp shift: tiny probabilities do not underflow to 0 together
        for key, label, value in zip(keys, labels, values):
            if key not in seen:
                seen.add(key)
                mass[label] += math.exp(value - shift)
    p = mass / mass.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------- every measure for a model
MEASURES = (
    "entropy_mean",
    "entropy_max",
    "logprob_sum",
    "logprob_mean",
    "agreement",
    "semantic_discrete",
    "semantic_weighted",
)


@dataclass
class AnswerConfidence:
    """One prompt's greedy answer and the confidence each measure gives it."""

    answer: str | None  # read from the greedy completion; None when unreadable
    completion_ids: list[int]
    confidences: dict[str, float]  # measure name (`MEASURES`) -> confidence in [0, 1]
    sampled_answers: list[str | None]


def answer_confidences(
    model,
    prompts: Sequence[Sequence[int]],
    read_answer: Callable[[list[int]], str | None],
    *,
    num_samples: int = 10,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    equivalent: Equivalence | None = None,
    eos_token_ids: Sequence[int] | None = None,
    score_temperature: float = 1.0,
) -> list[AnswerConfidence]:
    """Answer each prompt greedily with genforge's generator and score the answer with every
    measure of `MEASURES`.

    read_answer: completion token ids -> the answer (None when there is none); answers are
        compared through it (agreement) and through `equivalent` (semantic entropy).
    num_samples, temperature, seed: the sampled answers behind agreement and semantic
        entropy, drawn in one seeded batch.
    score_temperature: the logits' temperature for the token measures (a fitted
        temperature-scaling T); sampling keeps `temperature`.
    """
    from ..generate.generator import generate  # generation is only needed here
    from ..generate.sampling import SamplingParams

    if not isinstance(num_samples, int) or num_samples < 2:
        raise MetricError(f"num_samples must be an integer >= 2 (agreement needs several samples), got {num_samples!r}")
    if not temperature > 0:
        raise MetricError(f"temperature must be > 0 to sample, got {temperature!r}")
    prompts = [list(p) for p in prompts]
    greedy = generate(
        model,
        prompts,
        SamplingParams(temperature=0, max_new_tokens=max_new_tokens),
        eos_token_ids=eos_token_ids,
    )
    sampled = generate(
        model,
        [p for p in prompts for _ in range(num_samples)],
        SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
        eos_token_ids=eos_token_ids,
    )
    greedy_scores = score_completions(model, prompts, [c.token_ids for c in greedy], temperature=score_temperature)
    sample_scores = score_completions(
        model, [p for p in prompts for _ in range(num_samples)], [c.token_ids for c in sampled]
    )
    results = []
    for index, (completion, scores) in enumerate(zip(greedy, greedy_scores)):
        answer = read_answer(completion.token_ids)
        rows = range(index * num_samples, (index + 1) * num_samples)
        answers = [read_answer(sampled[r].token_ids) for r in rows]
        # An unreadable sample still is an outcome of the model: it gets its own meaning cluster.
        texts = [a if a is not None else f"<unreadable {r}>" for a, r in zip(answers, rows)]
        readable = [a for a in answers if a is not None]
        confidences = {
            "entropy_mean": entropy_confidence(scores.entropies, "mean"),
            "entropy_max": entropy_confidence(scores.entropies, "max"),
            "logprob_sum": sequence_logprob_confidence(scores.logprobs, normalise=False),
            "logprob_mean": sequence_logprob_confidence(scores.logprobs, normalise=True),
            "agreement": agreement_confidence(answer, readable) if readable else 0.0,
            "semantic_discrete": math.exp(-semantic_entropy(texts, equivalent)),
            "semantic_weighted": math.exp(
                -semantic_entropy(
                    texts,
                    equivalent,
                    logprobs=[sample_scores[r].sum_logprob for r in rows],
                    sample_ids=[tuple(sampled[r].token_ids) for r in rows],
                )
            ),
        }
        results.append(AnswerConfidence(answer, list(completion.token_ids), confidences, answers))
    return results


# -------------------------------------------------------------------- temperature scaling
def fit_temperature(logits, labels, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the mean NLL of `labels` under softmax(logits / T)
    (Guo et al. 2017), fitted on a held-out calibration split.

    logits: (N, C) class scores; labels: (N,) indices of the true classes. The NLL is convex
    in 1/T, so a bounded search over log T finds the one minimum (golden-section search,
    then refined). `bounds` limits T.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels)
    if z.dim() != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise MetricError(f"logits must be (N, classes) with N >= 1 and at least 2 classes, got {tuple(z.shape)}")
    if y.shape != (z.shape[0],) or y.dtype in (torch.float32, torch.float64, torch.bool):
        raise MetricError(f"labels must be ({z.shape[0]},) integer class indices, got shape {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise MetricError(f"labels must be class indices from 0 to {z.shape[1] - 1}")
    if not torch.isfinite(z).all():
        raise MetricError("logits must be finite")
    low, high = bounds
    if not 0 < low < high:
        raise MetricError(f"bounds must be 0 < low < high, got {bounds}")

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(80):  # each step keeps 0.618 of the interval: 80 steps reach ~1e-16 of it
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


def _confidence_logits(confidences) -> torch.Tensor:
    conf = torch.as_tensor(np.asarray(confidences, dtype=np.float64))
    if conf.dim() != 1 or conf.numel() == 0:
        raise MetricError("confidences must be a non-empty 1-D sequence")
    if not torch.isfinite(conf).all() or bool((conf < 0).any()) or bool((conf > 1).any()):
        raise MetricError("confidences must be probabilities in [0, 1]")
    conf = conf.clamp(1e-6, 1 - 1e-6)  # a confidence of exactly 0 or 1 would be an infinite logit
    return torch.log(conf) - torch.log1p(-conf)


def fit_confidence_temperature(confidences, correct) -> float:
    """Temperature scaling of a binary "this answer is right" confidence: the T for which
    sigmoid(logit(c) / T) best predicts `correct` (mean NLL) on the calibration split."""
    z = _confidence_logits(confidences)
    hits = np.asarray(correct)
    if hits.shape != (z.numel(),) or (hits.dtype != bool and not np.isin(hits, (0, 1)).all()):
        raise MetricError(f"correct must hold one boolean (or 0/1) per confidence ({z.numel()})")
    # Two classes, "wrong" with logit 0 and "right" with logit(c): softmax is then sigmoid(logit(c)).
    two_class = torch.stack([torch.zeros_like(z), z], dim=1)
    return fit_temperature(two_class, torch.as_tensor(hits.astype(np.int64)))


def temperature_scaled_confidence(confidences, temperature: float) -> np.ndarray:
    """sigmoid(logit(c) / T) for each confidence c."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise MetricError(f"temperature must be > 0, got {temperature!r}")
    return torch.sigmoid(_confidence_logits(confidences) / temperature).numpy()


# --------------------------------------------------------------------------------- AUROC
def auroc(confidences, correct) -> float:
    """Area under the ROC curve of `confidences` as a predictor of `correct`: the chance that
    a right answer has a higher confidence than a wrong one (ties count half; the
    Mann-Whitney U statistic). 0.5 is an uninformative confidence."""
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct).astype(bool)
    if conf.ndim != 1 or conf.shape != hits.shape or conf.size == 0:
        raise MetricError("confidences and correct must be 1-D and of the same non-zero length")
    positives, negatives = int(hits.sum()), int((~hits).sum())
    if positives == 0 or negatives == 0:
        raise MetricError("AUROC needs both right and wrong answers; all answers were one or the other")
    # Average ranks (ties share the mean of their ranks), then U = rank sum of positives - its minimum.
    order = np.argsort(conf, kind="mergesort")
    ranks = np.empty(conf.size)
    sorted_conf = conf[order]
    start = 0
    while start < conf.size:
        end = start
        while end + 1 < conf.size and sorted_conf[end + 1] == sorted_conf[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[hits].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))
