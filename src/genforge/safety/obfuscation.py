"""Undoing the obfuscations attackers wrap around a prompt before a detector reads it.

A detector that matches "ignore previous instructions" misses "ｉｇｎｏｒｅ", "іgnore" (a
Cyrillic і), "ig\u200bnore" (a zero-width space), "1gn0r3" (leetspeak), the same words in
base64, or in Unicode tag characters that render as nothing (the "ASCII smuggling" trick).
`reveal` turns a text into the views a detector should read:

- ``text``: NFKC-normalised (full-width and mathematical letters become plain ones, Unicode
  TR15), invisible characters removed (zero-width spaces and joiners, bidirectional
  overrides, tag characters), and look-alike letters from other scripts mapped to Latin
  (a small confusables table in the spirit of Unicode TR39) when the text is mostly Latin;
- ``leet``: ``text`` lower-cased with leetspeak digits and symbols read as letters, built only
  when enough words mix letters and digits (judged on the first and last 20,000 characters);
- ``payloads``: what base64 runs and tag-character runs decode to, when that is readable text.

Runs of combining marks are first cut to 30 (Unicode's stream-safe format), because NFKC's
canonical reordering is quadratic in a run's length (40,000 stacked marks took 7 s). After
that, everything is a single pass over the input, and every regex here is
free of nested quantifiers, so the cost is linear in the text's length (a megabyte takes
milliseconds), whatever the text holds.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import string
import unicodedata
from dataclasses import dataclass, field

__all__ = ["Revealed", "reveal", "INVISIBLE_CHARACTERS", "CONFUSABLES"]

# Characters that render as nothing but split words for a matcher: zero-width space, non-joiner
# and joiner, word joiner, soft hyphen, BOM, Mongolian vowel separator, invisible operators,
# and the bidirectional embeddings, overrides and isolates (which reorder what a reader sees).
INVISIBLE_CHARACTERS = frozenset(
    "\u200b\u200c\u200d\u2060\u00ad\ufeff\u180e\u2061\u2062\u2063\u2064"
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"
)
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Tag characters (U+E0000..U+E007F) mirror ASCII and are invisible: a hidden message channel.
_TAG_START = 0xE0000
_TAG_RUN = re.compile("[\U000e0000-\U000e007f]")

# Cyrillic, Greek and other letters that look like Latin ones (after NFKC, which already folds
# full-width, mathematical and circled letters). Lower and upper case.
CONFUSABLES = {
    **dict(zip("аеорсухіјѕԁԛԝкмнтвгпԍɡһӏ", "aeopcyxijsdqwkmhtbrnghhl")),
    **dict(zip("АВЕКМНОРСТХІЈЅԌԚԜУ", "ABEKMHOPCTXIJSGQWY")),
    **dict(zip("αβεικνορτυχωϲϳ", "abeiknoptuxwcj")),
    **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "ABEZHIKMNOPTYX")),
    **dict(zip("ıȷℓ", "ijl")),
}
# Regexes rather than str.translate with a dict: translate looks every character of a
# non-ASCII text up in the dict, several times slower on a megabyte than one regex pass.
_CONFUSABLE_RUN = re.compile("[" + "".join(CONFUSABLES) + "]")
_INVISIBLE_RUN = re.compile("[" + "".join(sorted(INVISIBLE_CHARACTERS)) + "]+")
# Unicode's stream-safe format (UAX #15) allows at most 30 combining marks in a row; longer runs
# only stack marks (a "Zalgo" flood), and NFKC's canonical reordering is quadratic in a run's length.
_MAX_COMBINING_RUN = 30
_LEET_SAMPLE = 20_000  # characters read from each end to decide whether a text is leetspeak
# Leetspeak digits and symbols as the letters they stand for (one reading of each).
_LEET_TABLE = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_LEET_WORD = re.compile(r"\b(?=[a-z]{0,20}[0-9@$])(?=[0-9@$!]{0,20}[a-z])[a-z0-9@$!]{3,24}\b")
_WORD = re.compile(r"\b[a-z]{2,}\b")
# Base64 runs long enough to hold an instruction (16+ characters, 12+ decoded bytes).
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_MAX_PAYLOADS = 16  # decoded payloads kept per text: enough for a prompt, bounded for a flood
_MAX_PAYLOAD_CHARS = 4096


@dataclass
class Revealed:
    """The views of a text a detector reads, and which tricks were undone to get them."""

    original: str
    text: str  # normalised: NFKC, invisible characters removed, confusables mapped
    leet: str | None = None  # lower-cased with leetspeak read as letters (None: no leetspeak seen)
    payloads: list[tuple[str, str]] = field(default_factory=list)  # (encoding, decoded text)
    tricks: dict[str, int] = field(default_factory=dict)  # trick -> how many characters or runs

    def views(self) -> list[tuple[str, str]]:
        """(name, text) for every view worth scanning: the normalised text, leetspeak, payloads."""
        out = [("text", self.text)]
        if self.leet is not None:
            out.append(("leetspeak", self.leet))
        out += [(encoding, decoded) for encoding, decoded in self.payloads]
        return out


@functools.cache
def _combining_runs() -> re.Pattern:
    """Runs of more than `_MAX_COMBINING_RUN` combining marks (non-zero canonical combining
    class, from this Python's Unicode tables; built once, on first use)."""
    ranges, start = [], None
    for code in range(0x110000 + 1):
        inside = code <= 0x10FFFF and unicodedata.combining(chr(code)) != 0
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(code - 1))}")
            start = None
    return re.compile(f"([{''.join(ranges)}]{{{_MAX_COMBINING_RUN}}})[{''.join(ranges)}]+")


def _decode_tags(text: str) -> tuple[str, str]:
    """Split out Unicode tag characters: (text without them, the ASCII they spell)."""
    hidden = "".join(chr(ord(ch) - _TAG_START) for ch in _TAG_RUN.findall(text) if 0x20 <= ord(ch) - _TAG_START < 0x7F)
    return _TAG_RUN.sub("", text), hidden


def _readable(data: bytes) -> str | None:
    """Decoded bytes as text if they read as text (UTF-8, mostly printable), else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in text)
    letters = sum(ch.isalpha() for ch in text)
    if not text or printable < 0.95 * len(text) or letters < 0.5 * len(text):
        return None
    return text


def _base64_payloads(text: str) -> list[str]:
    payloads = []
    for match in _BASE64_RUN.finditer(text):
        run = match.group()[: _MAX_PAYLOAD_CHARS * 4 // 3]
        # A plain word of 16+ letters is also valid base64; only runs mixing cases or digits
        # (as encoded text does) are worth decoding.
        if run.isalpha() and (run.islower() or run.isupper()):
            continue
        try:
            decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        readable = _readable(decoded)
        if readable is not None:
            payloads.append(readable)
            if len(payloads) >= _MAX_PAYLOADS:
                break
    return payloads


def reveal(text: str) -> Revealed:
    """The normalised, de-leeted and decoded views of ``text`` (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"expected text (str), got {type(text).__name__}; decode bytes first")
    tricks: dict[str, int] = {}
    payloads: list[tuple[str, str]] = []
    visible = text
    if _TAG_RUN.search(text):
        visible, hidden = _decode_tags(text)
        if hidden:
            tricks["unicode_tags"] = len(hidden)
            payloads.append(("unicode_tags", hidden[:_MAX_PAYLOAD_CHARS]))
    invisible = sum(visible.count(ch) for ch in INVISIBLE_CHARACTERS if ch in visible)
    if invisible:
        tricks["bidi_controls" if any(ch in visible for ch in _BIDI) else "zero_width"] = invisible
        visible = _INVISIBLE_RUN.sub("", visible)
    if not visible.isascii():
        capped = _combining_runs().sub(r"\1", visible)
        if len(capped) != len(visible):
            tricks["combining_flood"] = len(visible) - len(capped)
            visible = capped
    normal = visible if unicodedata.is_normalized("NFKC", visible) else unicodedata.normalize("NFKC", visible)
    if normal is not visible:
        tricks["nfkc"] = 1  # NFKC changes lengths, so a count of changed characters is not defined
    # Counting with str.count keeps the pass in C: a Python loop over a megabyte takes a tenth of a second.
    changed = len(_CONFUSABLE_RUN.findall(normal))
    if changed:
        mapped = _CONFUSABLE_RUN.sub(lambda m: CONFUSABLES[m.group()], normal)
        lowered = mapped.lower()
        latin = sum(lowered.count(ch) for ch in string.ascii_lowercase)
        # Mostly-Latin text with foreign look-alikes is a trick; Russian or Greek prose is not,
        # and mapping it would garble what the classifier reads.
        if changed <= 0.5 * max(latin, 1):
            tricks["homoglyphs"] = changed
            normal = mapped
    lower = normal.lower()
    leet = None
    sample = lower if len(lower) <= 2 * _LEET_SAMPLE else lower[:_LEET_SAMPLE] + " " + lower[-_LEET_SAMPLE:]
    leet_words = len(_LEET_WORD.findall(sample))
    if leet_words and leet_words >= 0.2 * (leet_words + len(_WORD.findall(sample))):
        leet = lower.translate(_LEET_TABLE)
        tricks["leetspeak"] = leet_words
    for decoded in _base64_payloads(visible):
        decoded = unicodedata.normalize("NFKC", decoded)
        payloads.append(("base64", _CONFUSABLE_RUN.sub(lambda m: CONFUSABLES[m.group()], decoded)))
    if any(name == "base64" for name, _ in payloads):
        tricks["base64"] = sum(name == "base64" for name, _ in payloads)
    return Revealed(original=text, text=normal, leet=leet, payloads=payloads, tricks=tricks)
