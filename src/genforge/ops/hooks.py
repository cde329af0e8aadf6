"""Where training and evaluation publish their metric records, for trackers to receive.

The training loops (`train.Trainer`, the GRPO and PPO trainers) write one JSON record per step
and per evaluation to `metrics.jsonl`, and `genforge eval` prints its results; each also hands
the same record to `publish_metrics`. A tracker (`ops.tracking`) subscribes for the length of a
command with `metric_listener`, so the loops never know which tracker, if any, is listening.
Listeners are kept in a context variable: a command's listener sees that command's records only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

MetricListener = Callable[[Mapping[str, Any]], None]

_listeners: ContextVar[tuple[MetricListener, ...]] = ContextVar("genforge_metric_listeners", default=())


def publish_metrics(record: Mapping[str, Any]) -> None:
    """Hand `record` (a metrics.jsonl record: "step" and numbers, or a result without "step") to
    every listener subscribed in this context; nothing happens when none is."""
    for listener in _listeners.get():
        listener(record)


@contextlib.contextmanager
def metric_listener(listener: MetricListener) -> Iterator[None]:
    """Subscribe `listener` to the records published inside the block."""
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


__all__ = ["MetricListener", "metric_listener", "publish_metrics"]
