"""PII detection and redaction: find personal data in text and replace it before it reaches a
log, a prompt or a training set.

Detection runs two kinds of recognizer on the same text:

- **patterns with validators** (`pii_patterns`): emails, phone numbers (`phonenumbers`), card
  numbers (Luhn), IBANs (mod-97), IP addresses, US SSNs, UK NINOs, Spanish DNI/NIE, Dutch BSNs,
  dates of birth and street addresses, in the spirit of Microsoft Presidio's pattern recognizers;
- **a named-entity model** (`pii_ner`) for names, organisations and places: a BERT token
  classifier (Devlin et al. 2019) loaded from a transformers `BertForTokenClassification`
  checkpoint. It is optional: no trained NER weights ship with genforge.

Before the patterns run, the text is normalised for detection only: zero-width and other format
characters are dropped, compatibility forms (full-width digits, non-breaking spaces, ligatures)
are folded by NFKC, decimal digits of any script read as ASCII digits and common Cyrillic/Greek
look-alikes of Latin letters read as those letters. Spans are mapped back, so each finding
covers the original characters, hidden ones included.

Overlapping findings are resolved by score, then length: the more certain reading wins (an
IBAN's digits are not also a phone number). Redaction styles (`REDACTION_STYLES`):

    mask         every character of the span becomes '*'
    placeholder  <EMAIL_1>, <PERSON_2>: the same value gets the same number within a text
    pseudonym    a fake value of the same type and shape, chosen by HMAC-SHA256 under a key: the same
                 value gets the same fake wherever it appears, and without the key the fake says
                 nothing about the value
    reversible   <EMAIL_3fa85f6457c1>: a keyed tag; the value, encrypted (Fernet: AES-128-CBC + HMAC),
                 goes to a `Vault` kept outside the text; `restore(text, vault, key)` gives the exact
                 original back
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import json
import random
import re
import secrets
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .pii_patterns import (
    DEFAULT_PHONE_REGIONS,
    DNI_LETTERS,
    IBAN_LENGTHS,
    PATTERN_RECOGNIZERS,
    bsn_valid,
    iban_check_digits,
    luhn_check_digit,
    phone_recognizer,
)

if TYPE_CHECKING:
    from .pii_ner import NERTagger

PATTERN_TYPES: tuple[str, ...] = tuple(PATTERN_RECOGNIZERS)
NER_TYPES: tuple[str, ...] = ("PERSON", "ORGANIZATION", "LOCATION")
PII_TYPES: tuple[str, ...] = PATTERN_TYPES + NER_TYPES
REDACTION_STYLES = ("mask", "placeholder", "pseudonym", "reversible")


@dataclass(frozen=True)
class Finding:
    """One piece of PII: its type, the span [start, end) in the original text, a confidence in
    [0, 1] and the recognizer that found it ("pattern:iban", "ner")."""

    type: str
    start: int
    end: int
    score: float
    source: str

    def to_dict(self) -> dict:
        """The finding without its value (safe to log)."""
        return {"type": self.type, "start": self.start, "end": self.end, "score": self.score, "source": self.source}


# --------------------------------------------------------------------------- normalisation
# Cyrillic and Greek letters drawn like Latin ones (Unicode's confusables for the letters that
# occur in emails, IBANs and IDs); a spoofed "pаypal" keeps its look but reads as Latin here.
_LOOKALIKES = {
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s",
    "ԁ": "d", "һ": "h", "ӏ": "l", "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O",
    "Р": "P", "С": "C", "Т": "T", "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S", "Α": "A", "Β": "B", "Ε": "E",
    "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y",
    "Χ": "X", "ο": "o", "ν": "v", "‐": "-", "‑": "-", "‒": "-", "–": "-", "—": "-", "−": "-", "․": ".",
}  # fmt: skip


class _DetectionForms(dict):
    """Code point -> what it reads as for detection, filled on first use (`str.translate` looks
    characters up in C, so only a character never seen before costs Python work). Characters
    whose form is not exactly one character (dropped or expanded) are kept in `irregular`."""

    def __init__(self) -> None:
        super().__init__()
        self.irregular: set[str] = set()

    def __missing__(self, code: int) -> str:
        char = chr(code)
        form = char if code < 128 else _detection_form(char)
        if len(form) != 1:
            self.irregular.add(char)
        if len(self) < 1 << 20:
            self[code] = form
        return form


_FORMS = _DetectionForms()


def _detection_form(char: str) -> str:
    """What one non-ASCII character reads as for detection ("" for an invisible one)."""
    if unicodedata.category(char) in ("Cf", "Cc", "Cs", "Co", "Cn") and not char.isspace():
        return ""  # zero-width spaces/joiners, bidi controls, soft hyphens, lone surrogates
    if char in _LOOKALIKES:
        return _LOOKALIKES[char]
    digit = unicodedata.decimal(char, None)
    if digit is not None:
        return str(digit)
    folded = unicodedata.normalize("NFKC", char)
    if folded.isascii():
        return folded
    return " " if char.isspace() else char


def normalize_for_detection(text: str) -> tuple[str, np.ndarray | None]:
    """(normalised text, offsets): offsets[i] is the index in `text` of normalised character i,
    with one more entry, len(text), at the end; None when each character maps to one (the
    offsets are then the identity)."""
    if text.isascii():
        return text, None
    normal = text.translate(_FORMS)
    irregular = [char for char in _FORMS.irregular if char in text]
    if not irregular:
        return normal, None
    # Original index of each normalised character: index i repeated len(form of char i) times,
    # counted in numpy so that a text full of hidden characters costs no Python loop per character.
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    lengths = np.ones(len(codes) + 1, dtype=np.int64)
    for char in irregular:
        lengths[:-1][codes == ord(char)] = len(_FORMS[ord(char)])
    offsets = np.repeat(np.arange(len(codes) + 1, dtype=np.int64), lengths)
    return normal, offsets


def _original_span(offsets: np.ndarray | None, start: int, end: int) -> tuple[int, int]:
    if offsets is None:
        return start, end
    return int(offsets[start]), int(offsets[end - 1]) + 1


# ------------------------------------------------------------------------------- detection
def parse_types(types: str | Iterable[str] | None, *, with_ner: bool = False) -> tuple[str, ...]:
    """The PII types to look for: None means every pattern type (and the NER types when a model
    is given); a comma-separated string or a list names some, in any case."""
    if types is None:
        return PII_TYPES if with_ner else PATTERN_TYPES
    names = [t for t in types.split(",")] if isinstance(types, str) else list(types)
    chosen = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"a PII type must be a string, got {name!r}")
        upper = name.strip().upper()
        if upper not in PII_TYPES:
            raise ValueError(f"unknown PII type {name!r}; accepted: {', '.join(PII_TYPES)}")
        if upper in NER_TYPES and not with_ner:
            raise ValueError(
                f"{upper} is found by a named-entity model, and none is loaded: pass ner=DIR (--ner-model DIR) "
                "with a BertForTokenClassification checkpoint, or choose among the pattern types: "
                f"{', '.join(PATTERN_TYPES)}"
            )
        if upper not in chosen:
            chosen.append(upper)
    if not chosen:
        raise ValueError(f"no PII type given; accepted: {', '.join(PII_TYPES)}")
    return tuple(chosen)


def resolve_overlaps(findings: Iterable[Finding]) -> list[Finding]:
    """Keep a set of non-overlapping findings: higher score first, then the longer span, then
    the earlier one; returned in text order."""
    starts: list[int] = []
    kept: list[Finding] = []  # sorted by start, parallel to `starts`
    for finding in sorted(findings, key=lambda f: (-f.score, -(f.end - f.start), f.start)):
        index = bisect.bisect_left(starts, finding.start)
        if index < len(kept) and kept[index].start < finding.end:
            continue  # the next kept span starts inside this one
        if index > 0 and kept[index - 1].end > finding.start:
            continue  # the previous kept span runs into this one
        starts.insert(index, finding.start)
        kept.insert(index, finding)
    return kept


class PIIDetector:
    """The recognizers for a chosen set of PII types.

    types: None for every pattern type (plus PERSON/ORGANIZATION/LOCATION with a model), or names.
    ner: a `pii_ner.NERTagger`, or the directory of a BertForTokenClassification checkpoint.
    phone_regions: the regions whose national formats count (international +CC numbers always do).
    min_score: findings below it are dropped.
    """

    def __init__(
        self,
        types: str | Iterable[str] | None = None,
        *,
        ner: NERTagger | str | Path | None = None,
        phone_regions: Iterable[str] = DEFAULT_PHONE_REGIONS,
        min_score: float = 0.0,
    ) -> None:
        if ner is not None and not callable(ner):
            from .pii_ner import NERTagger

            ner = NERTagger(ner)
        self.ner = ner
        self.types = parse_types(types, with_ner=ner is not None)
        if not 0 <= min_score <= 1:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        self.min_score = min_score
        regions = tuple(r.strip().upper() for r in phone_regions)
        self.recognizers = {
            name: phone_recognizer(regions) if name == "PHONE" and regions != DEFAULT_PHONE_REGIONS else recognizer
            for name, recognizer in PATTERN_RECOGNIZERS.items()
            if name in self.types
        }

    def detect(self, text: str) -> list[Finding]:
        """Non-overlapping findings in `text`, in order."""
        if not isinstance(text, str):
            raise TypeError(f"PII detection takes text (str), got {type(text).__name__}; decode bytes first")
        if not text or text.isspace():
            return []
        normal, offsets = normalize_for_detection(text)
        found: list[Finding] = []
        for recognizer in self.recognizers.values():
            for match in recognizer(normal):
                start, end = _original_span(offsets, match.start, match.end)
                found.append(Finding(match.type, start, end, match.score, match.source))
        ner_types = [t for t in self.types if t in NER_TYPES]
        if self.ner is not None and ner_types:
            for entity in self.ner(normal):
                if entity.type in ner_types:
                    start, end = _original_span(offsets, entity.start, entity.end)
                    found.append(Finding(entity.type, start, end, round(entity.score, 4), "ner"))
        return resolve_overlaps(f for f in found if f.score >= self.min_score)


@lru_cache(maxsize=16)
def _pattern_detector(types: tuple[str, ...] | None) -> PIIDetector:
    return PIIDetector(types)


def detect_pii(text: str, types: str | Iterable[str] | None = None) -> list[Finding]:
    """Findings of the pattern recognizers (see `PIIDetector` for a named-entity model too)."""
    return _pattern_detector(None if types is None else parse_types(types)).detect(text)


# ------------------------------------------------------------------------------- redaction
def _key_bytes(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes) or len(key) < 16:
        raise ValueError("a redaction key must be bytes or a string of at least 16 bytes (e.g. secrets.token_hex(16))")
    return key


def _derived(key: bytes, purpose: str) -> bytes:
    return hmac.new(key, f"genforge-pii:{purpose}".encode(), hashlib.sha256).digest()


def _identity(pii_type: str, value: str) -> str:
    """What makes two mentions the same value: case and spacing do not count, nor do the
    separators in numbers."""
    normal = normalize_for_detection(value)[0]
    if pii_type in ("EMAIL", "PERSON", "ORGANIZATION", "LOCATION", "STREET_ADDRESS", "DATE_OF_BIRTH"):
        return " ".join(normal.casefold().split())
    if pii_type == "IP_ADDRESS":
        return normal.lower()
    return "".join(char for char in normal.upper() if char.isalnum())


@dataclass
class Vault:
    """The values behind reversible tags, each encrypted under the redaction key: the vault can be
    stored (it reveals nothing without the key) and must be kept to restore the text."""

    entries: dict[str, str] = field(default_factory=dict)  # tag -> Fernet token

    def to_json(self) -> str:
        return json.dumps({"format": "genforge-pii-vault", "version": 1, "entries": self.entries}, indent=1)

    @classmethod
    def from_json(cls, data: str) -> Vault:
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as err:
            raise ValueError(f"not a PII vault: invalid JSON ({err.msg})") from None
        if not isinstance(payload, dict) or payload.get("format") != "genforge-pii-vault":
            raise ValueError("not a PII vault: expected the JSON written by Vault.to_json (format genforge-pii-vault)")
        return cls(dict(payload["entries"]))

    def save(self, path: str | Path) -> None:
        from ..atomic import atomic_write_text

        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vault:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


_VAULT_TAG = re.compile(r"<([A-Z_]{2,20})_([0-9a-f]{12})>")


def _fernet(key: bytes):
    from cryptography.fernet import Fernet

    return Fernet(base64.urlsafe_b64encode(_derived(key, "vault-encryption")))


def restore(text: str, vault: Vault | Mapping[str, str], key: bytes | str) -> str:
    """Put back every reversible tag of `text` that `vault` holds; other text is untouched."""
    from cryptography.fernet import InvalidToken

    entries = vault.entries if isinstance(vault, Vault) else dict(vault)
    fernet = _fernet(_key_bytes(key))

    def original(match: re.Match) -> str:
        token = entries.get(match.group())
        if token is None:
            return match.group()
        try:
            return fernet.decrypt(token.encode("ascii")).decode("utf-8", errors="surrogatepass")
        except InvalidToken:
            raise ValueError("this key does not open the vault (wrong key, or the vault was changed)") from None

    return _VAULT_TAG.sub(original, text)


@dataclass
class Redaction:
    """The redacted text and what was replaced.

    findings: spans in the ORIGINAL text; `replacements[i]` is what finding i became.
    vault: for the reversible style, the encrypted values (keep it, with the key, to restore).
    key: the key used by the pseudonym and reversible styles (one is generated when none is given).
    """

    text: str
    findings: list[Finding]
    style: str
    replacements: list[str] = field(default_factory=list, repr=False)
    vault: Vault | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)

    @property
    def counts(self) -> dict[str, int]:
        """Findings per type."""
        return dict(Counter(f.type for f in self.findings))


class Redactor:
    """Redacts texts one after another with shared state: placeholder numbers, pseudonyms and the
    vault stay consistent across the calls (the turns of a conversation, the chunks of a file).

    style: one of `REDACTION_STYLES`. key: for "pseudonym" and "reversible" (bytes or str, 16+
    bytes); None draws a random one, available as `.key`. detector: a `PIIDetector` (default:
    the pattern recognizers for `types`).
    """

    def __init__(
        self,
        style: str = "placeholder",
        *,
        types: str | Iterable[str] | None = None,
        key: bytes | str | None = None,
        detector: PIIDetector | None = None,
    ) -> None:
        if style not in REDACTION_STYLES:
            raise ValueError(f"unknown redaction style {style!r}; accepted: {', '.join(REDACTION_STYLES)}")
        if detector is not None and types is not None:
            raise ValueError("give either types or a detector (whose types are fixed), not both")
        self.style = style
        self.detector = detector or _pattern_detector(None if types is None else parse_types(types))
        self.key = _key_bytes(key) if key is not None else secrets.token_bytes(32)
        self.vault = Vault() if style == "reversible" else None
        self._numbers: dict[tuple[str, str], int] = {}
        self._per_type: Counter[str] = Counter()

    def redact(self, text: str) -> Redaction:
        return self.apply(text, self.detector.detect(text))

    def apply(self, text: str, findings: Iterable[Finding]) -> Redaction:
        """Replace the given findings (non-overlapping spans of `text`)."""
        findings = sorted(findings, key=lambda f: f.start)
        for before, after in zip(findings, findings[1:]):
            if after.start < before.end:
                raise ValueError(f"findings overlap ({before} and {after}); pass them through resolve_overlaps first")
        pieces, replacements, position = [], [], 0
        for finding in findings:
            value = text[finding.start : finding.end]
            replacement = self._replacement(finding.type, value)
            if self.style == "reversible" and replacement in text:
                raise ValueError(f"the text already holds the tag {replacement}; it could not be restored exactly")
            pieces += [text[position : finding.start], replacement]
            replacements.append(replacement)
            position = finding.end
        pieces.append(text[position:])
        return Redaction(
            text="".join(pieces),
            findings=findings,
            style=self.style,
            replacements=replacements,
            vault=self.vault,
            key=self.key if self.style in ("pseudonym", "reversible") else None,
        )

    def _replacement(self, pii_type: str, value: str) -> str:
        if self.style == "mask":
            return "*" * len(value)
        identity = _identity(pii_type, value)
        if self.style == "placeholder":
            number = self._numbers.get((pii_type, identity))
            if number is None:
                self._per_type[pii_type] += 1
                number = self._numbers[(pii_type, identity)] = self._per_type[pii_type]
            return f"<{pii_type}_{number}>"
        if self.style == "pseudonym":
            digest = hmac.new(_derived(self.key, "pseudonym"), f"{pii_type}\0{identity}".encode(), hashlib.sha256)
            return pseudonym(pii_type, normalize_for_detection(value)[0], random.Random(digest.digest()))
        # Reversible: the tag is keyed on the exact value, so the vault gives that value back.
        raw = value.encode("utf-8", errors="surrogatepass")
        tag = hmac.new(_derived(self.key, "vault-tag"), pii_type.encode() + b"\0" + raw, hashlib.sha256).hexdigest()
        token = f"<{pii_type}_{tag[:12]}>"
        if token not in self.vault.entries:
            self.vault.entries[token] = _fernet(self.key).encrypt(raw).decode("ascii")
        return token


def redact_pii(
    text: str,
    style: str = "placeholder",
    *,
    types: str | Iterable[str] | None = None,
    key: bytes | str | None = None,
    detector: PIIDetector | None = None,
) -> Redaction:
    """Find the PII in `text` and replace it in the given style (see the module docstring).

    types: PII types to redact (default: every pattern type); detector: a `PIIDetector`
    (e.g. with a named-entity model) used instead. key: for pseudonym and reversible styles.
    """
    return Redactor(style, types=types, key=key, detector=detector).redact(text)


# ------------------------------------------------------------------------------ pseudonyms
_FIRST = ("Alex", "Sam", "Jordan", "Taylor", "Morgan", "Casey", "Riley", "Jamie", "Robin", "Avery", "Quinn", "Rowan")
_LAST = ("Smith", "Garcia", "Novak", "Okafor", "Larsen", "Moreau", "Tanaka", "Silva", "Kowalski", "Byrne", "Haddad")
_ORGS = ("Contoso", "Fabrikam", "Northwind Traders", "Tailspin Toys", "Litware", "Adventure Works", "Woodgrove Bank")
_PLACES = ("Springfield", "Riverton", "Lakeside", "Fairview", "Greenville", "Kingsbridge", "Millbrook")
_STREETS = ("Elm", "Oak", "Maple", "Cedar", "Birch", "Willow", "Chestnut", "Hawthorn")


def _digits_like(value: str, rng: random.Random, keep: int = 0) -> str:
    """`value` with each digit after the first `keep` digits replaced by a drawn one."""
    out, seen = [], 0
    for char in value:
        if char.isdigit():
            seen += 1
            out.append(char if seen <= keep else str(rng.randrange(10)))
        else:
            out.append(char)
    return "".join(out)


def pseudonym(pii_type: str, value: str, rng: random.Random) -> str:
    """A fake value of the same type (and, for numbers, the same layout) drawn with `rng`."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    if pii_type == "EMAIL":
        return f"{first.lower()}.{last.lower()}{rng.randrange(100, 1000)}@example.com"  # RFC 2606 domain
    if pii_type == "PERSON":
        return first if len(value.split()) == 1 else f"{first} {last}"
    if pii_type == "ORGANIZATION":
        return rng.choice(_ORGS)
    if pii_type == "LOCATION":
        return rng.choice(_PLACES)
    if pii_type == "STREET_ADDRESS":
        return f"{rng.randrange(1, 400)} {rng.choice(_STREETS)} Street"
    if pii_type == "DATE_OF_BIRTH":
        return f"{rng.randrange(1940, 2006)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if pii_type == "IP_ADDRESS":
        if ":" in value:  # the IPv6 documentation prefix, RFC 3849
            return "2001:db8:" + ":".join(f"{rng.randrange(65536):x}" for _ in range(6))
        net = rng.choice(("192.0.2", "198.51.100", "203.0.113"))  # IPv4 documentation nets, RFC 5737
        return f"{net}.{rng.randrange(1, 255)}"
    if pii_type == "US_SSN":  # area 9xx is never issued
        return "9" + _digits_like(value, rng, keep=0)[1:]
    if pii_type == "UK_NINO":  # the prefix QQ is never issued
        return "QQ" + _digits_like(value[2:], rng)
    if pii_type == "CREDIT_CARD":
        digits = [c for c in _digits_like(value, rng, keep=1) if c.isdigit()]
        digits[-1] = luhn_check_digit("".join(digits[:-1]))
        it = iter(digits)
        return "".join(next(it) if c.isdigit() else c for c in value)
    if pii_type == "IBAN":
        compact = value.replace(" ", "").upper()
        country = compact[:2]
        bban = "".join(str(rng.randrange(10)) for _ in range(IBAN_LENGTHS.get(country, len(compact)) - 4))
        fake = iter(country + iban_check_digits(country, bban) + bban)
        return "".join(" " if c == " " else next(fake, "") for c in value)  # the original's grouping
    if pii_type == "ES_NIF":
        number = rng.randrange(10**7, 10**8)
        return f"{number}{DNI_LETTERS[number % 23]}"
    if pii_type == "NL_BSN":
        while True:
            digits = f"{rng.randrange(10**8, 10**9)}"
            if bsn_valid(digits):
                return digits
    if pii_type == "PHONE":  # keep a leading +country code, draw the rest
        return _digits_like(value, rng, keep=2 if value.lstrip().startswith("+") else 1)
    return _digits_like(value, rng)


__all__ = [
    "Finding",
    "NER_TYPES",
    "PATTERN_TYPES",
    "PII_TYPES",
    "PIIDetector",
    "REDACTION_STYLES",
    "Redaction",
    "Redactor",
    "Vault",
    "detect_pii",
    "normalize_for_detection",
    "parse_types",
    "pseudonym",
    "redact_pii",
    "resolve_overlaps",
    "restore",
]
