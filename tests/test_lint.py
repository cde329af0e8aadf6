"""The code follows the [tool.ruff] rules in pyproject.toml: pyflakes, import order, modern
syntax and bugbear's likely bugs, over the package, the tests and the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check failed (fix with `ruff check --fix`):\n{result.stdout}{result.stderr}"
