"""Operations: canary/A-B routing, outcome logs and their A/B statistics, drift monitoring."""
