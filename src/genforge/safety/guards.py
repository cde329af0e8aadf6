"""Guardrails around a model's input and output: what to check, what to do, and a streaming filter.

Three guards, each usable alone or together (`GuardConfig`, e.g. ``"input,output,pii"`` or a
JSON/TOML/YAML file):

- ``input``: prompts (user and tool messages; the operator's system message is trusted) are
  scanned for prompt injection (`injection.InjectionDetector`). ``block`` refuses the request;
  ``flag`` lets it through and reports it.
- ``output``: generated text is moderated (`moderation.Moderator`) as it is produced.
  `OutputFilter` holds text back until a sentence ends (or `hold_chars` pile up), moderates
  the held text with the tail of what was already released as context, and only then releases
  it, so no unchecked text reaches the client. A flagged segment stops the response
  (``block``: finish reason ``content_filter``, nothing of the segment sent) or is let through
  and reported (``flag``).
- ``pii``: released text is redacted (`pii.redact_pii`, placeholder style by default) before it
  is sent, and so is everything the guards log; ``pii_input`` also redacts prompts before the
  model sees them.

Each check returns a `GuardEvent` (what was found, what was done); the server reports them in a
response header, a ``guard`` field and Prometheus counters.
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "GUARDS",
    "ACTIONS",
    "GuardConfig",
    "GuardEvent",
    "Guards",
    "OutputFilter",
    "RedactingLogFilter",
    "pii_redactor",
]

GUARDS = ("input", "output", "pii")
ACTIONS = ("block", "flag")
# A segment ends after sentence punctuation followed by white space, or at a line break.
_BOUNDARY = re.compile(r"[.!?…](?:[\"')\]]*)\s|\n")
_CONTEXT_CHARS = 300  # of released text moderated with each new segment

log = logging.getLogger("genforge.safety.guards")


@dataclass
class GuardConfig:
    """Which guards run and how; see the module docstring. Thresholds default to the heads'."""

    input: bool = False
    output: bool = False
    pii: bool = False
    input_action: str = "block"
    input_threshold: float | None = None
    output_action: str = "block"
    output_categories: tuple[str, ...] | None = None  # None: every moderation category
    output_thresholds: dict[str, float] = field(default_factory=dict)
    pii_style: str = "placeholder"
    pii_types: tuple[str, ...] | None = None
    pii_input: bool = False
    hold_chars: int = 240  # most text held back before a segment is checked without a sentence end

    def __post_init__(self) -> None:
        for name in ("input_action", "output_action"):
            if getattr(self, name) not in ACTIONS:
                raise ValueError(f"{name} {getattr(self, name)!r} is not supported; accepted: {', '.join(ACTIONS)}")
        if self.hold_chars < 16:
            raise ValueError(f"hold_chars must be >= 16, got {self.hold_chars}")
        if self.output_categories is not None:
            from .moderation import CATEGORIES

            unknown = sorted(set(self.output_categories) - set(CATEGORIES))
            if unknown:
                raise ValueError(f"unknown output categories {', '.join(unknown)}; accepted: {', '.join(CATEGORIES)}")
            self.output_categories = tuple(self.output_categories)
        if self.pii_types is not None:
            self.pii_types = tuple(self.pii_types)

    @property
    def enabled(self) -> list[str]:
        return [g for g in GUARDS if getattr(self, g)]

    @classmethod
    def from_spec(cls, spec: str, **options) -> GuardConfig:
        """``"input,output,pii"`` (any subset) -> a config with those guards on."""
        names = [part.strip() for part in spec.split(",") if part.strip()]
        unknown = [n for n in names if n not in GUARDS]
        if unknown or not names:
            raise ValueError(f"--guard takes a comma-separated subset of {', '.join(GUARDS)}, got {spec!r}")
        return cls(**{n: True for n in names}, **options)

    @classmethod
    def from_mapping(cls, data: dict, where: str = "guard config") -> GuardConfig:
        """A config from a mapping: ``{"guards": [...], "input": {"action", "threshold"}, "output":
        {"action", "categories", "thresholds"}, "pii": {"style", "types", "redact_input"}, "hold_chars"}``."""
        known = {"guards", "input", "output", "pii", "hold_chars"}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"{where}: unknown keys {', '.join(extra)}; accepted: {', '.join(sorted(known))}")
        guards = data.get("guards", [g for g in GUARDS if g in data])
        if isinstance(guards, str):
            guards = [guards]
        unknown = [g for g in guards if g not in GUARDS]
        if unknown:
            raise ValueError(f"{where}: unknown guards {', '.join(unknown)}; accepted: {', '.join(GUARDS)}")
        sections = {}
        for section, allowed in (
            ("input", {"action", "threshold"}),
            ("output", {"action", "categories", "thresholds"}),
            ("pii", {"style", "types", "redact_input"}),
        ):
            value = data.get(section, {})
            if value is True or value is None:
                value = {}
            if not isinstance(value, dict) or set(value) - allowed:
                raise ValueError(f"{where}: [{section}] takes {', '.join(sorted(allowed))}; got {value!r}")
            sections[section] = value
        options = {
            "input_action": sections["input"].get("action", "block"),
            "input_threshold": sections["input"].get("threshold"),
            "output_action": sections["output"].get("action", "block"),
            "output_categories": sections["output"].get("categories"),
            "output_thresholds": dict(sections["output"].get("thresholds", {})),
            "pii_style": sections["pii"].get("style", "placeholder"),
            "pii_types": sections["pii"].get("types"),
            "pii_input": bool(sections["pii"].get("redact_input", False)),
        }
        if "hold_chars" in data:
            options["hold_chars"] = int(data["hold_chars"])
        return cls(**{g: True for g in guards}, **options)

    @classmethod
    def from_file(cls, path: str | Path) -> GuardConfig:
        """A config from a JSON, TOML or YAML file (by extension), in `from_mapping`'s shape."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot read guard config {path}: {err.strerror}") from None
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"guard config {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"guard config {path} must hold a mapping, got {type(data).__name__}")
        return cls.from_mapping(data, str(path))


@dataclass
class GuardEvent:
    """What one guard found in one text and what it did about it."""

    guard: str  # input, output, pii
    action: str  # passed, flagged, blocked, stopped, redacted
    found: list[str] = field(default_factory=list)  # categories or PII types
    score: float | None = None
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, [])} | {"action": self.action}

    def summary(self) -> str:
        found = f"({','.join(self.found)})" if self.found else ""
        return f"{self.guard}={self.action}{found}"


def pii_redactor(style: str = "placeholder", types: Sequence[str] | None = None) -> Callable[[str], tuple[str, list]]:
    """``text -> (redacted text, PII types found)`` through `genforge.safety.pii.redact_pii`
    (imported on first use, so the other guards work without it)."""
    from .pii import redact_pii

    def redact(text: str) -> tuple[str, list[str]]:
        redaction = redact_pii(text, style=style, types=list(types) if types is not None else None)
        return redaction.text, [finding.type for finding in redaction.findings]

    return redact


class RedactingLogFilter(logging.Filter):
    """A logging filter that redacts PII in a record's message before any handler writes it."""

    def __init__(self, redact: Callable[[str], tuple[str, list]]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: let logging report it as it would
            return True
        record.msg, record.args = self.redact(message)[0], None
        return True


class Guards:
    """The configured guards with their detectors, loaded on first use."""

    def __init__(self, config: GuardConfig, *, detector=None, moderator=None, redactor=None) -> None:
        self.config = config
        self._detector, self._moderator, self._redactor = detector, moderator, redactor
        if config.pii and redactor is None:
            self._redactor = pii_redactor(config.pii_style, config.pii_types)
        if self._redactor is not None:
            log.addFilter(RedactingLogFilter(self._redactor))

    @property
    def detector(self):
        if self._detector is None:
            from .injection import InjectionDetector

            self._detector = InjectionDetector(threshold=self.config.input_threshold)
        return self._detector

    @property
    def moderator(self):
        if self._moderator is None:
            from .moderation import Moderator

            self._moderator = Moderator(thresholds=self.config.output_thresholds)
        return self._moderator

    def redact(self, text: str) -> tuple[str, list[str]]:
        if self._redactor is None:
            return text, []
        return self._redactor(text)

    def check_input(self, texts: Sequence[str]) -> GuardEvent:
        """Scan prompt texts for injection; the event's action is passed, flagged or blocked."""
        results = self.detector.scan_many(list(texts)) if texts else []
        flagged = [r for r in results if r.flagged]
        if not flagged:
            best = max((r.score for r in results), default=0.0)
            return GuardEvent("input", "passed", score=best)
        worst = max(flagged, key=lambda r: r.score)
        found = sorted({c for r in flagged for c in r.categories}) or ["injection"]
        action = "blocked" if self.config.input_action == "block" else "flagged"
        event = GuardEvent(
            "input",
            action,
            found,
            worst.score,
            {"rules": sorted({h.rule for h in worst.rule_hits if not h.quoted}), "tricks": worst.tricks},
        )
        log.warning("input guard %s a prompt (score %.3f, %s): %.200s", action, worst.score, ",".join(found), texts[0])
        return event

    def output_flags(self, windows: Sequence[str]) -> list[list[str]]:
        """Flagged moderation categories for each window (only the configured categories count)."""
        wanted = self.config.output_categories
        flags = []
        for result in self.moderator.moderate_many(list(windows)):
            flags.append([c for c in result.flagged_categories if wanted is None or c in wanted])
        return flags

    def output_filter(self) -> OutputFilter:
        return OutputFilter(self)

    def filter_text(self, text: str) -> tuple[str, list[GuardEvent], bool]:
        """A whole (non-streamed) output through the same segments a stream would use:
        (released text, events, stopped)."""
        out = self.output_filter()
        released = out.feed(text, final=True)
        return released, out.events, out.stopped


class OutputFilter:
    """Holds back, checks and releases one choice's streamed text (see the module docstring)."""

    def __init__(self, guards: Guards) -> None:
        self.guards = guards
        self.buffer = ""
        self.released_tail = ""
        self.stopped = False
        self.events: list[GuardEvent] = []

    def _segments(self, final: bool) -> list[str]:
        """Cut the buffer into segments ready to check; what is left waits for more text.
        (A position walks the buffer, which is sliced once: linear in its length.)"""
        segments = []
        hold = self.guards.config.hold_chars
        buffer, start = self.buffer, 0
        while start < len(buffer):
            ends = [m.end() for m in _BOUNDARY.finditer(buffer, start, start + hold)]
            if ends:
                cut = ends[-1]  # the last boundary within the hold window
            elif len(buffer) - start >= hold:
                # No sentence end: cut after the last space, so a word (an email, a card number)
                # is never split between two checks; a space-free run is cut at the limit.
                space = buffer.rfind(" ", start, start + hold)
                cut = space + 1 if space >= start else start + hold
            elif final:
                cut = len(buffer)
            else:
                break
            segments.append(buffer[start:cut])
            start = cut
        self.buffer = buffer[start:]
        return segments

    def feed(self, text: str, final: bool = False) -> str:
        """Take new text; returns the text now safe to send ("" while holding back). After a
        block, `stopped` is set and nothing more is released."""
        if self.stopped:
            return ""
        self.buffer += text
        segments = self._segments(final)
        if not segments:
            return ""
        config = self.guards.config
        flags: list[list[str]] = [[] for _ in segments]
        if config.output:
            # Each segment alone (so benign context cannot dilute it) and with the tail of what
            # came before (so harm split over two segments is seen whole).
            windows, tail = [], self.released_tail
            for segment in segments:
                windows += [segment, tail + segment]
                tail = (tail + segment)[-_CONTEXT_CHARS:]
            pairs = self.guards.output_flags(windows)
            flags = [sorted(set(pairs[2 * i]) | set(pairs[2 * i + 1])) for i in range(len(segments))]
        released = []
        for segment, found in zip(segments, flags):
            if found:
                if config.output_action == "block":
                    self.stopped = True
                    self.buffer = ""
                    self.events.append(GuardEvent("output", "stopped", found, detail={"withheld_chars": len(segment)}))
                    redacted, _ = self.guards.redact(segment)
                    log.warning("output guard stopped a response (%s): %.200s", ",".join(found), redacted)
                    break
                self.events.append(GuardEvent("output", "flagged", found))
            self.released_tail = (self.released_tail + segment)[-_CONTEXT_CHARS:]
            if config.pii:
                segment, kinds = self.guards.redact(segment)
                if kinds:
                    self.events.append(GuardEvent("pii", "redacted", kinds))
            released.append(segment)
        return "".join(released)
