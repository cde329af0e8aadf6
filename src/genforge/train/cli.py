"""`genforge` commands of this subsystem, registered by `genforge.cli.build_parser`:
`genforge tokenizer train` and `genforge data prepare`. They parse, call the library, print."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

console = Console(stderr=True, highlight=False)


def _fraction_or_off(value: str) -> float | None:
    if value.lower() in ("off", "none"):
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or 'off', got {value!r}") from None
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or 'off', got {value!r}")
    return number


def _int_or_off(value: str) -> int | None:
    if value.lower() in ("off", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'off', got {value!r}") from None


def _role_token(value: str) -> tuple[str, str]:
    role, sep, token = value.partition("=")
    if not sep or not role or not token:
        raise argparse.ArgumentTypeError(f"expected ROLE=TOKEN (e.g. eos_token='<|endoftext|>'), got {value!r}")
    return (role if role.endswith("_token") else f"{role}_token"), token


def cmd_tokenizer_train(args) -> int:
    from .tokenizer_training import train_tokenizer

    special = dict(args.special_token) if args.special_token else None
    result = train_tokenizer(
        files=args.sources, text_field=args.text_field, extensions=args.ext, kind=args.kind, vocab_size=args.vocab_size,
        min_frequency=args.min_frequency, special_tokens=special, extra_special_tokens=args.extra_special_token,
        lowercase=not args.cased, model_max_length=args.model_max_length, out_dir=args.out,
        allow_smaller_vocab=args.allow_smaller_vocab, overwrite=args.overwrite, progress=True,
    )
    console.print(f"trained a {result.kind} tokenizer of {result.vocab_size} tokens (asked {result.requested_vocab_size}) "
                  f"on {result.documents:,} documents ({result.characters:,} characters); saved to {result.path} "
                  f"(tokenizer.json sha256 {result.sha256[:12]})")
    return 0


def cmd_data_prepare(args) -> int:
    from .prepare import DedupSettings, QualityFilters, prepare

    filters = QualityFilters(
        min_chars=args.min_chars, max_chars=args.max_chars, min_words=args.min_words,
        max_duplicate_line_ratio=args.max_duplicate_line_ratio, ngram_size=args.ngram_size,
        max_repeated_ngram_ratio=args.max_repeated_ngram_ratio, max_symbol_ratio=args.max_symbol_ratio,
    )
    dedup = DedupSettings(exact=not args.no_exact_dedup, near=not args.no_near_dedup, threshold=args.dedup_threshold,
                          num_perm=args.num_perm, shingle_size=args.shingle_size)
    result = prepare(
        args.sources, args.tokenizer, args.out, text_field=args.text_field, extensions=args.ext, filters=filters,
        dedup=dedup, val_fraction=args.val_fraction, seed=args.seed, seq_len=args.seq_len,
        shard_tokens=args.shard_tokens, overwrite=args.overwrite, progress=True, max_documents=args.max_documents,
    )
    meta = result.meta
    docs = meta["documents"]
    removed = {k: v for k, v in meta["filters"]["removed"].items() if v}
    console.print(
        f"read {docs['read']:,} documents: {docs['empty']:,} empty, filtered {sum(removed.values()):,} "
        f"({json.dumps(removed) if removed else 'none'}), {docs['exact_duplicates']:,} exact and "
        f"{docs['near_duplicates']:,} near duplicates removed, {docs['kept']:,} kept"
    )
    for split in ("train", "val"):
        info = meta["splits"][split]
        console.print(f"  {split}: {info['documents']:,} documents, {info['tokens']:,} tokens in "
                      f"{len(info['shards'])} {meta['dtype']} shard(s)")
    console.print(f"wrote {result.out_dir} (meta.json, duplicates.jsonl, filtered.jsonl, tokenizer/)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this subsystem's subcommands to the top-level parser."""
    tokenizer = sub.add_parser("tokenizer", help="train tokenizers", description="Tokenizer tools.")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = tokenizer_sub.add_parser(
        "train", help="train a byte-level BPE or WordPiece tokenizer on text files",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a tokenizer with the `tokenizers` library, streaming the corpus, and save tokenizer.json "
                    "+ tokenizer_config.json that transformers' AutoTokenizer loads. bpe: byte-level BPE for "
                    "decoders (every byte is a token, nothing is unknown); wordpiece: BERT-style for encoders.",
        epilog="example: genforge tokenizer train 'corpus/**/*.txt' --vocab-size 16000 --out tok/",
    )
    train.add_argument("sources", nargs="+", help="files, folders (files ending with --ext) and quoted globs; "
                                                   ".jsonl files give one document per line from --text-field")
    train.add_argument("--out", required=True, help="tokenizer directory to write (refused if it exists and is not "
                                                    "empty, unless --overwrite)")
    train.add_argument("--kind", choices=("bpe", "wordpiece"), default="bpe", help="tokenizer model")
    train.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary, special tokens included; "
                                                                     "an error if the corpus cannot supply it")
    train.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merge/piece to learn it")
    train.add_argument("--special-token", action="append", type=_role_token, default=[], metavar="ROLE=TOKEN",
                       help="a named special token, e.g. eos_token='<|endoftext|>' (repeatable; replaces the "
                            "defaults: bpe <|endoftext|> (bos/eos) and <|pad|>; wordpiece [PAD] [UNK] [CLS] [SEP] [MASK])")
    train.add_argument("--extra-special-token", action="append", default=[], metavar="TOKEN",
                       help="another special token kept whole, e.g. <|im_start|> (repeatable)")
    train.add_argument("--text-field", default="text", help="JSONL field holding the text")
    train.add_argument("--ext", nargs="+", default=[".txt", ".md", ".rst", ".jsonl"],
                       help="file endings read from folders")
    train.add_argument("--cased", action="store_true", help="wordpiece: keep case (default lower-cases, as BERT-uncased)")
    train.add_argument("--model-max-length", type=int, default=None, help="recorded in tokenizer_config.json")
    train.add_argument("--allow-smaller-vocab", action="store_true",
                       help="accept fewer tokens than --vocab-size when the corpus runs out of merges")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once training succeeded)")
    train.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="prepare training data", description="Training-data tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prep = data_sub.add_parser(
        "prepare", help="filter, deduplicate, tokenize and shard a corpus for `genforge pretrain --data`",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Stream documents from files, folders, globs and JSONL through quality filters, exact and MinHash-"
                    "LSH near-duplicate removal, a seeded per-document train/val split and the tokenizer, into "
                    "memory-mapped .npy shards (uint16 when the vocabulary fits, else uint32) with a meta.json report. "
                    "Thresholds given as 'off' switch a filter off. The output appears only when the run succeeds.",
        epilog="example: genforge data prepare 'corpus/**/*.txt' --tokenizer tok/ --out data/ --seq-len 512",
    )
    prep.add_argument("sources", nargs="+", help="files, folders (files ending with --ext) and quoted globs; "
                                                  ".jsonl files give one document per line; other files one each")
    prep.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json)")
    prep.add_argument("--out", required=True, help="output directory (refused if not empty, unless --overwrite)")
    prep.add_argument("--text-field", default="text", help="JSONL field holding the text")
    prep.add_argument("--ext", nargs="+", default=[".txt", ".md", ".rst", ".jsonl"], help="file endings read from folders")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="expected share of documents held out (0: none)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    prep.add_argument("--seq-len", type=int, default=None,
                      help="training sequence length: each split must hold one sequence; pretrain uses it by default")
    prep.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    prep.add_argument("--max-documents", type=int, default=None, help="stop after reading this many documents")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    quality = prep.add_argument_group("quality filters (a document is removed by the first rule it fails)")
    quality.add_argument("--min-chars", type=_int_or_off, default=50, help="minimum characters (stripped)")
    quality.add_argument("--max-chars", type=_int_or_off, default=1_000_000, help="maximum characters")
    quality.add_argument("--min-words", type=_int_or_off, default=5, help="minimum whitespace-separated words")
    quality.add_argument("--max-duplicate-line-ratio", type=_fraction_or_off, default=0.5,
                         help="maximum share of non-blank lines repeating an earlier line")
    quality.add_argument("--ngram-size", type=int, default=5, help="word n-gram size of the repetition rule")
    quality.add_argument("--max-repeated-ngram-ratio", type=_fraction_or_off, default=0.8,
                         help="maximum share of words inside an n-gram occurring twice or more")
    quality.add_argument("--max-symbol-ratio", type=_fraction_or_off, default=0.5,
                         help="maximum share of visible characters that are not letters or digits")
    dedup = prep.add_argument_group("deduplication")
    dedup.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates")
    dedup.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-duplicate removal")
    dedup.add_argument("--dedup-threshold", type=float, default=0.8,
                       help="estimated Jaccard similarity of word shingles at which a document is a near duplicate")
    dedup.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (more: finer estimates, slower)")
    dedup.add_argument("--shingle-size", type=int, default=5, help="words per shingle")
    prep.set_defaults(func=cmd_data_prepare)
