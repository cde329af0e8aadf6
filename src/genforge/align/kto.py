"""The KTO trainer: alignment from unpaired thumbs-up / thumbs-down completions (Ethayarajh et
al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

Each example is a prompt x, a completion y and a label: desirable or undesirable. With
r = log pi(y|x) - log pi_ref(y|x) and z0 the reference point, the loss (`losses.kto_loss`) is

    desirable:   w_d (1 - sigmoid(beta (r - z0)))
    undesirable: w_u (1 - sigmoid(beta (z0 - r)))

and z0 estimates KL(pi || pi_ref) from mismatched pairs: the prompt of each example with the
completion of another example (one with another prompt), the batch mean of their log-ratios,
clamped at 0 and detached (`losses.kto_reference_point`), as the paper and TRL do. Each
example's mismatched completion is fixed when the data is built (a seeded rotation, as TRL
fixes it in its KL dataset), so the reference log-probabilities of both sequences are computed
once, before the first step, like the preference trainer's (`align.preference`): LoRA's
reference is the base with the adapters off, full fine-tuning's the loaded model before its
first step, or `reference_model` (same tokenizer). They are cached in
`out_dir/reference_logps.safetensors` for a resumed run. The mismatched pairs are scored by the
policy without gradients. Under torchrun z0 is the mean over the whole micro-batch, every rank's
rows summed, so it equals one process's.

Data (JSONL), TRL's unpaired shapes, checked before any work (errors name the line):
- `{"prompt": str, "completion": str, "label": true|false}`;
- chat: `prompt` a list of messages (or a string, one user message) and `completion` one
  assistant message (a list of one, or its text);
- preference pairs (any shape `align.data` reads): each gives two examples, chosen desirable
  and rejected undesirable.
The label must be a JSON boolean. w_d and w_u rebalance unequal counts; the paper advises
w_d n_d / (w_u n_u) in [1, 4/3], and the run warns outside it.

Logged per step (metrics.jsonl): the loss, `kl` (z0), and as TRL logs them, sums and counts over
the step's examples: `rewards/chosen_sum`, `rewards/rejected_sum` (beta r of the desirable and
undesirable ones), `count/chosen`, `count/rejected`. Held-out examples are scored before and
after: `val_loss`, `val_kl`, the mean rewards `val_rewards/chosen`, `val_rewards/rejected` and
their difference `val_rewards/margins`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path, atomic_write_text
from ..checkpoint import load_model, read_config
from ..jsonl import json_objects
from ..quantize.saved import read_quantization_config
from ..tokenizer import ChatTemplateError, Tokenizer
from ..train.distributed import DistributedContext, all_reduce_sum
from ..train.trainer import Trainer
from .data import OVERFLOW_MODES, PreferenceDataError, parse_preference_record
from .logprobs import completion_logprobs
from .losses import PreferenceLoss, kto_loss
from .preference import PREFERENCE_LR, PREFERENCE_METHODS, finetune_settings, reference_logprobs, train_settings

REFERENCE_FILE = "reference_logps.safetensors"
SUMMARY_FILE = "kto.json"
_ACCEPTED = (
    "accepted records: {'prompt': str, 'completion': str, 'label': true|false}, the same with 'prompt' a list "
    "of {'role', 'content'} messages and 'completion' one assistant message, or a preference pair "
    "{'prompt', 'chosen', 'rejected'} (chosen desirable, rejected undesirable)"
)


class KTOError(ValueError):
    """A KTO run that cannot start as asked."""


# ------------------------------------------------------------------------------------ records
def _assistant_message(value: Any, where: str) -> dict[str, str]:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping)):
        raise PreferenceDataError(
            f"{where}: 'completion' must be a string or a list of one assistant message, got {value!r:.80}"
        )
    message = value[0]
    if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
        raise PreferenceDataError(
            f"{where}: 'completion' must be one message with role 'assistant' and a string 'content', got "
            f"{dict(message)!r:.80}"
        )
    return {"role": "assistant", "content": message["content"]}


def parse_kto_record(record: Mapping[str, Any], where: str = "record") -> list[dict[str, Any]]:
    """The examples of a record (see the module doc), each in one normal form:
    {"chat": False, "prompt": str, "completion": str, "desirable": bool} or
    {"chat": True, "prompt": [messages], "completion": message, "desirable": bool}.
    A preference pair gives two (chosen desirable, rejected undesirable), any other record one."""
    if "chosen" in record or "rejected" in record:
        pair = parse_preference_record(record, where)
        return [
            {"chat": pair["chat"], "prompt": pair["prompt"], "completion": pair[side], "desirable": side == "chosen"}
            for side in ("chosen", "rejected")
        ]
    missing = [key for key in ("prompt", "completion", "label") if key not in record]
    if missing:
        raise PreferenceDataError(f"{where}: missing field(s) {missing} (has {sorted(record)}); {_ACCEPTED}")
    label = record["label"]
    if not isinstance(label, bool):
        raise PreferenceDataError(
            f"{where}: 'label' must be true or false (a JSON boolean: is the completion desirable?), got {label!r} "
            f"({type(label).__name__})"
        )
    prompt, completion = record["prompt"], record["completion"]
    chat = isinstance(prompt, list) or isinstance(completion, list)
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(messages, list) or not messages:
            raise PreferenceDataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
        for index, message in enumerate(messages):
            if not (
                isinstance(message, Mapping)
                and isinstance(message.get("role"), str)
                and message["role"]
                and isinstance(message.get("content"), str)
            ):
                raise PreferenceDataError(
                    f"{where}: prompt[{index}] needs a non-empty string 'role' and a string 'content'"
                )
        answer = _assistant_message(completion, where)
        parsed = {
            "chat": True,
            "prompt": [{"role": m["role"], "content": m["content"]} for m in messages],
            "completion": answer,
        }
        text = answer["content"]
    else:
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise PreferenceDataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        parsed = {"chat": False, "prompt": prompt, "completion": completion}
        text = completion
    if not text.strip():
        raise PreferenceDataError(f"{where}: the completion is empty; an example needs a non-empty completion")
    return [parsed | {"desirable": label}]


def read_kto_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, example) for every example of a JSONL file (`parse_kto_record`), all checked
    before anything is returned."""
    path = Path(path)
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line, record in json_objects(handle, str(path), PreferenceDataError):
            where = f"{path}:{line}"
            examples.extend((where, example) for example in parse_kto_record(record, where))
    if not examples:
        raise PreferenceDataError(f"{path}: holds no records; expected one JSON object per line ({_ACCEPTED})")
    return examples


def _render(tokenizer: Tokenizer, messages, generation_prompt: bool, chat_template: str | None, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, chat_template=chat_template
        )
    except ChatTemplateError as err:
        raise PreferenceDataError(f"{where}: {err}") from err


def tokenize_kto_example(
    tokenizer: Tokenizer, example: dict[str, Any], where: str = "record", chat_template: str | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a parsed example, laid out as `align.data` lays out a
    pair's prompt and one answer: plain text with the tokenizer's special tokens on the prompt
    and eos after the completion; chat messages rendered with the template, the completion
    being what the template adds for the assistant turn."""
    encode = tokenizer.backend.encode
    if example["chat"]:
        if chat_template is None and tokenizer.chat_template is None:
            raise PreferenceDataError(
                f"{where}: a chat-message record needs a chat template and the tokenizer has none; pass "
                "chat_template=<Jinja source> (or use plain-text records)"
            )
        prompt = _render(tokenizer, example["prompt"], True, chat_template, where)
        whole = _render(tokenizer, example["prompt"] + [example["completion"]], False, chat_template, where)
        if not whole.startswith(prompt):
            raise PreferenceDataError(
                f"{where}: the chat template renders the prompt with its generation prompt differently from the "
                "conversation with the completion, so the completion's text cannot be located"
            )
        answer = whole[len(prompt) :].rstrip()
        if not answer:
            raise PreferenceDataError(f"{where}: the completion renders to nothing with this chat template")
        prompt_ids = list(encode(prompt, add_special_tokens=False).ids)
        completion_ids = list(encode(answer, add_special_tokens=False).ids)
    else:
        if tokenizer.eos_token_id is None:
            raise PreferenceDataError(
                f"{where}: plain-text completions end with the eos token and the tokenizer has none"
            )
        prompt_ids = list(encode(example["prompt"], add_special_tokens=True).ids)
        completion_ids = list(encode(example["completion"], add_special_tokens=False).ids) + [tokenizer.eos_token_id]
    if not prompt_ids:
        raise PreferenceDataError(
            f"{where}: the prompt has no tokens; a completion needs at least one token before it to be scored"
        )
    return prompt_ids, completion_ids


# ---------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class KTOExample:
    """One tokenized example and its mismatched pair: the example's prompt (`kl_prompt_ids`, cut
    further from the left if the pair needs it) before another example's completion."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    kl_prompt_ids: list[int]
    kl_completion_ids: list[int]
    source: str = ""
    truncated_prompt_tokens: int = 0

    @property
    def length(self) -> int:
        return max(
            len(self.prompt_ids) + len(self.completion_ids), len(self.kl_prompt_ids) + len(self.kl_completion_ids)
        )


def _prompt_keep(prompt: int, completion: int, max_length: int | None, max_prompt_length: int | None) -> int:
    keep = prompt if max_prompt_length is None else min(prompt, max_prompt_length)
    return keep if max_length is None else min(keep, max_length - completion)


def mismatched_partners(prompts: Sequence[Sequence[int]], seed: int = 0) -> list[int]:
    """For each example the index of the one whose completion forms its mismatched pair: the
    next in a seeded shuffle whose prompt differs (the next at all when every prompt is the
    same). An example is its own partner only when it is alone."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    partners = [0] * len(order)
    for position, index in enumerate(order):
        partner = order[(position + 1) % len(order)]
        for step in range(1, len(order)):
            candidate = order[(position + step) % len(order)]
            if list(prompts[candidate]) != list(prompts[index]):
                partner = candidate
                break
        partners[index] = partner
    return partners


def build_kto_examples(
    records: Sequence[tuple[str, dict[str, Any]]],
    tokenizer: Tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    overflow: str = "truncate",
    chat_template: str | None = None,
    seed: int = 0,
) -> list[KTOExample]:
    """Tokenize (where, example) records, pair each with a mismatched completion and fit the
    length limits: a prompt is cut from the left (its end, next to the completion, is kept), a
    completion never; overflow="error" refuses an example whose own prompt would be cut (the
    mismatched pair's prompt may still be cut further: it only estimates the KL)."""
    if overflow not in OVERFLOW_MODES:
        raise PreferenceDataError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    for name, limit in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
            raise PreferenceDataError(f"{name} must be an integer >= 2 or None, got {limit!r}")
    tokenized = [tokenize_kto_example(tokenizer, example, where, chat_template) for where, example in records]
    for (where, _), (_, completion) in zip(records, tokenized):
        if max_length is not None and len(completion) >= max_length:
            raise PreferenceDataError(
                f"{where}: a completion of {len(completion)} tokens leaves no room for the prompt within max_length="
                f"{max_length}; completions are never cut: raise max_length or drop the example"
            )
    partners = mismatched_partners([prompt for prompt, _ in tokenized], seed)
    examples = []
    for (where, example), (prompt, completion), partner in zip(records, tokenized, partners):
        keep = _prompt_keep(len(prompt), len(completion), max_length, max_prompt_length)
        if keep < len(prompt) and overflow == "error":
            raise PreferenceDataError(
                f"{where}: {len(prompt)} prompt tokens + {len(completion)} completion tokens exceed the limits "
                f"(max_length={max_length}, max_prompt_length={max_prompt_length}); raise them, drop the example, or "
                "pass overflow='truncate' to cut the prompt from the left"
            )
        other = tokenized[partner][1]
        kl_keep = min(keep, _prompt_keep(len(prompt), len(other), max_length, max_prompt_length))
        examples.append(
            KTOExample(
                prompt_ids=prompt[len(prompt) - keep :],
                completion_ids=completion,
                desirable=example["desirable"],
                kl_prompt_ids=prompt[len(prompt) - kl_keep :],
                kl_completion_ids=other,
                source=where,
                truncated_prompt_tokens=len(prompt) - keep,
            )
        )
    return examples


class KTORows:
    """KTO examples as the batch source `genforge.train.Trainer` draws from (`len`,
    `batch(indices)`, `seq_len`, `max_token_id`).

    `batch` gives (examples, 2, longest) tensors, row 0 of each the prompt + completion and row
    1 its mismatched pair, right-padded: `input_ids`, `attention_mask`, `completion_mask`;
    `desirable` (examples,) bool; and `reference_logps` (examples, 2) when set
    (`set_reference`). The layout is the preference pairs', so `preference.reference_logprobs`
    scores it.
    """

    def __init__(self, examples: Sequence[KTOExample], pad_id: int) -> None:
        self.examples = list(examples)
        if not self.examples:
            raise PreferenceDataError("no KTO examples to train on")
        self.pad_id = int(pad_id)
        self.seq_len = max(example.length for example in self.examples)
        self.max_token_id = max(
            max(e.prompt_ids + e.completion_ids + e.kl_prompt_ids + e.kl_completion_ids) for e in self.examples
        )
        self.desirable = torch.tensor([example.desirable for example in self.examples], dtype=torch.bool)
        self.reference_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """A hash of every sequence and label, in order: cached reference log-probabilities are
        reused only for the same examples."""
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(bytes([example.desirable]))
            for ids in (example.prompt_ids, example.completion_ids, example.kl_prompt_ids, example.kl_completion_ids):
                digest.update(len(ids).to_bytes(4, "little"))
                digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def set_reference(self, logps: torch.Tensor) -> None:
        """The reference model's summed completion log-probabilities, (examples, 2): the example's
        completion, its mismatched pair's."""
        if tuple(logps.shape) != (len(self.examples), 2):
            raise PreferenceDataError(
                f"reference log-probabilities must have shape ({len(self.examples)}, 2), got {tuple(logps.shape)}"
            )
        self.reference_logps = logps.float()

    def batch(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        chosen = [self.examples[i] for i in indices]
        shape = (len(chosen), 2, max(example.length for example in chosen))
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention = torch.zeros(shape, dtype=torch.long)
        completion = torch.zeros(shape, dtype=torch.long)
        for row, example in enumerate(chosen):
            sides = ((example.prompt_ids, example.completion_ids), (example.kl_prompt_ids, example.kl_completion_ids))
            for side, (prompt, answer) in enumerate(sides):
                start, end = len(prompt), len(prompt) + len(answer)
                input_ids[row, side, :end] = torch.tensor(prompt + answer)
                attention[row, side, :end] = 1
                completion[row, side, start:end] = 1
        selected = torch.tensor(indices)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "completion_mask": completion,
            "desirable": self.desirable[selected],
        }
        if self.reference_logps is not None:
            batch["reference_logps"] = self.reference_logps[selected]
        return batch


# ----------------------------------------------------------------------------- the objective
class KTOObjective:
    """The step objective (`genforge.train.StepObjective`) of KTO."""

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        distributed: DistributedContext | None = None,
    ) -> None:
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.distributed = distributed if distributed is not None else DistributedContext.current()

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    @staticmethod
    def _side(batch: dict[str, torch.Tensor], side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batch["input_ids"][:, side], batch["attention_mask"][:, side], batch["completion_mask"][:, side]

    def example_loss(
        self, engine: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor], across_ranks: bool
    ) -> tuple[PreferenceLoss, torch.Tensor]:
        """(KTO's `PreferenceLoss` of the batch, z0). The examples are scored through `engine`
        with gradients, their mismatched pairs through `model` without; across_ranks=True
        makes z0 the mean over every rank's rows."""
        reference = batch.get("reference_logps")
        if reference is None:
            raise KTOError("KTO needs the reference log-probabilities; none are set on the data")
        policy = completion_logprobs(engine, *self._side(batch, 0), lm_head=model.lm_head)
        with torch.no_grad():
            mismatched = completion_logprobs(model, *self._side(batch, 1), lm_head=model.lm_head)
        policy_kl, reference_kl = mismatched.sum, reference[:, 1]
        if across_ranks and self.distributed.enabled:
            # z0 is the mean over the whole micro-batch: sum each rank's log-ratios and counts,
            # and hand kto_loss that one mean (its clamp and detach still apply).
            total, count = all_reduce_sum(
                [float((policy_kl - reference_kl).sum()), float(policy_kl.numel())],
                self.distributed,
                policy_kl.device,
            )
            policy_kl, reference_kl = policy_kl.new_tensor([total / count]), policy_kl.new_zeros(1)
        result = kto_loss(
            policy.sum,
            reference[:, 0],
            batch["desirable"].bool(),
            policy_kl,
            reference_kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        return result, (policy_kl - reference_kl).mean().clamp(min=0).detach()

    def micro_loss(self, engine, model, batch, total_weight):
        result, reference_point = self.example_loss(engine, model, batch, across_ranks=True)
        examples = batch["input_ids"].shape[0]
        return result.losses.sum() / total_weight, {
            # z0 is the whole micro-batch's: each rank adds its rows' share of it.
            "kl": float(reference_point) * examples / total_weight,
            "rewards/chosen_sum": float(result.chosen_rewards.sum()),
            "rewards/rejected_sum": float(result.rejected_rewards.sum()),
            "count/chosen": float(result.chosen_rewards.numel()),
            "count/rejected": float(result.rejected_rewards.numel()),
        }

    @torch.no_grad()
    def evaluate(self, model, data: KTORows, batch_size: int) -> dict[str, float]:
        """Every rank scores all of `data`, `batch_size` examples at a time (z0 per batch)."""
        device = model.lm_head.weight.device
        loss = kl = chosen = rejected = 0.0
        chosen_count = rejected_count = 0
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))))
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            result, reference_point = self.example_loss(model, model, batch, across_ranks=False)
            loss += float(result.losses.sum())
            kl += float(reference_point) * batch["input_ids"].shape[0]
            chosen += float(result.chosen_rewards.sum())
            rejected += float(result.rejected_rewards.sum())
            chosen_count += result.chosen_rewards.numel()
            rejected_count += result.rejected_rewards.numel()
        scores = {"val_loss": loss / len(data), "val_kl": kl / len(data)}
        if chosen_count:
            scores["val_rewards/chosen"] = chosen / chosen_count
        if rejected_count:
            scores["val_rewards/rejected"] = rejected / rejected_count
        if chosen_count and rejected_count:
            scores["val_rewards/margins"] = scores["val_rewards/chosen"] - scores["val_rewards/rejected"]
        return scores


# ------------------------------------------------------------------------------------ the run
@dataclass
class KTOConfig:
    """What a KTO run reads, trains and writes.

    beta: the strength of the pull to the reference (default 0.1). desirable_weight,
        undesirable_weight: w_d and w_u (see the module doc).
    reference_model: a model directory to take the reference log-probabilities from (same
        tokenizer); None: the loaded model before training (adapters off).
    The data, length, training and LoRA fields mean what `align.preference.PreferenceConfig`'s do.
    """

    model_dir: str | Path
    data: str | Path
    out_dir: str | Path
    method: str = "lora"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference_model: str | Path | None = None
    eval_data: str | Path | None = None
    eval_fraction: float = 0.05
    max_length: int | None = None
    max_prompt_length: int | None = None
    overflow: str = "truncate"
    chat_template: str | None = None
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    gradient_checkpointing: bool = False
    device: str = "cpu"
    progress: bool = True
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Sequence[str] | None = None


def check_config(config: KTOConfig) -> None:
    """Everything that can be checked before the data is read or the model loaded."""
    if config.method not in PREFERENCE_METHODS:
        raise KTOError(f"unknown method {config.method!r}; accepted: {', '.join(PREFERENCE_METHODS)}")
    for name, directory in (("model", config.model_dir), ("reference model", config.reference_model)):
        if directory is not None and not (Path(directory) / "config.json").is_file():
            raise KTOError(f"{name} {directory} is not a Hugging Face model directory (no config.json)")
    if read_quantization_config(config.model_dir) is not None:
        raise KTOError(
            f"{config.model_dir} is a quantized model; align the floating-point model (or use --method qlora on it)"
        )
    for path in (config.data, config.eval_data):
        if path is not None and not Path(path).is_file():
            raise KTOError(f"data file {path} does not exist")
    if not 0 <= config.eval_fraction < 1:
        raise KTOError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.overflow not in OVERFLOW_MODES:
        raise KTOError(f"overflow must be one of {OVERFLOW_MODES}, got {config.overflow!r}")
    for name in ("beta", "desirable_weight", "undesirable_weight"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise KTOError(f"{name} must be a finite number > 0, got {value!r}")


def _check_reference_tokenizer(config: KTOConfig, tokenizer: Tokenizer) -> None:
    other = Tokenizer.from_dir(config.reference_model)
    if other.get_vocab() != tokenizer.get_vocab():
        raise KTOError(
            f"the reference model {config.reference_model} has another tokenizer than {config.model_dir}; the "
            "log-probability ratios compare the same token ids, so both need one vocabulary"
        )


def _examples(config: KTOConfig, tokenizer: Tokenizer, max_length: int) -> tuple[KTORows, KTORows | None, int]:
    """(training rows, held-out rows or None, examples whose prompt was cut). A preference
    pair's two examples stay on one side of the split."""
    from ..finetune.run import split_held_out

    records = read_kto_records(config.data)
    if config.eval_data is not None:
        held = read_kto_records(config.eval_data)
    else:
        # Split by line, so that the two halves of a pair are never on both sides.
        lines = sorted({where for where, _ in records}, key=lambda where: int(where.rsplit(":", 1)[1]))
        train_lines, held_lines = split_held_out(lines, config.eval_fraction, config.seed)
        kept, held_out = set(train_lines), set(held_lines)
        records, held = [r for r in records if r[0] in kept], [r for r in records if r[0] in held_out]
    limits = dict(
        max_length=max_length,
        max_prompt_length=config.max_prompt_length,
        overflow=config.overflow,
        chat_template=config.chat_template,
        seed=config.seed,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train = build_kto_examples(records, tokenizer, **limits)
    held_out = build_kto_examples(held, tokenizer, **limits) if held else []
    cut = sum(1 for example in train + held_out if example.truncated_prompt_tokens)
    return KTORows(train, pad), (KTORows(held_out, pad) if held_out else None), cut


def _warn_on_imbalance(config: KTOConfig, rows: KTORows) -> None:
    desirable = int(rows.desirable.sum())
    undesirable = len(rows) - desirable
    if not desirable or not undesirable:
        warnings.warn(
            f"{config.data}: every training example is {'desirable' if desirable else 'undesirable'}; KTO then only "
            "pushes that side against the KL reference point",
            stacklevel=3,
        )
        return
    ratio = config.desirable_weight * desirable / (config.undesirable_weight * undesirable)
    if not 1.0 <= ratio <= 4 / 3:
        low = undesirable * config.undesirable_weight / desirable
        warnings.warn(
            f"{desirable} desirable and {undesirable} undesirable examples weigh {ratio:.2f} to 1 "
            f"(desirable_weight {config.desirable_weight}, undesirable_weight {config.undesirable_weight}); the KTO "
            f"paper advises 1 to 4/3: e.g. desirable_weight in [{low:.3g}, {low * 4 / 3:.3g}]",
            stacklevel=3,
        )


def _reference_scores(
    config: KTOConfig, model: nn.Module, parts: dict[str, KTORows], out_dir: Path, resume: bool, write: bool
) -> float:
    """Set the reference log-probabilities on each part's rows: read from the run's cache when
    it holds them for the same examples and reference, else computed (and written by rank 0).
    Returns the seconds spent computing (0 when read)."""
    path = out_dir / REFERENCE_FILE
    source = str(config.reference_model or "policy at start")
    metadata = {name: rows.fingerprint() for name, rows in parts.items()} | {"reference": source}
    if resume and path.is_file():
        with safe_open(str(path), "pt") as cached:
            if (cached.metadata() or {}) == metadata:
                for name, rows in parts.items():
                    rows.set_reference(cached.get_tensor(name))
                return 0.0
        raise KTOError(
            f"cannot resume: {path} holds reference log-probabilities of other examples or another reference model; "
            "resume with the data and reference the run started with"
        )
    started = time.perf_counter()
    if config.reference_model is not None:
        reference = load_model(config.reference_model, dtype=torch.float32).to(model.lm_head.weight.device)
        scores = {name: reference_logprobs(reference, rows, config.batch_size) for name, rows in parts.items()}
        del reference
    else:
        scores = {name: reference_logprobs(model, rows, config.batch_size) for name, rows in parts.items()}
    for name, rows in parts.items():
        rows.set_reference(scores[name])
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            save_file({name: tensor.contiguous() for name, tensor in scores.items()}, str(temporary), metadata)
    return time.perf_counter() - started


@dataclass
class KTOResult:
    method: str
    output_dir: Path
    trainable_parameters: int
    total_parameters: int
    train_examples: int
    desirable_examples: int
    undesirable_examples: int
    held_out_examples: int
    truncated_examples: int
    before: dict | None
    after: dict | None
    steps: int
    tokens_per_s: float
    peak_rss_mib: float
    reference_seconds: float
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        record = asdict(self)
        record["output_dir"] = str(self.output_dir)
        return record


def train_kto(config: KTOConfig, resume: bool = False, distributed: DistributedContext | None = None) -> KTOResult:
    """Run `config` (see the module doc); resume=True continues the run in `out_dir`. Writes
    `out_dir/adapter/` (or `model/` for full fine-tuning), the trainer's files (checkpoints,
    metrics.jsonl, loss_curve.png), `reference_logps.safetensors` and `kto.json`, the result.
    Under torchrun rank 0 writes the files."""
    from ..finetune.lora import trainable_parameter_count
    from ..finetune.run import METHODS, _peak_rss_mib

    check_config(config)
    started = time.perf_counter()
    method = METHODS[config.method]
    out_dir = Path(config.out_dir)
    tokenizer = Tokenizer.from_dir(config.model_dir)
    if config.reference_model is not None:
        _check_reference_tokenizer(config, tokenizer)
    max_length = config.max_length or min(1024, read_config(config.model_dir).max_position_embeddings)
    rows, val_rows, truncated = _examples(config, tokenizer, max_length)
    if truncated:
        warnings.warn(
            f"{config.data}: cut the prompts of {truncated} examples from the left to fit max_length={max_length}, "
            f"max_prompt_length={config.max_prompt_length}",
            stacklevel=2,
        )
    _warn_on_imbalance(config, rows)

    model = load_model(config.model_dir, dtype=torch.float32)
    torch.manual_seed(config.seed)  # the adapter's initial weights: the same in every run and on every rank
    settings = finetune_settings(config)
    model = method.install(model, settings, tokenizer)
    if config.method == "full":
        model.requires_grad_(True)
    trainable, total = trainable_parameter_count(model)
    train_config = train_settings(config, out_dir, PREFERENCE_LR[config.method])
    objective = KTOObjective(config.beta, config.desirable_weight, config.undesirable_weight, distributed)
    trainer = Trainer(
        model, rows, train_config, val_data=val_rows, tokenizer=tokenizer, distributed=distributed, objective=objective
    )
    objective.distributed = trainer.distributed
    parts = {"train": rows} | ({"held_out": val_rows} if val_rows is not None else {})
    reference_seconds = _reference_scores(config, trainer.model, parts, out_dir, resume, trainer.distributed.is_main)
    summary_path = out_dir / SUMMARY_FILE
    before = None
    if val_rows is not None:
        if resume and summary_path.exists():
            before = json.loads(summary_path.read_text()).get("before")
        else:
            before = trainer.evaluate()
    if trainer.distributed.is_main and not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary_path, json.dumps({"before": before}, indent=2))
    result = trainer.train(resume=resume)
    after = result.evals[-1] if result.evals else None
    output_dir = out_dir / method.output
    if trainer.distributed.is_main:
        output_dir = method.save(model, output_dir, tokenizer, str(config.model_dir))
    records = [r for r in trainer.read_metrics() if "tokens_per_s" in r]
    desirable = int(rows.desirable.sum())
    outcome = KTOResult(
        method=config.method,
        output_dir=output_dir,
        trainable_parameters=trainable,
        total_parameters=total,
        train_examples=len(rows),
        desirable_examples=desirable,
        undesirable_examples=len(rows) - desirable,
        held_out_examples=len(val_rows) if val_rows is not None else 0,
        truncated_examples=truncated,
        before=before,
        after=after,
        steps=result.step,
        tokens_per_s=sum(r["tokens_per_s"] for r in records) / len(records) if records else 0.0,
        peak_rss_mib=_peak_rss_mib(),
        reference_seconds=reference_seconds,
        seconds=time.perf_counter() - started,
        settings={
            "beta": config.beta,
            "desirable_weight": config.desirable_weight,
            "undesirable_weight": config.undesirable_weight,
            "lr": train_config.lr,
            "max_length": max_length,
            "max_prompt_length": config.max_prompt_length,
        },
    )
    if trainer.distributed.is_main:
        atomic_write_text(summary_path, json.dumps(outcome.to_json(), indent=2))
    return outcome


# ---------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`genforge align kto`'s flags."""
    from .flags import add_length_arguments, add_run_arguments, add_shared_training_arguments

    parser.description = (
        "Align a model with KTO on JSONL examples rated on their own: {'prompt', 'completion', 'label': true|false} "
        "(plain text, or chat messages rendered with the model's chat template); preference pairs "
        "{'prompt', 'chosen', 'rejected'} count as one desirable and one undesirable example. Each example is "
        "pushed above (desirable) or below (undesirable) a reference point, the policy's KL to the reference "
        "estimated from mismatched prompt/completion pairs. Reference log-probabilities are computed once (with "
        "LoRA: the base, adapters off). Writes OUT/adapter (or OUT/model with --method full), metrics.jsonl and "
        "kto.json with the held-out rewards before and after. --resume continues; torchrun splits each batch."
    )
    parser.epilog = "example: genforge align kto --model sft-model/ --data feedback.jsonl --out runs/kto --beta 0.1"
    add_run_arguments(parser, "JSONL examples (prompt, completion, label) or preference pairs", PREFERENCE_METHODS)
    knobs = parser.add_argument_group("the loss")
    knobs.add_argument("--beta", type=float, default=0.1, help="strength of the pull to the reference (default 0.1)")
    knobs.add_argument(
        "--desirable-weight", type=float, default=1.0, help="w_d: weight of the desirable examples (default 1)"
    )
    knobs.add_argument(
        "--undesirable-weight", type=float, default=1.0, help="w_u: weight of the undesirable examples (default 1)"
    )
    knobs.add_argument("--reference-model", help="a model directory (same tokenizer) to take as the reference")
    add_length_arguments(parser, unit="examples")
    add_shared_training_arguments(parser, "examples", "peak learning rate (default: 5e-5 for adapters, 1e-6 for full)")


def run(args: argparse.Namespace) -> int:
    """`genforge align kto`: train, report one line on stderr and the result as JSON on stdout."""
    from ..console import console
    from .flags import launch, training_fields

    config = KTOConfig(
        **training_fields(args),
        beta=args.beta,
        desirable_weight=args.desirable_weight,
        undesirable_weight=args.undesirable_weight,
        reference_model=args.reference_model,
    )
    result, context = launch(train_kto, config, check_config, args.resume)
    if context.is_main:

        def scores(evaluation) -> str:
            if not evaluation or "val_rewards/margins" not in evaluation:
                return "n/a"
            return f"margin {evaluation['val_rewards/margins']:+.3f}, kl {evaluation['val_kl']:.3f}"

        console.print(
            f"kto ({result.method}): trained {result.trainable_parameters:,} of {result.total_parameters:,} parameters "
            f"for {result.steps} steps on {result.desirable_examples:,} desirable and {result.undesirable_examples:,} "
            f"undesirable examples; held-out ({result.held_out_examples}) {scores(result.before)} -> "
            f"{scores(result.after)}; {result.tokens_per_s:,.0f} tok/s; wrote {result.output_dir}"
        )
        print(json.dumps(result.to_json()))
    return 0


__all__ = [
    "KTOConfig",
    "KTOError",
    "KTOExample",
    "KTOObjective",
    "KTOResult",
    "KTORows",
    "add_arguments",
    "build_kto_examples",
    "check_config",
    "mismatched_partners",
    "parse_kto_record",
    "read_kto_records",
    "run",
    "tokenize_kto_example",
    "train_kto",
]
