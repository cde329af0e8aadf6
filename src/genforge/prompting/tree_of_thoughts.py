"""Tree of thoughts: search over partial solutions, proposing next steps and valuing them.

Yao et al. 2023, "Tree of Thoughts: Deliberate Problem Solving with Large Language Models". A
problem is solved in steps ("thoughts"); from a partial solution, a *propose* step offers next
steps, and a *value* step (each state on its own: "sure / likely / impossible") or a *vote* step
(the states compared: "which is most promising?") scores them. Search keeps the best:

- BFS (the paper's Algorithm 1): expand every state of the frontier, value all children, keep
  the `beam_width` best, for at most `max_depth` levels;
- DFS (Algorithm 2): follow the best child first, prune children valued under
  `value_threshold`, backtrack when a branch dies, within `max_expansions` proposals.

`tree_of_thoughts` is model-free: `propose(state) -> [states]`, `evaluate(states) -> [values]`
and `is_solution(state)` are plain functions, so the search is exact and testable. The model
steps (`ModelProposer`, `ModelValuer`, `ModelVoter`) are such functions over a `ChatModel`, and
`Game24` gives the paper's Game of 24 both ways: prompts and a checked parser for a model, and
an exhaustive proposer and an exact evaluator (is 24 still reachable?) for the search itself.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any

from ..chat_models import ChatModel

__all__ = [
    "Game24",
    "Game24State",
    "ModelProposer",
    "ModelValuer",
    "ModelVoter",
    "ThoughtNode",
    "ToTResult",
    "tree_of_thoughts",
]

Propose = Callable[[Any], Sequence[Any]]
Evaluate = Callable[[Sequence[Any]], Sequence[float]]


@dataclass
class ThoughtNode:
    """A state in the search tree, its value and its parent."""

    state: Any
    depth: int
    value: float = 0.0
    parent: ThoughtNode | None = None

    def path(self) -> list[Any]:
        """The states from the root to this one."""
        node, states = self, []
        while node is not None:
            states.append(node.state)
            node = node.parent
        return states[::-1]


@dataclass
class ToTResult:
    """What the search found: the solution state (None if none), the path to it (or to the best
    state reached), how many states were proposed from and valued, and each BFS level's kept values."""

    solution: Any
    path: list[Any]
    value: float | None
    expansions: int
    evaluated: int
    levels: list[list[float]] = field(default_factory=list)
    stop_reason: str = "solved"  # "solved" | "exhausted" | "max_depth" | "budget"


def tree_of_thoughts(
    root: Any,
    propose: Propose,
    evaluate: Evaluate,
    is_solution: Callable[[Any], bool],
    *,
    search: str = "bfs",
    beam_width: int = 5,
    max_depth: int = 4,
    value_threshold: float | None = None,
    max_expansions: int | None = None,
    key: Callable[[Any], Hashable] | None = None,
) -> ToTResult:
    """Search from `root` for a state with `is_solution`.

    evaluate: values for a list of sibling candidates (a value step maps each alone; a vote
        step compares them), higher is better.
    beam_width: BFS keeps this many states per level; DFS tries at most this many children of a state.
    value_threshold: children valued below it are pruned (both searches; None keeps all).
    max_expansions: at most this many states are proposed from (None: no limit).
    key: states with the same key are one state (default: the state itself if hashable), so a
        position reached by two paths is valued and expanded once per level.
    """
    if search not in ("bfs", "dfs"):
        raise ValueError(f"search must be 'bfs' or 'dfs', got {search!r}")
    for name, value in (("beam_width", beam_width), ("max_depth", max_depth)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_expansions is not None and (not isinstance(max_expansions, int) or max_expansions < 1):
        raise ValueError(f"max_expansions must be a positive integer or None, got {max_expansions!r}")
    searcher = _Search(propose, evaluate, is_solution, beam_width, max_depth, value_threshold, max_expansions, key)
    root_node = ThoughtNode(root, 0)
    if is_solution(root):
        return ToTResult(root, [root], None, 0, 0, stop_reason="solved")
    return searcher.bfs(root_node) if search == "bfs" else searcher.dfs(root_node)


class _Search:
    def __init__(self, propose, evaluate, is_solution, beam_width, max_depth, threshold, max_expansions, key):
        self.propose, self.evaluate, self.is_solution = propose, evaluate, is_solution
        self.beam_width, self.max_depth, self.threshold, self.max_expansions = (
            beam_width,
            max_depth,
            threshold,
            max_expansions,
        )
        self.key = key or (lambda state: state)
        self.expansions = self.evaluated = 0
        self.best: ThoughtNode | None = None

    def _budget_left(self) -> bool:
        return self.max_expansions is None or self.expansions < self.max_expansions

    def _children(self, node: ThoughtNode, seen: set | None) -> list[ThoughtNode]:
        """Propose from `node`, value the new children, drop those under the threshold."""
        self.expansions += 1
        children, keys = [], set()
        for state in self.propose(node.state):
            state_key = self.key(state)
            if state_key in keys or (seen is not None and state_key in seen):
                continue
            keys.add(state_key)
            if seen is not None:
                seen.add(state_key)
            children.append(ThoughtNode(state, node.depth + 1, parent=node))
        return children

    def _value(self, nodes: list[ThoughtNode]) -> list[ThoughtNode]:
        if not nodes:
            return []
        values = list(self.evaluate([n.state for n in nodes]))
        if len(values) != len(nodes):
            raise ValueError(f"evaluate returned {len(values)} values for {len(nodes)} states")
        self.evaluated += len(nodes)
        for node, value in zip(nodes, values):
            node.value = float(value)
            if self.best is None or node.value > self.best.value:
                self.best = node
        kept = [n for n in nodes if self.threshold is None or n.value >= self.threshold]
        # Best first; sorted() is stable, so equal values keep the proposer's order.
        return sorted(kept, key=lambda n: -n.value)

    def _result(self, node: ThoughtNode | None, reason: str, levels=()) -> ToTResult:
        if node is not None and reason == "solved":
            return ToTResult(node.state, node.path(), node.value, self.expansions, self.evaluated, list(levels), reason)
        best = self.best
        return ToTResult(
            None, best.path() if best else [], best.value if best else None, self.expansions, self.evaluated,
            list(levels), reason,
        )  # fmt: skip

    def bfs(self, root: ThoughtNode) -> ToTResult:
        frontier, levels = [root], []
        for _ in range(self.max_depth):
            candidates: list[ThoughtNode] = []
            seen: set = set()  # one state per level, whichever parent reached it first
            for node in frontier:
                if not self._budget_left():
                    break
                candidates += self._children(node, seen)
            ranked = self._value(candidates)
            solved = [n for n in ranked if self.is_solution(n.state)]
            if solved:
                levels.append([n.value for n in ranked[: self.beam_width]])
                return self._result(solved[0], "solved", levels)
            frontier = ranked[: self.beam_width]
            levels.append([n.value for n in frontier])
            if not frontier:
                return self._result(None, "exhausted", levels)
            if not self._budget_left():
                return self._result(None, "budget", levels)
        return self._result(None, "max_depth", levels)

    def dfs(self, root: ThoughtNode) -> ToTResult:
        found = self._dfs(root)
        if found is not None:
            return self._result(found, "solved")
        return self._result(None, "budget" if not self._budget_left() else "exhausted")

    def _dfs(self, node: ThoughtNode) -> ThoughtNode | None:
        if node.depth >= self.max_depth or not self._budget_left():
            return None
        for child in self._value(self._children(node, None))[: self.beam_width]:
            if self.is_solution(child.state):
                return child
            found = self._dfs(child)
            if found is not None:
                return found
        return None


# --- model steps ---------------------------------------------------------------------------


def _as_messages(prompt: str | Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


@dataclass
class ModelProposer:
    """The propose step through a model: `prompt(state)` (text or messages) is asked
    `samples` times and each reply is read by `parse(reply, state) -> [child states]`."""

    model: ChatModel
    prompt: Callable[[Any], Any]
    parse: Callable[[str, Any], Sequence[Any]]
    samples: int = 1
    temperature: float = 0.7
    max_tokens: int = 256
    seed: int | None = None

    def __call__(self, state: Any) -> list[Any]:
        messages = _as_messages(self.prompt(state))
        if self.samples == 1:
            replies = [self.model.chat(messages, max_tokens=self.max_tokens, temperature=self.temperature)]
        else:
            replies = self.model.sample_replies(
                messages, self.samples, max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed
            )
        return [child for reply in replies for child in self.parse(reply.content, state)]


@dataclass
class ModelValuer:
    """The value step through a model: each state's `prompt(state)` is sampled `samples` times,
    each reply read by `parse(reply) -> float`, and the values summed (Yao et al. sum three)."""

    model: ChatModel
    prompt: Callable[[Any], Any]
    parse: Callable[[str], float]
    samples: int = 3
    temperature: float = 0.7
    max_tokens: int = 64
    seed: int | None = None
    cache: dict = field(default_factory=dict)

    def __call__(self, states: Sequence[Any]) -> list[float]:
        values = []
        for state in states:
            messages = _as_messages(self.prompt(state))
            cache_key = repr(messages)
            if cache_key not in self.cache:  # the same position is valued once (the paper caches too)
                replies = self.model.sample_replies(
                    messages, self.samples, max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed
                )
                self.cache[cache_key] = sum(self.parse(reply.content) for reply in replies)
            values.append(self.cache[cache_key])
        return values


_VOTE = re.compile(r"best choice is\s*\(?(\d+)", re.IGNORECASE)


@dataclass
class ModelVoter:
    """The vote step through a model: `prompt(states)` shows the candidates numbered from 1 and
    is sampled `samples` times; each reply votes for one ("The best choice is 2"); a state's
    value is its share of the votes."""

    model: ChatModel
    prompt: Callable[[Sequence[Any]], Any]
    samples: int = 5
    temperature: float = 0.7
    max_tokens: int = 256
    seed: int | None = None
    vote_pattern: re.Pattern = _VOTE

    def __call__(self, states: Sequence[Any]) -> list[float]:
        messages = _as_messages(self.prompt(states))
        replies = self.model.sample_replies(
            messages, self.samples, max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed
        )
        votes = [0] * len(states)
        for reply in replies:
            matches = list(self.vote_pattern.finditer(reply.content))
            if matches and 1 <= int(matches[-1].group(1)) <= len(states):
                votes[int(matches[-1].group(1)) - 1] += 1
        return [v / len(replies) for v in votes] if replies else votes


# --- Game of 24 ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Game24State:
    """Numbers left to combine (exact fractions, sorted) and the steps taken ("4 * 6 = 24")."""

    numbers: tuple[Fraction, ...]
    steps: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[Fraction, ...]:
        return self.numbers

    def left(self) -> str:
        return " ".join(_show(n) for n in self.numbers)


def _show(number: Fraction) -> str:
    return str(number.numerator) if number.denominator == 1 else f"{number.numerator}/{number.denominator}"


def _operand(number: Fraction) -> str:
    """A number inside a step: a fraction in parentheses, so "8 / (1/3)" reads one way only."""
    return _show(number) if number.denominator == 1 else f"({_show(number)})"


def _combinations(a: Fraction, b: Fraction) -> list[tuple[str, Fraction]]:
    """Every value one arithmetic step makes of a and b, with the step's text; the larger number
    first, so the steps a person would write (13 - 9, not 9 - 13) are proposed first."""
    a, b = max(a, b), min(a, b)
    results = [(f"{_operand(a)} + {_operand(b)}", a + b), (f"{_operand(a)} * {_operand(b)}", a * b)]
    results += [(f"{_operand(a)} - {_operand(b)}", a - b), (f"{_operand(b)} - {_operand(a)}", b - a)]
    if b != 0:
        results.append((f"{_operand(a)} / {_operand(b)}", a / b))
    if a != 0:
        results.append((f"{_operand(b)} / {_operand(a)}", b / a))
    return results


@lru_cache(maxsize=65536)
def _reachable(numbers: tuple[Fraction, ...], target: Fraction) -> bool:
    if len(numbers) == 1:
        return numbers[0] == target
    for i, j in itertools.combinations(range(len(numbers)), 2):
        rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
        for _, value in _combinations(numbers[i], numbers[j]):
            if _reachable(tuple(sorted([*rest, value])), target):
                return True
    return False


_NUMBER = r"\(?(-?\d+(?:/\d+)?)\)?"  # an integer or a fraction, a fraction maybe in parentheses
_PROPOSAL = re.compile(_NUMBER + r"\s*([-+*/x×÷])\s*" + _NUMBER + r"\s*=\s*" + _NUMBER)
_OPERATORS = {"+": "+", "-": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}


class Game24:
    """The Game of 24 (Yao et al. 2023, section 4.1): combine four numbers with + - * / into 24,
    two numbers per step, three steps.

    For the search: `root`, `propose_all` (every legal next step: the exhaustive proposer),
    `exact_value` (1.0 when 24 is still reachable from what is left, else 0.0), `is_solution`.
    For a model: `propose_prompt` and `parse_proposals` (the paper's "a op b = c (left: ...)"
    lines, each checked exactly: a wrong sum or a number not on the board is skipped),
    `value_prompt` and `parse_value` (sure / likely / impossible -> 20 / 1 / 0.001, the paper's).
    """

    target = Fraction(24)
    VALUES = {"sure": 20.0, "likely": 1.0, "impossible": 0.001}

    def __init__(self, numbers: Sequence[int | Fraction | str]) -> None:
        try:
            parsed = tuple(sorted(Fraction(n) for n in numbers))
        except (ValueError, TypeError, ZeroDivisionError):
            raise ValueError(f"Game of 24 numbers must be integers or fractions, got {list(numbers)!r}") from None
        if len(parsed) < 1:
            raise ValueError("the Game of 24 needs at least one number")
        self.root = Game24State(parsed)

    def is_solution(self, state: Game24State) -> bool:
        return len(state.numbers) == 1 and state.numbers[0] == self.target

    def propose_all(self, state: Game24State) -> list[Game24State]:
        children = []
        for i, j in itertools.combinations(range(len(state.numbers)), 2):
            rest = [n for k, n in enumerate(state.numbers) if k not in (i, j)]
            for text, value in _combinations(state.numbers[i], state.numbers[j]):
                numbers = tuple(sorted([*rest, value]))
                step = f"{text} = {_show(value)} (left: {' '.join(_show(n) for n in numbers)})"
                children.append(Game24State(numbers, (*state.steps, step)))
        return children

    def exact_value(self, states: Sequence[Game24State]) -> list[float]:
        return [1.0 if _reachable(s.numbers, self.target) else 0.0 for s in states]

    def solve(self, search: str = "bfs", beam_width: int = 1, **options) -> ToTResult:
        """Exhaustive proposals valued exactly: finds a solution whenever one exists."""
        return tree_of_thoughts(
            self.root,
            self.propose_all,
            self.exact_value,
            self.is_solution,
            search=search,
            beam_width=beam_width,
            max_depth=max(1, len(self.root.numbers) - 1),
            value_threshold=0.5,
            key=lambda s: s.key,
            **options,
        )

    @staticmethod
    def propose_prompt(state: Game24State) -> str:
        return (
            "Use two of the numbers and one of + - * / to make a new number. "
            "List possible next steps, one per line, as 'a op b = c (left: remaining numbers)'.\n"
            "Input: 2 8 8 14\nPossible next steps:\n2 + 8 = 10 (left: 8 10 14)\n8 / 2 = 4 (left: 4 8 14)\n"
            "14 - 8 = 6 (left: 2 6 8)\n"
            f"Input: {state.left()}\nPossible next steps:\n"
        )

    def parse_proposals(self, reply: str, state: Game24State) -> list[Game24State]:
        """The reply's steps that are legal from `state`, as states; the arithmetic is recomputed,
        so a model's wrong result or a number it does not have is dropped, never trusted."""
        children = []
        for match in _PROPOSAL.finditer(reply):
            a, operator, b = Fraction(match.group(1)), _OPERATORS[match.group(2)], Fraction(match.group(3))
            remaining = list(state.numbers)
            try:
                remaining.remove(a)
                remaining.remove(b)
            except ValueError:
                continue
            if operator == "/" and b == 0:
                continue
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[operator]
            if value != Fraction(match.group(4)):
                continue
            numbers = tuple(sorted([*remaining, value]))
            step = (
                f"{_operand(a)} {operator} {_operand(b)} = {_show(value)} (left: {' '.join(_show(n) for n in numbers)})"
            )
            children.append(Game24State(numbers, (*state.steps, step)))
        return children

    @staticmethod
    def value_prompt(state: Game24State) -> str:
        return (
            "Evaluate if the given numbers can reach 24 with + - * / (sure / likely / impossible).\n"
            f"Numbers: {state.left()}\nAnswer with one word:"
        )

    @classmethod
    def parse_value(cls, reply: str) -> float:
        words = re.findall(r"[a-z]+", reply.lower())
        for word in reversed(words):
            if word in cls.VALUES:
                return cls.VALUES[word]
        return 0.0
