"""Safety and privacy: guardrails, differential privacy in training, membership inference,
red-teaming, bias measurement and model cards. See docs/safety.md.

- `injection`, `moderation`, `guards`: prompt-injection and jailbreak detection, moderation
  categories, and the guards `genforge serve --guard` runs on requests and responses.
- `pii`, `pii_ner`: personal data found (validated patterns, an optional name model on
  genforge's BERT) and redacted (mask, placeholder, pseudonym, reversible with a vault).
- `privacy`: DP-SGD (per-sample gradients, clipping, noise, Poisson sampling) and its RDP
  accountant, wired into the trainer through its `privacy=` seam.
- `membership`: membership-inference attacks (loss threshold, reference-calibrated, LiRA).
- `redteam`: attack prompts (templates x goals x mutations) against any chat model, scored.
- `bias`: WEAT/SEAT, CrowS-Pairs-style pseudo-log-likelihood, counterfactual log-likelihoods.
- `model_card`: a Hugging Face model card from a model directory and its run records.
"""

from .bias import CLASSIC_TESTS, counterfactual_loglikelihoods, crows_pairs, run_association_test, weat
from .guards import GuardConfig, Guards, OutputFilter, RedactingLogFilter
from .injection import InjectionDetector, InjectionResult, quote_as_data, scan_injection, screen_chunks
from .membership import (
    MembershipError,
    evaluate_attack,
    lira_scores,
    membership_inference,
    plot_roc,
    sequence_losses,
)
from .model_card import build_model_card, write_model_card
from .moderation import CATEGORIES, ModerationResult, Moderator, moderate
from .obfuscation import reveal
from .pii import (
    PII_TYPES,
    REDACTION_STYLES,
    Finding,
    PIIDetector,
    Redaction,
    Redactor,
    Vault,
    detect_pii,
    redact_pii,
    restore,
)
from .privacy import (
    DPSGD,
    DPConfig,
    PrivacyError,
    RDPAccountant,
    gdp_epsilon,
    noise_multiplier_for_epsilon,
    per_sample_gradients,
)
from .redteam import (
    AllOf,
    Attack,
    Goal,
    JudgeScorer,
    RedTeamReport,
    RefusalScorer,
    Scorer,
    build_attacks,
    run_redteam,
)

__all__ = [
    "moderate",
    "ModerationResult",
    "Moderator",
    "CATEGORIES",
    "quote_as_data",
    "screen_chunks",
    "scan_injection",
    "InjectionResult",
    "InjectionDetector",
    "reveal",
    "RedactingLogFilter",
    "OutputFilter",
    "Guards",
    "GuardConfig",
    "CLASSIC_TESTS",
    "DPSGD",
    "PII_TYPES",
    "REDACTION_STYLES",
    "AllOf",
    "Attack",
    "DPConfig",
    "Finding",
    "Goal",
    "JudgeScorer",
    "MembershipError",
    "PIIDetector",
    "PrivacyError",
    "RDPAccountant",
    "RedTeamReport",
    "Redaction",
    "Redactor",
    "RefusalScorer",
    "Scorer",
    "Vault",
    "build_attacks",
    "build_model_card",
    "counterfactual_loglikelihoods",
    "crows_pairs",
    "detect_pii",
    "evaluate_attack",
    "gdp_epsilon",
    "lira_scores",
    "membership_inference",
    "noise_multiplier_for_epsilon",
    "per_sample_gradients",
    "plot_roc",
    "redact_pii",
    "restore",
    "run_association_test",
    "run_redteam",
    "sequence_losses",
    "weat",
    "write_model_card",
]
