"""PII recognizers: validators, the labelled held-out set, agreement with presidio-analyzer's
pattern recognizers, hostile inputs in linear time, and the four redaction styles."""

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from genforge.safety.pii import (
    PATTERN_TYPES,
    PIIDetector,
    Redactor,
    Vault,
    detect_pii,
    normalize_for_detection,
    redact_pii,
    restore,
)
from genforge.safety.pii_patterns import bsn_valid, iban_valid, luhn_valid, nino_valid, spanish_nif_valid, ssn_valid

DATA = Path(__file__).parent / "data"
KEY = "a test key of sixteen bytes or more"


def load(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def score(records, detector=detect_pii):
    """Per type: (true positives, false positives, false negatives), a finding counting only on
    the exact gold span and type."""
    counts = {t: Counter() for t in PATTERN_TYPES}
    for record in records:
        gold = {tuple(e) for e in record["entities"]}
        found = {(f.type, f.start, f.end) for f in detector(record["text"])}
        for pii_type, *_ in gold & found:
            counts[pii_type]["tp"] += 1
        for pii_type, *_ in found - gold:
            counts[pii_type]["fp"] += 1
        for pii_type, *_ in gold - found:
            counts[pii_type]["fn"] += 1
    return counts


def test_validators():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82WEST12345698765432") and not iban_valid("GB83WEST12345698765432")
    assert not iban_valid("GB82WEST1234569876543")  # one character short of GB's 22
    assert ssn_valid("536", "90", "4399")
    assert not ssn_valid("000", "12", "3456") and not ssn_valid("666", "12", "3456")
    assert not ssn_valid("912", "12", "3456") and not ssn_valid("536", "00", "4399")
    assert nino_valid("AB") and not nino_valid("DA") and not nino_valid("AO") and not nino_valid("GB")
    assert spanish_nif_valid("", "12345678", "Z") and not spanish_nif_valid("", "12345678", "A")
    assert spanish_nif_valid("X", "1234567", "L")  # NIE X1234567L
    assert bsn_valid("111222333") and not bsn_valid("111222334")


def test_held_out_precision_and_recall():
    records = load("pii_eval.jsonl")
    counts = score(records)
    for pii_type, c in counts.items():
        support = c["tp"] + c["fn"]
        assert support >= 50, f"{pii_type}: only {support} gold entities"
        recall = c["tp"] / support
        precision = c["tp"] / max(1, c["tp"] + c["fp"])
        assert recall >= 0.95, f"{pii_type}: recall {recall:.3f}"
        assert precision >= 0.9, f"{pii_type}: precision {precision:.3f}"
    assert sum(1 for r in records if not r["entities"]) >= 300  # the near misses


@pytest.fixture(scope="module")
def presidio():
    import tldextract
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )
    from presidio_analyzer.predefined_recognizers.generic import email_recognizer

    # The email validator asks tldextract for the public-suffix list over the network: use the
    # snapshot tldextract ships instead.
    offline = tldextract.TLDExtract(suffix_list_urls=())
    original = email_recognizer.tldextract
    email_recognizer.tldextract = type("OfflineTldextract", (), {"extract": staticmethod(offline)})
    yield {
        "EMAIL": (EmailRecognizer(), "EMAIL_ADDRESS"),
        "CREDIT_CARD": (CreditCardRecognizer(), "CREDIT_CARD"),
        "IBAN": (IbanRecognizer(), "IBAN_CODE"),
        "IP_ADDRESS": (IpRecognizer(), "IP_ADDRESS"),
        "US_SSN": (UsSsnRecognizer(), "US_SSN"),
        "PHONE": (PhoneRecognizer(), "PHONE_NUMBER"),
    }
    email_recognizer.tldextract = original


@pytest.mark.slow
def test_agrees_with_presidio_pattern_recognizers(presidio):
    """On the held-out texts without Unicode tricks, presidio's pattern recognizers (no NLP
    model: nlp_artifacts=None; its 'very weak' patterns below 0.3 left out) and ours: every
    entity presidio finds, we find; and where we differ, the reason is known per type."""
    records = [r for r in load("pii_eval.jsonl") if r["text"].isascii()]
    differences = {t: Counter() for t in presidio}
    for record in records:
        text = record["text"]
        gold = {tuple(e) for e in record["entities"]}
        ours = {(f.type, f.start, f.end) for f in detect_pii(text, types=list(presidio))}
        for pii_type, (recognizer, entity) in presidio.items():
            theirs = {
                (pii_type, r.start, r.end)
                for r in recognizer.analyze(text, entities=[entity], nlp_artifacts=None)
                if r.score >= 0.3
            }
            mine = {f for f in ours if f[0] == pii_type}
            assert theirs & gold <= mine, f"presidio finds {theirs & gold - mine} in {text!r}, we do not"
            differences[pii_type]["both"] += len(mine & theirs)
            for _, start, _end in mine - theirs:
                # Mastercard's 2221-2720 series, which presidio's card expression does not take.
                assert pii_type == "CREDIT_CARD" and text[start] == "2", text
                differences[pii_type]["ours only"] += 1
            for finding in theirs - mine:
                assert finding not in gold  # presidio's extra findings are its false positives:
                _, start, end = finding
                if pii_type == "US_SSN":  # area numbers 900-999, never issued as SSNs
                    assert text[start] == "9", text
                elif pii_type == "PHONE":  # dotted quads, and digits inside an IBAN, a NINO, ..., read as phones
                    inside_other = any(s < end and start < e for t, s, e in gold if t != "PHONE")
                    shape = re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9]{4}( [0-9]{1,4})+", text[start:end])
                    assert inside_other or shape, text
                else:
                    raise AssertionError(f"presidio alone finds {text[start:end]!r} ({pii_type}) in {text!r}")
                differences[pii_type]["theirs only"] += 1
    for pii_type in ("EMAIL", "IBAN", "IP_ADDRESS"):
        assert set(differences[pii_type]) == {"both"}, (pii_type, differences[pii_type])
    assert all(differences[t]["both"] >= 50 for t in presidio)


def test_unicode_tricks_are_seen_through():
    text = "mail jo\u200bhn@exa\u200bmple.com, card ４１１１ １１１１ １１１１ １１１１, p\u0430ypal@example.com, ssn 536\u2011 90\u20114399"
    found = {(f.type, text[f.start : f.end]) for f in detect_pii(text)}
    assert ("EMAIL", "jo\u200bhn@exa\u200bmple.com") in found
    assert ("CREDIT_CARD", "４１１１ １１１１ １１１１ １１１１") in found
    assert ("EMAIL", "p\u0430ypal@example.com") in found
    normal, offsets = normalize_for_detection("a\u200bb\ufb01c")  # zero-width space, the ligature "fi"
    assert normal == "abfic" and list(offsets) == [0, 2, 3, 3, 4, 5]


@pytest.mark.parametrize(
    "text", ["", "   \n\t  ", "\x00\x01\xff\ufffd" * 100, "\ud800\udfff lone surrogates", "\u200b" * 50, "@" * 1000]
)
def test_hostile_inputs_give_a_clear_result(text):
    assert detect_pii(text) == []
    assert redact_pii(text).text == text


def test_bytes_are_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="decode bytes first"):
        detect_pii(b"jane@example.com")


MEGABYTE = 1_000_000
SAMPLE = (
    "Contact Jane at jane.doe@example.com or (415) 555-2671. Card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 "
    "7654 32. Server 192.168.1.20; SSN 536-90-4399; born on 12 March 1985 at 221B Baker Street. "
)
PROSE = "The committee reviews its 2023 budget of 45 items while the quick brown fox jumps over the dog. "


def _fill(unit: str, size: int = MEGABYTE) -> str:
    return (unit * (size // len(unit) + 1))[:size]


@pytest.mark.slow
@pytest.mark.parametrize(
    "unit",
    [PROSE * 4 + SAMPLE, "1", "1 ", "12-", "1.", "a@", "a.", "1:", "AB12 ", "1 Ab ", "born on ", "4\u200b1 ", "１", "\x00\xff"],
    ids=["prose+pii", "digits", "spaced", "dashed", "dotted", "at", "dots", "colons", "ibanish", "addressish",
         "cues", "zero-width", "fullwidth", "binary"],
)  # fmt: skip
def test_a_megabyte_takes_under_a_second_and_time_is_linear(unit):
    detect_pii(SAMPLE)  # imports and caches warm
    timings = {}
    for size in (MEGABYTE // 10, MEGABYTE):
        text = _fill(unit, size)
        start = time.process_time()  # CPU time: the machine is shared, wall time would count others' work
        detect_pii(text)
        timings[size] = time.process_time() - start
    assert timings[MEGABYTE] < 1.0, timings
    # Ten times the text, at most ~10x the time (quadratic backtracking would be ~100x).
    assert timings[MEGABYTE] < 20 * max(timings[MEGABYTE // 10], 0.005), timings


TEXT = "Mail ann@example.com or ANN@example.com; call +44 20 7946 0958. Ann's card: 4111 1111 1111 1111, mail bo@example.org."


def test_mask_and_placeholder_styles():
    masked = redact_pii(TEXT, "mask")
    assert "ann@example.com" not in masked.text and len(masked.text) == len(TEXT)
    assert masked.text.startswith("Mail *************** or")
    placeholder = redact_pii(TEXT, "placeholder")
    assert placeholder.text == (
        "Mail <EMAIL_1> or <EMAIL_1>; call <PHONE_1>. Ann's card: <CREDIT_CARD_1>, mail <EMAIL_2>."
    )  # the same address in another case is the same value
    assert placeholder.counts == {"EMAIL": 3, "PHONE": 1, "CREDIT_CARD": 1}
    assert [TEXT[f.start : f.end] for f in placeholder.findings][0] == "ann@example.com"


def test_pseudonyms_are_consistent_and_keyed():
    first = redact_pii(TEXT, "pseudonym", key=KEY)
    again = redact_pii(TEXT, "pseudonym", key=KEY)
    other = redact_pii(TEXT, "pseudonym", key=KEY + "!")
    assert first.text == again.text and first.text != other.text
    emails = [r for f, r in zip(first.findings, first.replacements) if f.type == "EMAIL"]
    assert emails[0] == emails[1] != emails[2] and emails[0].endswith("@example.com")
    card = first.replacements[[f.type for f in first.findings].index("CREDIT_CARD")]
    assert luhn_valid(card.replace(" ", "")) and card != "4111 1111 1111 1111"
    assert detect_pii(card)[0].type == "CREDIT_CARD"  # the fake keeps the type's shape
    iban = redact_pii("IBAN GB82 WEST 1234 5698 7654 32.", "pseudonym", key=KEY).replacements[0]
    assert iban_valid(iban.replace(" ", "")) and len(iban) == len("GB82 WEST 1234 5698 7654 32")
    assert redact_pii("SSN 536-90-4399", "pseudonym", key=KEY).replacements[0].startswith("9")  # never issued


def test_reversible_redaction_restores_exactly(tmp_path):
    text = TEXT + " Zero\u200bwidth: jo\u200bhn@example.com, and <EMAIL_notatag> stays."
    redaction = redact_pii(text, "reversible", key=KEY)
    assert "ann@example.com" not in redaction.text and "4111" not in redaction.text
    assert not any(value in redaction.vault.to_json() for value in ("ann@example.com", "4111 1111"))
    redaction.vault.save(tmp_path / "vault.json")
    assert restore(redaction.text, Vault.load(tmp_path / "vault.json"), KEY) == text
    with pytest.raises(ValueError, match="does not open"):
        restore(redaction.text, redaction.vault, "another key, sixteen bytes long")
    generated = redact_pii(text, "reversible")  # no key given: one is drawn and returned
    assert generated.key is not None and restore(generated.text, generated.vault, generated.key) == text


def test_a_redactor_numbers_consistently_across_texts():
    redactor = Redactor("placeholder")
    assert redactor.redact("from ann@example.com").text == "from <EMAIL_1>"
    assert redactor.redact("to bo@example.org, cc ann@example.com").text == "to <EMAIL_2>, cc <EMAIL_1>"


def test_types_are_chosen_and_checked():
    assert [f.type for f in detect_pii(TEXT, types="phone")] == ["PHONE"]
    with pytest.raises(ValueError, match="unknown PII type 'EMAILS'"):
        detect_pii(TEXT, types=["EMAILS"])
    with pytest.raises(ValueError, match="named-entity model"):
        PIIDetector(types=["PERSON"])
    with pytest.raises(ValueError, match="unknown redaction style"):
        redact_pii(TEXT, "blur")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        redact_pii(TEXT, "pseudonym", key="short")
