"""A progress bar for training a vision model: steps done, the latest losses, time left, on
stderr through `genforge.console` (so stdout carries only a command's result); silent when
stderr is not a terminal or when `enabled` is false (tests, benchmarks)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def training_progress(total_steps: int, description: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields `advance(**losses)`: one step done, with the losses to show beside the bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..console import console

    progress = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )
    with progress:
        task = progress.add_task(description, total=total_steps, status="")

        def advance(**losses: float) -> None:
            status = " ".join(f"{name} {value:.4g}" for name, value in losses.items())
            progress.update(task, advance=1, status=status)

        yield advance
