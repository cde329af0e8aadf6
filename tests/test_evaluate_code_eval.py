"""pass@k against the closed form, and the execution sandbox: pass, fail, time limit, memory
limit, no network, output truncation, clean-up."""

import math
import socket
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from genforge.evaluate import (
    MetricError,
    evaluate_code,
    mean_pass_at_k,
    network_isolation,
    pass_at_k,
    run_candidate,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs POSIX resource limits")


def closed_form(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) in exact rational arithmetic (math.comb is 0 when n-c < k)."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


@pytest.mark.parametrize(
    "n, c, k",
    [
        (1, 0, 1),
        (1, 1, 1),
        (10, 0, 1),
        (10, 1, 1),
        (10, 3, 1),
        (10, 3, 5),
        (10, 3, 8),
        (10, 10, 10),
        (20, 7, 10),
        (5, 3, 3),
        (5, 2, 4),
        (200, 13, 1),
        (200, 13, 10),
        (200, 13, 100),
        (200, 190, 50),
        (1000, 1, 1000),
    ],
)
def test_pass_at_k_equals_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), rel=1e-12, abs=1e-15)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 3, 8) == 1.0  # n - c = 7 < k: every draw of 8 holds a correct sample
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 4, 1) == pytest.approx(0.4)  # pass@1 is the fraction correct
    for args, message in [
        ((3, 1, 4), "k must lie in 1..n"),
        ((3, 4, 1), "0 <= c <= n"),
        ((0, 0, 1), "n >= 1"),
        ((3, 1, 0), "k must lie"),
        ((3.0, 1, 1), "n must be an integer"),
        ((3, True, 1), "c must be an integer"),
    ]:
        with pytest.raises(MetricError, match=message):
            pass_at_k(*args)


def test_mean_pass_at_k_over_tasks():
    result = mean_pass_at_k(
        {"t1": [True, False, False], "t2": [False, False, False], "t3": [True, True, False]}, ks=(1, 2)
    )
    assert result["pass@1"] == pytest.approx((1 / 3 + 0 + 2 / 3) / 3)
    assert result["pass@2"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert result.score == result["pass@1"]
    assert result.settings["num_tasks"] == 3
    with pytest.raises(MetricError, match="pass@4 needs at least 4 samples per task, but a task has only 3"):
        mean_pass_at_k([[True, False, True]], ks=(1, 4))
    with pytest.raises(MetricError, match="task 0 must be a list of booleans"):
        mean_pass_at_k([[1, 0]])


ADD_TEST = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_correct_incorrect_and_runaway_candidates_in_one_run():
    candidates = {
        "add": [
            "def add(a, b):\n    return a + b\n",  # correct
            "def add(a, b):\n    return a - b\n",  # wrong answer
            "def add(a, b):\n    while True:\n        pass\n",  # never returns
            "def add(a, b)\n    return a + b\n",  # syntax error
        ],
        "mul": ["def mul(a, b):\n    return a * b\n", "def mul(a, b):\n    return a * b\n"],
    }
    tests = {"add": ADD_TEST, "mul": "assert mul(3, 4) == 12\n"}
    started = time.monotonic()
    result = evaluate_code(candidates, tests, ks=(1, 2), timeout_s=1.5, workers=2)
    elapsed = time.monotonic() - started
    add = result.executions["add"]
    assert [r.status for r in add] == ["passed", "failed", "timeout", "failed"]
    assert "AssertionError" in add[1].stderr
    assert "SyntaxError" in add[3].stderr
    assert add[2].returncode == -9 and 1.4 < add[2].duration_s < 5
    assert result.num_correct == {"add": 1, "mul": 2}
    assert result.pass_at_k["pass@1"] == pytest.approx((1 / 4 + 1) / 2)
    assert result.pass_at_k["pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + 1) / 2)
    assert result.score == result.pass_at_k["pass@1"]
    assert result.settings["statuses"]["timeout"] == 1 and result.settings["timeout_s"] == 1.5
    assert elapsed < 10  # the runaway candidate cost its time limit, not the run


def test_memory_limit_stops_a_large_allocation():
    result = run_candidate("block = bytearray(4 * 1024 ** 3)\nprint('allocated')\n", memory_mb=256)
    assert result.status == "memory_limit" and not result.passed
    assert "allocated" not in result.stdout and "MemoryError" in result.stderr
    # the same program within its limit runs (a 64 MiB block under 1 GiB)
    assert run_candidate("block = bytearray(64 * 1024 ** 2)\n", memory_mb=1024).passed


@pytest.mark.parametrize(
    "program",
    [
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
        "import _socket\n_socket.socket()\n",
        "import socket\nsocket.getaddrinfo('localhost', 80)\n",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9/', timeout=1)\n",
    ],
)
def test_network_access_fails(program):
    result = run_candidate(program)
    assert result.status == "failed"
    assert "network access is disabled in the genforge sandbox" in result.stderr


def test_local_socket_pairs_still_work():
    program = "import asyncio\nasyncio.run(asyncio.sleep(0))\nimport socket\na, b = socket.socketpair()\nprint('ok')\n"
    result = run_candidate(program)
    assert result.passed and result.stdout == "ok\n"


def test_a_subprocess_cannot_reach_a_local_server_when_namespaces_are_available():
    if "unshare" not in network_isolation():
        pytest.skip("unshare -n is not available here; only the in-process socket guard applies")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        # A child process does not get the socket guard; the empty network namespace stops it.
        program = (
            "import subprocess, sys\n"
            f"code = 'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=2)'\n"
            "child = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)\n"
            "print(child.returncode, child.stderr.strip().splitlines()[-1])\n"
        )
        result = run_candidate(program)
    finally:
        server.close()
    assert result.passed
    assert result.stdout.startswith("1 ") and "unreachable" in result.stdout.lower()


def test_output_is_captured_and_cut():
    result = run_candidate(
        "import sys\nprint('x' * 100_000)\nprint('to stderr', file=sys.stderr)\n", max_output_chars=200
    )
    assert result.passed and result.truncated
    assert len(result.stdout) < 300 and "output cut: 100001 bytes in all" in result.stdout
    assert result.stdout.startswith("xxx") and result.stderr == "to stderr\n"


def test_runs_in_a_temporary_isolated_directory_that_is_removed():
    program = "import os, sys\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\nprint(sys.flags.isolated)\n"
    result = run_candidate(program)
    assert result.passed
    workdir, isolated = result.stdout.split()
    assert "genforge-exec-" in workdir and isolated == "1"
    assert not Path(workdir).exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to inspect processes")
def test_children_left_behind_are_killed():
    program = "import subprocess\nchild = subprocess.Popen(['sleep', '60'])\nprint(child.pid)\n"
    result = run_candidate(program)
    assert result.passed
    stat = Path(f"/proc/{int(result.stdout)}/stat")
    deadline = time.monotonic() + 2
    while stat.exists() and stat.read_text().split(") ")[1][0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z"  # gone, or a zombie awaiting its reaper


def test_sandbox_bad_input():
    with pytest.raises(MetricError, match="no tests for task"):
        evaluate_code({"a": ["pass"]}, {})
    with pytest.raises(MetricError, match="pass@2 needs at least 2 samples"):
        evaluate_code({"a": ["pass"]}, {"a": ""}, ks=2)  # refused before anything runs
    with pytest.raises(MetricError, match="memory_mb must be an integer of at least 64"):
        run_candidate("pass", memory_mb=8)
    with pytest.raises(MetricError, match="timeout_s must be"):
        run_candidate("pass", timeout_s=0)
    with pytest.raises(MetricError, match="must be a non-empty list of program strings"):
        evaluate_code({"a": "def f(): pass"}, {"a": ""})
