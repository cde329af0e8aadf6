"""A progress bar for long evaluation loops: rich if importable, else tqdm, else none."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# Fewer steps than this finish before a bar would tell anyone anything.
MIN_STEPS_FOR_BAR = 16


def progress(items: Iterable[T], total: int, description: str, show: bool | None = None) -> Iterator[T]:
    """Iterate `items`, drawing a transient bar when `show` is True, or when it is None and
    there are at least `MIN_STEPS_FOR_BAR` steps."""
    if show is None:
        show = total >= MIN_STEPS_FOR_BAR
    if not show:
        yield from items
        return
    try:
        from rich.progress import track
    except ImportError:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # neither installed: run without a bar rather than fail
            yield from items
            return
        yield from tqdm(items, total=total, desc=description, leave=False)
        return
    yield from track(items, total=total, description=description, transient=True)
