"""What machine a benchmark ran on: every results file records it next to its numbers; and
writing a benchmark's results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(**versions: str) -> dict:
    """CPU, cores, torch threads, GPU if any, and the versions of torch, Python and `versions`
    (the peer libraries the benchmark compares against)."""
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **versions,
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(directory: str | Path, name: str, result: dict, markdown: str) -> None:
    """`name.json` (the numbers) and `name.md` (the table) in `directory`, each written atomically."""
    from genforge.atomic import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / f"{name}.json", json.dumps(result, indent=2))
    atomic_write_text(directory / f"{name}.md", markdown)
