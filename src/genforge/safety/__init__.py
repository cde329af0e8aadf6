"""Safety and privacy: guardrails (prompt injection, moderation, PII), differential privacy in
training and membership inference. See docs/safety.md."""
