"""A task with known answers for uncertainty tests and benchmarks: one- and two-digit sums.

A tiny decoder over a 16-symbol character vocabulary ("0"-"9", "+", "=", end, start, pad)
is trained on the spot to complete "<s>a+b=" with the digits of a + b and an end token.
It learns the one-digit sums quickly and the two-digit ones only partly, so its answers
are a mix of right and wrong: what a confidence measure must tell apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genforge.config import Config
from genforge.model import Transformer

SYMBOLS = "0123456789+="
END, START, PAD = 12, 13, 14
VOCAB_SIZE = 16


def encode(text: str) -> list[int]:
    return [SYMBOLS.index(ch) for ch in text]


def decode(token_ids) -> str:
    """The digits and signs of `token_ids`, up to the first end token."""
    out = []
    for token in token_ids:
        if token == END:
            break
        out.append(SYMBOLS[token] if token < len(SYMBOLS) else "?")
    return "".join(out)


@dataclass(frozen=True)
class SumProblem:
    a: int
    b: int

    @property
    def prompt_ids(self) -> list[int]:
        return [START, *encode(f"{self.a}+{self.b}=")]

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def answer_ids(self) -> list[int]:
        return [*encode(self.answer), END]


def sum_problems(max_operand: int = 99, seed: int = 0) -> list[SumProblem]:
    """Every (a, b) with 0 <= a, b <= max_operand, in a seeded random order."""
    problems = [SumProblem(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(problems)
    return problems


def train_sum_model(
    problems: list[SumProblem], steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0
) -> Transformer:
    """A tiny Llama-layout decoder trained for `steps` AdamW steps on `problems` (answer tokens
    only are scored)."""
    torch.manual_seed(seed)
    config = Config(
        family="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=128,
        max_position_embeddings=16,
        eos_token_id=END,
    )
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = [rng.choice(problems) for _ in range(batch_size)]
        rows = [p.prompt_ids + p.answer_ids for p in batch]
        width = max(map(len, rows))
        ids = torch.full((batch_size, width), PAD, dtype=torch.long)
        targets = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, (p, row) in enumerate(zip(batch, rows)):
            ids[i, : len(row)] = torch.tensor(row)
            start = len(p.prompt_ids)
            targets[i, start - 1 : len(row) - 1] = torch.tensor(p.answer_ids)
        logits = model(ids).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), targets.reshape(-1))
        for group in optimizer.param_groups:  # linear decay to 10%: settles the last steps
            group["lr"] = lr * (1 - 0.9 * step / steps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
