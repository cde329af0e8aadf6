"""Moderation heads: per-category precision and recall on the held-out set in tests/data/safety
(written apart from the training set shipped in the package), the response shape, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genforge.safety.embedding_heads import HeadSet, binary_metrics
from genforge.safety.moderation import (
    CATEGORIES,
    OPENAI_CATEGORIES,
    Moderator,
    default_moderator,
    load_moderation_set,
    openai_response,
)

pytestmark = pytest.mark.usefixtures("one_thread")

HELD_OUT = Path(__file__).parent / "data" / "safety" / "moderation_heldout.jsonl"


def test_held_out_precision_and_recall_per_category():
    moderator = default_moderator()
    records = [json.loads(line) for line in HELD_OUT.read_text().splitlines()]
    assert not {r["text"] for r in load_moderation_set()} & {r["text"] for r in records}
    results = moderator.moderate_many([r["text"] for r in records])
    for category in CATEGORIES:
        labels = [int(category in r["categories"]) for r in records]
        metrics = binary_metrics([r.scores[category] for r in results], labels, moderator.thresholds[category])
        print(f"held-out {category}: {metrics}")
        assert metrics["positives"] >= 10
        assert metrics["roc_auc"] >= 0.95 and metrics["recall"] >= 0.8 and metrics["precision"] >= 0.6, category
    any_labels = [int(bool(r["categories"])) for r in records]
    flagged = binary_metrics([float(r.flagged) for r in results], any_labels, 0.5)
    assert flagged["recall"] >= 0.9 and flagged["precision"] >= 0.85


def test_openai_response_shape_has_every_openai_category():
    result = default_moderator().moderate("I will hurt him badly tomorrow with a knife.")
    body = openai_response([result])
    assert body["id"].startswith("modr-") and len(body["results"]) == 1
    entry = body["results"][0]
    assert set(entry["categories"]) == set(OPENAI_CATEGORIES) == set(entry["category_scores"])
    assert entry["flagged"] and entry["categories"]["violence"]
    assert entry["categories"]["violence/graphic"] is False and entry["category_scores"]["harassment"] == 0.0


def test_whitespace_and_bad_input():
    moderator = default_moderator()
    result = moderator.moderate("   \n\t ")
    assert not result.flagged and result.notes == ["empty or whitespace-only input"]
    with pytest.raises(TypeError, match="decode bytes first"):
        moderator.moderate_many([b"x"])
    with pytest.raises(ValueError, match="unknown moderation category 'spam'"):
        Moderator(thresholds={"spam": 0.5})


def test_harm_inside_a_long_text_is_not_averaged_away():
    benign = "The weather was mild and the market was busy. " * 200
    text = benign + "I am going to stab my neighbour tonight. " + benign
    result = default_moderator().moderate(text)
    assert result.categories["violence"], result.scores


@pytest.mark.slow
def test_the_shipped_heads_are_what_the_training_command_writes():
    from genforge.safety.train_guards import train_moderation_heads

    shipped = HeadSet.load(Path(__file__).parents[1] / "src/genforge/safety/data/moderation_heads.json")
    retrained = train_moderation_heads()
    assert retrained.data == shipped.data, "the training set changed: run python -m genforge.safety.train_guards"
    for category in CATEGORIES:
        assert abs(retrained.heads[category].threshold - shipped.heads[category].threshold) < 1e-3
        np.testing.assert_allclose(retrained.heads[category].weights, shipped.heads[category].weights, atol=1e-3)
