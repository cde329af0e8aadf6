"""Functional correctness of generated code: pass@k (Chen et al. 2021, "Evaluating Large
Language Models Trained on Code"), with candidates executed in a subprocess sandbox.

pass@k is the probability that at least one of k samples for a task passes its tests. Drawing
exactly k samples per task and checking them has high variance; the paper's unbiased
estimator instead draws n >= k samples, counts the c that pass, and computes the chance that
k of the n chosen without replacement contain a passing one:

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form is used because the binomial coefficients overflow floats for n in the
hundreds. The corpus score is the mean over tasks.

Sandbox. Each candidate runs in a fresh `python -I -B` process (isolated mode: no PYTHON*
variables, no user site-packages, no working directory on sys.path; no .pyc writes), in a
new session, with:

- a temporary working directory (also HOME and TMPDIR), deleted afterwards;
- a wall-clock limit: on expiry the whole process group is killed with SIGKILL, so a
  candidate's own child processes die too; an RLIMIT_CPU slightly above the wall limit backs
  this up should the evaluating process itself die;
- a memory limit: RLIMIT_AS (address space), set in a `preexec_fn` between fork and exec,
  so an over-large allocation fails with MemoryError; also RLIMIT_FSIZE (files, including
  the captured output, stop at 64 MiB) and RLIMIT_CORE 0;
- no network: a prelude run before the candidate makes creating a socket and resolving a
  host name raise PermissionError (which also stops urllib, http.client, requests and DNS
  lookups); in addition, where `unshare -n` works (root, or unprivileged user namespaces
  via `unshare -r -n`), the process gets its own network namespace with no interface up,
  which also stops subprocesses and ctypes. `settings["network"]` says which was used;
- stdout and stderr written to files (not pipes, so a chatty candidate cannot block) and
  cut to `max_output_chars`, keeping the head and the tail.

This guards against accidents (infinite loops, memory blow-ups, stray network calls, files
written to the working directory). It is not a security boundary against hostile code:
the candidate runs as the calling user and can read and write what that user can. Run
untrusted code in a container or VM as well. A candidate that exits 0 before the tests run
(`os._exit(0)`) counts as passing, as in the reference harness.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._progress import progress
from .base import MetricError, MetricResult

try:  # POSIX only; the sandbox needs it, pass@k does not
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

STATUSES = ("passed", "failed", "timeout", "memory_limit", "crashed")
# Files a candidate writes (and its captured output) stop here: enough for any test, and a
# bound on what a runaway print loop can put on disk.
FILE_SIZE_LIMIT = 64 * 1024 * 1024
_POLL_S = 0.005

# Run by `python -c` before the candidate. It refuses new sockets and name resolution, then
# executes candidate.py as __main__ in fresh globals. Wrapping an existing descriptor stays
# allowed: socket.socketpair (a connected local pair, which asyncio's event loop needs) does it.
_PRELUDE = r"""
import socket as _socket_module, _socket, sys

def _refuse(*args, **kwargs):
    raise PermissionError("network access is disabled in the genforge sandbox")

# socket.socket.__init__ calls _socket.socket.__init__, so guarding the C type's constructor
# covers both socket.socket() and _socket.socket(), while socket.socket stays a class that
# ssl and others can subclass.
_CSocket = _socket.socket

class _NoNewSocket(_CSocket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:
            _refuse()
        _CSocket.__init__(self, family, type, proto, fileno)

_socket.socket = _socket.SocketType = _NoNewSocket
for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
    setattr(_socket_module, _name, _refuse)
    setattr(_socket, _name, _refuse)
del _name, _socket_module, _socket

sys.argv = ["candidate.py"]
with open("candidate.py", encoding="utf-8") as _file:
    _code = compile(_file.read(), "candidate.py", "exec")
exec(_code, {"__name__": "__main__", "__file__": "candidate.py", "__builtins__": __builtins__})
"""


# ------------------------------------------------------------------------------------ pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate for one task: n samples drawn, c of them correct.

    1 - C(n-c, k) / C(n, k), computed as a product (see the module docstring). When fewer than
    k samples fail (n - c < k) every draw of k contains a correct one and the value is 1.0.
    Needs 0 <= c <= n and 1 <= k <= n: with fewer than k samples the estimator is undefined.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise MetricError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if n < 1 or not 0 <= c <= n:
        raise MetricError(f"pass_at_k: needs n >= 1 samples and 0 <= c <= n correct ones, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise MetricError(f"pass_at_k: k must lie in 1..n (here 1..{n}), got k={k}; draw at least k samples per task")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(
    results: Mapping[Any, Sequence[bool]] | Sequence[Sequence[bool]], ks: int | Sequence[int] = (1,)
) -> MetricResult:
    """pass@k averaged over tasks, for each k in `ks`; on 0-1, `score` is the first k.

    results: per task, whether each of its samples passed (a mapping task -> flags, or a list
        of flag lists). Tasks may have different sample counts, but every task needs at least
        max(ks) samples.
    """
    flags = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not flags:
        raise MetricError("mean_pass_at_k: no tasks given; pass, per task, the pass/fail flags of its samples")
    ks = [ks] if isinstance(ks, (int, np.integer)) else list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise MetricError(f"mean_pass_at_k: ks must be positive integers, got {ks}")
    counts = []
    for i, task in enumerate(flags):
        if (
            isinstance(task, (str, bytes))
            or not isinstance(task, Sequence)
            or not all(isinstance(f, (bool, np.bool_)) for f in task)
        ):
            raise MetricError(f"mean_pass_at_k: task {i} must be a list of booleans (passed or not per sample)")
        counts.append((len(task), int(sum(task))))
    fewest = min(n for n, _ in counts)
    if max(ks) > fewest:
        raise MetricError(
            f"mean_pass_at_k: pass@{max(ks)} needs at least {max(ks)} samples per task, but a task has "
            f"only {fewest}; lower k or draw more samples"
        )
    details = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks}
    settings = {
        "ks": ks,
        "num_tasks": len(counts),
        "samples_per_task": (fewest, max(n for n, _ in counts)),
        "estimator": "unbiased, 1 - C(n-c,k)/C(n,k) (Chen et al. 2021)",
        "aggregate": "mean over tasks",
    }
    return MetricResult("pass@k", details[f"pass@{ks[0]}"], details, settings)


# ----------------------------------------------------------------------------------- sandbox
@dataclass(frozen=True)
class ExecutionResult:
    """One program run in the sandbox. `status` is one of STATUSES: passed (exit code 0),
    failed (non-zero exit, e.g. an AssertionError), timeout (wall-clock or CPU limit),
    memory_limit (MemoryError under the address-space limit), crashed (killed by a signal)."""

    status: str
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str
    truncated: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...] | None:
    """The command prefix that gives a process an empty network namespace, or None where the
    system does not allow it (no unshare binary, no privilege, user namespaces disabled)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return None
    # -n needs CAP_SYS_ADMIN (root); -r -n makes an unprivileged user namespace first.
    for flags in (("-n",), ("-r", "-n")):
        try:
            if subprocess.run([exe, *flags, "true"], capture_output=True, timeout=10).returncode == 0:
                return (exe, *flags, "--")
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def network_isolation(allow_network: bool = False) -> str:
    """How candidates are kept off the network on this machine (recorded in results)."""
    if allow_network:
        return "allowed"
    prefix = _unshare_prefix()
    if prefix is None:
        return "blocked: python socket guard only (unshare unavailable; subprocesses and ctypes not covered)"
    return f"blocked: {' '.join(['unshare', *prefix[1:-1]])} (empty network namespace) + python socket guard"


def _limit_setter(memory_bytes: int, cpu_seconds: int):
    """A preexec_fn applying the resource limits in the child, between fork and exec. It only
    calls setrlimit (the resource module is imported already), so it takes no lock that
    another thread of the parent could hold at fork time."""

    def apply() -> None:
        for limit, value in (
            (resource.RLIMIT_AS, memory_bytes),
            (resource.RLIMIT_CPU, cpu_seconds),
            (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT),
            (resource.RLIMIT_CORE, 0),
        ):
            _, hard = resource.getrlimit(limit)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(limit, (value, value))

    return apply


def _read_output(path: Path, max_chars: int) -> tuple[str, bool]:
    """The file's text, cut to about `max_chars` keeping head and tail; and whether it was cut."""
    size = path.stat().st_size
    budget = max_chars * 4  # bytes: enough for max_chars characters of any UTF-8 text
    with open(path, "rb") as f:
        if size <= budget:
            text = f.read().decode("utf-8", errors="replace")
        else:
            head = f.read(budget // 2).decode("utf-8", errors="replace")
            f.seek(size - budget // 2)
            text = head + f.read().decode("utf-8", errors="replace")  # cut again below, by characters
    if len(text) <= max_chars and size <= budget:
        return text, False
    half = max_chars // 2
    return f"{text[:half]}\n[... output cut: {size} bytes in all ...]\n{text[len(text) - half :]}", True


@dataclass
class _Running:
    index: int
    process: subprocess.Popen
    directory: Path
    started: float
    deadline: float
    files: tuple


def _start(index: int, program: str, command: list[str], timeout_s: float, preexec) -> _Running:
    directory = Path(tempfile.mkdtemp(prefix="genforge-exec-"))
    work = directory / "work"
    work.mkdir()
    (work / "candidate.py").write_text(program, encoding="utf-8")
    # Output lives beside, not inside, the working directory the candidate sees.
    stdout, stderr = open(directory / "stdout", "wb"), open(directory / "stderr", "wb")
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    try:
        process = subprocess.Popen(
            command,
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            close_fds=True,
            preexec_fn=preexec,
        )
    except BaseException:
        stdout.close(), stderr.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    started = time.monotonic()
    return _Running(index, process, directory, started, started + timeout_s, (stdout, stderr))


def _finish(run: _Running, timed_out: bool, max_output_chars: int) -> ExecutionResult:
    # The group is killed whether the candidate finished or not: a finished candidate may
    # have left children behind. Its leader has exited but is not reaped yet (WNOWAIT), so
    # the group id cannot have been reused by an unrelated process.
    try:
        os.killpg(run.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    returncode = run.process.wait()
    duration = time.monotonic() - run.started
    for f in run.files:
        f.close()
    try:
        stdout, cut_out = _read_output(run.directory / "stdout", max_output_chars)
        stderr, cut_err = _read_output(run.directory / "stderr", max_output_chars)
    finally:
        shutil.rmtree(run.directory, ignore_errors=True)
    if timed_out or returncode == -signal.SIGXCPU:
        status = "timeout"
    elif returncode == 0:
        status = "passed"
    elif "MemoryError" in stderr[-2000:]:
        status = "memory_limit"
    elif returncode < 0:
        status = "crashed"
    else:
        status = "failed"
    return ExecutionResult(status, returncode, duration, stdout, stderr, cut_out or cut_err)


def _run_many(
    programs: Sequence[str],
    *,
    timeout_s: float,
    memory_mb: int,
    allow_network: bool,
    workers: int,
    max_output_chars: int,
    python: str,
) -> Iterator[tuple[int, ExecutionResult]]:
    """Yield (index, result) as programs finish, at most `workers` at a time.

    One thread polls all running processes: no threads means the preexec_fn runs in a
    single-threaded parent, and a timeout is enforced however many run at once.
    """
    command = [python, "-I", "-B", "-c", _PRELUDE]
    if not allow_network and (prefix := _unshare_prefix()) is not None:
        command = [*prefix, *command]
    preexec = _limit_setter(memory_mb * 1024 * 1024, math.ceil(timeout_s) + 1)
    pending, running = deque(enumerate(programs)), []
    try:
        while pending or running:
            while pending and len(running) < workers:
                index, program = pending.popleft()
                running.append(_start(index, program, command, timeout_s, preexec))
            now = time.monotonic()
            for run in list(running):
                exited = os.waitid(os.P_PID, run.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
                if exited or now >= run.deadline:
                    running.remove(run)  # before yielding: the consumer may stop here
                    yield run.index, _finish(run, timed_out=not exited, max_output_chars=max_output_chars)
            if running:
                time.sleep(_POLL_S)
    finally:  # interrupted (Ctrl-C, an exception in the consumer): leave no process behind
        for run in running:
            _finish(run, timed_out=True, max_output_chars=max_output_chars)


def _check_sandbox_settings(timeout_s: float, memory_mb: int, workers: int, max_output_chars: int) -> None:
    if resource is None or not hasattr(os, "waitid"):
        raise MetricError(
            "the code sandbox needs a POSIX system (Linux or macOS): it uses resource limits and process groups"
        )
    if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 3600:
        raise MetricError(f"timeout_s must be a number of seconds in (0, 3600], got {timeout_s!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
        raise MetricError(
            f"memory_mb must be an integer of at least 64 (the interpreter alone needs ~30 MB of "
            f"address space), got {memory_mb!r}"
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MetricError(f"workers must be a positive integer, got {workers!r}")
    if isinstance(max_output_chars, bool) or not isinstance(max_output_chars, int) or max_output_chars < 1:
        raise MetricError(f"max_output_chars must be a positive integer, got {max_output_chars!r}")


def run_candidate(
    program: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    allow_network: bool = False,
    max_output_chars: int = 2000,
    python: str | None = None,
) -> ExecutionResult:
    """Run one Python program in the sandbox (see the module docstring) and report how it ended.

    program: the full source: the candidate and, usually, its tests after it; the run passes
        when the process exits with code 0.
    python: the interpreter (default: this one, so the candidate sees the same packages).
    """
    if not isinstance(program, str):
        raise MetricError(f"run_candidate: program must be Python source as a string, got {type(program).__name__}")
    _check_sandbox_settings(timeout_s, memory_mb, 1, max_output_chars)
    runs = _run_many(
        [program],
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        allow_network=allow_network,
        workers=1,
        max_output_chars=max_output_chars,
        python=python or sys.executable,
    )
    return next(runs)[1]


@dataclass(frozen=True)
class CodeEvalResult:
    """pass@k over tasks, with every execution. `pass_at_k` maps "pass@1", ... to values on
    0-1; `executions[task]` lists that task's results in candidate order."""

    pass_at_k: dict[str, float]
    executions: dict[Any, list[ExecutionResult]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The headline number: pass@k for the first k asked for."""
        return next(iter(self.pass_at_k.values()))

    @property
    def num_correct(self) -> dict[Any, int]:
        return {task: sum(r.passed for r in runs) for task, runs in self.executions.items()}


def evaluate_code(
    candidates: Mapping[Any, Sequence[str]],
    tests: Mapping[Any, str],
    *,
    ks: int | Sequence[int] = (1,),
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    allow_network: bool = False,
    workers: int = 1,
    max_output_chars: int = 2000,
    python: str | None = None,
    show_progress: bool | None = None,
) -> CodeEvalResult:
    """Execute every candidate with its task's tests in the sandbox and estimate pass@k.

    candidates: task id -> the sampled programs (n per task, n >= max(ks)).
    tests: task id -> test code appended to each candidate (after a blank line); it should
        fail by raising (assert ...) or exiting non-zero. HumanEval's layout is
        `prompt + completion` as the candidate and `test + f"check({entry_point})"` as tests.
    workers: candidates run at once; each is a separate process, so more than the number of
        CPU cores only adds contention (and can turn slow candidates into timeouts).
    show_progress: a progress bar over candidates; None shows one for 16 or more.
    """
    if not isinstance(candidates, Mapping) or not isinstance(tests, Mapping):
        raise MetricError(
            "evaluate_code: candidates and tests must be mappings keyed by task id "
            "(candidates: task -> list of programs, tests: task -> test code)"
        )
    if not candidates:
        raise MetricError("evaluate_code: no tasks given")
    missing = [task for task in candidates if task not in tests]
    if missing:
        raise MetricError(f"evaluate_code: no tests for task(s) {missing[:5]}; give tests[task] for every task")
    programs, owners = [], []
    for task, samples in candidates.items():
        if isinstance(samples, str) or not isinstance(samples, Sequence) or not samples:
            raise MetricError(f"evaluate_code: candidates[{task!r}] must be a non-empty list of program strings")
        if not isinstance(tests[task], str):
            raise MetricError(f"evaluate_code: tests[{task!r}] must be a string of Python code")
        for sample in samples:
            if not isinstance(sample, str):
                raise MetricError(
                    f"evaluate_code: a candidate of task {task!r} is a {type(sample).__name__}, not a string"
                )
            programs.append(f"{sample}\n\n{tests[task]}\n")
            owners.append(task)
    _check_sandbox_settings(timeout_s, memory_mb, workers, max_output_chars)
    # Check k against the sample counts now, not after minutes of execution.
    mean_pass_at_k([[False] * len(samples) for samples in candidates.values()], ks)

    results: list[ExecutionResult | None] = [None] * len(programs)
    runs = _run_many(
        programs,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        allow_network=allow_network,
        workers=workers,
        max_output_chars=max_output_chars,
        python=python or sys.executable,
    )
    for index, result in progress(runs, len(programs), "executing candidates", show_progress):
        results[index] = result
    executions: dict[Any, list[ExecutionResult]] = {task: [] for task in candidates}
    for task, result in zip(owners, results):
        executions[task].append(result)
    table = mean_pass_at_k({task: [r.passed for r in runs] for task, runs in executions.items()}, ks)
    settings = table.settings | {
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "workers": workers,
        "network": network_isolation(allow_network),
        "python": python or sys.executable,
        "statuses": {s: sum(r.status == s for r in results) for s in STATUSES},
    }
    return CodeEvalResult(dict(table.details), executions, settings)


__all__ = [
    "CodeEvalResult",
    "ExecutionResult",
    "STATUSES",
    "evaluate_code",
    "mean_pass_at_k",
    "network_isolation",
    "pass_at_k",
    "run_candidate",
]
