"""Reference-based text metrics, each computed by the library the field trusts for it.

- BLEU (Papineni et al. 2002) and chrF (Popović 2015) through `sacrebleu` (Post 2018), whose
  signature string says exactly which tokenizer, smoothing and casing produced a number.
- ROUGE-1/2/L/Lsum (Lin 2004) through Google's `rouge-score`, the implementation behind most
  summarisation papers since 2020.
- SQuAD exact match and token F1 (Rajpurkar et al. 2016), with the normalisation of the
  official evaluation script, written out here because it is a dozen lines and the script is
  not a package.
- distinct-n (Li et al. 2016) and self-BLEU (Zhu et al. 2018, Texygen): diversity of a set of
  generations, which need no reference.

Every function takes `predictions` (a list of strings) and, where it compares against
references, `references`: one string per prediction, or a list of strings per prediction
(the number may vary). Every function returns a `MetricResult` that records the settings
used, so that a number can always be traced back to how it was computed.

Scales follow the reference implementations, so numbers compare directly with papers:
BLEU, chrF, self-BLEU and SQuAD are 0-100; ROUGE and distinct-n are 0-1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from sacrebleu.metrics import BLEU, CHRF

from .base import MetricError, MetricResult, check_pairs, check_predictions
from .meteor import meteor

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference slot, padded with None where a
    prediction has fewer references (sacrebleu skips None, allowing variable counts)."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


# ------------------------------------------------------------------------------ BLEU, chrF
def bleu(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
    smooth_method: str = "exp",
    max_ngram_order: int = 4,
) -> MetricResult:
    """Corpus BLEU (Papineni et al. 2002) through sacrebleu, on 0-100; `score` is BLEU.

    Defaults are sacrebleu's (13a tokenizer, exponential smoothing, n-grams up to 4), the
    settings WMT reports. `details` carries the n-gram precisions and the brevity penalty;
    `settings["signature"]` is sacrebleu's reproducibility signature.
    """
    predictions, grouped = check_pairs(predictions, references, "bleu")
    if smooth_method not in BLEU.SMOOTH_DEFAULTS:
        accepted = ", ".join(BLEU.SMOOTH_DEFAULTS)
        raise MetricError(f"bleu: smooth_method {smooth_method!r} is unknown; accepted: {accepted}")
    if tokenize not in BLEU.TOKENIZERS:
        raise MetricError(f"bleu: tokenize {tokenize!r} is unknown; accepted: {', '.join(BLEU.TOKENIZERS)}")
    metric = BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method, max_ngram_order=max_ngram_order)
    result = metric.corpus_score(predictions, _reference_streams(grouped))
    details = {
        "bleu": result.score,
        "brevity_penalty": result.bp,
        "length_ratio": result.ratio,
        "hypothesis_length": result.sys_len,
        "reference_length": result.ref_len,
    }
    details |= {f"precision_{n + 1}": p for n, p in enumerate(result.precisions)}
    settings = {
        "tokenize": tokenize,
        "lowercase": lowercase,
        "smooth_method": smooth_method,
        "max_ngram_order": max_ngram_order,
        "signature": str(metric.get_signature()),
    }
    return MetricResult("bleu", result.score, details, settings)


def chrf(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    char_order: int = 6,
    word_order: int = 0,
    beta: int = 2,
    lowercase: bool = False,
    whitespace: bool = False,
) -> MetricResult:
    """Corpus chrF (Popović 2015) through sacrebleu, on 0-100; `score` is chrF.

    Character n-gram F-score with recall weighted `beta` times precision. `word_order=2`
    adds word bigrams: chrF++ (Popović 2017). Defaults are sacrebleu's chrF2.
    """
    predictions, grouped = check_pairs(predictions, references, "chrf")
    metric = CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase, whitespace=whitespace)
    result = metric.corpus_score(predictions, _reference_streams(grouped))
    name = "chrf++" if word_order == 2 else "chrf"
    settings = {
        "char_order": char_order,
        "word_order": word_order,
        "beta": beta,
        "lowercase": lowercase,
        "whitespace": whitespace,
        "signature": str(metric.get_signature()),
    }
    return MetricResult(name, result.score, {name: result.score}, settings)


# ---------------------------------------------------------------------------------- ROUGE
def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    rouge_types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = False,
) -> MetricResult:
    """ROUGE (Lin 2004) through Google's `rouge-score`, mean over predictions, on 0-1.

    `details` has, for each type, the mean F1 under its own name (`rougeL`) and the mean
    precision and recall (`rougeL_precision`, `rougeL_recall`); `score` is the mean F1 of
    the first of `rouge_types`. With several references a prediction takes, per type, the
    reference with the best F1 (`RougeScorer.score_multi`).

    rougeLsum is summary-level LCS: it splits both texts into sentences on newlines, as
    rouge-score does, so put one sentence per line; without newlines it equals rougeL.
    rouge-score's tokenizer lowercases and keeps only [a-z0-9] runs: text in other scripts
    scores 0. `use_stemmer` applies the Porter stemmer (cats -> cat).
    """
    predictions, grouped = check_pairs(predictions, references, "rouge")
    rouge_types = [rouge_types] if isinstance(rouge_types, str) else list(rouge_types)
    unknown = [t for t in rouge_types if not re.fullmatch(r"rouge([1-9]|L|Lsum)", t)]
    if unknown or not rouge_types:
        raise MetricError(f"rouge: unknown rouge type(s) {unknown}; accepted: rouge1 ... rouge9, rougeL, rougeLsum")
    from rouge_score import rouge_scorer  # imports nltk, about a second: only when ROUGE is asked for

    scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer)
    totals = Counter()
    for prediction, refs in zip(predictions, grouped):
        # rouge-score's argument order is (target, prediction).
        scores = scorer.score(refs[0], prediction) if len(refs) == 1 else scorer.score_multi(refs, prediction)
        for kind, s in scores.items():
            totals[kind] += s.fmeasure
            totals[f"{kind}_precision"] += s.precision
            totals[f"{kind}_recall"] += s.recall
    details = {
        key: totals[key] / len(predictions)
        for key in [k for kind in rouge_types for k in (kind, f"{kind}_precision", f"{kind}_recall")]
    }
    settings = {
        "rouge_types": rouge_types,
        "use_stemmer": use_stemmer,
        "aggregate": "mean",
        "multiple_references": "best F1 per type",
    }
    return MetricResult("rouge", details[rouge_types[0]], details, settings)


# ---------------------------------------------------------------------------------- SQuAD
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lowercase, drop ASCII punctuation, drop the
    articles a/an/the, collapse whitespace (in that order, as evaluate-v2.0.py does)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1_score(prediction: str, gold: str) -> float:
    """F1 of the bag of normalised tokens shared by prediction and gold.

    When either side normalises to no tokens (an unanswerable question's empty gold, or an
    answer that is only an article), F1 is 1 if both are empty and 0 otherwise: the SQuAD
    v2.0 script's rule (v1.1 scores both-empty as 0).
    """
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    shared = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred_tokens), shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> MetricResult:
    """SQuAD exact match and token F1 (Rajpurkar et al. 2016, 2018), on 0-100 as the official
    script prints them; `score` is F1, `details` has `exact_match` and `f1`.

    Each prediction takes its best score over its gold answers. As in evaluate-v2.0.py, gold
    answers that normalise to nothing are dropped when the question has others, and a
    question whose golds are all empty is unanswerable: only an empty prediction scores.
    """
    predictions, grouped = check_pairs(predictions, references, "squad")
    em_total = f1_total = 0.0
    for prediction, golds in zip(predictions, grouped):
        golds = [g for g in golds if normalize_answer(g)] or [""]
        em_total += max(exact_match_score(prediction, g) for g in golds)
        f1_total += max(token_f1_score(prediction, g) for g in golds)
    details = {"exact_match": 100.0 * em_total / len(predictions), "f1": 100.0 * f1_total / len(predictions)}
    settings = {
        "normalization": "lowercase, strip punctuation, drop a/an/the, collapse whitespace",
        "multiple_references": "max over gold answers",
        "scale": "0-100",
    }
    return MetricResult("squad", details["f1"], details, settings)


# ------------------------------------------------------------------------------- diversity
def distinct_n(
    predictions: Sequence[str],
    *,
    orders: Sequence[int] = (1, 2),
    tokenizer: Callable[[str], list[str]] | None = None,
    lowercase: bool = False,
) -> MetricResult:
    """distinct-n (Li et al. 2016): unique n-grams / all n-grams over the whole set of
    predictions, on 0-1; `details` has `distinct-1`, `distinct-2`, ...; `score` is the first.

    Tokens are whitespace-separated words unless `tokenizer` is given. n-grams never cross
    predictions. A set with no n-gram of some order (all predictions shorter than n) scores
    0 for that order. The ratio falls as the set grows, so compare sets of equal size.
    """
    predictions = check_predictions(predictions, "distinct_n")
    orders = [orders] if isinstance(orders, int) else list(orders)
    if not orders or any(not isinstance(n, int) or n < 1 for n in orders):
        raise MetricError(f"distinct_n: orders must be positive integers, got {orders}")
    split = tokenizer or str.split
    token_lists = [split(p.lower() if lowercase else p) for p in predictions]
    details = {}
    for n in orders:
        ngrams = [tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
        details[f"distinct-{n}"] = len(set(ngrams)) / len(ngrams) if ngrams else 0.0
    tokenizer_name = "whitespace" if tokenizer is None else getattr(tokenizer, "__name__", "custom")
    settings = {"orders": orders, "tokenizer": tokenizer_name, "lowercase": lowercase}
    return MetricResult("distinct_n", details[f"distinct-{orders[0]}"], details, settings)


def self_bleu(predictions: Sequence[str], *, tokenize: str = "13a", max_ngram_order: int = 4) -> MetricResult:
    """Self-BLEU (Zhu et al. 2018): the mean sentence BLEU of each prediction against all the
    others as references, through sacrebleu, on 0-100. Higher means less diverse.

    Sentence BLEU uses sacrebleu's sentence settings (exponential smoothing, effective
    order). The cost is quadratic in the number of predictions; sample a subset of a
    large set.
    """
    predictions = check_predictions(predictions, "self_bleu")
    if len(predictions) < 2:
        raise MetricError("self_bleu: needs at least 2 predictions (each is scored against the others)")
    if tokenize not in BLEU.TOKENIZERS:
        raise MetricError(f"self_bleu: tokenize {tokenize!r} is unknown; accepted: {', '.join(BLEU.TOKENIZERS)}")
    metric = BLEU(tokenize=tokenize, effective_order=True, max_ngram_order=max_ngram_order)
    scores = [
        metric.sentence_score(prediction, predictions[:i] + predictions[i + 1 :]).score
        for i, prediction in enumerate(predictions)
    ]
    mean = sum(scores) / len(scores)
    settings = {
        "tokenize": tokenize,
        "max_ngram_order": max_ngram_order,
        "aggregate": "mean sentence BLEU",
        "signature": str(metric.get_signature()),
    }
    return MetricResult("self_bleu", mean, {"self_bleu": mean}, settings)


# ------------------------------------------------------------------------------ dispatcher
# name -> (function, needs references)
METRICS: dict[str, tuple[Callable[..., MetricResult], bool]] = {
    "bleu": (bleu, True),
    "chrf": (chrf, True),
    "rouge": (rouge, True),
    "meteor": (meteor, True),
    "squad": (squad, True),
    "distinct_n": (distinct_n, False),
    "self_bleu": (self_bleu, False),
}


def compute(
    names: str | Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]] | None = None,
) -> dict[str, MetricResult]:
    """Several metrics by name with their default settings: `{name: MetricResult}`.

    Accepted names are the keys of `METRICS`: bleu, chrf, rouge, meteor, squad,
    distinct_n, self_bleu. References are needed only by the reference-based ones. Call the functions
    themselves to change settings.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise MetricError(f"compute: no metric named; accepted: {', '.join(METRICS)}")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"compute: unknown metric(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(METRICS)}")
    results = {}
    for name in dict.fromkeys(names):
        function, needs_references = METRICS[name]
        results[name] = function(predictions, references) if needs_references else function(predictions)
    return results


__all__ = [
    "METRICS",
    "ROUGE_TYPES",
    "bleu",
    "chrf",
    "compute",
    "distinct_n",
    "exact_match_score",
    "normalize_answer",
    "rouge",
    "self_bleu",
    "squad",
    "token_f1_score",
]
