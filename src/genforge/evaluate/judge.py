"""LLM-as-judge: pairwise judgments, their aggregation into ratings, and agreement with people.

- A judge is any callable `judge(question, answer_a, answer_b) -> "A" | "B" | "tie"`: a local
  model, an HTTP endpoint, a person at a prompt. `pairwise_prompt` writes a prompt for it and
  `parse_verdict` reads the verdict back out of a model's reply.
- Position swap. LLM judges favour one position (Zheng et al. 2023, "Judging LLM-as-a-Judge
  with MT-Bench and Chatbot Arena"), so every pair is judged twice, once in each order. An
  answer wins only if both orders say it wins; both orders saying tie, or the orders
  disagreeing in any way (a win and a loss, or a win and a tie), gives a tie.
- Bradley-Terry (Bradley & Terry 1952): P(i beats j) = p_i / (p_i + p_j). Strengths are the
  maximum-likelihood estimate, found by the MM algorithm of Zermelo (1929) and Hunter (2004),
  with a tie counted as half a win for each side. Ratings are 400 log10(p) + 1000, the Elo
  scale, so a 400-point gap means 10:1 odds.
- Elo (Elo 1978): ratings updated online battle by battle with step K; the result depends on
  the order of battles, so confidence intervals come from bootstrap rounds over resampled
  (or reshuffled) battles, as in the Chatbot Arena reports (Chiang et al. 2024).
- Cohen's kappa (Cohen 1960; weighted, Cohen 1968): agreement between a judge and human
  labels beyond what chance would give.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, NamedTuple

import numpy as np

from ._progress import progress
from .base import MetricError, MetricResult

VERDICTS = ("A", "B", "tie")
Judge = Callable[[str, str, str], str]

DEFAULT_CRITERIA = "correctness, helpfulness, relevance, depth and clarity"


# ----------------------------------------------------------------------------------- judging
def pairwise_prompt(question: str, answer_a: str, answer_b: str, *, criteria: str = DEFAULT_CRITERIA) -> str:
    """A prompt asking a model which of two answers to `question` is better.

    The reply is asked to end with [[A]], [[B]] or [[tie]]; `parse_verdict` reads it. The
    prompt tells the model to disregard order and length, which reduces but does not remove
    those biases: judge both orders (`judge_pair`).
    """
    for name, value in (("question", question), ("answer_a", answer_a), ("answer_b", answer_b)):
        if not isinstance(value, str):
            raise MetricError(f"pairwise_prompt: {name} must be a string, got {type(value).__name__}")
    return (
        "Two assistants answered the question below. Decide which answer is better for the person who asked, "
        f"weighing {criteria}. Which answer comes first, how long each is and how confident it sounds are not "
        "evidence of quality; do not let them sway you.\n"
        "Reason briefly, then put your verdict alone on the last line: [[A]] if answer A is better, [[B]] if "
        "answer B is better, [[tie]] if neither is better.\n\n"
        f"### Question\n{question}\n\n"
        f"### Answer A\n{answer_a}\n### End of answer A\n\n"
        f"### Answer B\n{answer_b}\n### End of answer B\n"
    )


_VERDICT_MARK = re.compile(r"\[\[\s*(a|b|tie)\s*\]\]", re.IGNORECASE)


def parse_verdict(text: str) -> str:
    """ "A", "B" or "tie" from a judge's reply: the last [[A]] / [[B]] / [[tie]] in it, or the
    whole reply when it is just one of those words (any case)."""
    if not isinstance(text, str):
        raise MetricError(f"parse_verdict: expected the judge's reply as a string, got {type(text).__name__}")
    marks = _VERDICT_MARK.findall(text)
    word = (marks[-1] if marks else text).strip()
    for verdict in VERDICTS:
        if word.lower() == verdict.lower():
            return verdict
    raise MetricError(
        f"parse_verdict: no verdict in the reply {text[-200:]!r}; it must contain [[A]], [[B]] or "
        "[[tie]] (or be just A, B or tie)"
    )


def _check_verdict(verdict: Any, where: str) -> str:
    if isinstance(verdict, str):
        for accepted in VERDICTS:
            if verdict.strip().lower() == accepted.lower():
                return accepted
    raise MetricError(
        f"{where}: the judge returned {verdict!r}; a judge must return 'A', 'B' or 'tie' "
        "(use parse_verdict on a model's reply)"
    )


_SWAP = {"A": "B", "B": "A", "tie": "tie"}


def combine_orders(forward: str, swapped: str) -> str:
    """The position-swap rule. `forward` is the verdict with answer A shown first, `swapped` the
    verdict with the answers exchanged (there, "A" means the original answer B). A side wins
    only when both orders name it; everything else, disagreement included, is a tie."""
    forward, swapped = _check_verdict(forward, "combine_orders"), _check_verdict(swapped, "combine_orders")
    back = _SWAP[swapped]  # the swapped verdict in the original labels
    return forward if forward == back else "tie"


@dataclass(frozen=True)
class PairJudgment:
    """One pair judged in both orders: `verdict` (original labels) and the two raw verdicts."""

    verdict: str
    forward: str
    swapped: str

    @property
    def consistent(self) -> bool:
        """Whether the two orders agreed (when not, `verdict` is a tie by the swap rule)."""
        return self.forward == _SWAP[self.swapped]


def judge_pair(judge: Judge, question: str, answer_a: str, answer_b: str) -> PairJudgment:
    """Ask `judge` about (a, b) and about (b, a), and combine the two by `combine_orders`."""
    forward = _check_verdict(judge(question, answer_a, answer_b), "judge_pair")
    swapped = _check_verdict(judge(question, answer_b, answer_a), "judge_pair")
    return PairJudgment(combine_orders(forward, swapped), forward, swapped)


class Battle(NamedTuple):
    """One comparison between two models: winner is "A" (model_a won), "B" or "tie"."""

    model_a: Hashable
    model_b: Hashable
    winner: str


@dataclass(frozen=True)
class JudgedBattles:
    """The battles from `judge_all`, with the two-order judgment behind each."""

    battles: list[Battle]
    judgments: list[PairJudgment]
    questions: list[int]  # index of the question each battle was about
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def consistency(self) -> float:
        """Fraction of pairs on which both orders agreed: a measure of the judge's position bias."""
        return sum(j.consistent for j in self.judgments) / len(self.judgments)


def judge_all(
    judge: Judge,
    questions: Sequence[str],
    answers: Mapping[Hashable, Sequence[str]],
    *,
    pairs: Iterable[tuple[Hashable, Hashable]] | None = None,
    show_progress: bool | None = None,
) -> JudgedBattles:
    """Judge every pair of models on every question, both orders each (2 judge calls a pair).

    answers: model -> its answer to each question, in the order of `questions`.
    pairs: which (model_a, model_b) pairs to compare; default every unordered pair once.
    show_progress: a progress bar over judge calls; None shows one for 16 or more.
    """
    if isinstance(questions, str) or not questions:
        raise MetricError("judge_all: questions must be a non-empty list of strings")
    if not isinstance(answers, Mapping) or len(answers) < 2:
        raise MetricError("judge_all: answers must map at least two models to their answers")
    for model, given in answers.items():
        if isinstance(given, str) or len(given) != len(questions):
            count = "a single string" if isinstance(given, str) else len(given)
            raise MetricError(
                f"judge_all: model {model!r} has {count} answer(s) for {len(questions)} questions; "
                "give one answer per question"
            )
    pairs = list(combinations(answers, 2)) if pairs is None else [tuple(p) for p in pairs]
    unknown = {m for p in pairs for m in p if m not in answers}
    if unknown:
        raise MetricError(f"judge_all: pairs name model(s) without answers: {sorted(map(repr, unknown))}")
    if any(a == b for a, b in pairs):
        raise MetricError("judge_all: a pair compares a model with itself; pairs must name two different models")
    # Question by question, every pair within each: battles of all pairs interleave, which
    # suits online Elo (applied in this order) better than one pair's block after another.
    jobs = [(q, a, b) for q in range(len(questions)) for a, b in pairs]
    battles, judgments = [], []
    for q, a, b in progress(jobs, len(jobs), "judging pairs", show_progress):
        judgment = judge_pair(judge, questions[q], answers[a][q], answers[b][q])
        battles.append(Battle(a, b, judgment.verdict))
        judgments.append(judgment)
    settings = {
        "orders": "both (position swap)",
        "rule": "win only if both orders agree, else tie",
        "num_pairs": len(pairs),
        "num_questions": len(questions),
    }
    return JudgedBattles(battles, judgments, [q for q, _, _ in jobs], settings)


# ----------------------------------------------------------------------------------- ratings
@dataclass(frozen=True)
class Ratings:
    """Ratings on the Elo scale; `intervals` holds bootstrap (low, high) when asked for."""

    ratings: dict[Hashable, float]
    num_battles: int
    intervals: dict[Hashable, tuple[float, float]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> list[Hashable]:
        """Models from highest to lowest rating."""
        return sorted(self.ratings, key=self.ratings.__getitem__, reverse=True)

    def expected_score(self, model_a: Hashable, model_b: Hashable) -> float:
        """P(a beats b) + P(tie) / 2 implied by the ratings: 1 / (1 + base^((R_b - R_a) / scale))."""
        scale, base = self.settings.get("scale", 400.0), self.settings.get("base", 10.0)
        return 1.0 / (1.0 + base ** ((self.ratings[model_b] - self.ratings[model_a]) / scale))


def _check_battles(battles: Iterable[Any], where: str) -> tuple[list[Hashable], np.ndarray, np.ndarray, np.ndarray]:
    """(models, index of model_a, index of model_b, score of model_a in {1, 0, 0.5})."""
    battles = list(battles)
    if not battles:
        raise MetricError(f"{where}: no battles given; pass (model_a, model_b, winner) triples")
    models: dict[Hashable, int] = {}
    rows = []
    for i, battle in enumerate(battles):
        if not isinstance(battle, (tuple, list)) or len(battle) != 3:
            raise MetricError(f"{where}: battle {i} is {battle!r}; each battle is (model_a, model_b, winner)")
        a, b, winner = battle
        if a == b:
            raise MetricError(f"{where}: battle {i} pits {a!r} against itself")
        winner = _check_verdict(winner, f"{where}: battle {i}")
        rows.append(
            (
                models.setdefault(a, len(models)),
                models.setdefault(b, len(models)),
                {"A": 1.0, "B": 0.0, "tie": 0.5}[winner],
            )
        )
    if len(models) < 2:
        raise MetricError(f"{where}: needs at least two models")
    ia, ib, score = (np.array(column) for column in zip(*rows))
    return list(models), ia.astype(np.int64), ib.astype(np.int64), score.astype(np.float64)


def _check_common(scale: float, base: float, initial: float, confidence: float, bootstrap: int) -> None:
    if not scale > 0 or not base > 1:
        raise MetricError(f"scale must be > 0 and base > 1, got scale={scale}, base={base}")
    if not np.isfinite(initial):
        raise MetricError(f"initial must be a finite rating, got {initial}")
    if not 0 < confidence < 1:
        raise MetricError(f"confidence must lie in (0, 1), e.g. 0.95, got {confidence}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise MetricError(f"bootstrap must be a number of rounds >= 0, got {bootstrap!r}")


def _intervals(samples: np.ndarray, models: list[Hashable], confidence: float) -> dict[Hashable, tuple[float, float]]:
    low, high = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)], axis=0)
    return {m: (float(low[i]), float(high[i])) for i, m in enumerate(models)}


def _win_graph_problem(wins: np.ndarray, models: list[Hashable]) -> str | None:
    """Why no finite maximum-likelihood estimate exists, or None if one does.

    Bradley-Terry strengths are finite exactly when, for every split of the models into two
    groups, someone in each group beat (or tied) someone in the other (Ford 1957): the graph
    with an edge i -> j when i scored against j is strongly connected.
    """
    scored = wins > 0

    def reach(adjacency: np.ndarray) -> np.ndarray:
        seen = np.zeros(len(models), bool)
        seen[0], frontier = True, [0]
        while frontier:
            nxt = np.flatnonzero(adjacency[frontier].any(axis=0) & ~seen)
            seen[nxt] = True
            frontier = list(nxt)
        return seen

    met = scored | scored.T
    apart = ~reach(met)
    if apart.any():
        return (
            f"models {[models[i] for i in np.flatnonzero(apart)][:5]} never met (directly or through others) "
            f"the group of {models[0]!r}; ratings of separate groups are not comparable"
        )
    # Following "scored against" edges from model 0 misses a group its side never scored
    # against (that group never lost); following them backwards misses a group that never
    # scored against model 0's side (it never won or tied).
    unbeaten = ~reach(scored)
    winless = ~reach(scored.T)
    group = unbeaten if unbeaten.any() else winless
    if group.any():
        kind = "never lost to" if unbeaten.any() else "never beat or tied"
        named = [models[i] for i in np.flatnonzero(group)][:5]
        return f"models {named} {kind} the others, so their strength is infinite"
    return None


def _mm_fit(wins: np.ndarray, games: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
    """MM iterations for Bradley-Terry on a batch: wins, games (R, M, M); returns log-strengths
    (R, M), centred to mean 0, and the iterations used. Each step sets
    p_i = W_i / sum_j n_ij / (p_i + p_j), which never lowers the likelihood (Hunter 2004)."""
    total_wins = wins.sum(axis=2)
    p = np.ones(total_wins.shape)
    for iteration in range(1, max_iter + 1):
        denominator = (games / (p[:, :, None] + p[:, None, :])).sum(axis=2)
        new = total_wins / denominator
        new /= np.exp(np.log(new).mean(axis=1, keepdims=True))  # fix the free scale: geometric mean 1
        change = np.abs(np.log(new) - np.log(p)).max()
        p = new
        if change < tol:
            return np.log(p), iteration
    raise MetricError(
        f"bradley_terry: the MM iterations did not converge in {max_iter} steps (last change "
        f"{change:.2e}); raise max_iter, or add a prior if some model wins almost everything"
    )


def bradley_terry(
    battles: Iterable[Battle | tuple[Hashable, Hashable, str]],
    *,
    prior: float = 0.0,
    scale: float = 400.0,
    base: float = 10.0,
    initial: float = 1000.0,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    max_iter: int = 10_000,
    tol: float = 1e-10,
) -> Ratings:
    """Bradley-Terry ratings (maximum likelihood by MM, ties as half wins) on the Elo scale:
    rating = scale * log_base(p) + initial, with the mean rating equal to `initial`.

    battles: (model_a, model_b, winner) with winner "A", "B" or "tie" (`Battle`s, e.g. from
        `judge_all`). Order does not matter.
    prior: pseudo-games, split as ties, added to every pair that met. 0 (default) is the plain
        MLE, which does not exist when some group of models never loses (or never wins)
        against the rest; a small prior (e.g. 1) keeps ratings finite and shrinks them toward
        each other.
    bootstrap: rounds of resampling battles with replacement and refitting, for percentile
        `intervals` at `confidence`; `seed` fixes the draws.
    """
    models, ia, ib, score = _check_battles(battles, "bradley_terry")
    _check_common(scale, base, initial, confidence, bootstrap)
    if not np.isfinite(prior) or prior < 0:
        raise MetricError(f"bradley_terry: prior must be >= 0 pseudo-games, got {prior}")
    m = len(models)

    def tables(weights: np.ndarray) -> np.ndarray:
        """wins[r, i, j]: points model i took from model j when battle n is counted weights[r, n]
        times (all ones for the data as given, draw counts for a bootstrap round)."""
        cells = np.concatenate([ia * m + ib, ib * m + ia])
        points = np.concatenate([score, 1.0 - score])
        return np.stack([np.bincount(cells, np.tile(w, 2) * points, minlength=m * m).reshape(m, m) for w in weights])

    wins = tables(np.ones((1, len(score))))
    met = (wins[0] + wins[0].T) > 0
    pseudo = prior / 2.0 * met  # prior games per pair that met, half a win each way
    # With a prior every pair that met has points both ways, so only "never met" remains possible.
    problem = _win_graph_problem(wins[0] + pseudo, models)
    if problem is not None:
        advice = (
            "collect battles that link the groups"
            if "never met" in problem
            else "pass prior=1 (or more) pseudo-games, or collect more battles"
        )
        raise MetricError(f"bradley_terry: no finite maximum-likelihood ratings: {problem}; {advice}")
    log_p, iterations = _mm_fit(wins + pseudo, wins + wins.transpose(0, 2, 1) + 2 * pseudo, max_iter, tol)
    to_rating = scale / np.log(base)
    ratings = {model: float(initial + to_rating * log_p[0, i]) for i, model in enumerate(models)}

    intervals = None
    if bootstrap:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(len(score), np.full(len(score), 1.0 / len(score)), size=bootstrap).astype(float)
        boot_wins = tables(counts)
        if prior == 0:
            for r in range(bootstrap):
                problem = _win_graph_problem(boot_wins[r], models)
                if problem is not None:
                    raise MetricError(
                        f"bradley_terry: bootstrap round {r} has no finite ratings ({problem}); pass "
                        "prior=1 (or more) so that every resample can be fitted"
                    )
        boot_log_p, _ = _mm_fit(
            boot_wins + pseudo, boot_wins + boot_wins.transpose(0, 2, 1) + 2 * pseudo, max_iter, tol
        )
        intervals = _intervals(initial + to_rating * boot_log_p, models, confidence)

    settings = {
        "method": "bradley-terry MLE (MM algorithm)",
        "ties": "half a win each",
        "prior": prior,
        "scale": scale,
        "base": base,
        "initial": initial,
        "anchor": "mean rating = initial",
        "iterations": iterations,
        "bootstrap": bootstrap,
        "confidence": confidence if bootstrap else None,
        "seed": seed if bootstrap else None,
    }
    return Ratings(ratings, len(score), intervals, settings)


def _elo_run(
    ia: np.ndarray, ib: np.ndarray, score: np.ndarray, m: int, k: float, scale: float, base: float, initial: float
) -> np.ndarray:
    """Online Elo over battle sequences in parallel: ia, ib, score are (R, T), one sequence per
    row; returns final ratings (R, M). Rows advance together one battle at a time."""
    rounds = ia.shape[0]
    ratings = np.full((rounds, m), float(initial))
    rows = np.arange(rounds)
    for t in range(ia.shape[1]):
        a, b = ia[:, t], ib[:, t]
        expected = 1.0 / (1.0 + base ** ((ratings[rows, b] - ratings[rows, a]) / scale))
        step = k * (score[:, t] - expected)
        ratings[rows, a] += step
        ratings[rows, b] -= step
    return ratings


def elo_ratings(
    battles: Iterable[Battle | tuple[Hashable, Hashable, str]],
    *,
    k: float = 4.0,
    scale: float = 400.0,
    base: float = 10.0,
    initial: float = 1000.0,
    bootstrap: int = 0,
    bootstrap_method: str = "resample",
    confidence: float = 0.95,
    seed: int = 0,
) -> Ratings:
    """Online Elo ratings (Elo 1978), battles applied in the order given.

    After each battle both ratings move by K * (S - E), S the score of model_a (1 win, 0.5 tie,
    0 loss) and E = 1 / (1 + base^((R_b - R_a) / scale)) its expected score; the sum of
    ratings never changes. K=4 is the Chatbot Arena setting, made for tens of thousands of
    battles; with a few hundred, a larger K (16-32, chess's range) lets ratings move far
    enough, at the price of more noise.

    bootstrap: rounds for percentile `intervals` at `confidence`; bootstrap_method "resample"
        draws battles with replacement (in a new order), "shuffle" only reorders them, which
        measures the order dependence alone. `seed` fixes the draws.
    """
    models, ia, ib, score = _check_battles(battles, "elo_ratings")
    _check_common(scale, base, initial, confidence, bootstrap)
    if not k > 0:
        raise MetricError(f"elo_ratings: k (the step size) must be > 0, got {k}")
    if bootstrap_method not in ("resample", "shuffle"):
        raise MetricError(f"elo_ratings: bootstrap_method {bootstrap_method!r} is unknown; accepted: resample, shuffle")
    m = len(models)
    final = _elo_run(ia[None], ib[None], score[None], m, k, scale, base, initial)[0]
    ratings = {model: float(final[i]) for i, model in enumerate(models)}

    intervals = None
    if bootstrap:
        rng = np.random.default_rng(seed)
        n = len(score)
        if bootstrap_method == "resample":
            order = rng.integers(0, n, size=(bootstrap, n))
        else:
            order = np.argsort(rng.random((bootstrap, n)), axis=1)
        samples = _elo_run(ia[order], ib[order], score[order], m, k, scale, base, initial)
        intervals = _intervals(samples, models, confidence)

    settings = {
        "method": "online elo",
        "k": k,
        "scale": scale,
        "base": base,
        "initial": initial,
        "order": "as given",
        "bootstrap": bootstrap,
        "bootstrap_method": bootstrap_method if bootstrap else None,
        "confidence": confidence if bootstrap else None,
        "seed": seed if bootstrap else None,
    }
    return Ratings(ratings, len(score), intervals, settings)


# --------------------------------------------------------------------------------- agreement
def cohen_kappa(
    rater_a: Sequence[Hashable],
    rater_b: Sequence[Hashable],
    *,
    labels: Sequence[Hashable] | None = None,
    weights: str | None = None,
) -> MetricResult:
    """Cohen's kappa (Cohen 1960) between two raters' labels of the same items, e.g. a judge's
    verdicts and human ones: (p_o - p_e) / (1 - p_e), observed agreement against the
    agreement expected if each rater labelled at random with their own label frequencies.

    1 is perfect agreement, 0 chance level, negative worse than chance. `weights` "linear" or
    "quadratic" gives weighted kappa (Cohen 1968) for ordered labels (e.g. 1-5 scores):
    disagreements cost |i - j| or (i - j)^2 by their distance in `labels` order (default:
    sorted). `score` is kappa; `details` has kappa, observed_agreement, expected_agreement.
    """
    a, b = list(rater_a), list(rater_b)
    if isinstance(rater_a, str) or isinstance(rater_b, str):
        raise MetricError("cohen_kappa: pass each rater's labels as a list, not a single string")
    if not a:
        raise MetricError("cohen_kappa: no labels given; pass one label per item from each rater")
    if len(a) != len(b):
        raise MetricError(
            f"cohen_kappa: rater_a labelled {len(a)} items but rater_b {len(b)}; they must label the same items"
        )
    if weights not in (None, "linear", "quadratic"):
        raise MetricError(f"cohen_kappa: weights {weights!r} is unknown; accepted: None, 'linear', 'quadratic'")
    if labels is None:
        try:
            labels = sorted(set(a) | set(b))
        except TypeError as err:
            raise MetricError(
                "cohen_kappa: labels of different types cannot be ordered; pass labels=[...] in the order you want"
            ) from err
    labels = list(labels)
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise MetricError("cohen_kappa: labels has duplicates")
    stray = sorted({repr(x) for x in a + b if x not in index})
    if stray:
        raise MetricError(f"cohen_kappa: label(s) {', '.join(stray[:5])} are not in labels={labels!r}")

    c = len(labels)
    observed = np.zeros((c, c))
    np.add.at(observed, ([index[x] for x in a], [index[x] for x in b]), 1.0)
    observed /= len(a)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))  # independent raters, same marginals
    distance = np.abs(np.subtract.outer(np.arange(c), np.arange(c))).astype(float)
    cost = {None: (distance > 0).astype(float), "linear": distance, "quadratic": distance**2}[weights]
    expected_cost = float((cost * expected).sum())
    if expected_cost == 0:
        raise MetricError(
            "cohen_kappa: undefined when chance agreement is 1, i.e. both raters gave every item the "
            f"same single label ({labels[int(np.argmax(observed.sum(axis=1)))]!r}); there is no "
            "variation to agree on"
        )
    kappa = 1.0 - float((cost * observed).sum()) / expected_cost
    details = {
        "kappa": kappa,
        "observed_agreement": float(np.trace(observed)),
        "expected_agreement": float(np.trace(expected)),
    }
    settings = {"weights": weights, "labels": labels, "num_items": len(a)}
    return MetricResult("cohen_kappa", kappa, details, settings)


__all__ = [
    "Battle",
    "DEFAULT_CRITERIA",
    "JudgedBattles",
    "PairJudgment",
    "Ratings",
    "VERDICTS",
    "bradley_terry",
    "cohen_kappa",
    "combine_orders",
    "elo_ratings",
    "judge_all",
    "judge_pair",
    "pairwise_prompt",
    "parse_verdict",
]
