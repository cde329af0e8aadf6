"""A base model for the fine-tuning benchmarks, made on the spot: nothing is downloaded.

A byte-level BPE tokenizer and a small Llama-style decoder, pretrained for a fixed number of
steps on a deterministic sample of the Python standard library's source
(`genforge.quickstart.stdlib_source_files`). The sample's files are recorded with the model
(`pretrain.json`), so that a task built from the standard library can leave them out
(`genforge.finetune.tasks.docstring_task(exclude=...)`): what the fine-tuned model then knows
about those functions, it learnt from the fine-tuning data.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from genforge.atomic import atomic_write_text
from genforge.checkpoint import save_model
from genforge.config import Config
from genforge.finetune.sft import SFTDataError, tokenize_prompt_completion
from genforge.model import Transformer
from genforge.quickstart import stdlib_source_files
from genforge.train import TokenDataset, TrainConfig, Trainer
from genforge.train.tokenizer_training import train_tokenizer

SEQ_LEN = 128
PRETRAIN_RECORD = "pretrain.json"


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
    """The base model's sizes as command-line options (the same defaults in every benchmark)."""
    parser.add_argument("--corpus-bytes", type=int, default=1_500_000, help="standard-library source to pretrain on")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=200)


def train_quietly(model: Transformer, data, steps: int, lr: float, seed: int, objective=None, **fields):
    """Train `model` on `data` for `steps` (batch 16, warm-up over the first 5%) in a scratch
    directory, without progress bars or export: (the TrainResult, the metrics.jsonl records)."""
    with tempfile.TemporaryDirectory(prefix="benchmark-run-") as scratch:
        config = TrainConfig(
            out_dir=Path(scratch),
            max_steps=steps,
            batch_size=16,
            lr=lr,
            warmup_steps=max(1, steps // 20),
            seed=seed,
            progress=False,
            export=False,
            **fields,
        )
        result = Trainer(model, data, config, objective=objective).train()
        records = [json.loads(line) for line in (Path(scratch) / "metrics.jsonl").read_text().splitlines()]
    return result, records


def pretrain_base(
    directory: Path,
    corpus_bytes: int = 1_500_000,
    vocab: int = 1024,
    hidden: int = 128,
    layers: int = 4,
    steps: int = 200,
    seed: int = 0,
) -> dict:
    """Train a tokenizer and a decoder on `corpus_bytes` of standard-library source and save
    both to `directory` (a Hugging Face model directory), with `pretrain.json`: what was
    trained on, how long, and to what loss."""
    started = time.perf_counter()
    files = stdlib_source_files(corpus_bytes)
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in files]
    tokenizer = train_tokenizer(texts, vocab_size=vocab, model_max_length=SEQ_LEN).tokenizer
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
    config = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=hidden * 8 // 3 // 16 * 16,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Transformer(config)
    result, _ = train_quietly(model, TokenDataset(ids, SEQ_LEN), steps, lr=1e-2, seed=seed)
    save_model(model, directory, tokenizer)
    record = {
        "parameters": config.num_parameters(),
        "hidden": hidden,
        "layers": layers,
        "vocab": tokenizer.vocab_size,
        "corpus_bytes": corpus_bytes,
        "corpus_files": len(files),
        "corpus_tokens": len(ids),
        "steps": steps,
        "final_train_loss": result.losses[-1][1],
        "seconds": time.perf_counter() - started,
        "files": [str(path) for path in files],
    }
    atomic_write_text(Path(directory) / PRETRAIN_RECORD, json.dumps(record, indent=2))
    return record


def read_base(directory: Path) -> dict:
    """The `pretrain.json` of a base made by `pretrain_base`, or the same record for the model
    `genforge quickstart` pretrains (`OUT/pretrain/run/model`, beside its run's metrics.jsonl)."""
    path = Path(directory) / PRETRAIN_RECORD
    if path.is_file():
        return json.loads(path.read_text())
    metrics = Path(directory).parent / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{directory} has no {PRETRAIN_RECORD}: give a base made by pretrain_base or by genforge quickstart"
        )
    from genforge.checkpoint import read_config
    from genforge.quickstart import FULL_PLAN

    config = read_config(directory)
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    files = stdlib_source_files(FULL_PLAN.corpus_bytes)
    return {
        "parameters": config.num_parameters(),
        "hidden": config.hidden_size,
        "layers": config.num_layers,
        "vocab": config.vocab_size,
        "corpus_bytes": FULL_PLAN.corpus_bytes,
        "corpus_files": len(files),
        "corpus_tokens": json.loads((Path(directory).parents[1] / "data" / "meta.json").read_text())["splits"]["train"][
            "tokens"
        ],
        "steps": steps[-1]["step"],
        "final_train_loss": steps[-1]["loss"],
        "seconds": 0.0,
        "files": [str(path) for path in files],
    }


def pretraining_files(record: dict) -> list[Path]:
    """The standard-library files the base was pretrained on (to leave out of a task)."""
    return [Path(path) for path in record["files"]]


def fitting_records(records: Sequence[dict], tokenizer, max_tokens: int) -> list[dict]:
    """The prompt/completion records whose tokens (prompt, completion and end of sequence, as
    fine-tuning renders them) fit in `max_tokens`: a task every method can train on whole,
    without one method's shorter context (prompt methods' virtual tokens) cutting answers."""
    kept = []
    for record in records:
        try:
            tokenize_prompt_completion(tokenizer, record["prompt"], record["completion"], max_tokens, "error", "")
        except SFTDataError:
            continue
        kept.append(record)
    return kept


__all__ = ["SEQ_LEN", "add_base_arguments", "fitting_records", "pretrain_base", "pretraining_files", "read_base"]
