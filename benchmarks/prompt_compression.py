"""Prompt compression on RAG prompts: what survives at each compression ratio, surprisal against random.

genforge's LLMLingua-style compressor (`genforge.prompting.compress_prompt`, Jiang et al. 2023)
drops the words a small causal LM finds least surprising. The question is whether that keeps
what a reader of the compressed prompt needs better than dropping the same number of words at
random. Measured on retrieval-augmented prompts built offline:

- The passages are the first paragraphs of the Python standard library's top-level module
  docstrings (`genforge.quickstart.stdlib_module_docs`), each written "The NAME module: ...".
- Each item asks which module a description is about. Its context holds the supporting passage
  and `--distractors` others, shuffled; the gold answer is the module's name, and the
  supporting sentence is the passage's first sentence, naming the module.
- The instruction and the question are `<keep>` regions, never dropped; only the passages are
  compressed, to a budget of `kept + context / ratio` tokens for each ratio.

The scorer is a small Llama pretrained on the spot on standard-library source
(`finetune_base.pretrain_base`); the modules whose source it saw are left out of the items, so
the docstrings it is asked about are not ones it memorised. Random dropping (`RandomScorer`)
removes words at the same budget, averaged over `--random-seeds` seeds.

Reported per method and ratio: the achieved compression of the context, the share of items whose
gold answer survives in the supporting passage, the mean share of the supporting sentence's
words kept, and the share of items where both hold (answer kept and at least half the sentence).

    python benchmarks/prompt_compression.py      # writes benchmarks/results/prompt_compression.{json,md}
"""

from __future__ import annotations

import argparse
import math
import random
import re
import tempfile
import time
from pathlib import Path

import torch
from finetune_base import add_base_arguments, pretrain_base, pretraining_files, read_base
from machine import describe, write_results

from genforge.loading import load_for_inference
from genforge.prompting import CausalLMScorer, RandomScorer, Segment, compress_prompt
from genforge.quickstart import stdlib_module_docs

INSTRUCTION = "Answer the question from the passages below. Reply with the name of one module.\n\n"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def build_items(count: int, distractors: int, excluded: set[str], seed: int) -> list[dict]:
    """Items of the benchmark: passages (the supporting one among distractors), the question,
    the supporting sentence and the gold answer."""
    docs = {name: text for name, text in stdlib_module_docs().items() if name not in excluded}
    names = sorted(docs)
    rng = random.Random(seed)
    targets = rng.sample(names, min(count, len(names)))
    items = []
    for name in targets:
        first_sentence = _SENTENCE_END.split(docs[name], maxsplit=1)[0]
        passage = f"The {name} module: {docs[name]}"
        others = rng.sample([n for n in names if n != name], distractors)
        passages = [f"The {n} module: {docs[n]}" for n in others] + [passage]
        rng.shuffle(passages)
        words = first_sentence.split()
        # The question describes the module without naming it: the opening words of its sentence.
        description = " ".join(words[:8]).rstrip(".") + ("..." if len(words) > 8 else "")
        question = f"\nQuestion: Which module is described as: {description}?\nAnswer:"
        items.append(
            {
                "answer": name,
                "passages": passages,
                "support_passage": passages.index(passage),
                "support_sentence": f"The {name} module: {first_sentence}",
                "question": question,
            }
        )
    return items


def segments_of(item: dict) -> tuple[list[Segment], tuple[int, int], tuple[int, int]]:
    """The prompt's regions, and the character spans of the supporting sentence and of the
    gold answer inside the supporting passage (in the joined text)."""
    context = ""
    support_span = answer_span = (0, 0)
    for index, passage in enumerate(item["passages"]):
        start = len(INSTRUCTION) + len(context)
        if index == item["support_passage"]:
            support_span = (start, start + len(item["support_sentence"]))
            name_at = start + len("The ")
            answer_span = (name_at, name_at + len(item["answer"]))
        context += passage + "\n"
    segments = [Segment(INSTRUCTION, keep=True), Segment(context), Segment(item["question"], keep=True)]
    return segments, support_span, answer_span


def survival(text: str, dropped: list[tuple[int, int]], span: tuple[int, int]) -> float:
    """The share of the words inside `span` of `text` that were not dropped."""
    words = [(m.start() + span[0], m.end() + span[0]) for m in re.finditer(r"\S+", text[span[0] : span[1]])]
    lost = sum(1 for start, end in words if any(a <= start and end <= b for a, b in dropped))
    return 1.0 - lost / len(words) if words else 1.0


def measure(items: list[dict], scorer, count, ratio: float) -> dict:
    answers = support = both = 0.0
    context_ratios = []
    for item in items:
        segments, support_span, answer_span = segments_of(item)
        text = "".join(s.text for s in segments)
        kept_tokens = count(INSTRUCTION) + count(item["question"])
        context_tokens = count(segments[1].text)
        budget = kept_tokens + math.ceil(context_tokens / ratio)
        result = compress_prompt(segments, scorer, budget, count_tokens=count)
        answer_kept = survival(text, result.dropped_spans, answer_span) == 1.0
        sentence_kept = survival(text, result.dropped_spans, support_span)
        answers += answer_kept
        support += sentence_kept
        both += answer_kept and sentence_kept >= 0.5
        context_ratios.append(context_tokens / max(1, result.compressed_tokens - kept_tokens))
    n = len(items)
    return {
        "target_ratio": ratio,
        "context_ratio": sum(context_ratios) / n,
        "answer_kept": answers / n,
        "support_words_kept": support / n,
        "answer_and_half_support": both / n,
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="prompt-compression-"))
    base = Path(args.base) if args.base else work / "base"
    if (base / "config.json").is_file():
        print(f"reusing the base in {base}", flush=True)
        pretrained = read_base(base)
    else:
        print("pretraining the scorer on standard-library source ...", flush=True)
        pretrained = pretrain_base(base, args.corpus_bytes, args.vocab, args.hidden, args.layers, args.pretrain_steps)
        print(f"  {pretrained['parameters'] / 1e6:.2f}M parameters, {pretrained['seconds']:.0f}s", flush=True)
    excluded = {path.stem for path in pretraining_files(pretrained)}
    items = build_items(args.items, args.distractors, excluded, args.seed)
    loaded = load_for_inference(base)
    surprisal = CausalLMScorer(loaded.model, loaded.tokenizer)
    count = surprisal.count_tokens
    rows = []
    for ratio in args.ratios:
        scored_at = time.perf_counter()
        row = {"method": "surprisal", **measure(items, surprisal, count, ratio)}
        row["seconds"] = time.perf_counter() - scored_at
        rows.append(row)
        randoms = [
            measure(items, RandomScorer(loaded.tokenizer, seed), count, ratio) for seed in range(args.random_seeds)
        ]
        rows.append({"method": "random", **{key: sum(r[key] for r in randoms) / len(randoms) for key in randoms[0]}})
        print(f"  ratio {ratio}: {rows[-2]} / {rows[-1]}", flush=True)
    return {
        "machine": describe(),
        "scorer": {key: value for key, value in pretrained.items() if key != "files"},
        "items": len(items),
        "distractors": args.distractors,
        "excluded_modules": len(excluded),
        "example": {k: items[0][k] for k in ("answer", "support_sentence", "question")},
        "random_seeds": args.random_seeds,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def markdown(result: dict) -> str:
    machine, scorer = result["machine"], result["scorer"]
    lines = [
        f"Prompt compression on RAG prompts, {machine['cpu']} ({machine['cores']} cores shared with other jobs), "
        f"torch {machine['torch']}, Python {machine['python']}; {result['seconds']:.0f}s in all.",
        "",
        f"Scorer: a {scorer['parameters'] / 1e6:.2f}M-parameter Llama ({scorer['layers']} layers, hidden "
        f"{scorer['hidden']}, vocabulary {scorer['vocab']}) pretrained for {scorer['steps']} steps on "
        f"{scorer['corpus_bytes'] / 1e6:.1f} MB of standard-library source (final loss "
        f"{scorer['final_train_loss']:.2f}, {scorer['seconds']:.0f}s to pretrain on this machine, not counted above).",
        f"Items: {result['items']} questions over module docstrings the scorer did not train on, each context the "
        f"supporting passage among {result['distractors']} others; instruction and question kept. Random: mean of "
        f"{result['random_seeds']} seeds at the same budgets.",
        "",
        "| method | target ratio | context ratio | gold answer kept | support words kept | answer + half the support |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {row['target_ratio']:g}x | {row['context_ratio']:.2f}x | "
            f"{row['answer_kept']:.0%} | {row['support_words_kept']:.0%} | {row['answer_and_half_support']:.0%} |"
        )
    example = result["example"]
    lines += ["", f'Example item: answer `{example["answer"]}`, support "{example["support_sentence"]}".']
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_arguments(parser)
    parser.add_argument("--base", default=None, help="reuse a scorer made by pretrain_base (a model directory)")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--distractors", type=int, default=3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.5, 2.0, 3.0, 5.0])
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    result = run(args)
    write_results(args.out, "prompt_compression", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
