"""What the calibrated-quantization tests share: a tiny Llama-family model trained for a few
seconds on the standard library's source, so that perplexity means something, and the
perplexity of a model whose linear layers hold given INT4 grids.

Tokens are bytes (vocabulary 256): no tokenizer to train, and the same ids on every machine.
The text is `genforge.quickstart.stdlib_source_files`; the last files of the sample are held
out for perplexity, the first ones train the model and give the calibration rows.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import torch

from genforge.config import Config
from genforge.evaluate.perplexity import perplexity
from genforge.model import Transformer
from genforge.quantize.grid import Int4Grid, dequantize_int4, quantize_int4
from genforge.quickstart import stdlib_source_files
from genforge.train import TokenDataset, TrainConfig, Trainer

SEQ_LEN = 64
GROUP_SIZE = 32
SEED = 0
SMALL = dict(
    family="llama",
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_position_embeddings=SEQ_LEN,
)


def _byte_ids(paths) -> list[int]:
    ids: list[int] = []
    for path in paths:
        ids.extend(path.read_bytes())
    return ids


@functools.cache
def corpus() -> tuple[list[int], list[int]]:
    """(training ids, held-out ids): bytes of standard-library files, disjoint files."""
    files = stdlib_source_files(400_000)
    return _byte_ids(files[:-6]), _byte_ids(files[-6:])[:12_000]


def train(model: Transformer, ids: list[int], steps: int, lr: float, seed: int = SEED) -> Transformer:
    """`steps` of genforge's Trainer on `ids` (batches of 16 rows of SEQ_LEN bytes), in place."""
    with tempfile.TemporaryDirectory(prefix="quantize-test-") as scratch:
        config = TrainConfig(
            out_dir=Path(scratch),
            max_steps=steps,
            batch_size=16,
            lr=lr,
            warmup_steps=max(1, steps // 10),
            seed=seed,
            progress=False,
            export=False,
        )
        Trainer(model, TokenDataset(ids, SEQ_LEN), config).train()
    return model


@functools.cache
def _trained_state(seed: int, steps: int) -> tuple[dict, Config]:
    torch.manual_seed(seed)
    model = Transformer(Config(**SMALL))
    train(model, corpus()[0], steps, lr=1e-2, seed=seed)
    return copy.deepcopy(model.state_dict()), model.config


def trained_model(seed: int = SEED, steps: int = 300) -> Transformer:
    """A fresh copy of the tiny model trained `steps` steps (trained once per process), in eval mode."""
    state, config = _trained_state(seed, steps)
    model = Transformer(config)
    model.load_state_dict(state)
    return model.eval()


def calibration_rows(count: int = 32, offset: int = 0) -> list[torch.Tensor]:
    """`count` rows of SEQ_LEN training bytes, spread over the training text."""
    ids = torch.tensor(corpus()[0])
    starts = torch.linspace(offset, ids.numel() - SEQ_LEN - 1, count).long()
    return [ids[s : s + SEQ_LEN] for s in starts.tolist()]


def held_out_perplexity(model: Transformer) -> float:
    return perplexity(model, corpus()[1], max_length=SEQ_LEN, stride=SEQ_LEN // 2, show_progress=False).perplexity


def with_grids(model: Transformer, grids: dict[str, Int4Grid]) -> Transformer:
    """A copy of `model` whose named linear layers hold their grids' dequantized weights."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, grid in grids.items():
            copied.get_submodule(name).weight.copy_(dequantize_int4(grid))
    return copied


def rtn_grids(model: Transformer, group_size: int = GROUP_SIZE) -> dict[str, Int4Grid]:
    """Round-to-nearest INT4 of every linear layer in the blocks."""
    return {
        name: quantize_int4(module.weight, group_size)
        for name, module in model.named_modules()
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear)
    }
