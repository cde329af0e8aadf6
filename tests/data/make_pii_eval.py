"""Writes tests/data/pii_eval.jsonl: the labelled held-out set of the PII recognizers.

Synthetic sentences, each with its gold spans: valid values drawn fresh (card numbers with a
correct Luhn digit, IBANs with correct mod-97 check digits, SSNs in issued ranges, real calendar
dates after a birth cue, phone numbers `phonenumbers` calls valid in their region) and, as
distractors that must NOT be found, near misses of each (wrong check digits, unissued SSN areas,
octets over 255, dates with no birth cue, order numbers, times, versions). The sentence templates
here were written after the recognizers and are not the ones their development used.

    python tests/data/make_pii_eval.py   # seeded: rewrites the same file
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import phonenumbers

# Two draws of the same generator: "dev" was looked at while the recognizers were tuned (the phone
# rule against SSN/IP/IBAN-shaped numbers came from it); "eval" was drawn after and is the one reported.
SETS = {
    "dev": (19, Path(__file__).with_name("pii_dev.jsonl")),
    "eval": (2024, Path(__file__).with_name("pii_eval.jsonl")),
}
PER_TYPE = 60

FIRST = ["maria", "li", "ahmed", "olga", "pierre", "sven", "ana", "kofi", "yuki", "dev", "noor", "tom"]
LAST = ["keller", "nguyen", "okoro", "petrov", "dubois", "lind", "ruiz", "mensah", "sato", "patel"]
DOMAINS = ["mail.example.org", "corp.example.com", "uni.example.edu", "example.co.uk", "post.example.de"]
STREETS = ["Maple", "Harbor View", "King", "Old Mill", "Station", "Queen", "Cedar Ridge", "Union", "High"]
STREET_TYPES = ["Street", "St.", "Avenue", "Ave", "Road", "Rd", "Lane", "Drive", "Boulevard", "Court", "Way"]
CITIES = [("Springfield", "IL"), ("Portland", "OR"), ("Austin", "TX"), ("Denver", "CO"), ("Albany", "NY")]
MONTHS = ["January", "March", "April", "June", "August", "October", "December", "Feb", "Sept", "Nov"]


def luhn_digit(partial: str) -> str:
    for d in "0123456789":
        total = 0
        for i, c in enumerate(reversed(partial + d)):
            v = int(c) * (2 if i % 2 else 1)
            total += v - 9 if v > 9 else v
        if total % 10 == 0:
            return d
    raise AssertionError


def card(rng, valid=True):
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("34", 15), ("37", 15), ("6011", 16), ("2221", 16)])
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    check = luhn_digit(body)
    if not valid:
        check = str((int(check) + rng.randrange(1, 10)) % 10)
    number = body + check
    style = rng.choice(["space", "dash", "plain"])
    if length == 15:
        groups = [number[:4], number[4:10], number[10:]]
    else:
        groups = [number[i : i + 4] for i in range(0, 16, 4)]
    return {"space": " ", "dash": "-", "plain": ""}[style].join(groups)


IBAN_SHAPES = {"DE": "n18", "GB": "a4n14", "FR": "n23", "ES": "n20", "NL": "a4n10", "IT": "a1n22", "BE": "n12"}


def iban(rng, valid=True):
    country = rng.choice(sorted(IBAN_SHAPES))
    shape = IBAN_SHAPES[country]
    bban = ""
    for kind, count in re.findall(r"([an])(\d+)", shape):
        pool = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if kind == "a" else "0123456789"
        bban += "".join(rng.choice(pool) for _ in range(int(count)))
    number = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    check = 98 - number % 97
    if not valid:
        check = (check + rng.randrange(1, 96)) % 97 or 1
    value = f"{country}{check:02d}{bban}"
    if rng.random() < 0.6:
        value = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
    return value


def ssn(rng, valid=True):
    if valid:
        area = rng.choice([rng.randrange(1, 666), rng.randrange(667, 900)])
        group, serial = rng.randrange(1, 100), rng.randrange(1, 10000)
    else:
        area, group, serial = rng.choice([(0, 12, 3456), (666, 12, 3456), (rng.randrange(900, 1000), 45, 6789)])
    sep = rng.choice(["-", "-", " ", "."])
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


def nino(rng, valid=True):
    first, second = "ABCEGHJKLMNOPRSTWXYZ", "ABCEGHJKLMNPRSTWXYZ"
    while True:
        prefix = rng.choice(first) + rng.choice(second)
        if prefix not in {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}:
            break
    if not valid:
        prefix = rng.choice(["D", "F", "Q", "V"]) + rng.choice(second)
    digits = "".join(str(rng.randrange(10)) for _ in range(6))
    suffix = rng.choice("ABCD")
    if rng.random() < 0.5:
        return f"{prefix} {digits[:2]} {digits[2:4]} {digits[4:]} {suffix}"
    return f"{prefix}{digits}{suffix}"


def nif(rng, valid=True):
    letters = "TRWAGMYFPDXBNJZSQVHLCKE"
    if rng.random() < 0.3:
        prefix = rng.choice("XYZ")
        digits = f"{rng.randrange(10**7):07d}"
        number = int(str("XYZ".index(prefix)) + digits)
    else:
        prefix, digits = "", f"{rng.randrange(10**7, 10**8)}"
        number = int(digits)
    letter = letters[number % 23]
    if not valid:
        letter = letters[(number + rng.randrange(1, 23)) % 23]
    return f"{prefix}{digits}{letter}" if rng.random() < 0.7 else f"{prefix}{digits}-{letter}"


def bsn(rng, valid=True):
    while True:
        digits = f"{rng.randrange(10**8, 10**9)}"
        total = sum((9 - i) * int(d) for i, d in enumerate(digits[:8])) - int(digits[8])
        if (total % 11 == 0) == valid:
            return digits


def phone(rng):
    region = rng.choice(["US", "GB", "DE", "FR", "IN", "ES", "NL", "AU"])
    base = phonenumbers.example_number_for_type(region, rng.choice([0, 1]))  # fixed line or mobile
    national = str(base.national_number)
    while True:
        digits = national[:3] + "".join(str(rng.randrange(10)) for _ in range(len(national) - 3))
        number = phonenumbers.parse(f"+{base.country_code}{digits}")
        if phonenumbers.is_valid_number(number):
            break
    fmt = rng.choice(
        [phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164]
        + ([phonenumbers.PhoneNumberFormat.NATIONAL] if region in ("US", "GB", "DE", "FR") else [])
    )
    return phonenumbers.format_number(number, fmt)


def ip(rng, valid=True):
    if not valid:
        return rng.choice([f"{rng.randrange(256, 999)}.{rng.randrange(256)}.1.{rng.randrange(256)}",
                           f"10.{rng.randrange(256)}.{rng.randrange(300, 999)}.4"])  # fmt: skip
    if rng.random() < 0.6:
        return ".".join(str(rng.randrange(1, 255)) for _ in range(4))
    groups = [f"{rng.randrange(65536):x}" for _ in range(8)]
    if rng.random() < 0.5:
        return ":".join(groups)
    return ":".join(groups[:3]) + "::" + groups[7]


def email(rng):
    user = rng.choice(FIRST) + rng.choice([".", "_", ""]) + rng.choice(LAST) + rng.choice(["", str(rng.randrange(99))])
    return f"{user}@{rng.choice(DOMAINS)}"


def date(rng):
    year, month, day = rng.randrange(1930, 2010), rng.randrange(1, 13), rng.randrange(1, 29)
    return rng.choice(
        [
            f"{year}-{month:02d}-{day:02d}",
            f"{day:02d}/{month:02d}/{year}",
            f"{month}/{day}/{year}",
            f"{day} {rng.choice(MONTHS)} {year}",
            f"{rng.choice(MONTHS)} {day}, {year}",
        ]
    )


def address(rng):
    street = f"{rng.randrange(1, 9999)} {rng.choice(STREETS)} {rng.choice(STREET_TYPES)}"
    if rng.random() < 0.4:
        city, state = rng.choice(CITIES)
        street += f", {city}, {state} {rng.randrange(10000, 99999)}"
    return street


POSITIVE = {
    "EMAIL": (email, ["Please write to {} before Friday.", "cc: {} (team lead)", "Her address is {}."]),
    "PHONE": (phone, ["Call me at {} tomorrow.", "Mobile: {}", "Reach the desk on {} during office hours."]),
    "CREDIT_CARD": (lambda r: card(r), ["Charged to card {} last week.", "Visa ending: {}", "Pay with {} please."]),
    "IBAN": (lambda r: iban(r), ["Transfer the deposit to {} by Monday.", "IBAN: {}", "Account {} holds the funds."]),
    "IP_ADDRESS": (lambda r: ip(r), ["Login from {} was blocked.", "The host {} answered.", "Client IP {} logged."]),
    "US_SSN": (lambda r: ssn(r), ["SSN {} on file.", "Social security number: {}", "Her SSN is {}, keep it."]),
    "UK_NINO": (lambda r: nino(r), ["National Insurance number {} is registered.", "NI no: {}", "NINO {} matches."]),
    "ES_NIF": (lambda r: nif(r), ["DNI {} presented at the desk.", "NIE: {}", "Documento {} verificado."]),
    "NL_BSN": (lambda r: bsn(r), ["BSN: {}", "Burgerservicenummer {} staat in het dossier.", "bsn {} checked."]),
    "DATE_OF_BIRTH": (date, ["Date of birth: {}", "He was born on {} in a small town.", "DOB {} (verified)"]),
    "STREET_ADDRESS": (address, ["Ship it to {} please.", "She moved to {} last year.", "Office: {}"]),
}

# Near misses: none of these may be reported, as any type.
NEGATIVE = [
    ("Charged to card {} last week.", lambda r: card(r, valid=False)),
    ("Transfer the deposit to {} by Monday.", lambda r: iban(r, valid=False)),
    ("SSN {} on file.", lambda r: ssn(r, valid=False)),
    ("Login from {} was blocked.", lambda r: ip(r, valid=False)),
    ("DNI {} presented at the desk.", lambda r: nif(r, valid=False)),
    ("BSN: {}", lambda r: bsn(r, valid=False)),
    ("NI no: {}", lambda r: nino(r, valid=False)),
    ("The meeting moved to {}.", date),
    ("Order {} shipped in 3 boxes.", lambda r: f"{r.randrange(10**5, 10**6)}"),
    ("The run took {} seconds.", lambda r: f"{r.randrange(1, 60)}:{r.randrange(60):02d}:{r.randrange(60):02d}"),
    ("Released in version {} last spring.", lambda r: f"{r.randrange(1, 9)}.{r.randrange(20)}.{r.randrange(30)}"),
    ("Population grew to {} in the census.", lambda r: f"{r.randrange(1000, 99999):,}"),
    ("Chapter {} covers the method.", lambda r: f"{r.randrange(1, 30)}"),
    ("We walked past {} houses on the road.", lambda r: f"{r.randrange(2, 90)}"),
]


def disguise(value: str, rng: random.Random) -> str:
    """Now and then the tricks text copied from the web carries: a zero-width space, full-width digits."""
    roll = rng.random()
    if roll < 0.08 and len(value) > 2:
        cut = rng.randrange(1, len(value) - 1)
        return value[:cut] + "\u200b" + value[cut:]
    if roll < 0.14:
        return value.translate({ord(d): chr(0xFF10 + int(d)) for d in "0123456789"})
    return value


def build(seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for pii_type, (draw, templates) in POSITIVE.items():
        for _ in range(PER_TYPE):
            value = disguise(draw(rng), rng)
            template = rng.choice(templates)
            start = template.index("{}")
            text = template.format(value)
            records.append({"text": text, "entities": [[pii_type, start, start + len(value)]]})
    for _ in range(PER_TYPE // 2):
        for template, draw in NEGATIVE:
            records.append({"text": template.format(draw(rng)), "entities": []})
    # A few longer texts with several entities each.
    for _ in range(PER_TYPE // 2):
        parts, entities, text = [], [], ""
        for pii_type in rng.sample(sorted(POSITIVE), 3):
            draw, templates = POSITIVE[pii_type]
            value, template = draw(rng), rng.choice(templates)
            start = len(text) + template.index("{}")
            entities.append([pii_type, start, start + len(value)])
            text += template.format(value) + " "
            parts.append(pii_type)
        records.append({"text": text.rstrip(), "entities": entities})
    rng.shuffle(records)
    return records


def main() -> None:
    for seed, path in SETS.values():
        records = build(seed)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"wrote {len(records)} texts, {sum(len(r['entities']) for r in records)} entities to {path}")


if __name__ == "__main__":
    main()
