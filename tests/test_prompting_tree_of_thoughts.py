"""Tree of thoughts: BFS and DFS with beam and depth limits, model steps, and the Game of 24."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
from prompting_fakes import ScriptedChatModel

from genforge.prompting import Game24, ModelProposer, ModelValuer, ModelVoter, tree_of_thoughts

_STEP = re.compile(r"^(\S+) ([-+*/]) (\S+) = (\S+) \(left: ([^)]*)\)$")


def _replay(numbers, steps):
    """Check a Game-of-24 solution independently: each step uses two numbers on the board, its
    arithmetic is right, and the board after it is what the step says; the last number is 24."""
    board = sorted(Fraction(n) for n in numbers)
    for step in steps:
        a, operator, b, result, left = _STEP.match(step).groups()
        a, b, result = (Fraction(x.strip("()")) for x in (a, b, result))
        board.remove(a)
        board.remove(b)
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[operator] == result, step
        board = sorted([*board, result])
        assert board == sorted(Fraction(n) for n in left.split()), step
    return board == [24]


@pytest.mark.parametrize("numbers", [(4, 9, 10, 13), (1, 1, 4, 6), (3, 3, 8, 8), (1, 5, 5, 5), (2, 3, 4, 12)])
@pytest.mark.parametrize("search", ["bfs", "dfs"])
def test_game_of_24_is_solved_with_the_exact_evaluator(numbers, search):
    result = Game24(numbers).solve(search=search)
    assert result.stop_reason == "solved"
    assert len(result.solution.steps) == 3 and _replay(numbers, result.solution.steps)
    assert [len(s.numbers) for s in result.path] == [4, 3, 2, 1]


def test_an_unsolvable_instance_is_exhausted_at_the_first_level():
    result = Game24((1, 1, 1, 1)).solve()
    assert result.solution is None and result.stop_reason == "exhausted"
    assert result.expansions == 1 and result.levels == [[]]


def test_exact_value_and_proposals():
    game = Game24((4, 9, 10, 13))
    children = game.propose_all(game.root)
    # 6 pairs; + and * once, - and / both ways (no zeros here): 6 results per pair.
    assert len(children) == 36
    assert game.exact_value([game.root]) == [1.0]
    assert game.exact_value([children[0]]) == [0.0]  # 4 + 9 = 13 leaves 10 13 13: no 24


def _counting_problem():
    """States are strings of digits; each step appends 1, 2 or 3; value = digit sum; the goal is
    a sum of exactly 7 in three digits (e.g. "331")."""
    return dict(
        propose=lambda s: [s + d for d in "123"],
        evaluate=lambda states: [sum(map(int, s)) if s else 0 for s in states],
        is_solution=lambda s: len(s) == 3 and sum(map(int, s)) == 7,
    )


def test_bfs_keeps_the_beam_and_stops_at_the_depth_limit():
    problem = _counting_problem()
    result = tree_of_thoughts("", **problem, beam_width=2, max_depth=3)
    # Level 1 keeps "3", "2"; level 2: children of both, best two "33", "32"; level 3 holds "331".
    assert result.levels[:2] == [[3, 2], [6, 5]]
    assert result.solution == "331" and result.path == ["", "3", "33", "331"]
    assert result.expansions == 1 + 2 + 2 and result.evaluated == 3 + 6 + 6
    shallow = tree_of_thoughts("", **problem, beam_width=2, max_depth=2)
    assert shallow.solution is None and shallow.stop_reason == "max_depth"
    assert shallow.path == ["", "3", "33"]  # the best state reached


def test_dfs_follows_the_best_child_prunes_and_backtracks():
    problem = _counting_problem()
    # Best-first: "3" -> "33" -> "333","332","331": "331" is a solution.
    assert tree_of_thoughts("", **problem, search="dfs", beam_width=3, max_depth=3).solution == "331"
    # One child per state and values under 3 pruned: "3" -> "33" -> "333" only, which sums to 9.
    pruned = tree_of_thoughts("", **problem, search="dfs", beam_width=1, max_depth=3, value_threshold=3)
    assert pruned.solution is None and pruned.stop_reason == "exhausted"
    budget = tree_of_thoughts("", **problem, search="dfs", beam_width=3, max_depth=3, max_expansions=2)
    assert budget.solution is None and budget.stop_reason == "budget" and budget.expansions == 2


def test_bad_search_settings():
    problem = _counting_problem()
    with pytest.raises(ValueError, match="search must be 'bfs' or 'dfs'"):
        tree_of_thoughts("", **problem, search="astar")
    with pytest.raises(ValueError, match="beam_width must be a positive integer"):
        tree_of_thoughts("", **problem, beam_width=0)
    with pytest.raises(ValueError, match="evaluate returned 1 values for 3 states"):
        tree_of_thoughts("", problem["propose"], lambda states: [1.0], problem["is_solution"])


def test_model_steps_solve_game_of_24_from_scripted_replies():
    """The propose and value steps through a ChatModel: proposals in the paper's format are
    checked exactly (a wrong result and a number not on the board are dropped), values are
    sure/likely/impossible summed over samples."""
    game = Game24((4, 9, 10, 13))

    def respond(messages):
        prompt = messages[-1]["content"]
        if prompt.startswith("Evaluate"):
            numbers = sorted(Fraction(n) for n in prompt.split("Numbers: ")[1].split("\n")[0].split())
            return "sure" if game.exact_value([type(game.root)(tuple(numbers))]) == [1.0] else "impossible"
        board = prompt.rsplit("Input: ", 1)[1].split("\n")[0]
        return {
            "4 9 10 13": "13 - 9 = 4 (left: 4 4 10)\n4 + 9 = 14 (left: 10 13 14)\n10 - 4 = 6 (left: 6 9 13)\n"
            "7 * 2 = 14 (left: 9 10 14)",
            "4 4 10": "10 - 4 = 6 (left: 4 6)\n4 * 4 = 16 (left: 10 16)",
            "6 9 13": "13 - 9 = 4 (left: 4 6)",
            "10 13 14": "14 - 13 = 1 (left: 1 10)",
            "4 6": "4 * 6 = 24 (left: 24)\n4 + 6 = 10 (left: 10)",
            "10 16": "10 + 16 = 26 (left: 26)",
            "1 10": "1 + 10 = 11 (left: 11)",
        }.get(board, "")

    model = ScriptedChatModel(respond=respond)
    propose = ModelProposer(model, Game24.propose_prompt, game.parse_proposals, temperature=0.0)
    value = ModelValuer(model, Game24.value_prompt, Game24.parse_value, samples=3)
    children = propose(game.root)
    assert [c.numbers for c in children] == [
        tuple(map(Fraction, (4, 4, 10))),
        tuple(map(Fraction, (6, 9, 13))),
    ]  # "4 + 9 = 14" has wrong arithmetic and "7 * 2" uses numbers not on the board: both dropped
    result = tree_of_thoughts(
        game.root, propose, value, game.is_solution, beam_width=2, max_depth=3, key=lambda s: s.key
    )
    assert result.stop_reason == "solved" and _replay((4, 9, 10, 13), result.solution.steps)
    assert value([game.root]) == [60.0]  # three "sure" samples, each worth 20
    calls = len(model.calls)
    assert value([game.root]) == [60.0] and len(model.calls) == calls  # valued once, then cached


def test_model_voter_shares_votes():
    model = ScriptedChatModel(["The best choice is 2", "best choice is 2.", "The best choice is 1", "unsure"])
    voter = ModelVoter(model, lambda states: "Which is best?\n" + "\n".join(states), samples=4)
    assert voter(["plan a", "plan b"]) == [0.25, 0.5]
