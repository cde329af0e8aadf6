"""The code follows the [tool.ruff] rules in pyproject.toml: pyflakes, import order, modern
syntax and bugbear's likely bugs, over the package, the tests and the benchmarks; and it is laid
out as `ruff format` lays it out, so that no change carries another's reformatting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "benchmarks"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, *PATHS], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing():
    result = _ruff("check", "--no-cache")
    assert result.returncode == 0, f"ruff check failed (fix with `ruff check --fix`):\n{result.stdout}{result.stderr}"


def test_the_code_is_formatted():
    result = _ruff("format", "--check", "--no-cache")
    assert result.returncode == 0, f"not formatted (fix with `ruff format`):\n{result.stdout}{result.stderr}"
