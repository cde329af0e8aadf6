"""`genforge tokenizer train`, `data prepare`, `pretrain` and `size ...`, registered by `genforge.cli`:
the commands of training, from a corpus to a trained model. They parse, call the library, print."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..chat_models import add_chat_model_arguments
from ..console import console
from ..ops.tracking import enable_tracking
from ..safety.privacy_cli import add_dp_arguments, dp_config


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

    if args.kind in SENTENCEPIECE_KINDS:
        return _train_sentencepiece(args)

    special = dict(args.special_token) if args.special_token else None
    result = train_tokenizer(
        files=args.sources,
        text_field=args.text_field,
        extensions=args.ext,
        kind=args.kind,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=special,
        extra_special_tokens=args.extra_special_token,
        lowercase=not args.cased,
        model_max_length=args.model_max_length,
        out_dir=args.out,
        allow_smaller_vocab=args.allow_smaller_vocab,
        overwrite=args.overwrite,
        progress=True,
    )
    console.print(
        f"trained a {result.kind} tokenizer of {result.vocab_size} tokens (asked {result.requested_vocab_size}) "
        f"on {result.documents:,} documents ({result.characters:,} characters); saved to {result.path} "
        f"(tokenizer.json sha256 {result.sha256[:12]})"
    )
    return 0


SENTENCEPIECE_KINDS = {"unigram": "unigram", "sentencepiece-bpe": "bpe"}


def _train_sentencepiece(args) -> int:
    from .sources import iter_documents, resolve_sources
    from .tokenizer_training import train_sentencepiece

    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        raise ValueError(f"{args.out} already exists and is not empty; choose a new directory or pass --overwrite")
    documents = iter_documents(resolve_sources(args.sources, args.ext), text_field=args.text_field)
    lines = (line for doc in documents for line in doc.text.splitlines() if line.strip())
    tokenizer = train_sentencepiece(
        lines, args.out, vocab_size=args.vocab_size, model_type=SENTENCEPIECE_KINDS[args.kind]
    )
    console.print(
        f"trained a SentencePiece {SENTENCEPIECE_KINDS[args.kind]} tokenizer of {tokenizer.vocab_size} pieces "
        f"(byte fallback on); saved tokenizer.model and tokenizer.json to {args.out}"
    )
    return 0


def cmd_data_prepare(args) -> int:
    from .prepare import DedupSettings, QualityFilters, prepare

    filters = QualityFilters(
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        min_words=args.min_words,
        max_duplicate_line_ratio=args.max_duplicate_line_ratio,
        ngram_size=args.ngram_size,
        max_repeated_ngram_ratio=args.max_repeated_ngram_ratio,
        max_symbol_ratio=args.max_symbol_ratio,
    )
    dedup = DedupSettings(
        exact=not args.no_exact_dedup,
        near=not args.no_near_dedup,
        threshold=args.dedup_threshold,
        num_perm=args.num_perm,
        shingle_size=args.shingle_size,
    )
    result = prepare(
        args.sources,
        args.tokenizer,
        args.out,
        text_field=args.text_field,
        extensions=args.ext,
        filters=filters,
        dedup=dedup,
        val_fraction=args.val_fraction,
        seed=args.seed,
        seq_len=args.seq_len,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
        progress=True,
        max_documents=args.max_documents,
        pii=_pii_redaction(args),
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
        console.print(
            f"  {split}: {info['documents']:,} documents, {info['tokens']:,} tokens in "
            f"{len(info['shards'])} {meta['dtype']} shard(s)"
        )
    if meta["pii"] is not None:
        pii = meta["pii"]
        found = ", ".join(f"{n:,} {t}" for t, n in pii["redactions"].items()) or "none found"
        console.print(f"  PII ({pii['style']}): {pii['documents_redacted']:,} documents redacted: {found}")
    console.print(f"wrote {result.out_dir} (meta.json, duplicates.jsonl, filtered.jsonl, tokenizer/)")
    return 0


def _pii_redaction(args):
    """The --redact-pii settings, or None; a --pii-* flag without --redact-pii is a mistake."""
    from pathlib import Path

    from .prepare import PIIRedaction

    given = [flag for flag, value in (("--pii-style", args.pii_style), ("--pii-types", args.pii_types),
             ("--pii-key-file", args.pii_key_file), ("--pii-ner-model", args.pii_ner_model)) if value is not None]  # fmt: skip
    if not args.redact_pii:
        if given:
            raise ValueError(f"{', '.join(given)} take effect only with --redact-pii")
        return None
    key = Path(args.pii_key_file).read_bytes().strip() if args.pii_key_file else None
    return PIIRedaction(
        style=args.pii_style or "placeholder",
        types=tuple(args.pii_types.split(",")) if args.pii_types else None,
        key=key,
        ner_model=args.pii_ner_model,
    )


def _training_data(args, tokenizer, seq_len_default: int = 256):
    """(train, val) TokenDatasets from --data (prepared shards) or --text (tokenized here)."""
    from . import TokenDataset
    from .data import load_prepared

    if (args.text is None) == (args.data is None):
        raise ValueError(
            "give exactly one of --text FILE (tokenized here) or --data DIR (from `genforge data prepare`)"
        )
    if args.data is not None:
        return load_prepared(args.data, seq_len=args.seq_len)
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if tokenizer is None:
        raise ValueError("--text needs a tokenizer: pass --tokenizer DIR or a --model directory with tokenizer.json")
    ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False)
    split = int(len(ids) * (1 - args.val_fraction))
    seq_len = args.seq_len or seq_len_default
    return TokenDataset(ids[:split], seq_len), TokenDataset(ids[split:], seq_len)


def _optional_tokenizer(args):
    from ..tokenizer import Tokenizer

    directory = Path(args.tokenizer or args.model)
    if args.tokenizer is None and not (directory / "tokenizer.json").exists():
        return None  # --data training needs no tokenizer; the export then carries none
    return Tokenizer.from_dir(directory)


def _refuse_quantized_start(model_dir: str) -> None:
    from ..quantize.saved import read_quantization_config

    quantized = read_quantization_config(model_dir)
    if quantized is not None:
        raise ValueError(
            f"{model_dir} is a quantized model (genforge quantize --method {quantized.get('method')}); training "
            "updates floating-point weights. Train the floating-point model and quantize after (genforge quantize), "
            "or fine-tune it with --method qlora (genforge finetune)"
        )


def _curriculum_sampler(args, config, train_data):
    """`--curriculum SCHEDULE --difficulty rarity|MODEL_DIR`: easy training windows first."""
    if args.curriculum is None:
        return None
    from ..checkpoint import load_model
    from .curriculum import CurriculumSampler, loss_difficulty, rarity_difficulty

    if args.difficulty == "rarity":
        windows = [train_data.batch([i])[0] for i in range(len(train_data))]
        difficulty = rarity_difficulty(windows, vocab_size=train_data.max_token_id + 1)
    else:
        console.print(f"scoring {len(train_data)} training windows with {args.difficulty} ...")
        difficulty = loss_difficulty(load_model(args.difficulty), train_data)
    total = config.max_steps * config.batch_size * config.grad_accum
    return CurriculumSampler(difficulty, total, schedule=args.curriculum, start=args.curriculum_start, seed=config.seed)


def cmd_pretrain(args) -> int:
    import torch

    from ..checkpoint import load_model, read_config
    from ..model import Transformer
    from . import TrainConfig, Trainer
    from .distributed import destroy_distributed, init_distributed

    config = TrainConfig(
        out_dir=args.out,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup,
        eval_every=args.eval_every,
        save_every=args.save_every,
        gradient_checkpointing=args.gradient_checkpointing,
        peak_flops=args.peak_flops,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        fsdp=args.fsdp,
        fsdp_cpu_offload=args.fsdp_cpu_offload,
        mlm_probability=args.mlm_probability,
        label_smoothing=args.label_smoothing,
        scheduled_sampling=args.scheduled_sampling,
        scheduled_sampling_decay=args.scheduled_sampling_decay,
    )
    if args.init_weights:
        _refuse_quantized_start(args.model)
    config.validate()  # before the text is tokenized and the model built
    private = dp_config(args)
    # Under torchrun: join the process group (gloo on CPU, NCCL on CUDA) and take this rank's GPU.
    context, config.device = init_distributed(args.device)
    try:
        tokenizer = _optional_tokenizer(args)
        train_data, val_data = _training_data(args, tokenizer)
        torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
        model = load_model(args.model) if args.init_weights else Transformer(read_config(args.model))
        privacy = None
        if private is not None:
            from ..safety.privacy import DPSGD

            privacy = DPSGD(private)
        sampler = _curriculum_sampler(args, config, train_data)
        trainer = Trainer(
            model,
            train_data,
            config,
            val_data=val_data,
            tokenizer=tokenizer,
            distributed=context,
            privacy=privacy,
            sampler=sampler,
        )
        result = trainer.train(resume=args.resume)
    finally:
        destroy_distributed()
    if context.is_main:
        final = result.evals[-1] if result.evals else {}
        console.print(
            f"trained to step {result.step}; val loss {final.get('val_loss', float('nan')):.4f}, "
            f"perplexity {final.get('val_ppl', float('nan')):.2f}; model in {result.export_dir}"
        )
        if result.privacy is not None:
            console.print(
                f"DP-SGD: (epsilon {result.privacy['epsilon']:.3f}, delta {result.privacy['delta']:g}) after "
                f"{result.privacy['steps']} steps at sample rate {result.privacy['sample_rate']:.4g}, noise "
                f"multiplier {result.privacy['noise_multiplier']:g}, clipping norm {result.privacy['max_grad_norm']:g}"
            )
    return 0


def cmd_data_synthesize(args) -> int:
    from ..chat_models import chat_model_from_args
    from .synthetic import SelfInstructSettings, read_seed_tasks, self_instruct, write_tasks

    seeds = read_seed_tasks(args.seeds)
    settings = SelfInstructSettings(
        num_tasks=args.num,
        examples_per_prompt=args.examples_per_prompt,
        near_duplicate=args.near_duplicate,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    settings.validate()
    generator = chat_model_from_args(args)
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("self-instruct", total=settings.num_tasks)
        tasks, report = self_instruct(
            generator, seeds, settings, progress=lambda done, _: bar.update(task, completed=done)
        )
    write_tasks(tasks, report, args.out)
    rejected = ", ".join(f"{reason} {count}" for reason, count in sorted(report.rejected.items())) or "none"
    console.print(
        f"{report.generated} tasks from {report.requests} requests (rejected: {rejected}); distinct-2 "
        f"{report.diversity.get('distinct-2', 0):.3f}; written to {args.out} (report beside it)"
    )
    if report.generated < settings.num_tasks:
        console.print(f"[yellow]asked for {settings.num_tasks}; the request budget ran out first[/yellow]")
    return 0


def cmd_tune(args) -> int:
    import torch

    from ..checkpoint import load_model, read_config
    from ..model import Transformer
    from . import TrainConfig
    from .tune import parse_space, tune

    space = parse_space(args.space)  # before any work
    base = TrainConfig(
        out_dir=args.out,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=0,
        eval_every=0,
        eval_batches=args.eval_batches,
        seed=args.seed,
        device=args.device,
    )
    base.validate()
    train_data, val_data = _training_data(args, _optional_tokenizer(args), seq_len_default=128)

    def build_model():
        torch.manual_seed(args.seed)
        return load_model(args.model) if args.init_weights else Transformer(read_config(args.model))

    result = tune(
        build_model,
        train_data,
        val_data,
        base,
        space,
        trials=args.trials,
        out_dir=args.out,
        eval_every=args.eval_every,
        seed=args.seed,
        prune=not args.no_prune,
        progress=console.print,
    )
    pruned = sum(t["state"] == "pruned" for t in result.trials)
    console.print(
        f"{len(result.trials)} trials ({pruned} pruned); best val loss {result.best_value:.4f} with "
        f"{result.best_params}; table in {result.out_dir / 'trials.md'}, config in {result.out_dir / 'best_config.json'}"
    )
    print(json.dumps({"best_params": result.best_params, "best_val_loss": result.best_value}))
    return 0


def cmd_size_chinchilla(args) -> int:
    from .sizing import chinchilla_optimal, training_flops

    flops = args.flops
    if flops is None:
        if args.parameters is None or args.tokens is None:
            raise ValueError("give --flops, or --parameters and --tokens to compute the budget from")
        flops = training_flops(args.parameters, args.tokens)
    methods = ("fit", "rule") if args.method == "both" else (args.method,)
    plans = [chinchilla_optimal(flops, m, args.tokens_per_parameter).as_dict() for m in methods]
    print(json.dumps({"flops": flops, "plans": plans}, indent=2))
    return 0


def cmd_size_fit(args) -> int:
    from .sizing import fit_power_law, plot_power_law, points_from_runs, read_points

    if bool(args.points) == bool(args.runs):
        raise ValueError("give --points CSV (columns compute,loss) or --runs DIR [DIR ...] (finished pretrain runs)")
    compute, loss = read_points(args.points) if args.points else points_from_runs(args.runs)
    fit = fit_power_law(compute, loss, irreducible=args.irreducible)
    out = {"fit": fit.as_dict(), "points": [{"compute": c, "loss": v} for c, v in zip(compute, loss)]}
    if args.extrapolate:
        out["predicted_loss"] = {str(c): float(fit.predict(c)) for c in args.extrapolate}
    if args.plot:
        out["plot"] = str(plot_power_law(fit, compute, loss, args.plot, max(args.extrapolate or [0]) or None))
    print(json.dumps(out, indent=2))
    return 0


def cmd_size_noise_scale(args) -> int:
    from ..checkpoint import load_model
    from .sizing import language_model_noise_scale

    tokenizer = _optional_tokenizer(args)
    train_data, _ = _training_data(args, tokenizer, seq_len_default=128)
    model = load_model(args.model, device=args.device)
    estimate = language_model_noise_scale(model, train_data, args.small, args.big, args.trials, args.seed, args.device)
    out = estimate.as_dict() | {
        "seq_len": train_data.seq_len,
        "critical_batch_tokens": estimate.critical_batch * train_data.seq_len,
    }
    print(json.dumps(out, indent=2))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge tokenizer`, `data`, `pretrain` and `size` to the top-level parser."""
    tokenizer = sub.add_parser("tokenizer", help="train tokenizers", description="Tokenizer tools.")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = tokenizer_sub.add_parser(
        "train",
        help="train a byte-level BPE or WordPiece tokenizer on text files",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a tokenizer with the `tokenizers` library, streaming the corpus, and save tokenizer.json "
        "+ tokenizer_config.json that transformers' AutoTokenizer loads. bpe: byte-level BPE for "
        "decoders (every byte is a token, nothing is unknown); wordpiece: BERT-style for encoders.",
        epilog="example: genforge tokenizer train 'corpus/**/*.txt' --vocab-size 16000 --out tok/",
    )
    train.add_argument(
        "sources",
        nargs="+",
        help="files, folders (files ending with --ext) and quoted globs; "
        ".jsonl files give one document per line from --text-field",
    )
    train.add_argument(
        "--out",
        required=True,
        help="tokenizer directory to write (refused if it exists and is not empty, unless --overwrite)",
    )
    train.add_argument(
        "--kind",
        choices=("bpe", "wordpiece", *SENTENCEPIECE_KINDS),
        default="bpe",
        help="tokenizer model; unigram and sentencepiece-bpe train with the sentencepiece library (byte fallback, "
        "NFKC) and write its tokenizer.model beside tokenizer.json",
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="total vocabulary, special tokens included; an error if the corpus cannot supply it",
    )
    train.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merge/piece to learn it")
    train.add_argument(
        "--special-token",
        action="append",
        type=_role_token,
        default=[],
        metavar="ROLE=TOKEN",
        help="a named special token, e.g. eos_token='<|endoftext|>' (repeatable; replaces the "
        "defaults: bpe <|endoftext|> (bos/eos) and <|pad|>; wordpiece [PAD] [UNK] [CLS] [SEP] [MASK])",
    )
    train.add_argument(
        "--extra-special-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="another special token kept whole, e.g. <|im_start|> (repeatable)",
    )
    train.add_argument("--text-field", default="text", help="JSONL field holding the text")
    train.add_argument(
        "--ext", nargs="+", default=[".txt", ".md", ".rst", ".jsonl"], help="file endings read from folders"
    )
    train.add_argument(
        "--cased", action="store_true", help="wordpiece: keep case (default lower-cases, as BERT-uncased)"
    )
    train.add_argument("--model-max-length", type=int, default=None, help="recorded in tokenizer_config.json")
    train.add_argument(
        "--allow-smaller-vocab",
        action="store_true",
        help="accept fewer tokens than --vocab-size when the corpus runs out of merges",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (only once training succeeded)"
    )
    train.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="prepare training data", description="Training-data tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prep = data_sub.add_parser(
        "prepare",
        help="filter, deduplicate, tokenize and shard a corpus for `genforge pretrain --data`",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Stream documents from files, folders, globs and JSONL through quality filters, exact and MinHash-"
        "LSH near-duplicate removal, a seeded per-document train/val split and the tokenizer, into "
        "memory-mapped .npy shards (uint16 when the vocabulary fits, else uint32) with a meta.json report. "
        "Thresholds given as 'off' switch a filter off. The output appears only when the run succeeds.",
        epilog="example: genforge data prepare 'corpus/**/*.txt' --tokenizer tok/ --out data/ --seq-len 512",
    )
    prep.add_argument(
        "sources",
        nargs="+",
        help="files, folders (files ending with --ext) and quoted globs; "
        ".jsonl files give one document per line; other files one each",
    )
    prep.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json)")
    prep.add_argument("--out", required=True, help="output directory (refused if not empty, unless --overwrite)")
    prep.add_argument("--text-field", default="text", help="JSONL field holding the text")
    prep.add_argument(
        "--ext", nargs="+", default=[".txt", ".md", ".rst", ".jsonl"], help="file endings read from folders"
    )
    prep.add_argument("--val-fraction", type=float, default=0.05, help="expected share of documents held out (0: none)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    prep.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="training sequence length: each split must hold one sequence; pretrain uses it by default",
    )
    prep.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    prep.add_argument("--max-documents", type=int, default=None, help="stop after reading this many documents")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    quality = prep.add_argument_group("quality filters (a document is removed by the first rule it fails)")
    quality.add_argument("--min-chars", type=_int_or_off, default=50, help="minimum characters (stripped)")
    quality.add_argument("--max-chars", type=_int_or_off, default=1_000_000, help="maximum characters")
    quality.add_argument("--min-words", type=_int_or_off, default=5, help="minimum whitespace-separated words")
    quality.add_argument(
        "--max-duplicate-line-ratio",
        type=_fraction_or_off,
        default=0.5,
        help="maximum share of non-blank lines repeating an earlier line",
    )
    quality.add_argument("--ngram-size", type=int, default=5, help="word n-gram size of the repetition rule")
    quality.add_argument(
        "--max-repeated-ngram-ratio",
        type=_fraction_or_off,
        default=0.8,
        help="maximum share of words inside an n-gram occurring twice or more",
    )
    quality.add_argument(
        "--max-symbol-ratio",
        type=_fraction_or_off,
        default=0.5,
        help="maximum share of visible characters that are not letters or digits",
    )
    dedup = prep.add_argument_group("deduplication")
    dedup.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates")
    dedup.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-duplicate removal")
    dedup.add_argument(
        "--dedup-threshold",
        type=float,
        default=0.8,
        help="estimated Jaccard similarity of word shingles at which a document is a near duplicate",
    )
    dedup.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (more: finer estimates, slower)")
    dedup.add_argument("--shingle-size", type=int, default=5, help="words per shingle")
    pii = prep.add_argument_group("personal data (genforge.safety.pii)")
    pii.add_argument(
        "--redact-pii",
        action="store_true",
        help="replace emails, phone numbers, card numbers, IBANs, IDs, dates of birth and addresses in each kept "
        "document before deduplication; meta.json counts them per type",
    )
    pii.add_argument(
        "--pii-style",
        choices=("placeholder", "mask", "pseudonym"),
        default=None,
        help="placeholder (<EMAIL_1>; the default), mask (****) or pseudonym (consistent fake values)",
    )
    pii.add_argument("--pii-types", default=None, help="comma-separated PII types (default: all pattern types)")
    pii.add_argument(
        "--pii-key-file", default=None, help="key for --pii-style pseudonym (default: a random key per run)"
    )
    pii.add_argument(
        "--pii-ner-model",
        default=None,
        metavar="DIR",
        help="a BertForTokenClassification checkpoint to also redact names, organisations and places",
    )
    prep.set_defaults(func=cmd_data_prepare)

    synth = data_sub.add_parser(
        "synthesize",
        help="self-instruct: grow instruction data from seed tasks with a generator model",
        description="Self-instruct (Wang et al. 2023): show the generator a few seed and generated tasks, ask for a "
        "new one, drop it when it fails the quality rules or nearly repeats a task in the pool (MinHash), then "
        "let the generator answer it. Writes Alpaca-format JSONL (instruction, input, output) for genforge finetune "
        "and OUT.report.json (rejections by reason, distinct-n, the most common first words).",
    )
    synth.add_argument("--seeds", required=True, help="JSONL seed tasks: instruction (required), input, output")
    synth.add_argument("--out", required=True, help="JSONL file to write")
    synth.add_argument("--num", type=int, default=100, help="new tasks to produce (default 100)")
    synth.add_argument("--examples-per-prompt", type=int, default=6, help="tasks shown per request (default 6)")
    synth.add_argument(
        "--near-duplicate", type=float, default=0.7, help="word-bigram Jaccard at which a task is a repeat"
    )
    synth.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of new tasks")
    synth.add_argument("--max-tokens", type=int, default=256, help="tokens per generated task and per answer")
    synth.add_argument("--seed", type=int, default=0)
    add_chat_model_arguments(synth)
    synth.set_defaults(func=cmd_data_synthesize)
    pretrain = sub.add_parser(
        "pretrain",
        help="pretrain a model on text or prepared shards (torchrun for several)",
        description="Causal-LM training for decoders, masked-LM for a BERT encoder with a "
        "masked-LM head, with AdamW, warmup + cosine decay, clipping, "
        "accumulation, periodic evaluation and atomic checkpoints; --resume "
        "continues exactly. Writes metrics.jsonl, loss_curve.png and the final "
        "model (a Hugging Face directory) under --out. Under torchrun "
        "(torchrun --nproc_per_node N -m genforge.cli pretrain ...) it trains "
        "data-parallel: DDP, or FSDP with --fsdp. See docs/training.md.",
    )
    pretrain.add_argument(
        "--model",
        required=True,
        help="directory with config.json: the architecture (its weights too with --init-weights)",
    )
    pretrain.add_argument("--init-weights", action="store_true", help="start from the directory's weights")
    pretrain.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    pretrain.add_argument("--text", default=None, help="UTF-8 training text; the last --val-fraction is held out")
    pretrain.add_argument("--data", default=None, help="a `genforge data prepare` directory (memory-mapped shards)")
    pretrain.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plot, model)")
    pretrain.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pretrain.add_argument("--device", default="cpu")
    for flag, kind, default, text in (
        ("--steps", int, 1000, "optimizer steps"),
        ("--seq-len", int, None, "tokens per sequence (default: 256 with --text, the prepared one with --data)"),
        ("--batch-size", int, 8, "sequences per micro-batch, over all processes under torchrun"),
        ("--grad-accum", int, 1, "micro-batches per step"),
        ("--lr", float, 3e-4, "peak learning rate"),
        ("--warmup", int, 100, "linear warmup steps"),
        ("--eval-every", int, 100, "steps between evaluations (0: at the end)"),
        ("--save-every", int, 100, "steps between checkpoints (0: at the end)"),
        ("--val-fraction", float, 0.05, "share of the text held out for validation"),
        ("--seed", int, 0, "seed"),
        ("--peak-flops", float, None, "the device's peak FLOP/s, to show MFU"),
    ):
        pretrain.add_argument(flag, type=kind, default=default, help=text)
    pretrain.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    pretrain.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="mixed precision: fp32 weights and optimizer, products under autocast in bf16, or in fp16 with "
        "dynamic loss scaling (skipped steps are logged). Runs on CPU too, slowly unless the CPU has bf16 units",
    )
    regimen = pretrain.add_argument_group("curriculum and exposure bias (docs/training.md)")
    regimen.add_argument(
        "--curriculum",
        choices=("competence", "linear", "baby_steps"),
        help="draw easy windows first, opening the rest by this schedule over the first 80%% of the run",
    )
    regimen.add_argument(
        "--difficulty",
        default="rarity",
        help="how hard a window is: 'rarity' (mean unigram surprisal of its tokens) or a model directory "
        "(its loss under that smaller model) (default rarity)",
    )
    regimen.add_argument(
        "--curriculum-start", type=float, default=0.2, help="share of the data open at the start (default 0.2)"
    )
    regimen.add_argument(
        "--scheduled-sampling",
        type=float,
        default=0.0,
        help="feed the model its own predictions instead of gold tokens with a probability rising to this "
        "(Bengio et al. 2015; default 0: teacher forcing)",
    )
    regimen.add_argument(
        "--scheduled-sampling-decay", choices=("linear", "exponential", "inverse_sigmoid"), default="linear"
    )
    regimen.add_argument(
        "--label-smoothing", type=float, default=0.0, help="spread this much target mass over the vocabulary"
    )
    pretrain.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state (FSDP) instead of DDP",
    )
    pretrain.add_argument(
        "--fsdp-cpu-offload",
        action="store_true",
        help="with --fsdp: keep the parameter shards, gradients and AdamW state in host memory, the optimizer "
        "step on the CPU (saves device memory, costs host-device copies; benchmarks/results/offload.md)",
    )
    pretrain.add_argument(
        "--mlm-probability",
        type=float,
        default=0.15,
        help="masked LM (encoders): share of tokens chosen for prediction",
    )
    add_dp_arguments(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)
    enable_tracking(pretrain)

    size = sub.add_parser(
        "size",
        help="sizing tools: compute-optimal size, scaling-law fit, critical batch size",
        description="Plan a run before spending its compute (see docs/training.md).",
    )
    size_sub = size.add_subparsers(dest="size_command", required=True, metavar="SIZE_COMMAND")
    chinchilla = size_sub.add_parser(
        "chinchilla",
        help="compute-optimal parameters and tokens for a FLOP budget",
        description="Hoffmann et al. 2022: the closed-form optimum of the fitted loss "
        "L(N,D) = E + A/N^a + B/D^b under C = 6ND ('fit'), and the ~20 "
        "tokens per parameter rule ('rule'). Prints JSON.",
    )
    chinchilla.add_argument("--flops", type=float, default=None, help="training compute budget C in FLOPs")
    chinchilla.add_argument("--parameters", type=float, default=None, help="with --tokens: C = 6 x parameters x tokens")
    chinchilla.add_argument("--tokens", type=float, default=None, help="with --parameters")
    chinchilla.add_argument("--method", choices=("fit", "rule", "both"), default="both")
    chinchilla.add_argument("--tokens-per-parameter", type=float, default=20.0, help="for --method rule")
    chinchilla.set_defaults(func=cmd_size_chinchilla)
    fit = size_sub.add_parser(
        "fit",
        help="fit L(C) = a*C^-b (+ e) to measured (compute, loss) points",
        description="Least squares on log loss with scipy; prints the fit as JSON and optionally plots it.",
    )
    fit.add_argument("--points", default=None, help="CSV with a header and columns compute,loss")
    fit.add_argument("--runs", nargs="+", default=None, help="finished `genforge pretrain` run directories")
    fit.add_argument("--irreducible", action="store_true", help="fit an irreducible loss term e too")
    fit.add_argument("--plot", default=None, help="write a log-log PNG of points and fit here")
    fit.add_argument(
        "--extrapolate",
        type=float,
        nargs="+",
        default=None,
        metavar="FLOPS",
        help="print the predicted loss at these compute budgets",
    )
    fit.set_defaults(func=cmd_size_fit)
    tune_parser = sub.add_parser(
        "tune",
        help="hyperparameter search with Optuna over short training runs, pruning bad trials",
        description="Train the model (from its config, or its weights with --init-weights) for --steps steps per "
        "trial with values drawn by Optuna's TPE sampler from --space, evaluate every --eval-every steps and stop "
        "trials whose validation loss is worse than the median of earlier ones at the same step. Writes study.db "
        "(resumable), trials.csv, trials.md and best_config.json to --out. Example: --space lr=log:1e-4:3e-3 "
        "warmup_steps=int:0:20 batch_size=choice:4,8",
    )
    tune_parser.add_argument(
        "--model", required=True, help="directory with config.json (and weights for --init-weights)"
    )
    tune_parser.add_argument("--init-weights", action="store_true", help="start every trial from the model's weights")
    tune_parser.add_argument("--tokenizer", default=None, help="tokenizer directory for --text (default: --model)")
    tune_parser.add_argument("--text", default=None, help="UTF-8 training text; the last --val-fraction is held out")
    tune_parser.add_argument("--data", default=None, help="a `genforge data prepare` directory")
    tune_parser.add_argument("--out", required=True, help="study directory (re-run to continue an interrupted search)")
    tune_parser.add_argument(
        "--space",
        nargs="+",
        required=True,
        metavar="NAME=KIND:LOW:HIGH",
        help="searched fields: KIND is float, log, int (LOW:HIGH) or choice (A,B,C)",
    )
    tune_parser.add_argument("--trials", type=int, default=20, help="trials in all (default 20)")
    tune_parser.add_argument("--steps", type=int, default=100, help="training steps per trial (default 100)")
    tune_parser.add_argument("--eval-every", type=int, default=20, help="steps between evaluations (default 20)")
    tune_parser.add_argument("--eval-batches", type=int, default=4, help="validation batches per evaluation")
    tune_parser.add_argument("--batch-size", type=int, default=8, help="default when not searched")
    tune_parser.add_argument("--lr", type=float, default=3e-4, help="default when not searched")
    tune_parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128 with --text)")
    tune_parser.add_argument("--val-fraction", type=float, default=0.1, help="share of --text held out")
    tune_parser.add_argument("--no-prune", action="store_true", help="run every trial to the end")
    tune_parser.add_argument("--seed", type=int, default=0)
    tune_parser.add_argument("--device", default="cpu")
    tune_parser.set_defaults(func=cmd_tune)
    noise = size_sub.add_parser(
        "noise-scale",
        help="gradient noise scale (critical batch size) of a model on data",
        description="McCandlish et al. 2018: squared gradient norms at two batch sizes "
        "give |G|^2 and tr(Sigma); B_simple = tr(Sigma)/|G|^2. Prints JSON.",
    )
    noise.add_argument("--model", required=True, help="causal model directory (config.json + safetensors)")
    noise.add_argument("--tokenizer", default=None, help="tokenizer directory for --text (default: --model)")
    noise.add_argument("--text", default=None, help="UTF-8 text to sample batches from")
    noise.add_argument("--data", default=None, help="a `genforge data prepare` directory")
    noise.add_argument("--val-fraction", type=float, default=0.05, help=argparse.SUPPRESS)
    noise.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128 with --text)")
    noise.add_argument("--small", type=int, default=2, help="small batch size, in sequences")
    noise.add_argument("--big", type=int, default=16, help="big batch size, in sequences")
    noise.add_argument("--trials", type=int, default=8, help="gradient pairs averaged")
    noise.add_argument("--seed", type=int, default=0)
    noise.add_argument("--device", default="cpu")
    noise.set_defaults(func=cmd_size_noise_scale)
