"""PPO for language models: reinforcement learning from a reward, held near a reference model.

Proximal policy optimisation (Schulman et al. 2017) as RLHF uses it (Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences"; Stiennon et al. 2020; Ouyang et al.
2022, InstructGPT). One PPO step is:

1. Rollout: sample completions of a batch of prompts with genforge's batched generation
   (`rollout.generate_rollout`), score each with the reward (a Python callable or a
   `RewardModel`): one number per sequence.
2. Score every completion token under the sampling policy (log pi_old and the value V), and
   under the reference (log pi_ref: the base model with the LoRA adapters switched off, or a
   frozen copy when all weights train).
3. Per-token rewards: r_t = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t)), plus the sequence's
   score on its last completion token. The summed penalty is the k1 estimate of
   KL(pi || pi_ref) of the sample; it keeps the policy from drifting to text the reward model
   never saw (the reward hacking `benchmarks/reward_hacking.py` shows).
4. Generalised advantage estimation (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t,
   A_t = delta_t + gamma lambda A_{t+1}, returns R_t = A_t + V_t; the advantages are whitened
   over the batch.
5. Several epochs of shuffled minibatches minimise the clipped surrogate
   mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))), ratio = pi / pi_old, plus
   vf_coef * the clipped value loss 0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, +-eps_v) - R)^2)).
6. The KL controller updates kl_coef: fixed, or adaptive (Ziegler et al. section 2.2):
   kl_coef <- kl_coef (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), n the samples of
   the step.

The value head is a linear map from the policy's final hidden state to a scalar, on the
policy's own trunk (as the original TRL `AutoModelForCausalLMWithValueHead`), not a separate
critic network: one forward pass gives both the log-probabilities and the values, no second
model is held in memory (with LoRA the reference costs nothing either, so a PPO run holds one
set of base weights), and the hidden state that predicts token t is exactly the state of
which V estimates the return. The cost is that the value loss moves the shared trunk too;
vf_coef (default 0.1) keeps it from dominating. Ouyang et al. initialise a separate value model
from the reward model, which pays off on large models; on small ones the shared trunk learns
faster.

The update runs with dropout off (the model in eval mode, as TRL's PPO disables dropout), so
the first minibatch's ratio is exactly 1 and the clip fractions mean what they say.

Everything that is arithmetic is a pure function of tensors, tested against hand-written
loops and the formulas (tests/test_align_ppo.py); `PPOTrainer` runs the loop on a model in
memory, with atomic checkpoints and exact resume (weights, value head, optimizer, the KL
controller, and a seed per step for sampling and minibatch order); `train_ppo` and `run` are
the library call and the `genforge align ppo` command over model directories.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, atomic_write_text, staged_directory
from ..jsonl import json_objects
from ..ops.hooks import publish_metrics
from ..tokenizer import ChatTemplateError, Tokenizer
from .logprobs import CHUNK_ELEMENTS, check_masks, token_logprobs
from .reward import RewardModel, score_sequences
from .rollout import Rollout, generate_rollout

PPO_METHODS = ("lora", "dora", "full")
PPO_LR = {"full": 1e-5, "lora": 1e-4, "dora": 1e-4}
CHECKPOINT_FILES = ("weights.safetensors", "trainer_state.pt", "state.json")


class PPOError(ValueError):
    """A PPO run that cannot start (or go on) as asked."""


# ==================================================================================== pure math
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `values` where `mask` is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """The variance of `values` where `mask` is 1; unbiased (Bessel's n / (n - 1)) by default,
    which needs at least two entries."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        if count < 2:
            raise ValueError(f"an unbiased variance needs at least two masked entries; got {int(count)}")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the masked entries (unbiased variance); with
    shift_mean=False the mean is added back (rewards are rescaled, not centred). Entries
    outside the mask are returned as 0."""
    mask = mask.to(values.dtype)
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (rows, seq), by generalised advantage estimation (Schulman et
    al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation").

    rewards, values, mask: (rows, seq); each row's masked columns are one episode (its
    completion tokens, contiguous), ending in a terminal state whose value is 0. Per step:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}; R_t = A_t + V_t.
    Unmasked columns get 0."""
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            "rewards, values and mask must be (rows, seq) tensors of one shape; got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    _check_unit("gamma", gamma)
    _check_unit("lam", lam)
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])
    next_value = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = live * (delta + gamma * lam * running)
        advantages[:, t] = running
        # After a masked-out column the next episode starts afresh: no value flows across.
        next_value = live * values[:, t]
    return advantages, (advantages + values) * mask


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both (rows, seq): kl_t = log pi(y_t) - log pi_ref(y_t) on completion tokens
    (the k1 estimator; its sum over a sample estimates KL(pi || pi_ref)), and
    r_t = -kl_coef * kl_t, plus each row's sequence score (rows,) on its last completion token."""
    if logprobs.shape != reference_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            "logprobs, reference_logprobs and mask must be (rows, seq) tensors of one shape; got "
            f"{tuple(logprobs.shape)}, {tuple(reference_logprobs.shape)} and {tuple(mask.shape)}"
        )
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be ({logprobs.shape[0]},), one per row; got {tuple(scores.shape)}")
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
    live = mask.bool()
    if not bool(live.any(-1).all()):
        row = int((~live.any(-1)).nonzero()[0])
        raise ValueError(f"row {row} has no completion token to put its score on")
    kl = (logprobs - reference_logprobs) * live
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * live).argmax(-1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


class PolicyLoss(NamedTuple):
    """The clipped surrogate: loss (the masked mean), per_token (rows, seq; 0 off the mask),
    clip_fraction (the share of tokens whose clipped term was the larger), approx_kl
    (0.5 mean (log pi - log pi_old)^2, the drift from the sampling policy)."""

    loss: torch.Tensor
    per_token: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> PolicyLoss:
    """PPO's clipped policy objective (Schulman et al. 2017, eq. 7), as a loss per token:
    max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range)), ratio = exp(logp - old)."""
    _check_same(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not 0 < clip_range < 1:
        raise ValueError(f"clip_range must be in (0, 1), got {clip_range}")
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    per_token = torch.max(unclipped, clipped) * mask
    clip_fraction = masked_mean((clipped > unclipped).to(mask.dtype), mask)
    approx_kl = 0.5 * masked_mean((logprobs - old_logprobs).detach() ** 2, mask)
    return PolicyLoss(per_token.sum() / mask.sum().clamp(min=1), per_token, clip_fraction.detach(), approx_kl)


class ValueLoss(NamedTuple):
    """The clipped value loss: loss (the masked mean), per_token, clip_fraction (the share of
    tokens whose clipped error was the larger)."""

    loss: torch.Tensor
    per_token: torch.Tensor
    clip_fraction: torch.Tensor


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> ValueLoss:
    """0.5 max((V - R)^2, (V_clipped - R)^2) per token, V_clipped = V_old + clip(V - V_old,
    -clip_range_value, clip_range_value): the value function moves at most that far from the
    rollout's values in one update (PPO2's value clipping, as in Ziegler et al.'s code)."""
    _check_same(values=values, old_values=old_values, returns=returns, mask=mask)
    if not clip_range_value > 0:
        raise ValueError(f"clip_range_value must be > 0, got {clip_range_value}")
    mask = mask.to(values.dtype)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.max(unclipped_error, clipped_error) * mask
    clip_fraction = masked_mean((clipped_error > unclipped_error).to(mask.dtype), mask)
    return ValueLoss(per_token.sum() / mask.sum().clamp(min=1), per_token, clip_fraction.detach())


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect value function, 0 one no
    better than a constant, below 0 worse (nan when the returns do not vary)."""
    variance = masked_var(returns, mask, unbiased=False)
    if float(variance) == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, unbiased=False) / variance)


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float, samples: int) -> float:
    """Ziegler et al. (2019) section 2.2: a proportional controller on log kl_coef.
    e = clip(kl / target - 1, -0.2, 0.2); kl_coef (1 + e * samples / horizon). A KL above the
    target raises the coefficient, below it lowers it; the clip bounds one step's change."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * samples / horizon)


class FixedKLController:
    """A constant kl_coef."""

    def __init__(self, kl_coef: float) -> None:
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, kl: float, samples: int) -> None:
        """Nothing changes: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_controller_state(state, "fixed")
        self.value = float(state["value"])


class AdaptiveKLController:
    """kl_coef steered to keep the per-sample KL near `target` (`adaptive_kl_coef`); `horizon`
    is how many samples a full 20% correction takes to act."""

    def __init__(self, kl_coef: float, target: float, horizon: float) -> None:
        if not (math.isfinite(kl_coef) and kl_coef > 0):
            raise ValueError(f"an adaptive controller needs an initial kl_coef > 0, got {kl_coef}")
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"the KL target must be a finite number > 0 (nats per sample), got {target}")
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"the KL horizon must be a finite number > 0 (samples), got {horizon}")
        self.value, self.target, self.horizon = float(kl_coef), float(target), float(horizon)

    def update(self, kl: float, samples: int) -> None:
        self.value = adaptive_kl_coef(self.value, kl, self.target, self.horizon, samples)

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_controller_state(state, "adaptive")
        self.value = float(state["value"])


def kl_controller(kl_coef: float, target: float | None = None, horizon: float = 10000.0):
    """A fixed controller (target None) or an adaptive one."""
    return FixedKLController(kl_coef) if target is None else AdaptiveKLController(kl_coef, target, horizon)


def _check_controller_state(state: Mapping[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise PPOError(f"the checkpoint's KL controller is {state.get('kind')!r}; this run's is {kind!r}")


def _check_unit(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_same(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the tensors must share one shape; got {shapes}")


# ============================================================================ model pieces
class ValueHead(nn.Module):
    """V(s_t): a linear map from the policy's final hidden state to one number, in float32.
    Zero-initialised, so the first values are 0 and the first advantages are the returns."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.float()).squeeze(-1)


class TokenScores(NamedTuple):
    """Per completion token, laid out like `CompletionLogProbs.per_token` (rows, seq; column t
    is about token t, 0 off the completion): log-probabilities, values, and (when asked)
    entropies of the policy's next-token distribution."""

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None


def token_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """The entropy (tokens,) of softmax((hidden @ weight.T + bias) / temperature), a slice of
    rows at a time (no full tokens x vocab tensor), without gradients: a logged statistic."""
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    pieces = []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start : start + chunk], weight, bias).float() / temperature
            logp = torch.log_softmax(logits, dim=-1)
            pieces.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def score_tokens(
    model: nn.Module,
    value_head: ValueHead | None,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
) -> TokenScores:
    """One forward pass of the policy over prompt + completion rows: each completion token's
    log-probability and, from the same hidden state (the one that predicts the token), its value."""
    check_masks(sequences, attention_mask, completion_mask)
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise PPOError("PPO needs a causal language model whose LM head is a plain linear layer (model.lm_head)")
    hidden = model(sequences, attention_mask=attention_mask, compute_logits=False).hidden_states
    scored = completion_mask[:, 1:].bool()
    predictors = hidden[:, :-1][scored]
    targets = sequences[:, 1:][scored]

    def spread(flat: torch.Tensor) -> torch.Tensor:
        laid = torch.zeros(scored.shape, dtype=torch.float32, device=flat.device).masked_scatter(scored, flat.float())
        return F.pad(laid, (1, 0))

    logprobs = spread(token_logprobs(predictors, head.weight, targets, head.bias, temperature))
    values = spread(value_head(predictors)) if value_head is not None else None
    entropies = spread(token_entropy(predictors.detach(), head.weight, head.bias, temperature)) if entropy else None
    return TokenScores(logprobs, values, entropies)


# ================================================================================== rewards
RewardFunction = Callable[..., Sequence[float]]


def resolve_reward(spec: str) -> RewardFunction:
    """A reward function named on the command line: one of `rewards.REWARD_SPECS`
    (exact_match, format, reward_model, unit_tests) or "package.module:function"."""
    from .rewards import reward_from_spec

    try:
        return reward_from_spec(spec)
    except ValueError as err:
        raise PPOError(str(err)) from None


def _accepted_keywords(function: Callable) -> set[str] | None:
    """The keyword names `function` takes; None when it takes any (**kwargs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _call_with_fields(function: Callable, prompts: list[str], completions: list[str], fields: dict[str, list]):
    """function(prompts, completions, **the fields it takes) (all of them if it takes **kwargs)."""
    accepted = _accepted_keywords(function)
    if accepted is not None:
        fields = {name: value for name, value in fields.items() if name in accepted}
    return function(prompts, completions, **fields)


def check_scores(values: Any, prompts: Sequence[str], completions: Sequence[str], source: str) -> torch.Tensor:
    """(rows,) float32 of what a reward returned, or an error naming the first bad sample."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    try:
        values = list(values)
    except TypeError:
        raise PPOError(f"{source} returned a {type(values).__name__}; expected a list of numbers") from None
    if len(values) != len(completions):
        raise PPOError(f"{source} returned {len(values)} rewards for {len(completions)} completions")
    for row, value in enumerate(values):
        number = value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise PPOError(
                f"{source} returned {value!r} for sample {row} (prompt {prompts[row][:60]!r}, completion "
                f"{completions[row][:60]!r}); a reward must be a finite number"
            )
        values[row] = float(number)
    return torch.tensor(values, dtype=torch.float32)


# ===================================================================================== data
@dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample from: its token ids, its text (as the reward sees it), the record's
    other fields (passed to a reward function that takes them, e.g. a reference answer), and
    where it came from."""

    ids: list[int]
    text: str
    extras: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def prompt_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    chat_template: str | None = None,
    where: str = "record",
) -> list[PromptRecord]:
    """Prompts from records {"prompt": str or [{"role", "content"}, ...], ...other fields}: plain
    text is encoded with the tokenizer's special tokens (a bos), messages are rendered with the
    chat template and its generation prompt. Every record is checked first."""
    parsed = []
    for index, record in enumerate(records):
        here = f"{where} {index}" if where == "record" else f"{where}:{index + 1}"
        here = record.get("__where__", here) if isinstance(record, Mapping) else here
        if not isinstance(record, Mapping) or "prompt" not in record:
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise PPOError(f"{here}: needs a 'prompt' field (has {keys}); accepted: a string or chat messages")
        prompt = record["prompt"]
        chat = isinstance(prompt, list)
        if chat:
            if not prompt or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt
            ):
                raise PPOError(f"{here}: 'prompt' as a list must hold {{'role', 'content'}} string messages")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise PPOError(f"{here}: 'prompt' must be a non-empty string or a list of chat messages")
        extras = {k: v for k, v in record.items() if k not in ("prompt", "__where__")}
        parsed.append((here, prompt, chat, extras))
    out = []
    for here, prompt, chat, extras in parsed:
        if chat:
            if chat_template is None and tokenizer.chat_template is None:
                raise PPOError(f"{here}: chat-message prompts need a chat template and the tokenizer has none")
            try:
                text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, chat_template=chat_template)
            except ChatTemplateError as err:
                raise PPOError(f"{here}: {err}") from err
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            text, ids = prompt, tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise PPOError(f"{here}: the prompt encodes to no tokens")
        out.append(PromptRecord(list(ids), text, extras, here))
    return out


def read_prompts(path: str | Path, tokenizer: Tokenizer, chat_template: str | None = None) -> list[PromptRecord]:
    """`prompt_records` of a JSONL file, errors naming its lines."""
    path = Path(path)
    if not path.is_file():
        raise PPOError(f"prompt file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        records = [dict(r, __where__=f"{path}:{n}") for n, r in json_objects(handle, str(path), PPOError)]
    if not records:
        raise PPOError(f"{path} holds no prompts; expected one JSON object {{'prompt': ...}} per line")
    return prompt_records(records, tokenizer, chat_template, str(path))


def prompts_fingerprint(prompts: Sequence[PromptRecord]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(prompt.ids).encode())
    return digest.hexdigest()[:16]


# ================================================================================== trainer
@dataclass
class PPOConfig:
    """What a PPO run samples, optimises and writes.

    steps: PPO iterations; each samples `prompts_per_step` prompts `samples_per_prompt` times
        (max_new_tokens, temperature, top_k, top_p), then runs `ppo_epochs` passes over the
        samples in shuffled minibatches of `minibatch_size` rows, one optimizer step each,
        computed `micro_batch_size` rows at a time (default: the whole minibatch).
    kl_coef: the KL penalty's coefficient (its start value when adaptive); kl_target (nats per
        sample) switches on the adaptive controller with `kl_horizon` (samples).
    gamma, lam: GAE's discount and trace decay. clip_range, clip_range_value: PPO's epsilons.
    vf_coef: the value loss's weight in the shared-trunk loss.
    whiten_advantages: over the batch (on by default); whiten_rewards: rescale the per-token
        rewards (no centring) before GAE.
    missing_eos_penalty: subtracted from the score of a completion that hit max_new_tokens
        without ending (TRL's knob: discourages rambling).
    lr: None takes the method's usual rate (`PPO_LR`). The method and LoRA fields are read by
        `train_ppo` (a `PPOTrainer` trains the model it is given).
    """

    out_dir: str | Path
    steps: int = 100
    prompts_per_step: int = 16
    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ppo_epochs: int = 4
    minibatch_size: int = 8
    micro_batch_size: int | None = None
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    save_every: int = 0
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    method: str = "lora"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Sequence[str] | None = None
    chat_template: str | None = None

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else PPO_LR.get(self.method, PPO_LR["full"])


# Settings that decide what a resumed run computes: changing them breaks "exact resume".
_RESUME_INVARIANTS = (
    "prompts_per_step",
    "samples_per_prompt",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "ppo_epochs",
    "minibatch_size",
    "gamma",
    "lam",
    "clip_range",
    "clip_range_value",
    "vf_coef",
    "whiten_advantages",
    "whiten_rewards",
    "missing_eos_penalty",
    "kl_target",
    "kl_horizon",
    "seed",
)


def check_config(config: PPOConfig) -> None:
    """Every setting, checked before a model or a file is read."""

    def positive_int(name: str) -> None:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PPOError(f"{name} must be a positive integer, got {value!r}")

    for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs", "minibatch_size"):
        positive_int(name)
    if config.micro_batch_size is not None:
        positive_int("micro_batch_size")
        if config.micro_batch_size > config.minibatch_size:
            raise PPOError(
                f"micro_batch_size ({config.micro_batch_size}) cannot exceed minibatch_size ({config.minibatch_size})"
            )
    if config.minibatch_size > config.rows_per_step:
        raise PPOError(
            f"minibatch_size ({config.minibatch_size}) exceeds the samples of a step (prompts_per_step x "
            f"samples_per_prompt = {config.rows_per_step})"
        )
    if not (math.isfinite(config.temperature) and config.temperature > 0):
        raise PPOError(f"temperature must be > 0 (PPO samples; 0 would be greedy), got {config.temperature}")
    if not (math.isfinite(config.kl_coef) and config.kl_coef >= 0):
        raise PPOError(f"kl_coef must be a finite number >= 0, got {config.kl_coef}")
    if config.kl_target is not None:
        if not (math.isfinite(config.kl_target) and config.kl_target > 0):
            raise PPOError(f"kl_target must be a number > 0 (nats per sample), got {config.kl_target}")
        if config.kl_coef == 0:
            raise PPOError("an adaptive KL controller scales kl_coef, so it needs kl_coef > 0")
        if not (math.isfinite(config.kl_horizon) and config.kl_horizon > 0):
            raise PPOError(f"kl_horizon must be > 0 (samples), got {config.kl_horizon}")
    for name in ("gamma", "lam"):
        if not 0 <= getattr(config, name) <= 1:
            raise PPOError(f"{name} must be in [0, 1], got {getattr(config, name)}")
    if not 0 < config.clip_range < 1:
        raise PPOError(f"clip_range must be in (0, 1), got {config.clip_range}")
    if not config.clip_range_value > 0:
        raise PPOError(f"clip_range_value must be > 0, got {config.clip_range_value}")
    if not (math.isfinite(config.vf_coef) and config.vf_coef >= 0):
        raise PPOError(f"vf_coef must be >= 0, got {config.vf_coef}")
    if config.whiten_advantages and config.rows_per_step < 2:
        raise PPOError("whitening advantages needs at least two samples per step")
    if config.missing_eos_penalty is not None and not math.isfinite(config.missing_eos_penalty):
        raise PPOError(f"missing_eos_penalty must be a finite number, got {config.missing_eos_penalty}")
    if not (math.isfinite(config.resolved_lr) and config.resolved_lr > 0):
        raise PPOError(f"lr must be > 0, got {config.resolved_lr}")
    if config.save_every < 0:
        raise PPOError(f"save_every must be >= 0 (0: at the end only), got {config.save_every}")
    if config.method not in PPO_METHODS:
        raise PPOError(f"unknown method {config.method!r}; accepted: {', '.join(PPO_METHODS)}")
    if config.lora_dropout:
        raise PPOError(
            "PPO runs with dropout off (the sampling and the updated policy must agree on the first minibatch); "
            "set lora_dropout to 0"
        )


@dataclass
class PPOResult:
    """What a run did: steps, the mean reward and KL over its first and last steps (a tenth of
    the run each, at least one step), the final kl_coef, and where it wrote."""

    steps: int
    reward_start: float
    reward_end: float
    kl_start: float
    kl_end: float
    kl_coef: float
    seconds: float
    out_dir: Path
    output_dir: Path | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        record = asdict(self)
        record["out_dir"] = str(self.out_dir)
        record["output_dir"] = str(self.output_dir) if self.output_dir is not None else None
        return record


class PPOTrainer:
    """PPO on a model in memory (see the module doc for the step).

    model: a genforge causal LM; only its parameters with requires_grad train (with LoRA
        installed: the adapters). tokenizer: the model's.
    prompts: `PromptRecord`s (or lists of token ids). reward: a callable
        f(prompts, completions, **fields) -> numbers, or a `RewardModel` (same vocabulary).
        A callable that takes them receives keyword lists: `completion_ids`, `prompt_ids`, and each
        extra field of the prompt records.
    reference: the model to stay near; None: the base with the adapters off where the model
        has LoRA layers, else a frozen copy of the model as it is now.
    extra_metrics: called like a reward function, on the same samples, -> {name: number}, logged
        with each step (e.g. a true task reward that is not optimised).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        prompts: Sequence[PromptRecord] | Sequence[Sequence[int]],
        reward: RewardFunction | RewardModel,
        config: PPOConfig,
        reference: nn.Module | None = None,
        value_head: ValueHead | None = None,
        extra_metrics: Callable[..., Mapping[str, float]] | None = None,
    ) -> None:
        check_config(config)
        if not prompts:
            raise PPOError("PPO needs at least one prompt")
        self.prompts = [
            p if isinstance(p, PromptRecord) else PromptRecord(list(p), tokenizer.decode(list(p)), {}, f"prompt {i}")
            for i, p in enumerate(prompts)
        ]
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        for prompt in self.prompts:
            if not prompt.ids:
                raise PPOError(f"{prompt.source}: an empty prompt; a completion needs a token before it")
            if context is not None and len(prompt.ids) + config.max_new_tokens > context:
                raise PPOError(
                    f"{prompt.source}: {len(prompt.ids)} prompt tokens + max_new_tokens={config.max_new_tokens} exceed "
                    f"the model's context of {context}; shorten the prompt or lower max_new_tokens"
                )
        if isinstance(reward, RewardModel):
            vocab = reward.config.vocab_size
            if vocab < model.config.vocab_size:
                raise PPOError(
                    f"the reward model's vocabulary ({vocab}) is smaller than the policy's "
                    f"({model.config.vocab_size}); both must read the same token ids"
                )
        elif not callable(reward):
            raise PPOError(f"reward must be a callable or a RewardModel, got {type(reward).__name__}")
        self.model, self.tokenizer, self.reward, self.config = model, tokenizer, reward, config
        self.extra_metrics = extra_metrics
        self.device = torch.device(config.device)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        if self.pad_token_id is None:
            raise PPOError("the tokenizer has neither a pad nor an end-of-sequence token")
        from ..finetune.lora import LoraLinear

        self.adapted = reference is None and any(isinstance(m, LoraLinear) for m in model.modules())
        if reference is None and not self.adapted:
            # Full fine-tuning: the model as it is now is the reference; a frozen copy keeps it.
            reference = copy.deepcopy(model)
        if reference is not None:
            reference.requires_grad_(False).eval().to(self.device)
        self.reference = reference
        self.value_head = (value_head or ValueHead(model.config.hidden_size)).to(self.device)
        self.model.to(self.device)
        if isinstance(reward, RewardModel):
            reward.to(self.device).eval()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise PPOError("the model has no trainable parameters (install LoRA, or unfreeze it for full training)")
        from ..train.optim import build_optimizer

        self._trained = nn.ModuleDict({"policy": model, "value_head": self.value_head})
        self.optimizer = build_optimizer(self._trained, config.resolved_lr, weight_decay=config.weight_decay)
        self.controller = kl_controller(config.kl_coef, config.kl_target, config.kl_horizon)
        self.step = 0
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"

    # ------------------------------------------------------------------------ the schedule
    def prompt_batch(self, step: int) -> list[int]:
        """The prompt indices of `step`: consecutive slices of an endless list of seeded
        shuffles of all prompts (each prompt once per epoch), a function of (seed, step)."""
        count, size = len(self.prompts), self.config.prompts_per_step
        chosen = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, count)
            order = list(range(count))
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
            chosen.append(order[offset])
        return chosen

    def _seed(self, step: int, part: int) -> int:
        return (self.config.seed * 1_000_003 + step * 7919 + part) % (2**63)

    # ----------------------------------------------------------------------- one PPO step
    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        if not self.adapted:
            return self._score(self.reference, None, rollout).logprobs
        from ..finetune.lora import disabled_adapters

        with disabled_adapters(self.model):  # the base model under the LoRA layers
            return self._score(self.model, None, rollout).logprobs

    @torch.no_grad()
    def _score(self, model, value_head, rollout: Rollout, entropy: bool = False) -> TokenScores:
        batch = self.config.micro_batch_size or self.config.minibatch_size
        parts = []
        for start in range(0, rollout.rows, batch):
            rows = slice(start, start + batch)
            parts.append(
                score_tokens(
                    model,
                    value_head,
                    rollout.sequences[rows].to(self.device),
                    rollout.attention_mask[rows].to(self.device),
                    rollout.completion_mask[rows].to(self.device),
                    self.config.temperature,
                    entropy,
                )
            )

        def join(name: str) -> torch.Tensor | None:
            pieces = [getattr(p, name) for p in parts]
            return None if pieces[0] is None else torch.cat(pieces)

        return TokenScores(join("logprobs"), join("values"), join("entropy"))

    @staticmethod
    def _fields(rollout: Rollout, records: list[PromptRecord]) -> dict[str, list]:
        """The keyword lists a reward function may take: the token ids and the records' fields."""
        fields = {"completion_ids": rollout.completions, "prompt_ids": [r.ids for r in records]}
        for name in {k for r in records for k in r.extras}:
            fields[name] = [r.extras.get(name) for r in records]
        return fields

    def _scores(self, rollout: Rollout, records: list[PromptRecord]) -> torch.Tensor:
        prompts = [r.text for r in records]
        if isinstance(self.reward, RewardModel):
            sequences = [r.ids + c for r, c in zip(records, rollout.completions)]
            scores = score_sequences(self.reward, sequences).cpu()
            return check_scores(scores, prompts, rollout.texts, "the reward model")
        name = getattr(self.reward, "__name__", type(self.reward).__name__)
        values = _call_with_fields(self.reward, prompts, list(rollout.texts), self._fields(rollout, records))
        return check_scores(values, prompts, rollout.texts, name)

    def train_step(self) -> dict:
        """Run PPO step `self.step` (rollout, scoring, updates, controller) and return its metrics."""
        config, step = self.config, self.step
        started = time.perf_counter()
        from ..generate.sampling import SamplingParams

        indices = self.prompt_batch(step)
        prompt_records = [self.prompts[i] for i in indices]
        params = SamplingParams(
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            seed=self._seed(step, 0),
        )
        self.model.eval()
        rollout = generate_rollout(
            self.model,
            self.tokenizer,
            [r.ids for r in prompt_records],
            config.samples_per_prompt,
            params,
            pad_token_id=self.pad_token_id,
        )
        records = [prompt_records[int(i)] for i in rollout.prompt_index]
        generated = time.perf_counter()
        scores = self._scores(rollout, records)
        raw_scores = scores.clone()
        ended = torch.tensor([reason != "length" for reason in rollout.finish_reasons])
        if config.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - config.missing_eos_penalty)
        extra = {}
        if self.extra_metrics is not None:
            fields = self._fields(rollout, records)
            extra = dict(_call_with_fields(self.extra_metrics, [r.text for r in records], list(rollout.texts), fields))

        old = self._score(self.model, self.value_head, rollout, entropy=True)
        reference = self._reference_logprobs(rollout)
        mask = rollout.completion_mask.to(self.device).float()
        kl_coef = self.controller.value
        rewards, kl = kl_penalized_rewards(scores.to(self.device), old.logprobs, reference, mask, kl_coef)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(rewards, old.values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        update_stats = self._update(rollout, old, advantages, returns, mask)

        sequence_kl = kl.sum(-1)
        mean_kl = float(sequence_kl.mean())
        self.controller.update(mean_kl, rollout.rows)
        self.step += 1
        record = {
            "step": self.step,
            "reward": float(raw_scores.mean()),
            "reward_std": float(raw_scores.std()) if rollout.rows > 1 else 0.0,
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "non_score_reward": float((-kl_coef * sequence_kl).mean()),
            "entropy": float(masked_mean(old.entropy, mask)),
            "completion_tokens": float(mask.sum(-1).mean()),
            "ended_fraction": float(ended.float().mean()),
            "explained_variance": explained_variance(old.values, returns, mask),
            "returns": float(masked_mean(returns, mask)),
            **update_stats,
            **{name: float(value) for name, value in extra.items()},
            "generate_seconds": generated - started,
            "seconds": time.perf_counter() - started,
        }
        return record

    def _update(self, rollout: Rollout, old: TokenScores, advantages, returns, mask) -> dict:
        """`ppo_epochs` passes of shuffled minibatches, one optimizer step each; the means of the
        losses and clip fractions over every minibatch."""
        from ..train.optim import clip_gradients

        config = self.config
        micro = config.micro_batch_size or config.minibatch_size
        totals: dict[str, float] = {}
        updates = 0
        self.model.eval()  # dropout off: see the module doc
        for epoch in range(config.ppo_epochs):
            generator = torch.Generator().manual_seed(self._seed(self.step, 1 + epoch))
            order = torch.randperm(rollout.rows, generator=generator)
            for start in range(0, rollout.rows, config.minibatch_size):  # a remainder is a smaller minibatch
                minibatch = order[start : start + config.minibatch_size]
                tokens = mask[minibatch.to(mask.device)].sum().clamp(min=1)
                self.optimizer.zero_grad(set_to_none=True)
                sums = {"policy_loss": 0.0, "value_loss": 0.0, "policy_clip": 0.0, "value_clip": 0.0, "approx": 0.0}
                for part_start in range(0, len(minibatch), micro):
                    rows = minibatch[part_start : part_start + micro]
                    width = int(rollout.attention_mask[rows].sum(-1).max())
                    index = rows.to(self.device)
                    part_mask = mask[index, :width]
                    new = score_tokens(
                        self.model,
                        self.value_head,
                        rollout.sequences[rows, :width].to(self.device),
                        rollout.attention_mask[rows, :width].to(self.device),
                        rollout.completion_mask[rows, :width].to(self.device),
                        config.temperature,
                    )
                    policy = ppo_policy_loss(
                        new.logprobs,
                        old.logprobs[index, :width],
                        advantages[index, :width],
                        part_mask,
                        config.clip_range,
                    )
                    value = ppo_value_loss(
                        new.values,
                        old.values[index, :width],
                        returns[index, :width],
                        part_mask,
                        config.clip_range_value,
                    )
                    # Token sums over the whole minibatch's tokens: micro-batches add up to its mean.
                    loss = (policy.per_token.sum() + config.vf_coef * value.per_token.sum()) / tokens
                    loss.backward()
                    share = float(part_mask.sum() / tokens)
                    sums["policy_loss"] += float(policy.per_token.detach().sum() / tokens)
                    sums["value_loss"] += float(value.per_token.detach().sum() / tokens)
                    sums["policy_clip"] += float(policy.clip_fraction) * share
                    sums["value_clip"] += float(value.clip_fraction) * share
                    sums["approx"] += float(policy.approx_kl) * share
                if config.grad_clip is not None:
                    clip_gradients(self._trained, config.grad_clip)
                self.optimizer.step()
                updates += 1
                for name, value in sums.items():
                    totals[name] = totals.get(name, 0.0) + value
        self.optimizer.zero_grad(set_to_none=True)
        names = {
            "policy_loss": "policy_loss",
            "value_loss": "value_loss",
            "policy_clip": "policy_clip_fraction",
            "value_clip": "value_clip_fraction",
            "approx": "approx_kl",
        }
        return {names[k]: v / max(updates, 1) for k, v in totals.items()}

    # ------------------------------------------------------------------------------ the run
    def train(self, resume: bool = False) -> PPOResult:
        """Run to `config.steps`, checkpointing every `save_every` steps and at the end;
        resume=True continues from the latest checkpoint in out_dir."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        started = time.perf_counter()
        if resume:
            self.load_checkpoint()
        elif self.metrics_path.exists() or (self.checkpoint_dir / "latest.json").exists():
            raise PPOError(f"{self.out_dir} holds a run already; resume it, or choose another out_dir")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        progress = Progress(
            TextColumn("ppo"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            disable=not self.config.progress,
        )
        with progress:
            task = progress.add_task("ppo", total=self.config.steps, completed=self.step, status="")
            while self.step < self.config.steps:
                record = self.train_step()
                with open(self.metrics_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                publish_metrics(record)
                status = f"reward {record['reward']:+.3f} kl {record['kl']:.3f} kl_coef {record['kl_coef']:.4f}"
                progress.update(task, completed=self.step, status=status)
                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_checkpoint()
        if not (self.checkpoint_dir / f"step-{self.step:08d}").is_dir():
            self.save_checkpoint()
        self.write_curves()
        return self.result(time.perf_counter() - started)

    def result(self, seconds: float) -> PPOResult:
        records = self.read_metrics()
        if not records:
            raise PPOError("the run has no metrics: nothing was trained")
        window = max(1, len(records) // 10)

        def mean(name: str, part: list[dict]) -> float:
            return sum(r[name] for r in part) / len(part)

        return PPOResult(
            steps=self.step,
            reward_start=mean("reward", records[:window]),
            reward_end=mean("reward", records[-window:]),
            kl_start=mean("kl", records[:window]),
            kl_end=mean("kl", records[-window:]),
            kl_coef=self.controller.value,
            seconds=seconds,
            out_dir=self.out_dir,
        )

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_curves(self) -> Path | None:
        """reward, KL and kl_coef against the step, to out_dir/ppo_curves.png (atomically)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        records = self.read_metrics()
        if not records:
            return None
        steps = [r["step"] for r in records]
        figure = Figure(figsize=(10, 3.2))
        FigureCanvasAgg(figure)
        for column, (name, label) in enumerate(
            (("reward", "reward (mean score)"), ("kl", "KL to reference (nats/sample)"), ("kl_coef", "kl_coef"))
        ):
            axes = figure.add_subplot(1, 3, column + 1)
            axes.plot(steps, [r[name] for r in records])
            if name == "kl" and self.config.kl_target is not None:
                axes.axhline(self.config.kl_target, linestyle="--", color="gray", label="target")
                axes.legend()
            axes.set_xlabel("PPO step")
            axes.set_title(label)
        figure.tight_layout()
        path = self.out_dir / "ppo_curves.png"
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png")
        return path

    # ------------------------------------------------------------------------ checkpoints
    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"policy.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        tensors.update({f"value_head.{n}": p for n, p in self.value_head.named_parameters()})
        return tensors

    def _invariants(self) -> dict:
        return {name: getattr(self.config, name) for name in _RESUME_INVARIANTS} | {
            "prompts": prompts_fingerprint(self.prompts)
        }

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-XXXXXXXX/ (assembled beside it, then renamed into place) and
        point checkpoints/latest.json at it (also by rename): the trainable weights and value head
        (safetensors), the optimizer and RNG state, the step and the KL controller's state."""
        final = self.checkpoint_dir / f"step-{self.step:08d}"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with staged_directory(final) as staging:
            tensors = {name: t.detach().contiguous().cpu() for name, t in self._trainable_tensors().items()}
            save_file(tensors, str(staging / "weights.safetensors"))
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
                staging / "trainer_state.pt",
            )
            state = {"step": self.step, "controller": self.controller.state_dict(), "config": self._invariants()}
            (staging / "state.json").write_text(json.dumps(state, indent=2))
        atomic_write_text(self.checkpoint_dir / "latest.json", json.dumps({"step": self.step, "dir": final.name}))
        return final

    def load_checkpoint(self) -> int:
        """Restore the latest checkpoint; every file is read and checked before the trainer
        changes, so a bad checkpoint leaves the run as it was."""
        latest = self.checkpoint_dir / "latest.json"
        if not latest.is_file():
            raise PPOError(f"cannot resume: no checkpoint in {self.checkpoint_dir} (expected latest.json)")
        try:
            directory = self.checkpoint_dir / json.loads(latest.read_text())["dir"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PPOError(f"cannot resume: {latest} is corrupt ({err})") from None
        absent = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
        if absent:
            raise PPOError(f"cannot resume: checkpoint {directory} is missing {', '.join(absent)}")
        try:
            weights = load_file(directory / "weights.safetensors", device=str(self.device))
            trainer_state = torch.load(directory / "trainer_state.pt", map_location=self.device, weights_only=True)
            state = json.loads((directory / "state.json").read_text())
        except Exception as err:  # the readers raise many types; all mean a damaged file
            raise PPOError(f"cannot resume: checkpoint {directory} is corrupt ({type(err).__name__}: {err})") from None
        current = self._trainable_tensors()
        if set(weights) != set(current):
            missing, unexpected = sorted(set(current) - set(weights)), sorted(set(weights) - set(current))
            raise PPOError(
                f"cannot resume: checkpoint {directory} does not fit this model (missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}); resume with the method and adapter settings the run started with"
            )
        shapes = [n for n, t in current.items() if weights[n].shape != t.shape]
        if shapes:
            raise PPOError(f"cannot resume: checkpoint {directory} has other shapes for {shapes[:4]}")
        saved, now = state.get("config", {}), self._invariants()
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
        if changed:
            raise PPOError(f"cannot resume: settings the run's samples depend on changed ({'; '.join(changed)})")
        if int(state["step"]) > self.config.steps:
            raise PPOError(
                f"cannot resume: the checkpoint is at step {state['step']}, beyond steps={self.config.steps}"
            )
        controller = kl_controller(self.config.kl_coef, self.config.kl_target, self.config.kl_horizon)
        controller.load_state_dict(state["controller"])
        # Everything read and checked: apply.
        with torch.no_grad():
            for name, tensor in current.items():
                tensor.copy_(weights[name])
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        torch.set_rng_state(trainer_state["torch_rng"].cpu())
        self.controller = controller
        self.step = int(state["step"])
        if self.metrics_path.exists():  # drop steps a killed run logged after its last checkpoint
            kept = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line)["step"] <= self.step]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        return self.step


# ========================================================================= from directories
def _check_reward_tokenizer(reward_model_dir: Path, tokenizer: Tokenizer, model_dir: Path) -> None:
    if not (reward_model_dir / "tokenizer.json").is_file():
        return  # nothing to compare; the vocabulary sizes are compared when the trainer starts
    other = Tokenizer.from_dir(reward_model_dir)
    if other.get_vocab() != tokenizer.get_vocab():
        raise PPOError(
            f"the reward model {reward_model_dir} has another tokenizer than {model_dir}; it scores the policy's "
            "token ids, so both need one vocabulary"
        )


def train_ppo(
    model_dir: str | Path,
    data: str | Path,
    config: PPOConfig,
    reward: RewardFunction | None = None,
    reward_model: str | Path | None = None,
    resume: bool = False,
) -> PPOResult:
    """PPO on a Hugging Face model directory with the prompts of a JSONL file (see
    `prompt_records`), rewarded by a callable or by the reward model in `reward_model` (one of
    the two). Installs `config.method` (LoRA, DoRA: the reference is the base with the adapters
    off; full: a second, frozen copy loaded from `model_dir`), trains, and writes into out_dir:
    the adapter (`adapter/`, PEFT format) or the model (`model/`), `value_head.safetensors`,
    checkpoints, metrics.jsonl, ppo_curves.png and ppo.json (the result)."""
    from ..checkpoint import load_model
    from ..finetune.lora import trainable_parameter_count
    from ..finetune.run import METHODS, FinetuneConfig
    from ..quantize.saved import read_quantization_config

    check_config(config)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PPOError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if read_quantization_config(model_dir) is not None:
        raise PPOError(f"{model_dir} is a quantized model; run PPO on the floating-point model")
    if (reward is None) == (reward_model is None):
        raise PPOError("give one reward: a reward function or a reward model directory")
    if reward_model is not None and not (Path(reward_model) / "config.json").is_file():
        raise PPOError(f"reward model {reward_model} is not a Hugging Face model directory (no config.json)")
    started = time.perf_counter()
    tokenizer = Tokenizer.from_dir(model_dir)
    prompts = read_prompts(data, tokenizer, config.chat_template)
    if reward_model is not None:
        _check_reward_tokenizer(Path(reward_model), tokenizer, model_dir)
        reward = RewardModel.from_pretrained(reward_model, dtype=torch.float32)

    model = load_model(model_dir, dtype=torch.float32)
    method = METHODS[config.method]
    finetune_config = FinetuneConfig(
        model_dir=model_dir,
        data=data,
        out_dir=config.out_dir,
        method=config.method,
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        target_modules=config.target_modules,
    )
    torch.manual_seed(config.seed)  # the adapter's and the value head's initial weights
    model = method.install(model, finetune_config, tokenizer)
    reference = None
    if config.method == "full":
        model.requires_grad_(True)
        reference = load_model(model_dir, dtype=torch.float32)
    trainer = PPOTrainer(model, tokenizer, prompts, reward, config, reference=reference)
    result = trainer.train(resume=resume)
    output_dir = method.save(model, Path(config.out_dir) / method.output, tokenizer, str(model_dir))
    with atomic_path(Path(config.out_dir) / "value_head.safetensors") as temporary:
        save_file({n: p.detach().contiguous().cpu() for n, p in trainer.value_head.named_parameters()}, str(temporary))
    result.output_dir = output_dir
    result.trainable_parameters, result.total_parameters = trainable_parameter_count(model)
    result.seconds = time.perf_counter() - started
    result.settings = {
        "method": config.method,
        "lr": config.resolved_lr,
        "kl_coef": config.kl_coef,
        "kl_target": config.kl_target,
        "reward": str(reward_model) if reward_model is not None else getattr(reward, "__name__", repr(reward)),
        "prompts": len(prompts),
    }
    atomic_write_text(Path(config.out_dir) / "ppo.json", json.dumps(result.to_json(), indent=2))
    return result


# ============================================================================== the command
def add_arguments(parser) -> None:
    """The flags of `genforge align ppo` on `parser` (an argparse parser or subparser)."""
    from ..finetune.cli import add_lora_arguments

    parser.add_argument("--model", required=True, help="Hugging Face model directory (the SFT model)")
    rewards = parser.add_mutually_exclusive_group(required=True)
    rewards.add_argument(
        "--reward-model",
        help="a reward model directory (genforge align reward, or a transformers "
        "...ForSequenceClassification with one label) with the policy's tokenizer",
    )
    rewards.add_argument(
        "--reward",
        help="a reward function: a name genforge.align.rewards defines, or 'package.module:function' taking "
        "(prompts, completions, **fields) and returning one number per completion",
    )
    parser.add_argument("--data", required=True, help="JSONL prompts: {'prompt': text or chat messages, ...fields}")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics, the adapter or model")
    parser.add_argument("--method", choices=PPO_METHODS, default="lora", help="what trains (default lora)")
    ppo = parser.add_argument_group("PPO")
    ppo.add_argument("--steps", type=int, default=100, help="PPO steps: a rollout and its updates each (default 100)")
    ppo.add_argument("--prompts-per-step", type=int, default=16, help="prompts sampled per step (default 16)")
    ppo.add_argument("--samples-per-prompt", type=int, default=1, help="completions per prompt (default 1)")
    ppo.add_argument("--max-new-tokens", type=int, default=64, help="longest completion (default 64)")
    ppo.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    ppo.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: off)")
    ppo.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    ppo.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout (default 4)")
    ppo.add_argument("--minibatch-size", type=int, default=8, help="samples per optimizer step (default 8)")
    ppo.add_argument("--micro-batch-size", type=int, help="samples per forward pass (default: the minibatch)")
    ppo.add_argument("--kl-coef", type=float, default=0.05, help="KL penalty coefficient (start value if adaptive)")
    ppo.add_argument("--kl-target", type=float, help="target KL in nats per sample: adapt kl_coef (Ziegler et al.)")
    ppo.add_argument("--kl-horizon", type=float, default=10000.0, help="adaptive controller horizon in samples")
    ppo.add_argument("--gamma", type=float, default=1.0, help="discount (default 1)")
    ppo.add_argument("--lam", type=float, default=0.95, help="GAE lambda (default 0.95)")
    ppo.add_argument("--clip-range", type=float, default=0.2, help="policy ratio clip epsilon (default 0.2)")
    ppo.add_argument("--clip-range-value", type=float, default=0.2, help="value clip epsilon (default 0.2)")
    ppo.add_argument("--vf-coef", type=float, default=0.1, help="value loss weight (default 0.1)")
    ppo.add_argument("--no-whiten-advantages", action="store_true", help="use the raw advantages")
    ppo.add_argument("--whiten-rewards", action="store_true", help="rescale per-token rewards before GAE")
    ppo.add_argument("--missing-eos-penalty", type=float, help="subtracted from the score of an unfinished sample")
    ppo.add_argument("--chat-template", help="a Jinja chat template file for chat-message prompts")
    train = parser.add_argument_group("training")
    train.add_argument("--lr", type=float, help="learning rate (default 1e-4 for adapters, 1e-5 for full)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--grad-clip", type=float, default=1.0, help="global gradient norm limit (default 1)")
    train.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    train.add_argument("--seed", type=int, default=0, help="seeds the prompt order, sampling and minibatches")
    train.add_argument("--device", default="cpu", help="cpu or cuda")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_lora_arguments(parser, "lora, dora", "layers to adapt (genforge or Hugging Face names); default: all")


def run(args) -> int:
    """`genforge align ppo`: parse, train, report (a one-line summary on stderr, JSON on stdout)."""
    from ..console import console

    chat_template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    config = PPOConfig(
        out_dir=args.out,
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        ppo_epochs=args.ppo_epochs,
        minibatch_size=args.minibatch_size,
        micro_batch_size=args.micro_batch_size,
        kl_coef=args.kl_coef,
        kl_target=args.kl_target,
        kl_horizon=args.kl_horizon,
        gamma=args.gamma,
        lam=args.lam,
        clip_range=args.clip_range,
        clip_range_value=args.clip_range_value,
        vf_coef=args.vf_coef,
        whiten_advantages=not args.no_whiten_advantages,
        whiten_rewards=args.whiten_rewards,
        missing_eos_penalty=args.missing_eos_penalty,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        save_every=args.save_every,
        seed=args.seed,
        device=args.device,
        method=args.method,
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        use_rslora=args.rslora,
        target_modules=args.target_modules,
        chat_template=chat_template,
    )
    check_config(config)
    reward = resolve_reward(args.reward) if args.reward else None
    result = train_ppo(args.model, args.data, config, reward, args.reward_model, resume=args.resume)
    console.print(
        f"ppo ({args.method}): {result.steps} steps, reward {result.reward_start:+.3f} -> {result.reward_end:+.3f}, "
        f"KL {result.kl_start:.3f} -> {result.kl_end:.3f} nats/sample (kl_coef {result.kl_coef:.4f}); trained "
        f"{result.trainable_parameters:,} of {result.total_parameters:,} parameters; wrote {result.output_dir}"
    )
    print(json.dumps(result.to_json()))
    return 0
