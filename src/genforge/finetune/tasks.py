"""Instruction tasks built from what every machine has, and their exact-match score.

`docstring_task`: the Python standard library's functions, each record asking for a
function's summary given its signature: the prompt is the `def` line and the opening quotes
of the docstring, the completion the docstring's first paragraph (when it is one short line)
and the closing quotes. A
model pretrained on Python source has seen the shape of the answer but not these answers when
the task's files are kept out of its pretraining sample (`exclude`), so held-out loss and exact
match measure what fine-tuning taught.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..atomic import atomic_write_text

_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo", "pydoc_data"}
SUMMARY_MAX_CHARS = 72


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"


def _summaries(path: Path) -> Iterable[tuple[str, str]]:
    """(signature, summary) for the public functions and methods of `path` whose docstring
    opens with a summary (its first paragraph, on one line) short enough to be a target."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        summary = " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())
        if 8 <= len(summary) <= SUMMARY_MAX_CHARS and '"""' not in summary:
            yield _signature(node), summary


def docstring_task(
    count: int | None = None, exclude: Iterable[Path] = (), seed: int = 0, root: Path | None = None
) -> list[dict[str, str]]:
    """Prompt/completion records from the standard library (or `root`): prompt
    `def name(args):\\n    \"\"\"`, completion `<summary>\"\"\"`. Files in `exclude`
    are skipped; a signature seen twice keeps its first summary (overloads and copies would
    make one prompt ask for two answers). `count` records are drawn with `seed` (None: all)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"no Python source found at {root}")
    skipped = {Path(p).resolve() for p in exclude}
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _SKIPPED_DIRS & set(relative.parts[:-1]) or relative.name.startswith("test_") or path.resolve() in skipped:
            continue
        files.append((hashlib.blake2b(relative.as_posix().encode(), digest_size=8).hexdigest(), path))
    seen, records = set(), []
    for _, path in sorted(files):
        for signature, summary in _summaries(path):
            if signature in seen:
                continue
            seen.add(signature)
            records.append({"prompt": f'{signature}\n    """', "completion": f'{summary}"""'})
    if not records:
        raise ValueError(f"no documented functions found under {root}")
    random.Random(seed).shuffle(records)
    return records if count is None else records[:count]


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    """The records as JSON lines, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))
    return path


def fits(tokenizer, record: dict, context: int, extra_tokens: int = 4) -> bool:
    """Whether a prompt/completion record's tokens, and `extra_tokens` more (see `exact_match`),
    fit in `context` positions: the records a model of that context can be trained and scored
    on whole."""
    ids = tokenizer.encode(record["prompt"] + record["completion"], add_special_tokens=False)
    return len(ids) + extra_tokens <= context


@torch.no_grad()
def exact_match(model, tokenizer, records: Sequence[dict], batch_size: int = 16, extra_tokens: int = 4) -> float:
    """The share of prompt/completion records whose greedy continuation of the prompt starts
    with the whole completion (the model may go on after it: what counts is that it said it).
    A batch decodes `extra_tokens` more tokens than its longest completion has (the model may
    split the same text into more tokens); records join a batch while its longest prompt and
    those tokens fit in the model's context (see `fits`)."""
    from ..generate.generator import generate
    from ..generate.sampling import SamplingParams

    context = model.config.max_position_embeddings
    encoded = [
        (
            record,
            tokenizer.encode(record["prompt"], add_special_tokens=False),
            len(tokenizer.encode(record["completion"], add_special_tokens=False)) + extra_tokens,
        )
        for record in records
    ]
    batches, batch = [], []
    for item in encoded:
        grown = batch + [item]
        if batch and (
            len(grown) > batch_size or max(len(p) for _, p, _ in grown) + max(n for *_, n in grown) > context
        ):
            batches.append(batch)
            grown = [item]
        batch = grown
    if batch:
        batches.append(batch)
    was_training = model.training
    model.eval()
    hits = 0
    for batch in batches:
        params = SamplingParams(temperature=0, max_new_tokens=max(n for *_, n in batch))
        completions = generate(model, [ids for _, ids, _ in batch], params, eos_token_ids=[])
        for (record, _, _), completion in zip(batch, completions):
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            hits += text.startswith(record["completion"])
    model.train(was_training)
    return hits / len(records) if records else 0.0


__all__ = ["SUMMARY_MAX_CHARS", "docstring_task", "exact_match", "fits", "write_jsonl"]
