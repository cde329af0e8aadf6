"""Fusion and MMR on cases small enough to compute by hand."""

from __future__ import annotations

import numpy as np
import pytest

from genforge.rag.retrieve import mmr, reciprocal_rank_fusion, weighted_score_fusion


def test_rrf_matches_hand_computation():
    # k = 60: a = 1/61 + 1/63, b = 1/62 + 1/61, c = 1/63, d = 1/62
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["b", "d", "a"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 63)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 63)
    assert fused["d"] == pytest.approx(1 / 62)
    assert [item for item, _ in reciprocal_rank_fusion([["a", "b", "c"], ["b", "d", "a"]])] == ["b", "a", "d", "c"]


def test_weighted_fusion_min_max_normalises_each_list():
    # dense: x=1, y=0 after normalisation; sparse: y=1, z=0.5, x=0.
    fused = dict(weighted_score_fusion([{"x": 0.9, "y": 0.5}, {"y": 12.0, "z": 7.0, "x": 2.0}], [0.7, 0.3]))
    assert fused == pytest.approx({"x": 0.7, "y": 0.3, "z": 0.15})
    with pytest.raises(ValueError, match="one weight per list"):
        weighted_score_fusion([{"x": 1.0}], [0.5, 0.5])


def test_mmr_prefers_a_diverse_second_pick():
    q = np.array([1.0, 0.0])
    cands = np.array([[1.0, 0.0], [0.99, 0.141], [0.6, -0.8]])
    # Relevance: 1.0, ~0.990, 0.6. After picking 0, candidate 1 is nearly a copy of it (sim ~0.990)
    # and candidate 2 is not (sim 0.6). Pure relevance (lambda 1) keeps the near-copy second.
    assert mmr(q, cands, k=3, lambda_=1.0) == [0, 1, 2]
    # lambda 0.3: cand1 = 0.3*0.990 - 0.7*0.990 = -0.396; cand2 = 0.3*0.6 - 0.7*0.6 = -0.24 -> cand 2 wins.
    assert mmr(q, cands, k=2, lambda_=0.3) == [0, 2]
    with pytest.raises(ValueError, match="lambda"):
        mmr(q, cands, k=1, lambda_=1.5)
