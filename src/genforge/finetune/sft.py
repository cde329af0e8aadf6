"""Supervised fine-tuning data: instruction/chat JSONL to (input_ids, labels) with completion-only loss.

Records come in three formats people have: OpenAI chat (`messages`), `prompt`/`completion` (strings,
or lists of messages as TRL's conversational prompt-completion), and Alpaca (`instruction`, optional
`input`, `output`). Each becomes a conversation, is rendered with the model's chat template, and every
token outside an assistant turn gets the label -100, so the loss counts only what the assistant says.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..jsonl import json_objects
from ..tokenizer import ChatTemplateError, Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "SFT_FORMATS",
    "SFTDataError",
    "SFTDataset",
    "SFTExample",
    "SFTRows",
    "collate",
    "detect_format",
    "read_sft_records",
    "record_to_conversation",
    "tokenize_conversation",
    "tokenize_prompt_completion",
]

# The label the loss skips; equal to genforge.train.losses.IGNORE_INDEX (and PyTorch's default), kept
# here so that this data layer does not import the trainer.
IGNORE_INDEX = -100
SFT_FORMATS = ("messages", "prompt_completion", "alpaca")
_FORMAT_KEYS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
_ACCEPTED = (
    "accepted formats: {'messages': [{'role': ..., 'content': ...}, ...]}, "
    "{'prompt': ..., 'completion': ...}, {'instruction': ..., 'input': ... (optional), 'output': ...}"
)


class SFTDataError(ValueError):
    """A fine-tuning record or example that cannot be turned into training data."""


@dataclass(frozen=True)
class SFTExample:
    """One training example: token ids, their labels (-100 where the loss skips) and where it came from."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    truncated_tokens: int = 0


# ------------------------------------------------------------------------------------------ records


def detect_format(record: Mapping[str, Any], where: str = "record") -> str:
    """The format of one record, from its keys: 'messages', 'prompt_completion' or 'alpaca'."""
    found = [name for name, keys in _FORMAT_KEYS.items() if any(key in record for key in keys)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise SFTDataError(f"{where}: no known fields (has {sorted(record)}); {_ACCEPTED}")
    raise SFTDataError(
        f"{where}: fields of several formats ({', '.join(found)}: keys {sorted(record)}); "
        "keep one format per record or pass format= explicitly"
    )


def _string_field(record: Mapping[str, Any], field: str, where: str, optional: bool = False) -> str | None:
    value = record.get(field)
    if value is None and optional:
        return None
    if field not in record:
        raise SFTDataError(f"{where}: missing field {field!r} (has {sorted(record)}); {_ACCEPTED}")
    if not isinstance(value, str):
        raise SFTDataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _checked_messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise SFTDataError(
            f"{where}: field {field!r} must be a non-empty list of {{'role': ..., 'content': ...}} objects, "
            f"got {type(value).__name__}"
        )
    messages = []
    for index, message in enumerate(value):
        name = f"{field}[{index}]"
        if not isinstance(message, Mapping):
            raise SFTDataError(f"{where}: field {name!r} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise SFTDataError(f"{where}: field '{name}.role' must be a non-empty string (system, user, assistant)")
        if not isinstance(content, str):
            found = "missing" if "content" not in message else f"a {type(content).__name__}"
            raise SFTDataError(f"{where}: field '{name}.content' must be a string, is {found}")
        messages.append({"role": role, "content": content})
    return messages


def record_to_conversation(
    record: Mapping[str, Any], format: str | None = None, where: str = "record"
) -> list[dict[str, str]]:
    """A record as a conversation, a list of {'role', 'content'} messages with at least one assistant turn.

    `format` is one of `SFT_FORMATS`, or None to detect it from the record's keys. Alpaca's `input`,
    when present and not empty, follows the instruction after a blank line in the user message.
    """
    if format is None:
        format = detect_format(record, where)
    elif format not in SFT_FORMATS:
        raise SFTDataError(f"format must be one of {SFT_FORMATS} or None (detect), got {format!r}")
    if format == "messages":
        messages = _checked_messages(record.get("messages"), "messages", where)
    elif format == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt-completion
            messages = _checked_messages(prompt, "prompt", where) + _checked_messages(completion, "completion", where)
        else:
            prompt = _string_field(record, "prompt", where)
            completion = _string_field(record, "completion", where)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        instruction = _string_field(record, "instruction", where)
        extra = _string_field(record, "input", where, optional=True)
        output = _string_field(record, "output", where)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if not any(message["role"] == "assistant" for message in messages):
        raise SFTDataError(
            f"{where}: the conversation has no assistant turn (roles: {[m['role'] for m in messages]}), "
            "so there is nothing to train on; add a message with role 'assistant'"
        )
    return messages


def read_sft_records(path: str | os.PathLike, format: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for each record of a JSONL file, `where` being 'path:line'; checked with
    `record_to_conversation` before anything is returned, so a bad line stops the read early."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as handle:
        for line, record in json_objects(handle, str(path), SFTDataError):
            where = f"{path}:{line}"
            record_to_conversation(record, format, where)
            records.append((where, record))
    if not records:
        raise SFTDataError(f"{path}: holds no records; expected one JSON object per line ({_ACCEPTED})")
    return records


# ------------------------------------------------------------------------------------- tokenization


def _labels_from_spans(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    # A token is trained when its characters overlap a trained span, as transformers'
    # return_assistant_tokens_mask does (it marks every token from the span's first to its last char).
    labels = [IGNORE_INDEX] * len(ids)
    for index, (token_id, (start, end)) in enumerate(zip(ids, offsets)):
        if any(start < span_end and end > span_start for span_start, span_end in spans):
            labels[index] = token_id
    return labels


def _truncate(ids: list[int], labels: list[int], max_length: int | None, overflow: str, where: str):
    if max_length is None or len(ids) <= max_length:
        return ids, labels, 0
    if overflow != "truncate":
        raise SFTDataError(
            f"{where}: {len(ids)} tokens, more than max_length={max_length}; raise max_length, drop the "
            "record, or pass overflow='truncate' to cut it (the cut is counted and reported)"
        )
    cut = len(ids) - max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise SFTDataError(
            f"{where}: truncating {cut} tokens to max_length={max_length} leaves no assistant token to train on; "
            "raise max_length or drop the record"
        )
    return ids, labels, cut


def tokenize_conversation(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    max_length: int | None = None,
    overflow: str = "error",
    where: str = "conversation",
    chat_template: str | None = None,
) -> SFTExample:
    """Token ids of a conversation rendered with the chat template, and labels that train only the assistant.

    Every assistant turn is trained: its content and what the template writes after it up to the end of
    the turn (the end-of-turn token, e.g. `<|im_end|>`), less trailing whitespace (ChatML's newline after
    `<|im_end|>` is the template's, not the model's). Everything else (system, user, the role headers,
    the generation prompt) is labelled -100. The spans come from rendering the conversation prefix by
    prefix: the text before assistant message i is the rendering of messages[:i] with
    add_generation_prompt=True and its end the rendering of messages[:i+1]; a template whose prefix
    renderings are not prefixes of the whole conversation's (one that moves the system prompt, or drops
    earlier reasoning) is refused. `overflow` is 'error' (refuse an example longer than `max_length`) or
    'truncate' (cut the end; the count is kept in `truncated_tokens`).
    """
    if overflow not in ("error", "truncate"):
        raise SFTDataError(f"overflow must be 'error' or 'truncate', got {overflow!r}")
    messages = list(messages)

    def render(part: Sequence[Mapping[str, str]], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(
                part, add_generation_prompt=generation_prompt, chat_template=chat_template
            )
        except ChatTemplateError as err:  # say which record the template refused
            raise SFTDataError(f"{where}: {err}") from err

    whole = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:
            raise SFTDataError(
                f"{where}: the conversation opens with an assistant message; the template's text before it "
                "(a default system prompt, a bos) cannot be rendered apart, so start with a system or user message"
            )
        before = render(messages[:index], generation_prompt=True)
        through = render(messages[: index + 1])
        for name, text in (("up to", before), ("through", through)):
            if not whole.startswith(text):
                raise SFTDataError(
                    f"{where}: the chat template's rendering of the conversation {name} assistant message {index} "
                    "is not a prefix of the whole conversation's rendering, so the assistant's tokens cannot be "
                    "located; use a template that renders earlier turns the same whatever follows"
                )
        if not through.startswith(before):
            raise SFTDataError(
                f"{where}: the chat template renders the generation prompt before assistant message {index} "
                "differently from the assistant turn itself; the assistant's tokens cannot be located"
            )
        end = len(through.rstrip())
        if end <= len(before):
            raise SFTDataError(f"{where}: assistant message {index} renders to nothing with this chat template")
        spans.append((len(before), end))
    encoding = tokenizer.backend.encode(whole, add_special_tokens=False)
    labels = _labels_from_spans(encoding.ids, encoding.offsets, spans)
    ids, labels, cut = _truncate(list(encoding.ids), labels, max_length, overflow, where)
    return SFTExample(ids, labels, where, cut)


def tokenize_prompt_completion(
    tokenizer: Tokenizer,
    prompt: str,
    completion: str,
    max_length: int | None = None,
    overflow: str = "error",
    where: str = "example",
    add_eos: bool = True,
) -> SFTExample:
    """Plain text without a chat template: prompt + completion (+ eos) in one encoding, the prompt masked.

    The text is encoded whole (with the tokenizer's own special tokens, e.g. a bos), so the tokens are
    those the model sees at inference; a token that straddles the prompt/completion boundary is
    trained. `add_eos` appends the eos token, trained, so the model learns to stop.
    """
    if overflow not in ("error", "truncate"):
        raise SFTDataError(f"overflow must be 'error' or 'truncate', got {overflow!r}")
    encoding = tokenizer.backend.encode(prompt + completion, add_special_tokens=True)
    # Special tokens added by the post-processor have (0, 0) offsets; they are never in the span.
    spans = [(len(prompt), len(prompt) + len(completion))]
    ids, labels = list(encoding.ids), _labels_from_spans(encoding.ids, encoding.offsets, spans)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise SFTDataError(f"{where}: add_eos=True but the tokenizer has no eos token; pass add_eos=False")
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if all(label == IGNORE_INDEX for label in labels):
        raise SFTDataError(f"{where}: the completion is empty, so there is nothing to train on")
    ids, labels, cut = _truncate(ids, labels, max_length, overflow, where)
    return SFTExample(ids, labels, where, cut)


# --------------------------------------------------------------------------------- dataset, collate


class SFTDataset(torch.utils.data.Dataset):
    """Supervised fine-tuning examples, each a dict of `input_ids` and `labels` (lists of ints).

    `truncated_examples` / `truncated_tokens` say how much `overflow='truncate'` cut (a warning says it too).
    """

    def __init__(self, examples: Sequence[SFTExample]):
        self.examples = list(examples)
        self.truncated_examples = sum(1 for example in self.examples if example.truncated_tokens)
        self.truncated_tokens = sum(example.truncated_tokens for example in self.examples)

    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike,
        tokenizer: Tokenizer,
        format: str | None = None,
        max_length: int | None = None,
        overflow: str = "error",
        chat_template: str | None = None,
    ) -> SFTDataset:
        """Read, check and tokenize a JSONL file (see `from_records`)."""
        records = read_sft_records(path, format)  # every record checked before any tokenization
        dataset = cls.from_records(records, tokenizer, format, max_length, overflow, chat_template)
        if dataset.truncated_examples:
            warnings.warn(
                f"{path}: truncated {dataset.truncated_examples} of {len(dataset)} examples to "
                f"max_length={max_length}, cutting {dataset.truncated_tokens} tokens",
                stacklevel=2,
            )
        return dataset

    @classmethod
    def from_records(
        cls,
        records: Sequence[tuple[str, Mapping[str, Any]]],
        tokenizer: Tokenizer,
        format: str | None = None,
        max_length: int | None = None,
        overflow: str = "error",
        chat_template: str | None = None,
    ) -> SFTDataset:
        """Tokenize (where, record) pairs. With a chat template (the tokenizer's, or `chat_template`)
        every record goes through it; without one, only string prompt/completion records are accepted and
        are concatenated (`tokenize_prompt_completion`)."""
        templated = chat_template is not None or tokenizer.chat_template is not None
        examples = []
        for where, record in records:
            if templated:
                messages = record_to_conversation(record, format, where)
                examples.append(tokenize_conversation(tokenizer, messages, max_length, overflow, where, chat_template))
                continue
            kind = format or detect_format(record, where)
            if kind != "prompt_completion" or not isinstance(record.get("prompt"), str):
                raise SFTDataError(
                    f"{where}: a {kind!r} record needs a chat template and the tokenizer has none; pass "
                    "chat_template=<Jinja source> (or use string prompt/completion records)"
                )
            examples.append(
                tokenize_prompt_completion(
                    tokenizer, record["prompt"], record["completion"], max_length, overflow, where
                )
            )
        return cls(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


def collate(batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: `input_ids` with `pad_id`, `labels` with -100, and an
    `attention_mask` of 1 for real tokens and 0 for padding; all (batch, longest) int64 tensors."""
    if not batch:
        raise SFTDataError("collate got an empty batch")
    longest = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example["input_ids"])
        if len(example["labels"]) != length:
            raise SFTDataError(f"collate: example {row} has {length} input_ids but {len(example['labels'])} labels")
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ------------------------------------------------------------------------------ rows for the trainer


class SFTRows:
    """Fine-tuning examples laid out in training rows of at most `seq_len` tokens: the batch source
    `genforge.train.Trainer` draws from (`len`, `batch(indices)`, `seq_len`, `max_token_id`).

    Unpacked, each example is a row, right-padded to the longest row of its batch (padding is never
    a target, and causal attention never lets a real token read the padding after it). Packed, whole
    examples are placed first-fit in rows (each example kept whole, in its first row with room), and
    `batch` also gives `document_ids`, so that attention stays inside each example and positions
    restart per example (`Transformer.forward`): a packed row trains each example exactly as alone,
    with far fewer padding tokens (Krell et al. 2021, "Efficient Sequence Packing without
    Cross-contamination").
    """

    def __init__(self, examples: Sequence[SFTExample], seq_len: int, pad_id: int, packing: bool = False) -> None:
        examples = list(examples)
        if not examples:
            raise SFTDataError("no fine-tuning examples to lay out in rows")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise SFTDataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        for number, example in enumerate(examples):
            if len(example.input_ids) > seq_len:
                where = example.source or f"example {number}"
                raise SFTDataError(
                    f"{where}: {len(example.input_ids)} tokens do not fit in seq_len={seq_len}; raise seq_len, or "
                    "read the data with max_length and overflow='truncate'"
                )
            if all(label == IGNORE_INDEX for label in example.labels):
                where = example.source or f"example {number}"
                raise SFTDataError(f"{where}: no token is a target (every label is -100); nothing to learn from it")
        self.seq_len, self.pad_id, self.packing = seq_len, int(pad_id), packing
        self.rows = _first_fit(examples, seq_len) if packing else [[example] for example in examples]
        self.num_examples = len(examples)
        self.max_token_id = max(max(example.input_ids) for example in examples)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fill(self) -> float:
        """The share of row positions that hold tokens rather than padding, in rows of `seq_len`."""
        used = sum(len(example.input_ids) for row in self.rows for example in row)
        return used / (len(self.rows) * self.seq_len)

    def batch(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        """`input_ids`, `labels` (and `document_ids` when packed), (batch, longest row) int64 tensors."""
        rows = [self.rows[int(index)] for index in indices]
        width = max(sum(len(example.input_ids) for example in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        documents = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: the padding's own document
        for number, row in enumerate(rows):
            start = 0
            for document, example in enumerate(row):
                end = start + len(example.input_ids)
                input_ids[number, start:end] = torch.tensor(example.input_ids)
                labels[number, start:end] = torch.tensor(example.labels)
                documents[number, start:end] = document
                start = end
        batch = {"input_ids": input_ids, "labels": labels}
        if self.packing:
            batch["document_ids"] = documents
        return batch


def _first_fit(examples: Sequence[SFTExample], seq_len: int) -> list[list[SFTExample]]:
    rows: list[list[SFTExample]] = []
    room: list[int] = []
    for example in examples:
        size = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= size), None)
        if slot is None:
            rows.append([])
            room.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(example)
        room[slot] -= size
    return rows
