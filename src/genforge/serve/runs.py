"""Cutting rows of different lengths into runs that are cheap to process together.

A batch's rows differ in length, and one dense call over them (attention, or a whole forward
pass over gathered blocks) works on every row as far as the longest. Cutting rows that are in
order of length into runs of neighbours, each processed only as far as its own longest, saves
that work at the price of one more call per run. `cheapest_runs` finds the best cut; the
resident buffers use it for attention calls (`resident.py`), the engine for forward passes
over gathered blocks (`engine.py`).
"""

from __future__ import annotations

import math


def cheapest_runs(widths: list[int], run_cost: float) -> tuple[float, list[tuple[int, int]]]:
    """Cut rows, in order, into runs [start, end) minimising the width processed plus the calls made.

    A run processes every one of its rows as far as its widest, so its cost is `run_cost` (one
    more call, in the same unit as widths) plus rows x widest. Solved
    exactly by dynamic programming over the cut points (O(n^2); n is at most the number of
    running sequences). Returns the total cost and the runs.
    """
    count = len(widths)
    whole = run_cost + count * max(widths, default=0)
    if count < 2 or whole - run_cost - sum(widths) <= run_cost:
        return whole, [(0, count)]  # even a perfect cut would not save one call
    best = [0.0] + [math.inf] * count  # best[j]: cheapest cover of the first j rows
    cut = [0] * (count + 1)
    for j in range(1, count + 1):
        widest = 0
        for i in range(j - 1, -1, -1):  # the last run is rows i .. j-1
            widest = max(widest, widths[i])
            cost = best[i] + run_cost + (j - i) * widest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs = []
    j = count
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return best[count], runs[::-1]
