"""Training a tokenizer from raw text with the `tokenizers` library.

Two kinds, the two that genforge's model families use:

- **byte-level BPE** for decoders (GPT-2, Radford et al. 2019; Llama 3 and Qwen use the same
  scheme): text is mapped to its UTF-8 bytes, each shown as one of 256 printable characters,
  and byte-pair encoding (Sennrich et al. 2016) learns merges of frequent adjacent pairs. The
  256 bytes are always in the vocabulary, so any text encodes and nothing is ever unknown.
- **WordPiece** for encoders (BERT, Devlin et al. 2019; the algorithm of Schuster & Nakajima
  2012): BERT normalization and pre-tokenization, then word pieces with a `##` prefix for the
  inside of a word; characters never seen in training become `[UNK]`.

Training streams: documents come from an iterator (or from files read lazily through
`genforge.train.sources.iter_documents`), so the corpus is never held in memory at once.
The result is a Hugging Face tokenizer directory (`tokenizer.json` + `tokenizer_config.json`)
that `transformers.AutoTokenizer` and `genforge.tokenizer.Tokenizer.from_dir` both load,
written atomically.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..atomic import staged_directory
from ..spm import MODEL_TYPES, SPM_FILE
from ..tokenizer import Tokenizer
from .data import DataError
from .sources import DEFAULT_EXTENSIONS, iter_documents, resolve_sources

KINDS = ("bpe", "wordpiece")
BYTE_ALPHABET_SIZE = 256  # byte-level BPE always holds one token per byte value

# Named special tokens per kind (role -> token), in the order their ids are assigned (0, 1, ...).
DEFAULT_SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    # GPT-2 style: one token that ends a document (and starts the next); padding gets its own
    # token so that masking padding never masks a real end of document.
    "bpe": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
    # BERT's five, in BERT's relative order.
    "wordpiece": {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
}
SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerTrainingError(DataError):
    """A tokenizer cannot be trained as asked (empty corpus, impossible vocabulary size, bad options)."""


@dataclass
class TrainedTokenizer:
    """What `train_tokenizer` produced: the loaded tokenizer, where it was written, and how it went."""

    tokenizer: Tokenizer
    path: Path | None
    kind: str
    requested_vocab_size: int
    vocab_size: int
    documents: int
    characters: int
    sha256: str | None  # of the written tokenizer.json's bytes (None when not written): its exact identity


def tokenizer_sha256(directory: str | os.PathLike) -> str:
    """SHA-256 of a tokenizer directory's `tokenizer.json` (its identity for data shards)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _special_tokens(
    kind: str, special_tokens: Mapping[str, str] | None, extra_special_tokens: Sequence[str]
) -> tuple[dict[str, str], list[str]]:
    named = dict(DEFAULT_SPECIAL_TOKENS[kind] if special_tokens is None else special_tokens)
    unknown = [role for role in named if role not in SPECIAL_TOKEN_ROLES]
    if unknown:
        raise TokenizerTrainingError(
            f"unknown special-token role(s) {unknown}; accepted: {', '.join(SPECIAL_TOKEN_ROLES)}"
        )
    for role, token in named.items():
        if not isinstance(token, str) or not token or token.isspace():
            raise TokenizerTrainingError(f"special token for {role} must be a non-empty string, got {token!r}")
    if kind == "wordpiece" and "unk_token" not in named:
        raise TokenizerTrainingError(
            "a WordPiece tokenizer needs an unk_token (characters unseen in training map to it)"
        )
    extras = [t for t in extra_special_tokens if t not in named.values()]
    bad = [t for t in extras if not isinstance(t, str) or not t or t.isspace()]
    if bad:
        raise TokenizerTrainingError(f"extra special tokens must be non-empty strings, got {bad}")
    ordered = list(dict.fromkeys([*named.values(), *extras]))  # ids in this order, duplicates once
    return named, ordered


def _build(kind: str, unk_token: str | None, lowercase: bool) -> tokenizers.Tokenizer:
    if kind == "bpe":
        backend = tokenizers.Tokenizer(models.BPE())
        # add_prefix_space=False: text is encoded exactly as given ("def" and " def" differ), the
        # convention of GPT-2's and Llama 3's tokenizers; use_regex splits words, numbers and
        # punctuation so that merges never cross them.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        # trim_offsets=False keeps offsets on the raw text; the processor adds no tokens.
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return backend
    backend = tokenizers.Tokenizer(models.WordPiece(unk_token=unk_token, continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return backend


def _peek_nonempty(texts: Iterable[str]) -> Iterator[str] | None:
    """The same stream, or None when it holds no non-blank text (checked before training)."""
    iterator = iter(texts)
    for text in iterator:
        if not isinstance(text, str):
            raise TokenizerTrainingError(f"training texts must be str, got {type(text).__name__}")
        if text.strip():
            return itertools.chain([text], iterator)
    return None


def train_tokenizer(
    texts: Iterable[str] | None = None,
    *,
    files: Sequence[str | os.PathLike] | None = None,
    text_field: str = "text",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    kind: str = "bpe",
    vocab_size: int = 8192,
    min_frequency: int = 2,
    special_tokens: Mapping[str, str] | None = None,
    extra_special_tokens: Sequence[str] = (),
    lowercase: bool = True,
    model_max_length: int | None = None,
    out_dir: str | os.PathLike | None = None,
    allow_smaller_vocab: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> TrainedTokenizer:
    """Train a `kind` tokenizer ("bpe": byte-level BPE; "wordpiece") of `vocab_size` tokens.

    texts: an iterable of documents (consumed once, lazily), or `files`: sources as
        `genforge.train.sources.iter_documents` reads them (files, folders, globs, JSONL with
        `text_field`; folders contribute the files ending with one of `extensions`).
    vocab_size: total size including special tokens. For BPE it must hold the 256 bytes plus the
        special tokens; a corpus too small to supply enough merges raises (with the size
        reached) unless `allow_smaller_vocab`.
    min_frequency: a pair (BPE) or piece (WordPiece) must occur this often to be learned.
    special_tokens: role -> token (roles: bos_token, eos_token, unk_token, sep_token, pad_token,
        cls_token, mask_token); default `DEFAULT_SPECIAL_TOKENS[kind]`. They get the first ids.
    lowercase: WordPiece only (BERT-uncased normalization).
    progress: show a rich progress bar while the corpus is read (over files when `files` is given).
    out_dir: when given, the tokenizer directory is written there atomically. A non-empty
        existing directory is refused (before training) unless `overwrite`, and even then it is
        replaced only once the new one is complete.
    """
    if kind not in KINDS:
        raise TokenizerTrainingError(f"unknown tokenizer kind {kind!r}; accepted: {', '.join(KINDS)}")
    if (texts is None) == (files is None):
        raise TokenizerTrainingError(
            "pass either texts (an iterable of str) or files (paths, folders, globs), not both"
        )
    if isinstance(texts, str):
        raise TokenizerTrainingError("texts must be an iterable of documents, not one str; wrap it in a list")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise TokenizerTrainingError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise TokenizerTrainingError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        if not Path(out_dir).is_dir() or any(Path(out_dir).iterdir()):
            raise TokenizerTrainingError(
                f"{out_dir} already exists and is not empty; choose a new directory or pass "
                "overwrite=True (--overwrite) to replace it"
            )
    named, ordered_specials = _special_tokens(kind, special_tokens, extra_special_tokens)
    if kind == "bpe":
        floor = BYTE_ALPHABET_SIZE + len(ordered_specials)
        if vocab_size < floor:
            raise TokenizerTrainingError(
                f"vocab_size {vocab_size} is too small for byte-level BPE: it must hold the {BYTE_ALPHABET_SIZE} "
                f"byte tokens and {len(ordered_specials)} special token(s), so at least {floor} (and more to learn any merge)"
            )
    elif vocab_size <= len(ordered_specials):
        raise TokenizerTrainingError(
            f"vocab_size {vocab_size} is too small for WordPiece: the {len(ordered_specials)} special tokens alone "
            "fill it; leave room for the corpus alphabet and word pieces"
        )
    files_total, position = None, {"file": 0}
    if files is not None:
        resolved = resolve_sources(files, extensions)  # raises on a missing path or a glob that matches nothing
        files_total = len(resolved)

        def file_texts() -> Iterator[str]:
            for doc in iter_documents(resolved, text_field=text_field):
                position["file"] = doc.source_index
                yield doc.text

        texts = file_texts()

    counts = {"documents": 0, "characters": 0}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("reading corpus"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not progress,
    )
    task = bar.add_task("read", total=files_total, status="")

    def counted(stream: Iterable[str]) -> Iterator[str]:
        for text in stream:
            if not isinstance(text, str):
                raise TokenizerTrainingError(f"training texts must be str, got {type(text).__name__}")
            counts["documents"] += 1
            counts["characters"] += len(text)
            bar.update(
                task,
                completed=position["file"] if files_total else counts["documents"],
                status=f"{counts['documents']:,} documents, {counts['characters']:,} characters",
            )
            yield text
        if files_total:
            bar.update(task, completed=files_total)

    stream = _peek_nonempty(texts)
    if stream is None:
        raise TokenizerTrainingError(
            "the corpus is empty: no document with any non-blank text; give files or texts with content"
        )
    backend = _build(kind, named.get("unk_token"), lowercase)
    if kind == "bpe":
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=ordered_specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=ordered_specials,
            continuing_subword_prefix="##",
            show_progress=False,
        )
    with bar:
        backend.train_from_iterator(counted(stream), trainer=trainer)
    if kind == "wordpiece":
        cls, sep = named.get("cls_token"), named.get("sep_token")
        if cls and sep:  # BERT's input format: [CLS] A [SEP] (B [SEP])
            backend.post_processor = processors.TemplateProcessing(
                single=f"{cls} $A {sep}",
                pair=f"{cls} $A {sep} $B:1 {sep}:1",
                special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))],
            )
    reached = backend.get_vocab_size(with_added_tokens=True)
    if reached > vocab_size:
        # WordPiece keeps every character of the corpus alphabet (and its ## form), whatever the size asked.
        raise TokenizerTrainingError(
            f"vocab_size {vocab_size} is too small for this corpus: its alphabet and the special tokens alone need "
            f"{reached} tokens; ask for more than {reached}"
        )
    if reached < vocab_size and not allow_smaller_vocab:
        raise TokenizerTrainingError(
            f"requested vocab_size {vocab_size} but the corpus supports only {reached} tokens "
            f"({counts['documents']} documents, {counts['characters']:,} characters, min_frequency={min_frequency}); "
            f"use vocab_size <= {reached}, more text, a lower min_frequency, or allow_smaller_vocab"
        )

    config: dict = {**named, "clean_up_tokenization_spaces": False, "tokenizer_class": "TokenizersBackend"}
    extras = [t for t in ordered_specials if t not in named.values()]
    if extras:
        config["extra_special_tokens"] = extras
    if kind == "bpe":
        config["add_prefix_space"] = False
    else:
        config["do_lower_case"] = lowercase
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    tokenizer = Tokenizer(backend, config)
    digest = path = None
    if out_dir is not None:
        path = Path(out_dir)
        with staged_directory(path) as staging:
            tokenizer.save(staging)
        digest = tokenizer_sha256(path)
    return TrainedTokenizer(
        tokenizer=tokenizer,
        path=path,
        kind=kind,
        requested_vocab_size=vocab_size,
        vocab_size=reached,
        documents=counts["documents"],
        characters=counts["characters"],
        sha256=digest,
    )


def train_sentencepiece(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    **options,
) -> Tokenizer:
    """Train a SentencePiece model with the library and write `tokenizer.model` plus the
    equivalent `tokenizer.json` to `out_dir` (written whole, then renamed into place).

    `options` go to `SentencePieceTrainer.train` as they are, e.g. Llama 2's settings:
    normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True."""
    import sentencepiece

    if model_type not in MODEL_TYPES:
        raise TokenizerTrainingError(
            f"unknown SentencePiece model type {model_type!r}; accepted: {', '.join(MODEL_TYPES)}"
        )
    buffer = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            minloglevel=2,
            **({"pad_id": 3} | options),
        )
    except RuntimeError as err:  # the trainer's own message says what to change (e.g. vocab too large)
        raise TokenizerTrainingError(f"SentencePiece training failed: {err}") from None
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        (staging / SPM_FILE).write_bytes(buffer.getvalue())
        tokenizer = Tokenizer.from_sentencepiece(staging / SPM_FILE)
        tokenizer.save(staging)
    return tokenizer


__all__ = [
    "KINDS",
    "DEFAULT_SPECIAL_TOKENS",
    "TokenizerTrainingError",
    "TrainedTokenizer",
    "train_tokenizer",
    "train_sentencepiece",
    "tokenizer_sha256",
]
