"""Scheduled sampling against exposure bias (Bengio et al. 2015).

Teacher forcing trains every position on the gold prefix, but at generation time the model reads
its own earlier tokens, mistakes included: the gap is exposure bias. Scheduled sampling feeds the
model some of its own predictions during training, more as the run goes on. With a transformer
the whole sequence is one parallel pass, so it is done in two (Mihaylova & Martins 2019): a
gradient-free pass predicts each next token from the gold prefix, then each input token after the
first is swapped for the model's prediction of it with probability p, and the loss of the second
pass is taken against the gold labels as usual.
"""

from __future__ import annotations

import math

import torch

DECAYS = ("linear", "exponential", "inverse_sigmoid")


def own_token_probability(step: int, max_steps: int, final: float, decay: str = "linear") -> float:
    """The chance of feeding the model's own token at `step`, rising from 0 to `final`.

    The teacher-forcing share 1 - p decays as in the paper: linearly, exponentially
    (0.01^progress), or as an inverse sigmoid k / (k + exp((progress - 0.6) / k)), k = 0.1,
    which keeps teacher forcing for most of the first half and drops it around 60% of the run."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    if decay == "linear":
        share = progress
    elif decay == "exponential":
        share = 1.0 - 0.01**progress
    elif decay == "inverse_sigmoid":
        k = 0.1
        share = 1.0 - k / (k + math.exp((progress - 0.6) / k))
    else:
        raise ValueError(f"unknown scheduled-sampling decay {decay!r}; accepted: {', '.join(DECAYS)}")
    return final * share


def mix_in_predictions(
    inputs: torch.Tensor, predictions: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`inputs` with each token after the first replaced, with `probability`, by the model's
    prediction of it: `predictions[:, t - 1]` (the argmax of the logits at t - 1)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"the own-token probability must be in [0, 1], got {probability}")
    if probability == 0.0 or inputs.shape[1] < 2:
        return inputs
    draws = torch.rand(inputs[:, 1:].shape, generator=generator, device="cpu").to(inputs.device)
    mixed = inputs.clone()
    mixed[:, 1:] = torch.where(draws < probability, predictions[:, :-1], inputs[:, 1:])
    return mixed
