"""Pattern recognizers for structured personal data (PII): a regular expression proposes a
candidate, a validator (checksum, registry rule or library parse) accepts or rejects it.

Checks used, by type:
    EMAIL            RFC 5322's common subset: a dot-atom local part, a dotted host with an alphabetic TLD
    PHONE            `phonenumbers` (Google's libphonenumber): PhoneNumberMatcher, leniency VALID
    CREDIT_CARD      issuer prefix (2-6), 13-19 digits, Luhn checksum (ISO/IEC 7812-1)
    IBAN             the country's registered length and the ISO 7064 mod-97-10 check digits (ISO 13616)
    IP_ADDRESS       IPv4 and IPv6, parsed by `ipaddress`
    US_SSN           area not 000/666/9xx, group not 00, serial not 0000, one separator style
    UK_NINO          HMRC's prefix rules (no D/F/I/Q/U/V, second letter not O, no BG/GB/KN/NK/NT/TN/ZZ), suffix A-D
    ES_NIF           Spanish DNI (8 digits) and NIE (X/Y/Z + 7 digits): the mod-23 control letter
    NL_BSN           Dutch citizen service number: the "11-test", and only near a cue (BSN, burgerservicenummer)
    DATE_OF_BIRTH    a real calendar date within a few words after a birth cue (born, DOB, date of birth, ...)
    STREET_ADDRESS   house number + capitalised street name + street-type word (Street, Ave, Road, ...),
                     optionally a unit, and "City, ST 12345"

Every expression is written to run in linear time on Python's backtracking `re`: each starts
with a negative look-behind on its own character class (so an attempt inside a long run fails
at once and only the run's first position scans), and every repetition is bounded. Recognizers
run on text already normalised by `pii.normalize_for_detection` (ASCII digits, no zero-width
characters), and return spans in that text.
"""

from __future__ import annotations

import calendar
import hashlib
import ipaddress
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher


@dataclass(frozen=True)
class PatternMatch:
    """A validated candidate: its span in the (normalised) text, the type and a confidence."""

    type: str
    start: int
    end: int
    score: float
    source: str


# ----------------------------------------------------------------------------- checksums
def luhn_valid(digits: str) -> bool:
    """The Luhn (mod-10) check of card numbers: double every second digit from the right."""
    if not digits.isdigit() or not digits.isascii():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def luhn_check_digit(partial: str) -> str:
    """The digit that makes `partial + digit` pass the Luhn check."""
    for digit in "0123456789":
        if luhn_valid(partial + digit):
            return digit
    raise AssertionError("unreachable: one of ten digits always completes a Luhn number")


# Registered IBAN lengths by country (SWIFT's IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """Country length and ISO 7064 mod-97-10: move the first four characters to the end, read
    letters as 10..35, and the number must leave remainder 1 modulo 97."""
    iban = iban.upper()
    if not iban.isascii() or not iban.isalnum() or IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    if not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def iban_check_digits(country: str, bban: str) -> str:
    """The two check digits of the IBAN `country + ?? + bban`."""
    number = int("".join(str(int(char, 36)) for char in (bban + country + "00").upper()))
    return f"{98 - number % 97:02d}"


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """The Social Security Administration's never-issued ranges, plus all-same-digit numbers and
    the numbers published in advertisements (078-05-1120, 219-09-9999)."""
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    digits = area + group + serial
    return len(set(digits)) > 1 and digits not in ("078051120", "219099999")


NINO_FIRST = "ABCEGHJKLMNOPRSTWXYZ"  # not D, F, I, Q, U, V
NINO_SECOND = "ABCEGHJKLMNPRSTWXYZ"  # nor O
NINO_BAD_PREFIXES = {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}


def nino_valid(prefix: str) -> bool:
    prefix = prefix.upper()
    return prefix[0] in NINO_FIRST and prefix[1] in NINO_SECOND and prefix not in NINO_BAD_PREFIXES


DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def spanish_nif_valid(prefix: str, digits: str, letter: str) -> bool:
    """DNI: 8 digits + the letter at (number mod 23); NIE: X/Y/Z read as 0/1/2 before 7 digits."""
    if prefix:
        if len(digits) != 7:
            return False
        digits = str("XYZ".index(prefix.upper())) + digits
    elif len(digits) != 8:
        return False
    return DNI_LETTERS[int(digits) % 23] == letter.upper()


def bsn_valid(digits: str) -> bool:
    """The Dutch "11-test": 9*d1 + 8*d2 + ... + 2*d8 - d9 is a multiple of 11 (and not 0)."""
    if len(digits) != 9 or not digits.isdigit():
        return False
    total = sum((9 - i) * int(d) for i, d in enumerate(digits[:8])) - int(digits[8])
    return total % 11 == 0 and int(digits) != 0


# --------------------------------------------------------------------------- recognizers
Recognizer = Callable[[str], Iterator[PatternMatch]]

_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-](?<![A-Za-z0-9._%+\-!#$&'*/=?^`{|}~].)"
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]{0,63}(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]{1,64}){0,16}"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}(?:[A-Za-z]{2,24}|xn--[A-Za-z0-9\-]{1,59})"
    r"(?![A-Za-z0-9\-]|\.[A-Za-z0-9])"
)


def find_emails(text: str) -> Iterator[PatternMatch]:
    if "@" not in text:
        return
    for match in _EMAIL.finditer(text):
        local = match.group().split("@", 1)[0]
        if len(local) <= 64:
            yield PatternMatch("EMAIL", match.start(), match.end(), 1.0, "pattern:email")


# A phone-like run: an optional + or (, then 7 to 24 digits with spaces, dots, dashes or brackets
# between them (one way only to read each gap, so a failed attempt cannot backtrack through
# alternatives), ending on a digit. A run starts only where no digit and separator precede it.
_PHONE_RUN = re.compile(
    r"(?<![A-Za-z0-9+(\-.])(?<![0-9][ .\-])(?:\+|\(\+?)?[0-9](?:(?:[ .\-]{1,2}|[ ]?[()][ ]?)?[0-9]){6,23}(?![0-9])"
)
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "NL", "IT", "IN", "CA", "AU", "BR")


# Results of the phone matcher per candidate, keyed by a salted hash so that the cache of a
# long-running server holds no phone numbers; cleared when full.
_PHONE_CACHE: dict[bytes, tuple[tuple[int, int], ...]] = {}
_PHONE_CACHE_SALT = secrets.token_bytes(16)
_PHONE_CACHE_SIZE = 4096


def _phone_spans(candidate: str, regions: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """(start, end) of the valid numbers `phonenumbers` finds in one candidate run, trying the
    regions in order (an international '+' number needs none) and keeping the first that finds any."""
    digest = hashlib.blake2b(
        f"{candidate}\0{','.join(regions)}".encode(), key=_PHONE_CACHE_SALT, digest_size=16
    ).digest()
    found = _PHONE_CACHE.get(digest)
    if found is not None:
        return found
    found = ()
    for region in regions[:1] if candidate.lstrip("(").startswith("+") else regions:
        found = tuple((m.start, m.end) for m in PhoneNumberMatcher(candidate, region, leniency=Leniency.VALID))
        if found:
            break
    if len(_PHONE_CACHE) >= _PHONE_CACHE_SIZE:
        _PHONE_CACHE.clear()
    _PHONE_CACHE[digest] = found
    return found


_SSN_SHAPE = re.compile(r"[0-9]{3}([ .\-])[0-9]{2}\1[0-9]{4}")
_IPV4_SHAPE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_BLOCKS_OF_FOUR = re.compile(r"[0-9]{4}(?: [0-9]{4}){1,}(?: [0-9]{1,3})?")


def _other_number_shape(number: str) -> bool:
    """National-format numbers that some region's plan accepts but whose layout says they are
    something else: an SSN's 3-2-4 groups, an IPv4 address, the blocks of four of an IBAN or a
    card, or a bare run of 9 digits or fewer without the trunk prefix 0 (an ID, an amount)."""
    if number.startswith("+"):
        return False
    if _SSN_SHAPE.fullmatch(number) or _IPV4_SHAPE.fullmatch(number) or _BLOCKS_OF_FOUR.fullmatch(number):
        return True
    return number.isdigit() and len(number) <= 9 and not number.startswith("0")


def phone_recognizer(regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS) -> Recognizer:
    unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
    if unknown or not regions:
        raise ValueError(
            f"unknown phone region(s) {unknown or regions}; accepted: ISO 3166 codes phonenumbers knows, e.g. US, GB, DE"
        )

    def find_phones(text: str) -> Iterator[PatternMatch]:
        for run in _PHONE_RUN.finditer(text):
            for start, end in _phone_spans(run.group(), regions):
                if _other_number_shape(run.group()[start:end]):
                    continue
                yield PatternMatch("PHONE", run.start() + start, run.start() + end, 0.75, "pattern:phone")

    return find_phones


# Issuer prefixes 2-6 (Mastercard 2-series, Amex/Diners/JCB, Visa, Mastercard, Discover/UnionPay),
# 13-19 digits in groups split by single spaces or dashes.
_CARD = re.compile(r"[2-6](?<![0-9A-Za-z\-].)(?<![0-9][ \-].)(?:[ \-]?[0-9]){12,18}(?![0-9])")


def find_credit_cards(text: str) -> Iterator[PatternMatch]:
    for match in _CARD.finditer(text):
        raw = match.group()
        if len({char for char in raw if not char.isdigit()}) > 1:
            continue  # one separator style per number
        # The longest run of whole groups that passes: "4111 1111 1111 1111 7" is the card and a 7.
        groups = re.split(r"[ \-]", raw)
        for count in range(len(groups), 0, -1):
            digits = "".join(groups[:count])
            if 13 <= len(digits) <= 19 and luhn_valid(digits):
                end = match.start() + len(" ".join(groups[:count]))
                yield PatternMatch("CREDIT_CARD", match.start(), end, 1.0, "pattern:credit_card")
                break
            if len(digits) < 13:
                break


_IBAN = re.compile(r"[A-Za-z](?<![A-Za-z0-9].)[A-Za-z][0-9]{2}(?: ?[A-Za-z0-9]){11,30}")


def _end_after_characters(raw: str, count: int) -> int | None:
    """The index just after the `count`-th non-space character of `raw` (None if it has fewer)."""
    taken = 0
    for index, char in enumerate(raw):
        if char != " ":
            taken += 1
            if taken == count:
                return index + 1
    return None


def find_ibans(text: str) -> Iterator[PatternMatch]:
    position = 0
    while (match := _IBAN.search(text, position)) is not None:
        # A failed candidate may have run on into the next IBAN: look again from its next character.
        position = match.start() + 1
        raw = match.group()
        length = IBAN_LENGTHS.get(raw[:2].upper())
        if length is None:
            continue
        # The span ends where the country's length is reached, and the IBAN must not run on
        # into more letters or digits (a longer token is not an IBAN).
        end = _end_after_characters(raw, length)
        if end is None:
            continue
        stop = match.start() + end
        if stop < len(text) and text[stop].isalnum():
            continue
        if iban_valid(raw[:end].replace(" ", "")):
            yield PatternMatch("IBAN", match.start(), stop, 1.0, "pattern:iban")
            position = stop


_IPV4 = re.compile(r"[0-9](?<![0-9.].)[0-9]{0,2}\.(?:[0-9]{1,3}\.){2}[0-9]{1,3}(?![0-9]|\.[0-9])")
_IPV6 = re.compile(
    r"(?:[0-9A-Fa-f](?<![0-9A-Za-z:].)[0-9A-Fa-f]{0,3}:|:(?<![0-9A-Za-z:].))(?:[0-9A-Fa-f]{0,4}:){1,6}(?:[0-9A-Fa-f]{1,4}|(?:[0-9]{1,3}\.){3}[0-9]{1,3})?"
    r"(?:%[0-9A-Za-z]{1,16})?(?![0-9A-Za-z:]|\.[0-9])"
)


def find_ip_addresses(text: str) -> Iterator[PatternMatch]:
    for match in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(match.group())
        except ValueError:
            continue
        yield PatternMatch("IP_ADDRESS", match.start(), match.end(), 0.9, "pattern:ipv4")
    for match in _IPV6.finditer(text) if "::" in text or text.count(":") >= 7 else ():
        candidate = match.group()
        if candidate.count(":") < 2 or len(candidate) < 3:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield PatternMatch("IP_ADDRESS", match.start(), match.end(), 0.9, "pattern:ipv6")


_SSN = re.compile(r"([0-9](?<![0-9A-Za-z\-.].)[0-9]{2})([ \-.])([0-9]{2})\2([0-9]{4})(?![0-9]|[\-.][0-9])")
# Nine digits in a row are an SSN only after a cue: otherwise any nine-digit number would be one.
_SSN_CUED = re.compile(
    r"[Ss](?<![A-Za-z0-9].)(?i:sn|ocial security(?: number| no\.?)?)[ :#.]{0,3}(?i:is[ ]|number[ ]|no\.?[ ]?)?"
    r"([0-9]{3})([0-9]{2})([0-9]{4})(?![0-9])"
)


def find_us_ssns(text: str) -> Iterator[PatternMatch]:
    for match in _SSN.finditer(text):
        if ssn_valid(match.group(1), match.group(3), match.group(4)):
            yield PatternMatch("US_SSN", match.start(), match.end(), 0.85, "pattern:us_ssn")
    for match in _SSN_CUED.finditer(text):
        if ssn_valid(*match.groups()):
            yield PatternMatch("US_SSN", match.start(1), match.end(3), 0.85, "pattern:us_ssn_cued")


_NINO = re.compile(
    r"([A-Za-z](?<![A-Za-z0-9].)[A-Za-z]) ?([0-9]{2}) ?([0-9]{2}) ?([0-9]{2}) ?([A-Da-d])(?![A-Za-z0-9])"
)


def find_uk_ninos(text: str) -> Iterator[PatternMatch]:
    for match in _NINO.finditer(text):
        if nino_valid(match.group(1)):
            yield PatternMatch("UK_NINO", match.start(), match.end(), 0.85, "pattern:uk_nino")


_NIF = re.compile(r"[XYZ0-9](?<![A-Za-z0-9\-].)-?[0-9]{6,8}[ \-]?[A-Z](?![A-Za-z0-9])")


def find_spanish_nifs(text: str) -> Iterator[PatternMatch]:
    for match in _NIF.finditer(text):
        raw = match.group()
        prefix = raw[0] if raw[0] in "XYZ" else ""
        if spanish_nif_valid(prefix, "".join(c for c in raw[:-1] if c.isdigit()), raw[-1]):
            yield PatternMatch("ES_NIF", match.start(), match.end(), 1.0, "pattern:es_nif")


_BSN_CUED = re.compile(
    r"[BbSsCc](?<![A-Za-z0-9].)(?i:sn|urgerservicenummer|ofinummer|itizen service number)(?:[ :#.-]{1,3}|[ ]is[ ])"
    r"([0-9]{4})[ .]?([0-9]{2})[ .]?([0-9]{3})(?![0-9])"
)


def find_dutch_bsns(text: str) -> Iterator[PatternMatch]:
    for match in _BSN_CUED.finditer(text):
        if bsn_valid("".join(match.groups())):
            yield PatternMatch("NL_BSN", match.start(1), match.end(3), 0.95, "pattern:nl_bsn")


_MONTHS = {name.lower(): number for number, name in enumerate(calendar.month_name) if name} | {
    name.lower(): number for number, name in enumerate(calendar.month_abbr) if name
}
_MONTH = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t|tember)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
_DOB_CUE = re.compile(
    r"[BbDdGgNnFf](?<![A-Za-z0-9].)(?i:ate of birth|irth ?date|irthday|orn(?: on| in)?|\.o\.b\.?|ob|eboren(?: am)?|"
    r"[ée]e? le|echa de nacimiento)\b[ :,.\-()]{0,4}(?i:(?:on|is|was)[ ])?(?i:the[ ])?"
)
_DATE = re.compile(
    r"(?i)(?P<iso>(?P<iy>[0-9]{4})[\-/.](?P<im>[0-9]{1,2})[\-/.](?P<id>[0-9]{1,2}))(?![0-9])"
    r"|(?P<num>(?P<a>[0-9]{1,2})[\-/.](?P<b>[0-9]{1,2})[\-/.](?P<ny>[0-9]{4}|[0-9]{2}))(?![0-9])"
    rf"|(?P<dmy>(?P<dd>[0-9]{{1,2}})(?:st|nd|rd|th)?(?: of)? (?P<dm>{_MONTH}),? (?P<dy>[0-9]{{4}}))(?![0-9])"
    rf"|(?P<mdy>(?P<mm>{_MONTH}) (?P<md>[0-9]{{1,2}})(?:st|nd|rd|th)?,? (?P<my>[0-9]{{4}}))(?![0-9])"
)


def _real_date(year: int, month: int, day: int) -> bool:
    return 1 <= month <= 12 and 1 <= day <= calendar.monthrange(max(year, 1), month)[1]


def _date_valid(match: re.Match) -> bool:
    groups = match.groupdict()
    if groups["iso"]:
        return _real_date(int(groups["iy"]), int(groups["im"]), int(groups["id"]))
    if groups["num"]:
        a, b, year = int(groups["a"]), int(groups["b"]), int(groups["ny"])
        return _real_date(year, b, a) or _real_date(year, a, b)  # day-first or month-first
    if groups["dmy"]:
        return _real_date(int(groups["dy"]), _MONTHS[groups["dm"].lower().rstrip(".")[:3]], int(groups["dd"]))
    return _real_date(int(groups["my"]), _MONTHS[groups["mm"].lower().rstrip(".")[:3]], int(groups["md"]))


def find_dates_of_birth(text: str) -> Iterator[PatternMatch]:
    """A date that begins at most a few characters after a birth cue ("born on", "DOB:")."""
    for cue in _DOB_CUE.finditer(text):
        date = _DATE.match(text, cue.end())
        if date is not None and _date_valid(date):
            yield PatternMatch("DATE_OF_BIRTH", date.start(), date.end(), 0.85, "pattern:date_of_birth")


_STREET_TYPES = (
    "Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|Ter|Way|Close|"
    "Crescent|Cres|Square|Sq|Highway|Hwy|Parkway|Pkwy|Circle|Cir|Row|Walk|Gardens|Grove|Hill|Park|Trail|Trl|Alley|Mews"
)
_ADDRESS = re.compile(
    r"[0-9](?<![A-Za-z0-9\-/.,].)[0-9]{0,5}[A-Za-z]?,?"  # house number, maybe "221B"
    r"(?:[ ](?:[NSEW]\.?|North|South|East|West))?"
    r"(?:[ ](?:[A-Z][A-Za-z'\-]{1,20}|[0-9]{1,3}(?:st|nd|rd|th))){1,4}"  # the street's name
    rf"[ ](?:{_STREET_TYPES})\.?(?![A-Za-z])(?:[ ](?:NW|NE|SW|SE|N|S|E|W)\.?(?![A-Za-z]))?"
    r"(?:,?[ ](?:Apt|Apartment|Suite|Ste|Unit|Flat|#)\.?[ ]?#?[0-9A-Za-z\-]{1,6})?"
    r"(?:,[ ][A-Z][A-Za-z\-]{1,20}(?:[ ][A-Z][A-Za-z\-]{1,20}){0,2},?[ ](?:[A-Z]{2}[ ])?[0-9]{5}(?:-[0-9]{4})?(?![0-9]))?"
)


def find_street_addresses(text: str) -> Iterator[PatternMatch]:
    for match in _ADDRESS.finditer(text):
        yield PatternMatch("STREET_ADDRESS", match.start(), match.end(), 0.6, "pattern:street_address")


PATTERN_RECOGNIZERS: dict[str, Recognizer] = {
    "EMAIL": find_emails,
    "PHONE": phone_recognizer(),
    "CREDIT_CARD": find_credit_cards,
    "IBAN": find_ibans,
    "IP_ADDRESS": find_ip_addresses,
    "US_SSN": find_us_ssns,
    "UK_NINO": find_uk_ninos,
    "ES_NIF": find_spanish_nifs,
    "NL_BSN": find_dutch_bsns,
    "DATE_OF_BIRTH": find_dates_of_birth,
    "STREET_ADDRESS": find_street_addresses,
}

__all__ = [
    "DEFAULT_PHONE_REGIONS",
    "IBAN_LENGTHS",
    "PATTERN_RECOGNIZERS",
    "PatternMatch",
    "bsn_valid",
    "iban_check_digits",
    "iban_valid",
    "luhn_check_digit",
    "luhn_valid",
    "nino_valid",
    "phone_recognizer",
    "spanish_nif_valid",
    "ssn_valid",
]
