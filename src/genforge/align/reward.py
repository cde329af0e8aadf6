"""Reward models: a decoder with a scalar head, read at the last real token.

The reward model of RLHF (Stiennon et al. 2020; Ouyang et al. 2022, "Training language models
to follow instructions with human feedback") maps a prompt and completion to one number. It
is a language model whose vocabulary projection is replaced by a linear `score` head to one
output, without bias, applied to the final hidden state of the sequence's last token: the
only position that has read the whole text. It is trained on preference pairs with the
Bradley-Terry loss (`losses.reward_model_loss`).

The layout is transformers' `...ForSequenceClassification` with one label, so a checkpoint
moves both ways: `RewardModel.from_pretrained` reads one (Llama, Mistral, Qwen2/3, Gemma,
Phi-3, Mixtral, GPT-2) and `save_pretrained` writes one that
`AutoModelForSequenceClassification` loads. The last token is chosen as transformers
chooses it: the rightmost token that is neither padding (attention mask 0) nor the pad token
id, so a checkpoint scores the same in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_model_body, save_model
from ..config import Config
from ..model import Transformer

# transformers' sequence-classification class of each decoder family genforge reads.
SEQUENCE_CLASSIFIERS = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "phi3": "Phi3ForSequenceClassification",
    "mixtral": "MixtralForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
}
SCORE = "score.weight"


class RewardModel(nn.Module):
    """A genforge decoder with a scalar `score` head: `forward` gives one reward per sequence.

    Built from a decoder (a loaded or SFT-trained causal LM), the decoder's LM head is dropped
    (a reward model does not predict tokens) and a fresh head is drawn from N(0, 0.02), as
    transformers initialises it. PEFT wrappers go on `reward_model.decoder` as on any model.
    """

    def __init__(self, decoder: Transformer, score: nn.Linear | None = None) -> None:
        super().__init__()
        config = decoder.config
        if config.family not in SEQUENCE_CLASSIFIERS or not config.causal:
            raise ValueError(
                f"a reward model needs a decoder of a family with a sequence classifier; {config.family!r} is not "
                f"one (accepted: {', '.join(SEQUENCE_CLASSIFIERS)})"
            )
        decoder.lm_head = None
        if score is None:
            score = nn.Linear(config.hidden_size, 1, bias=False, device=decoder.device, dtype=decoder.dtype)
            nn.init.normal_(score.weight, std=0.02)
        if score.bias is not None or tuple(score.weight.shape) != (1, config.hidden_size):
            raise ValueError(
                f"the score head must be a Linear({config.hidden_size}, 1) without bias, got weight "
                f"{tuple(score.weight.shape)} {'with' if score.bias is not None else 'without'} bias"
            )
        self.decoder = decoder
        self.score = score

    @property
    def config(self) -> Config:
        return self.decoder.config

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder's blocks, where the trainer's gradient checkpointing wraps each forward."""
        return self.decoder.blocks

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (batch,) for `input_ids` (batch, seq), padded left or right (`attention_mask`
        1 for real tokens)."""
        hidden = self.decoder(input_ids, attention_mask=attention_mask, compute_logits=False).hidden_states
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(pooled).squeeze(-1)

    # ------------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> RewardModel:
        """Load a transformers `...ForSequenceClassification` directory with one label (or one
        `save_pretrained` wrote)."""
        decoder, head = load_model_body(directory, [SCORE], dtype, device)
        weight = head[SCORE]
        if weight.shape[0] != 1:
            raise CheckpointError(
                f"{directory}'s score head has {weight.shape[0]} outputs; a reward model has one (num_labels=1)"
            )
        if tuple(weight.shape) != (1, decoder.config.hidden_size):
            raise CheckpointError(
                f"{directory}'s {SCORE} has shape {tuple(weight.shape)}; expected (1, {decoder.config.hidden_size})"
            )
        score = nn.Linear(decoder.config.hidden_size, 1, bias=False, device="meta")
        score.weight = nn.Parameter(weight)
        return cls(decoder, score).eval()

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> Path:
        """Write a directory transformers' `AutoModelForSequenceClassification` loads (config.json
        with the classifier architecture and one label, safetensors with `score.weight`),
        atomically. Set `config.pad_token_id` first if transformers is to score padded batches."""
        config_updates = {
            "architectures": [SEQUENCE_CLASSIFIERS[self.config.family]],
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
        }
        return save_model(
            self.decoder,
            directory,
            tokenizer=tokenizer,
            extra_tensors={SCORE: self.score.weight},
            config_updates=config_updates,
        )


def last_token_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None
) -> torch.Tensor:
    """(batch,) the position of each row's last token: the rightmost one that is real
    (attention mask 1) and, where the model has a pad token id, not that id (transformers'
    rule: with pad = eos, a trailing eos is not read)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(input_ids.shape)}")
    if pad_token_id is not None:
        real = real & (input_ids != pad_token_id)
    if not bool(real.any(-1).all()):
        row = int((~real.any(-1)).nonzero()[0])
        raise ValueError(f"row {row} has no token to score: every position is padding or the pad token id")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * real).argmax(-1)


# -------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score_sequences(model: RewardModel, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
    """Rewards (n,) float32 of token-id sequences, scored `batch_size` at a time, right-padded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for index, sequence in enumerate(sequences):
        if len(sequence) == 0:
            raise ValueError(f"sequence {index} is empty; a reward is read at a sequence's last token")
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    device = model.decoder.device
    rewards = []
    for start in range(0, len(sequences), batch_size):
        group = sequences[start : start + batch_size]
        width = max(len(s) for s in group)
        input_ids = torch.full((len(group), width), pad, dtype=torch.long, device=device)
        attention = torch.zeros_like(input_ids)
        for row, sequence in enumerate(group):
            input_ids[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
            attention[row, : len(sequence)] = 1
        rewards.append(model(input_ids, attention_mask=attention).float())
    return torch.cat(rewards) if rewards else torch.zeros(0)


@dataclass(frozen=True)
class PairwiseAccuracy:
    """How often the reward model ranks the chosen completion above the rejected one (a tie
    counts as wrong), and the mean reward margin, over `pairs` pairs."""

    accuracy: float
    mean_margin: float
    pairs: int


def pairwise_accuracy(
    model: RewardModel, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16
) -> PairwiseAccuracy:
    """Accuracy on held-out (chosen, rejected) token-id pairs (prompt included in both)."""
    if not pairs:
        raise ValueError("pairwise_accuracy needs at least one (chosen, rejected) pair")
    chosen = score_sequences(model, [pair[0] for pair in pairs], batch_size)
    rejected = score_sequences(model, [pair[1] for pair in pairs], batch_size)
    margins = chosen - rejected
    return PairwiseAccuracy(float((margins > 0).float().mean()), float(margins.mean()), len(pairs))
