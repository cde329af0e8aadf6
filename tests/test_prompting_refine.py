"""Self-refine: draft -> critique -> revise, and each stop criterion."""

from __future__ import annotations

import pytest
from prompting_fakes import ScriptedChatModel

from genforge.prompting import SelfRefine, read_score


def test_read_score():
    assert read_score("Too long.\nScore: 7/10") == 7.0
    assert read_score("score is 4, then Score = 8.5") == 8.5
    assert read_score("fine") is None


def test_stops_when_the_critic_says_done():
    model = ScriptedChatModel(
        ["draft one", "Too vague. Score: 4", "draft two", "Clear now. NO ISSUES. Score: 9"], tokens_per_reply=5
    )
    result = SelfRefine(model).run("Write a slogan for tea.")
    assert result.output == "draft two" and result.stop_reason == "done"
    assert [(r.draft, r.score, r.revision) for r in result.rounds] == [
        ("draft one", 4.0, "draft two"),
        ("draft two", 9.0, None),
    ]
    assert result.completion_tokens == 20
    critique = model.calls[1][1][0]["content"]
    assert "Draft:\ndraft one" in critique and "say NO ISSUES" in critique


def test_stops_at_the_score_threshold_and_shows_history_when_revising():
    model = ScriptedChatModel(["v1", "Weak. Score: 3", "v2", "Better. Score: 6", "v3", "Good. Score: 8"])
    result = SelfRefine(model, score_threshold=8, max_rounds=5).run("task")
    assert result.output == "v3" and result.stop_reason == "score"
    second_revision = model.calls[4][1][0]["content"]
    assert "Earlier draft:\nv1\nFeedback on it:\nWeak. Score: 3" in second_revision
    assert "Current draft:\nv2\n\nFeedback:\nBetter. Score: 6" in second_revision


def test_stops_when_a_revision_changes_nothing():
    model = ScriptedChatModel(["the draft", "Add a verb. Score: 5", "  the   draft\n"])
    result = SelfRefine(model).run("task")
    assert result.stop_reason == "no_change" and result.output == "the draft"


def test_stops_at_the_round_budget_and_the_token_budget():
    model = ScriptedChatModel(["a", "fix 1", "b", "fix 2", "c"])
    result = SelfRefine(model, max_rounds=2).run("task")
    assert result.stop_reason == "budget" and result.output == "c" and len(result.rounds) == 2
    tokens = ScriptedChatModel(["a", "fix", "b"], tokens_per_reply=10)
    result = SelfRefine(tokens, max_rounds=5, max_tokens_total=25).run("task")
    assert result.stop_reason == "tokens" and result.output == "b" and result.completion_tokens == 30


def test_a_function_critic_and_a_given_draft():
    def critic(task, draft):
        return "NO ISSUES" if draft.endswith("!") else "It needs an exclamation mark."

    model = ScriptedChatModel(["Tea time!"])
    result = SelfRefine(model, critic=critic).run("Write a slogan.", draft="Tea time")
    assert result.output == "Tea time!" and result.stop_reason == "done"
    assert len(model.calls) == 1  # only the revision; no draft call, no critique calls


def test_bad_settings_are_refused():
    model = ScriptedChatModel()
    with pytest.raises(ValueError, match="needs \\['tone'\\]"):
        SelfRefine(model, feedback_template="{{ draft }} {{ tone }}")
    with pytest.raises(ValueError, match="max_rounds"):
        SelfRefine(model, max_rounds=-1)
    with pytest.raises(ValueError, match="needs a task"):
        SelfRefine(model).run("  ")
