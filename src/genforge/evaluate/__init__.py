"""Evaluation: reference-based text metrics (BLEU, chrF, ROUGE, METEOR, SQuAD), BERTScore,
perplexity, classification and calibration, pass@k with sandboxed code execution, LLM-as-judge
aggregation (position swap, Bradley-Terry, Elo, Cohen's kappa), A/B statistics and a benchmark
harness for lm-evaluation-harness task YAML files. See
docs/evaluation.md for each metric's definition, settings and the reference implementation it
is checked against."""

from .base import MetricError, MetricResult
from .bertscore import BERTScorer, BERTScoreResult, IdfWeights, bertscore
from .classification import (
    CalibrationBin,
    CalibrationResult,
    calibration_from_confidences,
    classification_metrics,
    expected_calibration_error,
    reliability_diagram,
)
from .code_eval import (
    CodeEvalResult,
    ExecutionResult,
    evaluate_code,
    mean_pass_at_k,
    network_isolation,
    pass_at_k,
    run_candidate,
)
from .harness import (
    OUTPUT_TYPES,
    Task,
    TaskResult,
    evaluate,
    evaluate_task,
    load_task,
    loglikelihood,
    loglikelihood_rolling,
    results_table,
    write_results,
)
from .judge import (
    Battle,
    JudgedBattles,
    PairJudgment,
    Ratings,
    bradley_terry,
    cohen_kappa,
    combine_orders,
    elo_ratings,
    judge_all,
    judge_pair,
    pairwise_prompt,
    parse_verdict,
)
from .meteor import NoSynonyms, meteor, use_wordnet, wordnet_source
from .metrics import (
    METRICS,
    ROUGE_TYPES,
    bleu,
    chrf,
    compute,
    distinct_n,
    exact_match_score,
    normalize_answer,
    rouge,
    self_bleu,
    squad,
    token_f1_score,
)
from .perplexity import PerplexityResult, perplexity, perplexity_of_text, strided_windows
from .stats import (
    ConfidenceInterval,
    HypothesisTestResult,
    SampleSize,
    bootstrap_ci,
    bootstrap_difference_ci,
    power_two_proportions,
    sample_size_two_proportions,
    two_proportion_ztest,
    welch_t_test,
)

__all__ = [
    "METRICS", "ROUGE_TYPES", "BERTScoreResult", "BERTScorer", "CalibrationBin", "CalibrationResult", "IdfWeights",
    "MetricError", "MetricResult", "PerplexityResult", "bertscore", "bleu", "calibration_from_confidences", "chrf",
    "classification_metrics", "compute", "distinct_n", "exact_match_score", "expected_calibration_error",
    "normalize_answer", "perplexity", "perplexity_of_text", "reliability_diagram", "rouge", "self_bleu", "squad",
    "strided_windows", "token_f1_score",
    # METEOR
    "NoSynonyms", "meteor", "use_wordnet", "wordnet_source",
    # pass@k and the code sandbox
    "CodeEvalResult", "ExecutionResult", "evaluate_code", "mean_pass_at_k", "network_isolation", "pass_at_k",
    "run_candidate",
    # benchmark harness (lm-eval task YAML); genforge.evaluate.lm_eval_model registers genforge with lm_eval
    "OUTPUT_TYPES", "Task", "TaskResult", "evaluate", "evaluate_task", "load_task", "loglikelihood",
    "loglikelihood_rolling", "results_table", "write_results",
    # LLM-as-judge
    "Battle", "JudgedBattles", "PairJudgment", "Ratings", "bradley_terry", "cohen_kappa", "combine_orders",
    "elo_ratings", "judge_all", "judge_pair", "pairwise_prompt", "parse_verdict",
    # A/B statistics
    "ConfidenceInterval", "HypothesisTestResult", "SampleSize", "bootstrap_ci", "bootstrap_difference_ci",
    "power_two_proportions", "sample_size_two_proportions", "two_proportion_ztest", "welch_t_test",
]
