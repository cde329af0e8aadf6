"""Self-refine: draft, critique, revise, until the critic is satisfied or the budget is spent.

Madaan et al. 2023, "Self-Refine: Iterative Refinement with Self-Feedback": one model writes a
draft, then alternately gives itself specific, actionable feedback on the latest draft and
rewrites the draft to address it, with the earlier drafts and feedback in view so that it does
not repeat a mistake. Refinement stops on the first of:

- the critic says the draft is done (its feedback contains `done_phrase`, "NO ISSUES" by default),
- the critic's score ("Score: 8", read by `score_pattern`) reaches `score_threshold`,
- a revision comes back unchanged (white space aside): the model has nothing more to fix,
- the budget: `max_rounds` critique-and-revise rounds, or `max_tokens_total` completion tokens.

The critic may be the same model, another one, or a function `(task, draft) -> feedback text`
(an exact checker: a test runner, a validator), which is where self-refine is most reliable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..chat_models import ChatModel
from .templates import PromptTemplate

__all__ = ["RefineResult", "RefineRound", "SelfRefine", "read_score"]

DRAFT_TEMPLATE = "{{ task }}"
FEEDBACK_TEMPLATE = (
    "Task: {{ task }}\n\nDraft:\n{{ draft }}\n\n"
    "Review the draft against the task. List each concrete problem and how to fix it. "
    "End with a line 'Score: N' rating the draft from 0 to 10. "
    "If nothing needs to change, say {{ done_phrase }}."
)
REFINE_TEMPLATE = (
    "Task: {{ task }}\n\n"
    "{% for earlier in history %}Earlier draft:\n{{ earlier.draft }}\nFeedback on it:\n{{ earlier.feedback }}\n\n"
    "{% endfor %}"
    "Current draft:\n{{ draft }}\n\nFeedback:\n{{ feedback }}\n\n"
    "Rewrite the current draft so that it fixes every problem the feedback names, without bringing back "
    "earlier problems. Reply with the new draft only."
)

_SCORE = re.compile(r"\bscore\b\s*(?:is|of)?\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def read_score(feedback: str, pattern: re.Pattern | str = _SCORE) -> float | None:
    """The last score in the feedback ("Score: 7/10" -> 7.0), or None when it gives none."""
    matches = (
        list(re.compile(pattern).finditer(feedback)) if isinstance(pattern, str) else list(pattern.finditer(feedback))
    )
    return float(matches[-1].group(1)) if matches else None


@dataclass
class RefineRound:
    """One round: the draft reviewed, the feedback on it, its score (None if not given) and the
    revision made from it (None when the round stopped before revising)."""

    draft: str
    feedback: str
    score: float | None
    revision: str | None = None


@dataclass
class RefineResult:
    """The final text, every round, why refinement stopped, and the completion tokens spent."""

    output: str
    rounds: list[RefineRound] = field(default_factory=list)
    stop_reason: str = "budget"  # "done" | "score" | "no_change" | "budget" | "tokens"
    completion_tokens: int = 0


Critic = Callable[[str, str], str]


def _normalised(text: str) -> str:
    return " ".join(text.split())


@dataclass
class SelfRefine:
    """Self-refine with `model` writing and revising, and `critic` (default: `model`) reviewing.

    max_rounds: critique-and-revise rounds after the first draft.
    score_threshold: stop once the critic's score is at least this (None: scores do not stop it).
    max_tokens_total: a budget of completion tokens over every call (None: no budget).
    """

    model: ChatModel
    critic: ChatModel | Critic | None = None
    max_rounds: int = 3
    score_threshold: float | None = None
    done_phrase: str = "NO ISSUES"
    score_pattern: re.Pattern | str = _SCORE
    draft_template: PromptTemplate | str = DRAFT_TEMPLATE
    feedback_template: PromptTemplate | str = FEEDBACK_TEMPLATE
    refine_template: PromptTemplate | str = REFINE_TEMPLATE
    max_tokens: int = 512
    temperature: float = 0.0
    max_tokens_total: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_rounds, int) or self.max_rounds < 0:
            raise ValueError(f"max_rounds must be an integer >= 0, got {self.max_rounds!r}")
        if self.max_tokens_total is not None and self.max_tokens_total < 1:
            raise ValueError(f"max_tokens_total must be a positive integer or None, got {self.max_tokens_total!r}")
        variables = {
            "draft_template": ["task"],
            "feedback_template": ["task", "draft", "done_phrase"],
            "refine_template": ["task", "draft", "feedback", "history"],
        }
        for attribute, names in variables.items():
            value = getattr(self, attribute)
            if isinstance(value, str):
                value = PromptTemplate(value, name=attribute.removesuffix("_template"))
            elif not isinstance(value, PromptTemplate):
                raise ValueError(f"{attribute} must be a PromptTemplate or a Jinja string")
            extra = set(value.required) - set(names)
            if extra:
                raise ValueError(
                    f"{attribute} needs {sorted(extra)}; self-refine gives it only {names}"  # checked before any call
                )
            setattr(self, attribute, value)
        self._tokens = 0

    def _ask(self, model: ChatModel, template: PromptTemplate, **values) -> str:
        readable = {k: v for k, v in values.items() if k in template.declared}
        reply = model.chat(template.messages(**readable), max_tokens=self.max_tokens, temperature=self.temperature)
        self._tokens += reply.completion_tokens
        return reply.content.strip()

    def _critique(self, task: str, draft: str) -> str:
        critic = self.critic if self.critic is not None else self.model
        if hasattr(critic, "chat"):
            return self._ask(critic, self.feedback_template, task=task, draft=draft, done_phrase=self.done_phrase)
        if callable(critic):
            feedback = critic(task, draft)
            if not isinstance(feedback, str):
                raise ValueError(f"a critic function returns the feedback text, got {type(feedback).__name__}")
            return feedback
        raise ValueError(f"critic must be a ChatModel or a function (task, draft) -> feedback, got {critic!r}")

    def _over_budget(self) -> bool:
        return self.max_tokens_total is not None and self._tokens >= self.max_tokens_total

    def run(self, task: str, draft: str | None = None) -> RefineResult:
        """Refine `draft` (default: the model's own first draft of `task`)."""
        if not isinstance(task, str) or not task.strip():
            raise ValueError(f"self-refine needs a task (non-empty text), got {task!r:.60}")
        self._tokens = 0
        if draft is None:
            draft = self._ask(self.model, self.draft_template, task=task)
        result = RefineResult(output=draft)
        for _ in range(self.max_rounds):
            if self._over_budget():
                result.stop_reason = "tokens"
                break
            feedback = self._critique(task, draft)
            score = read_score(feedback, self.score_pattern)
            current = RefineRound(draft=draft, feedback=feedback, score=score)
            result.rounds.append(current)
            if self.done_phrase and self.done_phrase.casefold() in feedback.casefold():
                result.stop_reason = "done"
                break
            if self.score_threshold is not None and score is not None and score >= self.score_threshold:
                result.stop_reason = "score"
                break
            if self._over_budget():
                result.stop_reason = "tokens"
                break
            history = [{"draft": r.draft, "feedback": r.feedback} for r in result.rounds[:-1]]
            revision = self._ask(
                self.model, self.refine_template, task=task, draft=draft, feedback=feedback, history=history
            )
            current.revision = revision
            if _normalised(revision) == _normalised(draft):
                result.stop_reason = "no_change"
                break
            draft = result.output = revision
        else:
            result.stop_reason = "budget"
        result.completion_tokens = self._tokens
        return result
