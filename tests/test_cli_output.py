"""How the `genforge` command talks: a reader that closes the pipe early ends it quietly, an
error arrives whole on one line whatever the length of its paths, and a user's mistake is a
message, never a traceback."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

from genforge.cli import EXIT_STDOUT_CLOSED, main


def _genforge(*args: str, **popen) -> subprocess.Popen:
    # COLUMNS=80: the width a console assumes when stderr is not a terminal, where wrapping bit.
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.Popen([sys.executable, "-m", "genforge.cli", *args], env=env, text=True, **popen)


def test_a_reader_closing_the_pipe_early_ends_the_command_quietly(tmp_path):
    points = tmp_path / "points.csv"
    with open(points, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["compute", "loss"])
        for exponent in range(15, 20):
            writer.writerow([10.0**exponent, 50 * (10.0**exponent) ** -0.07])
    # Far more output than a pipe holds, so the command is still writing when the reader leaves.
    budgets = [f"{1e20 + i * 1e15:.6e}" for i in range(20_000)]
    process = _genforge(
        "size",
        "fit",
        "--points",
        str(points),
        "--extrapolate",
        *budgets,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.readline().strip() == "{"
    process.stdout.close()  # as `| head -1` does
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == EXIT_STDOUT_CLOSED
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr


def test_an_error_with_a_long_path_arrives_on_one_line(tmp_path):
    deep = tmp_path.joinpath(*["a-directory-with-a-rather-long-name"] * 5)  # ~180 characters below tmp_path
    deep.mkdir(parents=True)
    (deep / "pred.txt").write_text("first prediction\nsecond prediction\n")
    (deep / "ref.txt").write_text("only one reference\n")
    process = _genforge(
        "eval",
        "metrics",
        "--pred",
        str(deep / "pred.txt"),
        "--ref",
        str(deep / "ref.txt"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and stdout == ""
    sentence = (
        f"error: {deep / 'pred.txt'} has 2 lines but {deep / 'ref.txt'} has 1; "
        "each reference file needs one line per prediction"
    )
    assert sentence in stderr.splitlines(), stderr


def test_user_mistakes_are_one_line_errors_not_tracebacks(tmp_path, capsys):
    # A directory where a file is expected: the operating system's error, reported as one line.
    assert main(["eval", "metrics", "--pred", str(tmp_path), "--metrics", "bleu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and "Traceback" not in err
    # Brackets in a message are text, not console markup to be swallowed.
    missing = tmp_path / "[bold]predictions.txt"
    assert main(["eval", "metrics", "--pred", str(missing)]) == 2
    assert f"--pred file {missing} does not exist" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as probe:  # bound and closed again: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_server_that_is_not_there_is_one_line_not_a_traceback(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["bench", "serve", "--url", url, "--num-requests", "1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot list the models of {url}" in err and "Traceback" not in err
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question": "q", "answers": {"a": "x", "b": "y"}}) + "\n")
    assert main(["eval", "judge", "--answers", str(answers), "--endpoint", f"{url}/v1", "--judge-model", "j"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the endpoint" in err and "is the server running?" in err and "Traceback" not in err
