"""GRPO, group relative policy optimisation (Shao et al. 2024, "DeepSeekMath: Pushing the Limits
of Mathematical Reasoning in Open Language Models"): online RL for language models without a
value model.

Each step takes a batch of prompts and samples G completions of every prompt in one batched
decode (`align.rollout`, genforge's generator: a finished row leaves the batch at once). Every
completion is scored by a list of reward functions, plain Python callables
`f(prompts, completions, **columns) -> list[float]` (TRL's signature; ready-made ones in
`align.rewards`), summed with weights. The baseline is the group: a completion's advantage is
its reward minus the mean reward of the G completions of its prompt, divided by their
standard deviation (or not: `scale_rewards="none"`, Dr. GRPO, Liu et al. 2025). The policy
then takes `num_iterations` passes over the samples, each split into `minibatches` optimizer
updates, minimising the clipped-ratio objective of PPO (Schulman et al. 2017) per token with a
k3 estimate of KL to the reference model (`losses.grpo_loss`, equal to TRL's loss):

    ratio = pi(token) / pi_old(token),   KL = pi_ref / pi - log(pi_ref / pi) - 1,
    loss per token = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta KL.

pi_old is the policy that sampled (its log-probabilities are scored once, `score_rollout`,
when there is more than one update per rollout; with one the ratio is 1 and its gradient the
policy gradient). The reference is the model before training: with an adapter, the base with
its adapters off (`finetune.lora.disabled_adapters`), no second copy; with full fine-tuning a
frozen copy. beta = 0 (TRL's default) skips the reference pass.

The run is resumable exactly: a step's prompts and sampling seed are functions of the run's
seed and the step number, and a checkpoint (written atomically, the trainer's layout:
`checkpoints/step-N/` with the trainable tensors, optimizer, schedule and RNG states, then
`latest.json`) holds the rest. Logged per step in `metrics.jsonl`, with TRL's names: the
reward's mean and std, each function's, the share of groups with one reward throughout (no
signal), KL, the clipped share of tokens, completion lengths, the loss, the gradient norm and
the seconds spent generating and updating.

`genforge align grpo` is the command (`add_arguments`, `run`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write_text, staged_directory
from ..ops.hooks import publish_metrics
from ..tokenizer import Tokenizer
from .logprobs import completion_logprobs
from .losses import GRPO_LOSS_TYPES, grpo_loss
from .rollout import Rollout, generate_rollout, score_rollout

GRPO_METHODS = ("lora", "dora", "qlora", "full")
# TRL's default rate for all weights; adapters take a larger one, as in preference training.
GRPO_LR = {"full": 1e-6, "lora": 5e-5, "dora": 5e-5, "qlora": 5e-5}
SCALE_REWARDS = ("group", "batch", "none")
# TRL's guard against a zero standard deviation (a group whose rewards are all equal).
STD_EPSILON = 1e-4
CHECKPOINT_FILES = ("model.safetensors", "trainer_state.pt", "state.json")
# Settings that decide which samples a step draws and how they are normalised: a resumed run
# with other values would not continue the same run.
RESUME_INVARIANTS = (
    "seed",
    "prompts_per_step",
    "samples_per_prompt",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "method",
    "max_steps",
    "warmup_steps",
    "num_iterations",
    "minibatches",
    "scale_rewards",
    "loss_type",
    "beta",
)


class GRPOError(ValueError):
    """A GRPO run that cannot start as asked."""


class RewardFunctionError(ValueError):
    """A reward function returned something that is not one number per completion."""


# ----------------------------------------------------------------------------- reward functions
@dataclass(frozen=True)
class RewardFunction:
    """A reward callable `function(prompts, completions, **columns) -> list[float]`, its weight
    in the summed reward and its name in the logs (default: the callable's `__name__`)."""

    function: Callable[..., Sequence[Any]]
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise GRPOError(f"a reward function must be callable, got {type(self.function).__name__}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)):
            raise GRPOError(f"reward weight must be a finite number, got {self.weight!r}")
        if not self.name:
            name = getattr(self.function, "__name__", None) or type(self.function).__name__
            object.__setattr__(self, "name", name)


def as_reward_functions(
    functions: Sequence[Callable | RewardFunction] | Callable | RewardFunction, weights: Sequence[float] | None = None
) -> list[RewardFunction]:
    """`RewardFunction`s from callables (or `RewardFunction`s), with `weights` (default 1 each).
    Names are made unique (`f`, `f_2`, ...), so each has its own column in the logs."""
    if callable(functions) or isinstance(functions, RewardFunction):
        functions = [functions]
    functions = list(functions)
    if not functions:
        raise GRPOError("GRPO needs at least one reward function")
    if weights is not None and len(weights) != len(functions):
        raise GRPOError(f"{len(weights)} reward weights for {len(functions)} reward functions; give one per function")
    wrapped, seen = [], {}
    for index, function in enumerate(functions):
        reward = function if isinstance(function, RewardFunction) else RewardFunction(function)
        if weights is not None:
            reward = RewardFunction(reward.function, float(weights[index]), reward.name)
        count = seen[reward.name] = seen.get(reward.name, 0) + 1
        if count > 1:
            reward = RewardFunction(reward.function, reward.weight, f"{reward.name}_{count}")
        wrapped.append(reward)
    return wrapped


def compute_rewards(
    reward_functions: Sequence[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    sample_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(completions, functions) float32: each function's reward for every completion. A
    function that returns other than one finite number (bools count) per completion raises
    `RewardFunctionError` naming the function and the sample (`sample_names[i]`: where the
    sample's prompt came from)."""
    count = len(completions)
    table = torch.zeros(count, len(reward_functions), dtype=torch.float32)
    for column, reward in enumerate(reward_functions):
        try:
            values = reward.function(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
        except RewardFunctionError:
            raise
        except Exception as err:
            raise RewardFunctionError(f"reward function {reward.name!r} raised {type(err).__name__}: {err}") from err
        try:
            values = list(values)
        except TypeError:
            raise RewardFunctionError(
                f"reward function {reward.name!r} returned {type(values).__name__}; it must return a list of "
                f"{count} numbers, one per completion"
            ) from None
        if len(values) != count:
            raise RewardFunctionError(
                f"reward function {reward.name!r} returned {len(values)} values for {count} completions; it must "
                "return one number per completion"
            )
        for index, value in enumerate(values):
            number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            if not isinstance(number, (int, float)) or not math.isfinite(number):
                where = sample_names[index] if sample_names is not None else f"sample {index}"
                raise RewardFunctionError(
                    f"reward function {reward.name!r} returned {value!r} for completion {index} ({where}, completion "
                    f"{str(completions[index])[:80]!r}); a reward must be a finite number"
                )
            table[index, column] = float(number)
    return table


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """Advantages (rows,) of rewards (rows,) whose consecutive `group_size` rows share a prompt:
    the reward minus its group's mean, divided by (std + 1e-4), the std (Bessel-corrected, as
    TRL's) taken over the group ("group", the paper's), over the whole batch ("batch", Hu
    2025's REINFORCE++ normalisation) or not at all ("none", Dr. GRPO)."""
    if scale_rewards not in SCALE_REWARDS:
        raise GRPOError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise GRPOError(
            f"rewards must be (rows,) with rows a multiple of group_size={group_size}, got {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1) if group_size > 1 else torch.zeros(grouped.shape[0])
        advantages = advantages / (std.repeat_interleave(group_size) + STD_EPSILON)
    elif scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = advantages / (std + STD_EPSILON)
    return advantages


# ----------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class GRPOPrompt:
    """One prompt: as given (`prompt`, a string or chat messages), its token ids, the record's
    other fields (the reward functions' columns) and where it came from."""

    prompt: Any
    prompt_ids: tuple[int, ...]
    columns: dict[str, Any]
    where: str
    chat: bool


def _check_messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise GRPOError(f"{where}: a prompt must be a string or a non-empty list of chat messages")
    for index, message in enumerate(value):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise GRPOError(f"{where}: prompt message {index} needs a string 'role' and a string 'content'")
    return [dict(m) for m in value]


def prepare_prompts(
    records: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    chat_template: str | None = None,
    max_prompt_length: int | None = None,
    wheres: Sequence[str] | None = None,
) -> list[GRPOPrompt]:
    """Tokenized prompts from records: a string, a list of chat messages, or a mapping with a
    "prompt" (either form) and any other fields, which become the reward functions' columns
    (every record must have the same fields). Chat prompts are rendered with the chat template
    and the generation prompt; plain ones are encoded with the tokenizer's special tokens (BOS).
    max_prompt_length: longer prompts keep their last tokens (TRL's left truncation)."""
    if not records:
        raise GRPOError("GRPO needs at least one prompt")
    prompts, fields = [], None
    for index, record in enumerate(records):
        where = wheres[index] if wheres is not None else f"prompt {index}"
        if isinstance(record, Mapping):
            if "prompt" not in record:
                raise GRPOError(f"{where}: a record needs a 'prompt' field (has {sorted(record)})")
            prompt, columns = record["prompt"], {k: v for k, v in record.items() if k != "prompt"}
        else:
            prompt, columns = record, {}
        if fields is None:
            fields = set(columns)
        elif set(columns) != fields:
            raise GRPOError(
                f"{where}: has fields {sorted(columns)}, the first record {sorted(fields)}; every record needs the "
                "same fields (the reward functions' columns)"
            )
        chat = not isinstance(prompt, str)
        if chat:
            prompt = _check_messages(prompt, where)
            if chat_template is None and tokenizer.chat_template is None:
                raise GRPOError(f"{where}: a chat prompt needs a chat template and the tokenizer has none")
            ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, chat_template=chat_template
            )
        else:
            if not prompt:
                raise GRPOError(f"{where}: the prompt is empty")
            ids = tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise GRPOError(f"{where}: the prompt has no tokens")
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        prompts.append(GRPOPrompt(prompt, tuple(ids), columns, where, chat))
    return prompts


def read_prompt_records(path: str | Path) -> tuple[list[dict], list[str]]:
    """(records, wheres) of a JSONL file of {"prompt": ..., other fields}."""
    from ..jsonl import json_objects

    path = Path(path)
    if not path.is_file():
        raise GRPOError(f"prompt file {path} does not exist")
    records, wheres = [], []
    with open(path, encoding="utf-8") as handle:
        for line, record in json_objects(handle, str(path), GRPOError):
            records.append(record)
            wheres.append(f"{path}:{line}")
    if not records:
        raise GRPOError(f"{path} holds no prompts; expected one JSON object with a 'prompt' per line")
    return records, wheres


def prompts_fingerprint(prompts: Sequence[GRPOPrompt]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([list(prompt.prompt_ids), prompt.columns], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------ config
@dataclass
class GRPOConfig:
    """What a GRPO run samples, optimises and writes.

    prompts_per_step x samples_per_prompt (G) completions per step, of at most max_new_tokens
    tokens, sampled at temperature (with top_p / top_k); the log-probabilities are scored at
    the same temperature. beta: the KL coefficient (0: no reference pass). epsilon_low /
    epsilon_high: the clip range (epsilon_high None: = epsilon_low; DAPO's "clip higher" sets
    it larger). loss_type: the token aggregation of `losses.grpo_loss`. scale_rewards: see
    `group_advantages`. num_iterations: passes over each rollout (TRL's mu); minibatches:
    optimizer updates per pass; micro_batch_size: rows per forward pass (gradients accumulate;
    None: the whole minibatch). mask_truncated_completions: completions cut by
    max_new_tokens take no part in the loss (DAPO). merge_for_sampling: sample with each LoRA
    layer's update added into a temporary copy of its weight (`merged_for_sampling`), one
    product per layer instead of three; eval_max_new_tokens: the evaluation's limit (default
    max_new_tokens). The training and LoRA fields mean what
    `finetune.run.FinetuneConfig`'s do; lr None takes `GRPO_LR[method]`.
    """

    out_dir: str | Path
    method: str = "lora"
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    minibatches: int = 1
    micro_batch_size: int | None = None
    mask_truncated_completions: bool = False
    max_prompt_length: int | None = None
    chat_template: str | None = None
    max_steps: int = 100
    lr: float | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    save_every: int = 0
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    eval_max_new_tokens: int | None = None
    merge_for_sampling: bool = True
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Sequence[str] | None = None

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else GRPO_LR[self.method]

    @property
    def updates_per_step(self) -> int:
        return self.num_iterations * self.minibatches


def check_config(config: GRPOConfig) -> None:
    """Everything that can be checked before a model or a prompt is read."""

    def positive_int(name: str) -> None:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GRPOError(f"{name} must be a positive integer, got {value!r}")

    for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "max_steps", "num_iterations"):
        positive_int(name)
    positive_int("minibatches")
    if config.method not in GRPO_METHODS:
        raise GRPOError(f"unknown method {config.method!r}; accepted: {', '.join(GRPO_METHODS)}")
    if config.loss_type not in GRPO_LOSS_TYPES:
        raise GRPOError(f"unknown loss_type {config.loss_type!r}; accepted: {', '.join(GRPO_LOSS_TYPES)}")
    if config.scale_rewards not in SCALE_REWARDS:
        raise GRPOError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {config.scale_rewards!r}")
    if config.samples_per_prompt < 2:
        raise GRPOError(
            f"samples_per_prompt must be >= 2: the advantage compares a completion with the others of its group "
            f"(got {config.samples_per_prompt})"
        )
    if config.rows_per_step % config.minibatches:
        raise GRPOError(
            f"minibatches={config.minibatches} must divide the {config.rows_per_step} completions of a step "
            f"(prompts_per_step x samples_per_prompt)"
        )
    if config.micro_batch_size is not None and (
        not isinstance(config.micro_batch_size, int) or config.micro_batch_size < 1
    ):
        raise GRPOError(f"micro_batch_size must be a positive integer or None, got {config.micro_batch_size!r}")
    if not (math.isfinite(config.temperature) and config.temperature > 0):
        raise GRPOError(
            f"temperature must be > 0 (GRPO samples, and scores at the same temperature), got {config.temperature}"
        )
    if not (math.isfinite(config.beta) and config.beta >= 0):
        raise GRPOError(f"beta (the KL coefficient) must be >= 0, got {config.beta}")
    high = config.epsilon_low if config.epsilon_high is None else config.epsilon_high
    if not (0 <= config.epsilon_low < 1 and high >= 0):
        raise GRPOError(f"epsilon_low must be in [0, 1) and epsilon_high >= 0, got {config.epsilon_low}, {high}")
    if not config.resolved_lr > 0:
        raise GRPOError(f"lr must be > 0, got {config.resolved_lr}")
    if not 0 <= config.warmup_steps <= config.max_steps * config.updates_per_step:
        raise GRPOError(f"warmup_steps must be in [0, optimizer updates], got {config.warmup_steps}")
    if config.save_every < 0:
        raise GRPOError(f"save_every must be >= 0, got {config.save_every}")
    if config.max_prompt_length is not None and config.max_prompt_length < 1:
        raise GRPOError(f"max_prompt_length must be >= 1 or None, got {config.max_prompt_length}")


# ----------------------------------------------------------------------------------- results
@dataclass
class GRPOResult:
    """What a run did: the adapter or model it wrote (None for a model passed in loaded), the
    greedy rewards of the evaluation prompts before and after, the mean sampled reward of the
    first and last steps, and its settings."""

    method: str
    output_dir: Path | None
    steps: int
    trainable_parameters: int
    total_parameters: int
    prompts: int
    reward_before: dict | None
    reward_after: dict | None
    first_reward: float | None
    last_reward: float | None
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        record = asdict(self)
        record["output_dir"] = str(self.output_dir) if self.output_dir is not None else None
        return record


def completion_positions(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths) (rows,) of each row's completion in its sequence."""
    lengths = rollout.completion_mask.sum(-1)
    starts = rollout.attention_mask.sum(-1) - lengths
    return starts, lengths


def completion_view(per_token: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width): each row's values from its completion's first token on (TRL's completion
    layout), gathered from the sequence layout (rows, seq); columns past a row's end repeat
    its last position and are masked by the caller. Gradients flow through the gather."""
    index = (starts[:, None] + torch.arange(width, device=per_token.device)[None]).clamp(max=per_token.shape[1] - 1)
    return per_token.gather(1, index.to(per_token.device))


@contextlib.contextmanager
def merged_for_sampling(model: nn.Module):
    """Inside the block every plain LoRA layer computes with a temporary weight W + s B A in
    place of W + its low-rank update (what PEFT's merge does, without touching W): sampling,
    token by token, then pays one product per layer instead of three, which is most of a small
    batch's cost. The adapted layers' weights are held twice while the block runs; on exit the
    original weight tensors are put back as they were, bit for bit (an in-place merge and
    unmerge would leave rounding in W). DoRA and QLoRA layers are left as they are."""
    from ..finetune.lora import LoraLinear

    swapped = []
    try:
        with torch.no_grad():
            for layer in model.modules():
                if type(layer) is LoraLinear and not layer.merged and not layer.disabled:
                    original = layer.weight
                    merged = original + layer.delta_weight().to(original.dtype)
                    layer.weight = nn.Parameter(merged, requires_grad=False)
                    layer.merged = True
                    swapped.append((layer, original))
        yield model
    finally:
        for layer, original in swapped:
            layer.weight = original
            layer.merged = False


# ----------------------------------------------------------------------------------- trainer
class GRPOTrainer:
    """GRPO over `model` (a loaded genforge decoder, changed in place: the method is installed
    on it) with `tokenizer`, sampling `prompts` (`GRPOPrompt`s, or records `prepare_prompts`
    reads) and scoring with `reward_functions`. `train()` runs to `config.max_steps`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        prompts: Sequence[Any],
        reward_functions: Sequence[Callable | RewardFunction] | Callable,
        config: GRPOConfig,
        *,
        reward_weights: Sequence[float] | None = None,
        eval_prompts: Sequence[Any] | None = None,
        eos_token_ids: Sequence[int] | None = None,
        base_dir: str | Path | None = None,
    ) -> None:
        from ..finetune.lora import LoraLinear, trainable_parameter_count
        from ..train.optim import build_optimizer, build_scheduler

        check_config(config)
        self.config = config
        self.reward_functions = as_reward_functions(reward_functions, reward_weights)
        self.tokenizer = tokenizer
        self.prompts = self._prompts(prompts)
        self.eval_prompts = self._prompts(eval_prompts) if eval_prompts else []
        if config.prompts_per_step > len(self.prompts):
            raise GRPOError(
                f"prompts_per_step={config.prompts_per_step} is more than the {len(self.prompts)} prompts given"
            )
        context = model.config.max_position_embeddings
        longest = max(len(p.prompt_ids) for p in self.prompts + self.eval_prompts)
        if longest + config.max_new_tokens > context:
            raise GRPOError(
                f"a prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} exceeds the model's context "
                f"of {context}; set max_prompt_length or lower max_new_tokens"
            )
        self.eos_token_ids = eos_token_ids
        self.base_dir = str(base_dir) if base_dir is not None else None
        self.device = torch.device(config.device)
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"

        model = model.to(device=self.device, dtype=torch.float32)
        self.reference = None
        adapted = any(isinstance(m, LoraLinear) for m in model.modules())
        if config.method == "full":
            model.requires_grad_(True)
            if config.beta > 0:
                # Full fine-tuning changes the weights the reference must keep: one frozen copy.
                self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        elif not adapted:
            from ..finetune.run import METHODS

            torch.manual_seed(config.seed)  # the adapter's initial weights: the same in every run
            model = METHODS[config.method].install(model, self._finetune_config(), tokenizer)
        if self.device.type == "cpu":
            from ..onednn import use_onednn

            # As the training loop does: oneDNN's fp32 products (the LM head of every decode
            # step among them) are about twice MKL's on AMD CPUs. Same parameters.
            for module in (model, self.reference):
                if module is not None:
                    use_onednn(module)
        self.model = model
        self.trainable, self.total = trainable_parameter_count(model)
        if self.trainable == 0:
            raise GRPOError("the model has no trainable parameters")
        self.optimizer = build_optimizer(model, config.resolved_lr, weight_decay=config.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer, config.warmup_steps, max(1, config.max_steps * config.updates_per_step)
        )
        self.step = 0
        self.fingerprint = prompts_fingerprint(self.prompts)

    # ---------------------------------------------------------------------------- set-up
    def _prompts(self, prompts: Sequence[Any]) -> list[GRPOPrompt]:
        if prompts and all(isinstance(p, GRPOPrompt) for p in prompts):
            return list(prompts)
        return prepare_prompts(
            prompts,
            self.tokenizer,
            chat_template=self.config.chat_template,
            max_prompt_length=self.config.max_prompt_length,
        )

    def _finetune_config(self):
        from ..finetune.run import FinetuneConfig

        config = self.config
        return FinetuneConfig(
            model_dir=self.base_dir or "",
            data="",
            out_dir=config.out_dir,
            method=config.method,
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            target_modules=config.target_modules,
        )

    def _sampling(self, seed: int | None, max_new_tokens: int, greedy: bool = False):
        from ..generate.sampling import SamplingParams

        if greedy:
            return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        return SamplingParams(
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            top_k=self.config.top_k,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )

    def step_prompts(self, step: int) -> list[GRPOPrompt]:
        """The prompts of `step` (0-based): consecutive slices of seeded shuffles of the prompts,
        a new shuffle each epoch, so any step's prompts follow from the seed alone."""
        count, per_step = len(self.prompts), self.config.prompts_per_step
        chosen = []
        for position in range(step * per_step, (step + 1) * per_step):
            epoch, offset = divmod(position, count)
            order = list(range(count))
            random.Random(f"{self.config.seed}-{epoch}").shuffle(order)
            chosen.append(self.prompts[order[offset]])
        return chosen

    # ---------------------------------------------------------------------------- sampling
    def sample(self, prompts: Sequence[GRPOPrompt], seed: int | None, greedy: bool = False, samples: int = 0):
        """(rollout, completions as reward functions see them, rewards (rows, functions)) of
        `prompts`, each sampled `samples` (default G) times."""
        samples = samples or self.config.samples_per_prompt
        max_new = (
            self.config.max_new_tokens
            if not greedy
            else (self.config.eval_max_new_tokens or self.config.max_new_tokens)
        )
        merging = merged_for_sampling(self.model) if self.config.merge_for_sampling else contextlib.nullcontext()
        with merging:
            rollout = generate_rollout(
                self.model,
                self.tokenizer,
                [list(p.prompt_ids) for p in prompts],
                samples,
                self._sampling(seed, max_new, greedy),
                eos_token_ids=self.eos_token_ids,
            )
        eos = set(
            self.eos_token_ids or ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        )
        texts = []
        for ids in rollout.completions:
            kept = ids[:-1] if ids and ids[-1] in eos else ids
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True))
        owners = [prompts[i] for i in rollout.prompt_index.tolist()]
        completions = [[{"role": "assistant", "content": t}] if p.chat else t for p, t in zip(owners, texts)]
        columns = {name: [p.columns[name] for p in owners] for name in owners[0].columns}
        rewards = compute_rewards(
            self.reward_functions, [p.prompt for p in owners], completions, columns, [p.where for p in owners]
        )
        return rollout, completions, rewards

    def weighted(self, rewards: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor([r.weight for r in self.reward_functions], dtype=torch.float32)
        return (rewards * weights).sum(-1)

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[GRPOPrompt] | None = None) -> dict[str, float]:
        """Greedy completions of `prompts` (default: the evaluation prompts) scored by every
        reward function: their means, and the weighted total's ("reward")."""
        prompts = list(prompts) if prompts is not None else self.eval_prompts
        if not prompts:
            raise GRPOError("no prompts to evaluate")
        _, _, rewards = self.sample(prompts, None, greedy=True, samples=1)
        record = {f"rewards/{r.name}/mean": float(rewards[:, i].mean()) for i, r in enumerate(self.reward_functions)}
        record["reward"] = float(self.weighted(rewards).mean())
        return record

    # ---------------------------------------------------------------------------- one step
    @contextlib.contextmanager
    def _reference_model(self):
        if self.reference is not None:
            yield self.reference
            return
        from ..finetune.lora import disabled_adapters

        with disabled_adapters(self.model):
            yield self.model

    def train_step(self) -> dict:
        """Sample, score and update for step `self.step`; returns its metrics record."""
        from ..train.optim import clip_gradients

        config = self.config
        started = time.perf_counter()
        prompts = self.step_prompts(self.step)
        rollout, _, per_function = self.sample(prompts, seed=config.seed * 1_000_003 + self.step)
        generated = time.perf_counter()
        rewards = self.weighted(per_function)
        advantages = group_advantages(rewards, config.samples_per_prompt, config.scale_rewards)

        starts, lengths = completion_positions(rollout)
        width = int(lengths.max())
        mask = (torch.arange(width)[None] < lengths[:, None]).to(torch.float32)
        truncated = torch.tensor([reason == "length" for reason in rollout.finish_reasons])
        if config.mask_truncated_completions:
            mask = mask * (~truncated).to(torch.float32)[:, None]
        device = self.device
        rollout = _to_device(rollout, device)
        starts, mask, advantages = starts.to(device), mask.to(device), advantages.to(device)
        # No-gradient scoring holds no activations: as many rows per pass as the updates take.
        scoring_rows = config.micro_batch_size or rollout.rows // config.minibatches
        old = None
        if config.updates_per_step > 1:
            old = completion_view(
                score_rollout(self.model, rollout, config.temperature, scoring_rows).per_token, starts, width
            )
        reference = None
        if config.beta > 0:
            with self._reference_model() as reference_model:
                scored = score_rollout(reference_model, rollout, config.temperature, scoring_rows)
            reference = completion_view(scored.per_token, starts, width)

        self.model.train()
        rows = rollout.rows
        per_update = rows // config.minibatches
        micro = config.micro_batch_size or per_update
        losses, clipped, kls, norms = [], [], [], []
        for _ in range(config.num_iterations):
            for first in range(0, rows, per_update):
                update_rows = list(range(first, first + per_update))
                update_tokens = mask[update_rows].sum()
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for start in range(0, per_update, micro):
                    part = update_rows[start : start + micro]
                    result = self._micro_loss(
                        rollout.select(part),
                        part,
                        starts,
                        width,
                        mask,
                        advantages,
                        old,
                        reference,
                        per_update,
                        update_tokens,
                    )
                    total += float(result[0])
                    clipped.append((float(result[1]), float(mask[part].sum())))
                    if result[2] is not None:
                        kls.append((float(result[2]), float(mask[part].sum())))
                norms.append(clip_gradients(self.model, config.grad_clip))
                self.optimizer.step()
                self.scheduler.step()
                losses.append(total)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        finished = time.perf_counter()

        counts = lengths.to(torch.float32)
        record = {
            "step": self.step,
            "loss": sum(losses) / len(losses),
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "frac_reward_zero_std": float(
                (rewards.view(-1, config.samples_per_prompt).std(dim=1) < 1e-8).float().mean()
            ),
        }
        for index, reward in enumerate(self.reward_functions):
            column = per_function[:, index]
            record[f"rewards/{reward.name}/mean"] = float(column.mean())
            record[f"rewards/{reward.name}/std"] = float(column.std()) if column.numel() > 1 else 0.0
        if kls:
            record["kl"] = sum(k * n for k, n in kls) / max(1.0, sum(n for _, n in kls))
        record["clip_ratio"] = sum(c * n for c, n in clipped) / max(1.0, sum(n for _, n in clipped))
        record |= {
            "completions/mean_length": float(counts.mean()),
            "completions/min_length": float(counts.min()),
            "completions/max_length": float(counts.max()),
            "completions/clipped_ratio": float(truncated.float().mean()),
            "grad_norm": sum(norms) / len(norms),
            "lr": self.scheduler.get_last_lr()[0],
            "generation_s": generated - started,
            "update_s": finished - generated,
            "step_s": finished - started,
        }
        return record

    def _micro_loss(
        self, part_rollout, part, starts, width, mask, advantages, old, reference, per_update, update_tokens
    ):
        """Backward through one micro-batch's share of the update's loss; returns (its loss
        value, its clipped share, its mean KL or None). The shares add up to the loss of the
        whole update computed at once, whatever the micro-batch size."""
        config = self.config
        scored = completion_logprobs(
            self.model,
            part_rollout.sequences,
            part_rollout.attention_mask,
            part_rollout.completion_mask,
            temperature=config.temperature,
        )
        logps = completion_view(scored.per_token, starts[part], width)
        part_mask = mask[part]
        result = grpo_loss(
            logps,
            advantages[part],
            part_mask,
            old_per_token_logps=old[part] if old is not None else None,
            reference_per_token_logps=reference[part] if reference is not None else None,
            beta=config.beta,
            epsilon_low=config.epsilon_low,
            epsilon_high=config.epsilon_high,
            loss_type=config.loss_type,
            max_completion_length=config.max_new_tokens,
            num_items=update_tokens,
        )
        if config.loss_type in ("grpo", "dr_grpo"):  # means over rows: weigh by rows
            share = len(part) / per_update
        elif config.loss_type == "bnpo":  # a mean over tokens: weigh by tokens
            share = float(part_mask.sum() / update_tokens.clamp(min=1))
        else:  # dapo: already divided by the update's tokens
            share = 1.0
        loss = result.loss * share
        loss.backward()
        kl = None
        if result.per_token_kl is not None:
            kl = float((result.per_token_kl.detach() * part_mask).sum() / part_mask.sum().clamp(min=1))
        return float(loss.detach()), float(result.clipped_fraction), kl

    # ---------------------------------------------------------------------------- the loop
    def train(self, resume: bool = False) -> list[dict]:
        """Run until `max_steps`, checkpointing every `save_every` steps and at the end;
        resume=True first restores the latest checkpoint in `out_dir`, resume=False refuses an
        `out_dir` that holds a run. Returns the records of the steps run here."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        config = self.config
        if resume:
            self.load_checkpoint()
        else:
            if self.checkpoint_dir.exists() or self.metrics_path.exists():
                raise GRPOError(
                    f"{self.out_dir} already holds a GRPO run; pass resume=True to continue it, or choose an empty "
                    "out_dir"
                )
            torch.manual_seed(config.seed)
            random.seed(config.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        progress = Progress(
            TextColumn("grpo"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            disable=not config.progress,
        )
        with progress:
            task = progress.add_task("grpo", total=config.max_steps, completed=self.step, status="")
            while self.step < config.max_steps:
                record = self.train_step()
                records.append(record)
                with open(self.metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                publish_metrics(record)
                kl = f" kl {record['kl']:.4f}" if "kl" in record else ""
                progress.update(
                    task,
                    completed=self.step,
                    status=f"reward {record['reward']:.3f} ± {record['reward_std']:.3f}{kl} "
                    f"len {record['completions/mean_length']:.0f} {record['step_s']:.1f} s/step",
                )
                if (config.save_every and self.step % config.save_every == 0) or self.step == config.max_steps:
                    self.save_checkpoint()
        return records

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------------ checkpoints
    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the trainable parameters (an adapter's, or every weight
        for full fine-tuning; the frozen base is the model the run started from)."""
        return {name: p.detach().contiguous() for name, p in self.model.named_parameters() if p.requires_grad}

    def _invariants(self) -> dict:
        return {name: getattr(self.config, name) for name in RESUME_INVARIANTS} | {"prompts": self.fingerprint}

    def save_checkpoint(self) -> Path:
        """`checkpoints/step-XXXXXXXX/` assembled beside its place and renamed in, then
        `checkpoints/latest.json` pointed at it (also by rename)."""
        final = self.checkpoint_dir / f"step-{self.step:08d}"
        with staged_directory(final) as staging:
            save_file(self._trainable_tensors(), str(staging / "model.safetensors"))
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python_rng": random.getstate(),
                },
                staging / "trainer_state.pt",
            )
            state = {"step": self.step, "config": self._invariants()}
            (staging / "state.json").write_text(json.dumps(state, indent=2))
        atomic_write_text(self.checkpoint_dir / "latest.json", json.dumps({"step": self.step, "dir": final.name}))
        return final

    def load_checkpoint(self) -> int:
        """Restore the latest checkpoint; every file is read and checked before anything
        changes, so a bad checkpoint leaves the trainer as it was."""
        latest = self.checkpoint_dir / "latest.json"
        if not latest.is_file():
            raise GRPOError(f"cannot resume: no checkpoint in {self.checkpoint_dir} (expected latest.json)")
        try:
            directory = self.checkpoint_dir / json.loads(latest.read_text())["dir"]
            weights = load_file(directory / "model.safetensors", device=str(self.device))
            trainer_state = torch.load(directory / "trainer_state.pt", map_location=self.device, weights_only=True)
            state = json.loads((directory / "state.json").read_text())
        except Exception as err:  # the readers raise many types; any of them means damage
            raise GRPOError(f"cannot resume: the checkpoint in {self.checkpoint_dir} is unreadable ({err})") from None
        current = dict(self.model.named_parameters())
        expected = {name for name, p in current.items() if p.requires_grad}
        if set(weights) != expected or any(weights[n].shape != current[n].shape for n in expected):
            raise GRPOError(f"cannot resume: checkpoint {directory} does not fit this model and method")
        saved, now = state.get("config", {}), self._invariants()
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
        if changed:
            raise GRPOError(f"cannot resume: settings or prompts changed since the checkpoint ({'; '.join(changed)})")
        with torch.no_grad():
            for name in expected:
                current[name].copy_(weights[name])
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        torch.set_rng_state(trainer_state["torch_rng"].cpu())
        if trainer_state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer_state["cuda_rng"])
        version, internal, gauss = trainer_state["python_rng"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
        self.step = int(state["step"])
        if self.metrics_path.exists():  # drop what a killed run logged after its checkpoint
            kept = [r for r in self.read_metrics() if r.get("step", 0) <= self.step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        return self.step


def _to_device(rollout: Rollout, device: torch.device) -> Rollout:
    if device.type == "cpu":
        return rollout
    return Rollout(
        prompt_index=rollout.prompt_index,
        sequences=rollout.sequences.to(device),
        attention_mask=rollout.attention_mask.to(device),
        completion_mask=rollout.completion_mask.to(device),
        completions=rollout.completions,
        texts=rollout.texts,
        finish_reasons=rollout.finish_reasons,
    )


# -------------------------------------------------------------------------------- the run
def train_grpo(
    model: str | Path | nn.Module,
    prompts: Sequence[Any] | str | Path,
    reward_functions: Sequence[Callable | RewardFunction] | Callable,
    config: GRPOConfig,
    *,
    tokenizer: Tokenizer | None = None,
    reward_weights: Sequence[float] | None = None,
    eval_prompts: Sequence[Any] | str | Path | None = None,
    resume: bool = False,
) -> GRPOResult:
    """Train `model` (a Hugging Face model directory, or a loaded genforge decoder with its
    `tokenizer`) with GRPO on `prompts` (records, or a JSONL file of them: see
    `prepare_prompts`). Scores `eval_prompts` greedily before and after when given. Writes
    `out_dir/adapter` (or `out_dir/model` for full fine-tuning) when the model came from a
    directory, the checkpoints, metrics.jsonl and grpo.json (the result)."""
    from ..checkpoint import load_model
    from ..finetune.run import METHODS

    check_config(config)
    started = time.perf_counter()
    base_dir = None
    if isinstance(model, (str, Path)):
        base_dir = Path(model)
        if not (base_dir / "config.json").is_file():
            raise GRPOError(f"{base_dir} is not a Hugging Face model directory (no config.json)")
        tokenizer = tokenizer or Tokenizer.from_dir(base_dir)
        model = load_model(base_dir, dtype=torch.float32)
    if tokenizer is None:
        raise GRPOError("a loaded model needs its tokenizer: pass tokenizer=")
    records, wheres = read_prompt_records(prompts) if isinstance(prompts, (str, Path)) else (prompts, None)
    prepared = prepare_prompts(
        records,
        tokenizer,
        chat_template=config.chat_template,
        max_prompt_length=config.max_prompt_length,
        wheres=wheres,
    )
    held = None
    if eval_prompts is not None:
        eval_records, eval_wheres = (
            read_prompt_records(eval_prompts) if isinstance(eval_prompts, (str, Path)) else (eval_prompts, None)
        )
        held = prepare_prompts(
            eval_records,
            tokenizer,
            chat_template=config.chat_template,
            max_prompt_length=config.max_prompt_length,
            wheres=eval_wheres,
        )
    trainer = GRPOTrainer(
        model,
        tokenizer,
        prepared,
        reward_functions,
        config,
        reward_weights=reward_weights,
        eval_prompts=held,
        base_dir=base_dir,
    )
    summary_path = Path(config.out_dir) / "grpo.json"
    if not resume and (trainer.checkpoint_dir.exists() or trainer.metrics_path.exists()):
        raise GRPOError(f"{config.out_dir} already holds a GRPO run; pass resume=True to continue it")
    before = None
    if held:
        if resume and summary_path.is_file():
            before = json.loads(summary_path.read_text()).get("reward_before")
        else:
            before = trainer.evaluate()
    if not resume:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary_path, json.dumps({"reward_before": before}, indent=2))
    trainer.train(resume=resume)
    after = trainer.evaluate() if held else None
    output_dir = None
    if base_dir is not None:
        method = METHODS[config.method]
        output_dir = method.save(trainer.model, Path(config.out_dir) / method.output, tokenizer, str(base_dir))
    history = trainer.read_metrics()
    result = GRPOResult(
        method=config.method,
        output_dir=output_dir,
        steps=trainer.step,
        trainable_parameters=trainer.trainable,
        total_parameters=trainer.total,
        prompts=len(prepared),
        reward_before=before,
        reward_after=after,
        first_reward=history[0]["reward"] if history else None,
        last_reward=history[-1]["reward"] if history else None,
        seconds=time.perf_counter() - started,
        settings={
            name: getattr(config, name)
            for name in RESUME_INVARIANTS + ("epsilon_low", "epsilon_high", "mask_truncated_completions")
        }
        | {"lr": config.resolved_lr, "rewards": {r.name: r.weight for r in trainer.reward_functions}},
    )
    atomic_write_text(summary_path, json.dumps(result.to_json(), indent=2))
    return result


# ------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `genforge align grpo`."""
    from ..finetune.cli import add_lora_arguments
    from .rewards import REWARD_SPECS

    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json, safetensors)")
    parser.add_argument(
        "--data", required=True, help="JSONL prompts: {'prompt': text or chat messages, other fields: columns}"
    )
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics, the adapter or model")
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        help="reward function(s), comma-separated or repeated: " + "; ".join(REWARD_SPECS.values()),
    )
    parser.add_argument("--reward-weights", help="comma-separated weights, one per reward function (default 1 each)")
    parser.add_argument("--eval-data", help="JSONL prompts scored greedily before and after training")
    parser.add_argument("--method", choices=GRPO_METHODS, default="lora", help="what to train (default lora)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step (default 8)")
    sampling.add_argument("--num-generations", type=int, default=8, help="completions per prompt, G (default 8)")
    sampling.add_argument("--max-new-tokens", type=int, default=256, help="longest completion (default 256)")
    sampling.add_argument("--max-prompt-length", type=int, help="keep a prompt's last N tokens")
    sampling.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    sampling.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0: off)")
    objective = parser.add_argument_group("the objective")
    objective.add_argument("--beta", type=float, default=0.0, help="KL coefficient (default 0: no reference pass)")
    objective.add_argument("--epsilon", type=float, default=0.2, help="clip range (default 0.2)")
    objective.add_argument("--epsilon-high", type=float, help="upper clip range (DAPO's clip higher; default epsilon)")
    objective.add_argument("--loss-type", choices=GRPO_LOSS_TYPES, default="dapo", help="token aggregation")
    objective.add_argument(
        "--scale-rewards", choices=SCALE_REWARDS, default="group", help="advantage scaling (none: Dr. GRPO)"
    )
    objective.add_argument("--num-iterations", type=int, default=1, help="passes over each rollout (mu)")
    objective.add_argument("--minibatches", type=int, default=1, help="optimizer updates per pass")
    objective.add_argument("--micro-batch-size", type=int, help="completions per forward pass (default: all)")
    objective.add_argument(
        "--mask-truncated", action="store_true", help="leave completions cut by --max-new-tokens out of the loss"
    )
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=100, help="GRPO steps (rollouts) (default 100)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: 5e-5 adapters, 1e-6 full)")
    train.add_argument("--warmup", type=int, default=0, help="linear warmup (optimizer updates)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    train.add_argument("--seed", type=int, default=0, help="seeds the prompt order, the sampling and the adapter")
    train.add_argument("--device", default="cpu", help="cpu or cuda")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_lora_arguments(
        parser, "lora, dora, qlora", "layers to adapt (genforge or Hugging Face names); default every block linear"
    )


def run(args) -> int:
    """`genforge align grpo`: parse, train, report."""
    from ..console import console
    from .rewards import reward_from_spec, split_reward_specs

    specs = [spec for value in args.reward for spec in split_reward_specs(value)]
    functions = [reward_from_spec(spec) for spec in specs]
    weights = None
    if args.reward_weights:
        try:
            weights = [float(w) for w in args.reward_weights.split(",")]
        except ValueError:
            raise GRPOError(f"--reward-weights must be comma-separated numbers, got {args.reward_weights!r}") from None
    config = GRPOConfig(
        out_dir=args.out,
        method=args.method,
        prompts_per_step=args.prompts_per_step,
        samples_per_prompt=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        beta=args.beta,
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high,
        loss_type=args.loss_type,
        scale_rewards=args.scale_rewards,
        num_iterations=args.num_iterations,
        minibatches=args.minibatches,
        micro_batch_size=args.micro_batch_size,
        mask_truncated_completions=args.mask_truncated,
        max_steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        save_every=args.save_every,
        seed=args.seed,
        device=args.device,
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        use_rslora=args.rslora,
        target_modules=args.target_modules,
    )
    result = train_grpo(
        args.model,
        args.data,
        functions,
        config,
        reward_weights=weights,
        eval_prompts=args.eval_data,
        resume=args.resume,
    )

    def scores(evaluation) -> str:
        return "n/a" if not evaluation else f"{evaluation['reward']:.3f}"

    console.print(
        f"grpo ({result.method}): {result.steps} steps on {result.prompts} prompts, trained "
        f"{result.trainable_parameters:,} of {result.total_parameters:,} parameters; mean reward of the samples "
        f"{result.first_reward:.3f} (first step) -> {result.last_reward:.3f} (last); held-out greedy reward "
        f"{scores(result.reward_before)} -> {scores(result.reward_after)}; wrote {result.output_dir}"
    )
    print(json.dumps(result.to_json()))
    return 0


__all__ = [
    "GRPO_LR",
    "GRPO_METHODS",
    "SCALE_REWARDS",
    "GRPOConfig",
    "GRPOError",
    "GRPOPrompt",
    "GRPOResult",
    "GRPOTrainer",
    "RewardFunction",
    "RewardFunctionError",
    "add_arguments",
    "as_reward_functions",
    "check_config",
    "completion_positions",
    "completion_view",
    "compute_rewards",
    "group_advantages",
    "prepare_prompts",
    "read_prompt_records",
    "run",
    "train_grpo",
]
