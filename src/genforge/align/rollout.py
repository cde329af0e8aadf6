"""Rollouts for online RL (PPO, GRPO): sample completions with genforge's batched generation
and lay them out for scoring.

Every prompt is sampled `samples_per_prompt` times in one batched decode (the generator drops
a row from the batch the moment it finishes). The rows come back as right-padded
prompt + completion sequences with an attention mask and a completion mask, the layout that
`logprobs.completion_logprobs` scores, so the policy, the reference and a value head all read
the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .logprobs import CompletionLogProbs, completion_logprobs


@dataclass
class Rollout:
    """Sampled completions of a batch of prompts, one row per sample.

    prompt_index: (rows,) which prompt each row continues; rows of one prompt are adjacent.
    sequences: (rows, seq) prompt + completion token ids, right-padded with `pad_token_id`.
    attention_mask: (rows, seq) 1 on real tokens.
    completion_mask: (rows, seq) 1 on completion tokens (the end-of-sequence token included).
    completions: the generated ids of each row; texts: their decoded text (stop strings cut).
    finish_reasons: "stop" or "length" per row.
    """

    prompt_index: torch.Tensor
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    completions: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]

    @property
    def rows(self) -> int:
        return self.sequences.shape[0]

    def select(self, rows: torch.Tensor | Sequence[int]) -> Rollout:
        """The rollout restricted to `rows` (a minibatch), sequences cut to their longest row."""
        index = torch.as_tensor(rows, dtype=torch.long)
        attention = self.attention_mask[index]
        width = int(attention.sum(-1).max().item()) if len(index) else 0
        return Rollout(
            prompt_index=self.prompt_index[index],
            sequences=self.sequences[index, :width],
            attention_mask=attention[:, :width],
            completion_mask=self.completion_mask[index, :width],
            completions=[self.completions[i] for i in index.tolist()],
            texts=[self.texts[i] for i in index.tolist()],
            finish_reasons=[self.finish_reasons[i] for i in index.tolist()],
        )


def layout(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    prompt_index: Sequence[int],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequences, attention_mask, completion_mask) of prompt + completion rows, right-padded."""
    rows = [list(prompts[p]) + list(c) for p, c in zip(prompt_index, completions)]
    width = max((len(r) for r in rows), default=0)
    sequences = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (p, ids) in enumerate(zip(prompt_index, rows)):
        start = len(prompts[p])
        sequences[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        completion[row, start : len(ids)] = 1
    return sequences, attention, completion


def generate_rollout(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    samples_per_prompt: int,
    params,
    *,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Rollout:
    """Sample `samples_per_prompt` completions of every prompt (token ids) under `params`
    (a `SamplingParams` with `max_new_tokens` set), in one batched decode, in eval mode."""
    from ..generate.decode import decode

    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be a positive integer, got {samples_per_prompt}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if params.max_new_tokens is None:
        raise ValueError("a rollout needs params.max_new_tokens (the longest completion)")
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token; pass pad_token_id")
    prompts = [list(p) for p in prompts]
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    index = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    training = model.training
    model.eval()
    try:
        outputs = decode("sample", model, tokenizer, repeated, params, eos_token_ids=eos_token_ids)
    finally:
        model.train(training)
    completions = [out.token_ids for out in outputs]
    sequences, attention, completion = layout(prompts, completions, index, pad_token_id)
    return Rollout(
        prompt_index=torch.tensor(index, dtype=torch.long),
        sequences=sequences,
        attention_mask=attention,
        completion_mask=completion,
        completions=completions,
        texts=[out.text or "" for out in outputs],
        finish_reasons=[out.finish_reason or "stop" for out in outputs],
    )


@torch.no_grad()
def score_rollout(model, rollout: Rollout, temperature: float = 1.0, batch_size: int = 16) -> CompletionLogProbs:
    """Per-token completion log-probabilities of every row under `model` (no gradients), in
    batches of `batch_size` rows: the old policy's or the reference's view of the samples."""
    training = model.training
    model.eval()
    pieces = []
    try:
        for start in range(0, rollout.rows, batch_size):
            part = slice(start, start + batch_size)
            pieces.append(
                completion_logprobs(
                    model,
                    rollout.sequences[part],
                    rollout.attention_mask[part],
                    rollout.completion_mask[part],
                    temperature=temperature,
                )
            )
    finally:
        model.train(training)
    return CompletionLogProbs(
        per_token=torch.cat([p.per_token for p in pieces]),
        sum=torch.cat([p.sum for p in pieces]),
        count=torch.cat([p.count for p in pieces]),
    )
