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

import importlib

# Each public name and its module, imported on first use: `genforge serve` and the training
# commands load the guards or DP-SGD alone, not the attacks' scipy and matplotlib.
_EXPORTS = {
    "CLASSIC_TESTS": "bias",
    "counterfactual_loglikelihoods": "bias",
    "crows_pairs": "bias",
    "run_association_test": "bias",
    "weat": "bias",
    "GuardConfig": "guards",
    "Guards": "guards",
    "OutputFilter": "guards",
    "RedactingLogFilter": "guards",
    "InjectionDetector": "injection",
    "InjectionResult": "injection",
    "quote_as_data": "injection",
    "scan_injection": "injection",
    "screen_chunks": "injection",
    "MembershipError": "membership",
    "evaluate_attack": "membership",
    "lira_scores": "membership",
    "membership_inference": "membership",
    "plot_roc": "membership",
    "sequence_losses": "membership",
    "build_model_card": "model_card",
    "write_model_card": "model_card",
    "CATEGORIES": "moderation",
    "ModerationResult": "moderation",
    "Moderator": "moderation",
    "moderate": "moderation",
    "reveal": "obfuscation",
    "PII_TYPES": "pii",
    "REDACTION_STYLES": "pii",
    "Finding": "pii",
    "PIIDetector": "pii",
    "Redaction": "pii",
    "Redactor": "pii",
    "Vault": "pii",
    "detect_pii": "pii",
    "redact_pii": "pii",
    "restore": "pii",
    "DPSGD": "privacy",
    "DPConfig": "privacy",
    "PrivacyError": "privacy",
    "RDPAccountant": "privacy",
    "gdp_epsilon": "privacy",
    "noise_multiplier_for_epsilon": "privacy",
    "per_sample_gradients": "privacy",
    "AllOf": "redteam",
    "Attack": "redteam",
    "Goal": "redteam",
    "JudgeScorer": "redteam",
    "RedTeamReport": "redteam",
    "RefusalScorer": "redteam",
    "Scorer": "redteam",
    "build_attacks": "redteam",
    "run_redteam": "redteam",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
