"""`genforge data prepare`: raw text to tokenized, deduplicated training shards.

The pipeline, one document at a time (so corpora larger than memory stream through it):

1. **Read** documents lazily from files, folders, globs and JSONL (`sources.py`): one document
   per plain-text file, one per JSONL line, taken from a text field.
2. **Quality filters**, heuristic rules in the spirit of Gopher's (Rae et al. 2021, appendix
   A): length bounds, repetition (the share of duplicate lines and the share of words inside
   repeated word n-grams) and non-text content (the share of symbols among the visible
   characters). Each removal is counted under the first rule it failed.
   **PII redaction** (optional, `PIIRedaction`): emails, phone numbers, card numbers, IBANs, IDs
   and the other types of `genforge.safety.pii` are replaced (placeholder, mask or keyed
   pseudonym) in each kept document before deduplication, so that documents that differ only
   in personal data count as duplicates and no shard holds the originals; the report counts the
   redactions per type.
3. **Exact deduplication** by a content hash of the text (leading and trailing whitespace
   ignored).
4. **Near-duplicate removal** with MinHash (Broder 1997) over word shingles and locality-
   sensitive hashing (`datasketch.MinHashLSH`): a document whose estimated Jaccard similarity
   to an earlier kept document is at least `threshold` is dropped (LSH proposes candidates, the
   signatures confirm them). The index holds signatures, never texts. Lee et al. 2022 show such
   deduplication lowers memorization and train/val overlap.
5. **Split** train/val by document with a seeded hash of the document's text (stable whatever the
   location, order or size of the corpus), after deduplication, so no document has a copy on the
   other side.
6. **Tokenize** in batches with a trained tokenizer; each document is followed by the
   tokenizer's end-of-text (or separator) token so the model learns where documents end.
7. **Write shards** `train-00000.npy`, ..., `val-00000.npy`: flat token-id arrays, uint16 when
   the vocabulary fits (< 65536 ids) else uint32, opened later with `numpy.load(mmap_mode="r")`.
   `meta.json` records counts, dtype, the tokenizer's hash and the filter/dedup report;
   `filtered.jsonl` and `duplicates.jsonl` list every removal (and for a duplicate, which kept
   document it duplicated); `tokenizer/` holds a copy of the tokenizer.

Everything is written into a staging directory that takes the output's place only when the run
succeeds (`genforge.atomic.staged_directory`), so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import staged_directory
from ..tokenizer import Tokenizer
from .data import DataError
from .sources import DEFAULT_EXTENSIONS, iter_documents, resolve_sources
from .tokenizer_training import tokenizer_sha256

FORMAT = "genforge-token-shards"
FORMAT_VERSION = 1
META_FILE = "meta.json"


# ------------------------------------------------------------------------------------ filters
@dataclass
class QualityFilters:
    """Document-level quality rules; None switches a rule off.

    min_chars / max_chars: bounds on the length in characters.
    min_words: at least this many whitespace-separated words.
    max_duplicate_line_ratio: share of non-blank lines that repeat an earlier line of the same
        document (Gopher uses 0.30 on web text).
    max_repeated_ngram_ratio: share of the words that sit inside a word `ngram_size`-gram
        occurring more than once in the document (Gopher's "duplicate n-gram character
        fraction", counted in words; it uses 0.15 for 5-grams on prose; code repeats more).
    max_symbol_ratio: share of visible characters that are not letters or digits; U+FFFD
        (undecodable bytes) and control characters always count as non-text.
    """

    min_chars: int | None = 50
    max_chars: int | None = 1_000_000
    min_words: int | None = 5
    max_duplicate_line_ratio: float | None = 0.5
    ngram_size: int = 5
    max_repeated_ngram_ratio: float | None = 0.8
    max_symbol_ratio: float | None = 0.5

    RULES = ("too_short", "too_long", "too_few_words", "duplicate_lines", "repeated_ngrams", "non_text")

    def validate(self) -> None:
        for name in ("min_chars", "max_chars", "min_words"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise DataError(f"{name} must be an integer >= 0 or None, got {value!r}")
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise DataError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        for name in ("max_duplicate_line_ratio", "max_repeated_ngram_ratio", "max_symbol_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise DataError(f"{name} must be a fraction in [0, 1] or None, got {value!r}")
        if isinstance(self.ngram_size, bool) or not isinstance(self.ngram_size, int) or self.ngram_size < 1:
            raise DataError(f"ngram_size must be an integer >= 1, got {self.ngram_size!r}")

    def first_failure(self, text: str) -> str | None:
        """The name of the first rule `text` fails (in `RULES` order), or None if it passes all."""
        if self.min_chars is not None and len(text.strip()) < self.min_chars:
            return "too_short"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "too_long"
        words = text.split()
        if self.min_words is not None and len(words) < self.min_words:
            return "too_few_words"
        if self.max_duplicate_line_ratio is not None and duplicate_line_ratio(text) > self.max_duplicate_line_ratio:
            return "duplicate_lines"
        if (
            self.max_repeated_ngram_ratio is not None
            and repeated_ngram_ratio(words, self.ngram_size) > self.max_repeated_ngram_ratio
        ):
            return "repeated_ngrams"
        if self.max_symbol_ratio is not None and symbol_ratio(text) > self.max_symbol_ratio:
            return "non_text"
        return None


def duplicate_line_ratio(text: str) -> float:
    """Share of the non-blank lines (compared stripped) that repeat an earlier line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def repeated_ngram_ratio(words: Sequence[str], n: int) -> float:
    """Share of the words covered by some word n-gram that occurs at least twice."""
    if len(words) < n or not words:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(covered) / len(words)


def symbol_ratio(text: str) -> float:
    """Share of the visible (non-whitespace) characters that are not letters or digits;
    U+FFFD and control/format/unassigned characters count as non-text too."""
    visible = symbols = 0
    for char in text:
        if char.isspace():
            continue
        visible += 1
        if not char.isalnum():
            symbols += 1
    if visible == 0:
        return 1.0
    return symbols / visible


@dataclass
class PIIRedaction:
    """PII scrubbing of each kept document (`genforge.safety.pii`).

    style: placeholder (<EMAIL_1>, numbered per document), mask (****) or pseudonym (a fake value
        of the same type, the same for the same value across the whole corpus under `key`; a
        random key per run when None). Reversible redaction keeps a vault of the originals,
        which training data must not have, so it is refused.
    types: PII types to redact (None: every pattern type, plus names with `ner_model`).
    ner_model: a BertForTokenClassification directory for PERSON/ORGANIZATION/LOCATION.
    """

    style: str = "placeholder"
    types: tuple[str, ...] | None = None
    key: bytes | str | None = None
    ner_model: str | None = None

    STYLES = ("placeholder", "mask", "pseudonym")

    def validate(self) -> None:
        if self.style not in self.STYLES:
            raise DataError(
                f"PII style {self.style!r} is not available for training data; accepted: {', '.join(self.STYLES)} "
                "(reversible redaction would keep the originals in a vault)"
            )


# ------------------------------------------------------------------------------------- dedup
@dataclass
class DedupSettings:
    """exact: drop documents whose stripped text hashes equal an earlier one's.
    near: MinHash LSH with `num_perm` permutations over lower-cased word `shingle_size`-grams;
    a document at estimated Jaccard >= `threshold` to an earlier kept one is dropped."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    shingle_size: int = 5
    seed: int = 1  # MinHash permutation seed (datasketch's default)

    def validate(self) -> None:
        if not 0 < self.threshold <= 1:
            raise DataError(f"dedup threshold must be in (0, 1], got {self.threshold}")
        if isinstance(self.num_perm, bool) or not isinstance(self.num_perm, int) or self.num_perm < 2:
            raise DataError(f"num_perm must be an integer >= 2, got {self.num_perm!r}")
        if isinstance(self.shingle_size, bool) or not isinstance(self.shingle_size, int) or self.shingle_size < 1:
            raise DataError(f"shingle_size must be an integer >= 1, got {self.shingle_size!r}")
        if self.near:
            from datasketch import MinHashLSH

            try:  # LSH splits the signature into bands; a very high threshold can leave fewer than two
                MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
            except ValueError as err:
                raise DataError(
                    f"near-dedup threshold {self.threshold} with num_perm {self.num_perm} cannot be "
                    f"indexed ({err}); lower the threshold or raise num_perm"
                ) from None


def word_shingles(text: str, size: int) -> set[bytes]:
    """The set of lower-cased word `size`-grams of `text` (the whole text when it is shorter)."""
    words = text.lower().split()
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


def _band_digest(band: bytes) -> bytes:
    return hashlib.blake2b(band, digest_size=8).digest()


class NearDuplicateIndex:
    """MinHash signatures of the kept documents in a `datasketch.MinHashLSH` index.

    `check_and_add(doc_id, text)` returns `(duplicate_of, estimated_jaccard)` for a near
    duplicate (and does not index it), or None after indexing the document. Memory per kept
    document: one signature (`num_perm` 32-bit hash values, datasketch's affine32 scheme) and
    its LSH bucket keys; no text.
    """

    def __init__(self, settings: DedupSettings) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.settings = settings
        # Band keys are shortened to 8-byte digests: the tables then take ~12% less memory, and a
        # rare digest collision only adds a candidate, which the signature check rejects.
        self.lsh = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm, hashfunc=_band_digest)
        self.signatures: list[np.ndarray] = []
        self.ids: list[str] = []
        # One MinHash's permutations, reused by all: building them is the costly part of MinHash().
        self._template = MinHash(num_perm=settings.num_perm, seed=settings.seed)

    def signature(self, text: str):
        minhash = self._minhash(
            num_perm=self.settings.num_perm,
            seed=self.settings.seed,
            permutations=self._template.permutations,
            scheme=self._template.scheme,
        )
        minhash.update_batch(list(word_shingles(text, self.settings.shingle_size)))
        return minhash

    def check_and_add(self, doc_id: str, text: str) -> tuple[str, float] | None:
        minhash = self.signature(text)
        best, best_score = None, -1.0
        for key in self.lsh.query(minhash):
            score = float(np.mean(self.signatures[key] == minhash.hashvalues))
            if score > best_score:
                best, best_score = key, score
        if best is not None and best_score >= self.settings.threshold:
            return self.ids[best], best_score
        key = len(self.ids)
        self.lsh.insert(key, minhash, check_duplication=False)
        self.signatures.append(minhash.hashvalues.copy())
        self.ids.append(doc_id)
        return None


# ------------------------------------------------------------------------------------ shards
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32."""
    if vocab_size > 2**32:
        raise DataError(f"a vocabulary of {vocab_size} ids does not fit in uint32 shards")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    """Buffers one split's token ids and writes a `.npy` shard each time `shard_tokens` are
    buffered, so memory stays bounded by one shard whatever the corpus size."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.buffer = array("I")
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0
        self.max_token_id = -1

    def add(self, ids: Sequence[int]) -> None:
        self.buffer.extend(ids)
        if ids:
            self.max_token_id = max(self.max_token_id, max(ids))
        self.tokens += len(ids)
        self.documents += 1
        while len(self.buffer) >= self.shard_tokens:
            self._write(self.shard_tokens)

    def _write(self, count: int) -> None:
        name = f"{self.split}-{len(self.shards):05d}.npy"
        values = np.frombuffer(self.buffer, dtype=np.uint32, count=count).astype(self.dtype)
        np.save(self.directory / name, values, allow_pickle=False)
        self.shards.append({"file": name, "tokens": int(count)})
        del self.buffer[:count]

    def close(self) -> list[dict]:
        if len(self.buffer):
            self._write(len(self.buffer))
        return self.shards


def content_key(text: str) -> bytes:
    """A 128-bit BLAKE2 hash of the text without its surrounding whitespace: the identity used for
    exact deduplication and for the split draw."""
    return hashlib.blake2b(text.strip().encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


def val_fraction_of(key: bytes, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, content key): the split draw of a document.

    It depends on the text alone, not on its path or position, so the same corpus splits the
    same way wherever it is stored and in whatever order it is read.
    """
    digest = hashlib.blake2b(seed.to_bytes(8, "little", signed=True) + key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# ---------------------------------------------------------------------------------- pipeline
@dataclass
class PrepareResult:
    out_dir: Path
    meta: dict = field(repr=False)

    @property
    def train_tokens(self) -> int:
        return self.meta["splits"]["train"]["tokens"]

    @property
    def val_tokens(self) -> int:
        return self.meta["splits"]["val"]["tokens"]


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(
            f"{out_dir} already exists and is not empty; choose a new directory or pass "
            "overwrite=True (--overwrite) to replace it once the new shards are complete"
        )


def _pii_redactor(pii: PIIRedaction | None):
    """A fresh `Redactor` per document (placeholders are numbered per document) sharing one
    detector and one key across the corpus, or None when PII is kept."""
    if pii is None:
        return None
    pii.validate()
    import secrets
    from functools import partial

    from ..safety.pii import PIIDetector, Redactor

    try:
        detector = PIIDetector(pii.types, ner=pii.ner_model)
    except ValueError as err:
        raise DataError(str(err)) from None
    key = pii.key if pii.key is not None else secrets.token_bytes(32)
    return partial(Redactor, pii.style, key=key, detector=detector)


def prepare(
    sources: Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    filters: QualityFilters | None = None,
    dedup: DedupSettings | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    seq_len: int | None = None,
    shard_tokens: int = 1 << 24,
    batch_documents: int = 256,
    overwrite: bool = False,
    progress: bool = False,
    max_documents: int | None = None,
    pii: PIIRedaction | None = None,
) -> PrepareResult:
    """Run the pipeline in the module docstring from `sources` to shards in `out_dir`.

    val_fraction: expected share of documents in the validation split (0: no split).
    seq_len: when given, each non-empty split must hold at least one full sequence of this
        length (checked before the output is published), and `load_prepared` uses it by default.
    shard_tokens: tokens per shard file (the last one of a split is shorter).
    max_documents: stop reading after this many documents (a bounded, deterministic sample).
    pii: redact personal data from each kept document (see `PIIRedaction`); None keeps it.
    Every option and source is checked, and the tokenizer loaded, before any document is read.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    filters = filters or QualityFilters()
    dedup = dedup or DedupSettings()
    filters.validate()
    dedup.validate()
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise DataError(f"seq_len must be an integer >= 2 (a sequence needs a next token to predict), got {seq_len!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be >= 1 or None, got {max_documents}")
    redactor = _pii_redactor(pii)  # checked (and a named-entity model loaded) before any document is read
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    files = resolve_sources(sources, extensions)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    dtype = token_dtype(tokenizer.vocab_size)

    removed = dict.fromkeys(QualityFilters.RULES, 0)
    counts = {"read": 0, "empty": 0, "exact_duplicates": 0, "near_duplicates": 0, "kept": 0}
    exact_seen: dict[bytes, str] = {}
    near_index = NearDuplicateIndex(dedup) if dedup.near else None
    pii_counts: Counter[str] = Counter()
    pii_documents = 0

    with staged_directory(out_dir) as staging:
        writers = {split: _ShardWriter(staging, split, dtype, shard_tokens) for split in ("train", "val")}
        batch: list[tuple[str, str]] = []  # (split, text) awaiting tokenization

        def flush() -> None:
            if not batch:
                return
            encoded = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
            for (split, _), ids in zip(batch, encoded):
                if separator is not None:
                    ids.append(separator)
                writers[split].add(ids)
            batch.clear()

        bar = Progress(
            TextColumn("prepare"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            disable=not progress,
        )
        with (
            bar,
            open(staging / "filtered.jsonl", "w", encoding="utf-8") as filtered_log,
            open(staging / "duplicates.jsonl", "w", encoding="utf-8") as duplicate_log,
        ):
            task = bar.add_task("prepare", total=len(files), status="")
            for doc in iter_documents(files, text_field=text_field, max_chars=filters.max_chars):
                if max_documents is not None and counts["read"] >= max_documents:
                    break
                counts["read"] += 1
                bar.update(task, completed=doc.source_index, status=f"{counts['read']:,} read, {counts['kept']:,} kept")
                if not doc.text.strip():
                    counts["empty"] += 1
                    continue
                failure = filters.first_failure(doc.text)
                if failure is not None:
                    removed[failure] += 1
                    filtered_log.write(json.dumps({"id": doc.id, "rule": failure}) + "\n")
                    continue
                text = doc.text
                if redactor is not None:
                    redaction = redactor().redact(text)
                    if redaction.findings:
                        pii_documents += 1
                        pii_counts.update(redaction.counts)
                        text = redaction.text
                key = content_key(text)
                if dedup.exact:
                    if key in exact_seen:
                        counts["exact_duplicates"] += 1
                        duplicate_log.write(
                            json.dumps({"id": doc.id, "kind": "exact", "duplicate_of": exact_seen[key], "jaccard": 1.0})
                            + "\n"
                        )
                        continue
                if near_index is not None:
                    match = near_index.check_and_add(doc.id, text)
                    if match is not None:
                        counts["near_duplicates"] += 1
                        duplicate_log.write(
                            json.dumps(
                                {"id": doc.id, "kind": "near", "duplicate_of": match[0], "jaccard": round(match[1], 4)}
                            )
                            + "\n"
                        )
                        continue
                if dedup.exact:  # recorded only once kept, so "duplicate_of" always names a kept document
                    exact_seen[key] = doc.id
                counts["kept"] += 1
                split = "val" if val_fraction > 0 and val_fraction_of(key, seed) < val_fraction else "train"
                batch.append((split, text))
                if len(batch) >= batch_documents:
                    flush()
            flush()
            bar.update(task, completed=len(files), status=f"{counts['read']:,} read, {counts['kept']:,} kept")

        report = {"documents": counts, "filters": removed}
        if pii is not None:
            report["pii_redactions"] = dict(pii_counts)
        if counts["read"] == counts["empty"]:
            raise DataError(
                f"the corpus is empty: {len(files)} file(s) gave {counts['read']} document(s), none with any text"
            )
        if counts["kept"] == 0:
            raise DataError(
                f"no document is left after filtering and deduplication: {json.dumps(report)}; "
                "loosen the filters (see --help)"
            )
        shards = {split: writer.close() for split, writer in writers.items()}
        need = seq_len or 2
        train_tokens, val_tokens = writers["train"].tokens, writers["val"].tokens
        if train_tokens < need:
            raise DataError(
                f"the train split has {train_tokens} tokens ({writers['train'].documents} documents), "
                f"fewer than one sequence of seq_len={need}; use more text or a shorter seq_len"
            )
        if val_fraction > 0 and val_tokens == 0:
            raise DataError(
                f"no document fell into the val split (val_fraction={val_fraction}, {counts['kept']} "
                "documents kept); raise val_fraction, add documents, or pass val_fraction=0"
            )
        if val_fraction > 0 and val_tokens < need:
            raise DataError(
                f"the val split has {val_tokens} tokens ({writers['val'].documents} documents), fewer "
                f"than one sequence of seq_len={need}; raise val_fraction, add text or shorten seq_len"
            )
        # A byte-for-byte copy, so the recorded hash identifies the copy too.
        (staging / "tokenizer").mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, staging / "tokenizer" / name)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "separator_token_id": separator,
            "tokenizer": {"source": str(tokenizer_dir), "copy": "tokenizer", "sha256": tokenizer_sha256(tokenizer_dir)},
            "seq_len": seq_len,
            "seed": seed,
            "val_fraction": val_fraction,
            "splits": {
                split: {
                    "documents": writers[split].documents,
                    "tokens": writers[split].tokens,
                    "max_token_id": writers[split].max_token_id,
                    "shards": shards[split],
                }
                for split in writers
            },
            "documents": counts,
            "filters": {"removed": removed, "settings": {k: v for k, v in asdict(filters).items()}},
            "dedup": {
                "exact_removed": counts["exact_duplicates"],
                "near_removed": counts["near_duplicates"],
                "settings": asdict(dedup),
                "report": "duplicates.jsonl",
            },
            "pii": None
            if pii is None
            else {
                "style": pii.style,
                "types": list(redactor.keywords["detector"].types),
                "ner_model": pii.ner_model,
                "documents_redacted": pii_documents,
                "redactions": dict(pii_counts.most_common()),
            },
            "sources": [str(f) for f in files] if len(files) <= 1000 else {"files": len(files)},
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
    return PrepareResult(out_dir=out_dir, meta=meta)


__all__ = [
    "QualityFilters",
    "duplicate_line_ratio",
    "repeated_ngram_ratio",
    "symbol_ratio",
    "DedupSettings",
    "word_shingles",
    "NearDuplicateIndex",
    "token_dtype",
    "content_key",
    "val_fraction_of",
    "PIIRedaction",
    "PrepareResult",
    "prepare",
    "META_FILE",
]
