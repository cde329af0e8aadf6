"""Preference data: pairs of a prompt, a preferred (chosen) and a dispreferred (rejected)
completion, from JSONL to the token layout the preference trainer scores.

Records take the shapes TRL's preference datasets have:

- plain text: `{"prompt": str, "chosen": str, "rejected": str}`. The prompt is encoded with the
  tokenizer's special tokens (a bos), each completion without them and followed by eos, so the
  model learns to stop, as generation sees them (prompt ids first, then the answer's).
- chat messages: `prompt` a list of `{"role", "content"}` messages (or a string, taken as one
  user message) and `chosen` / `rejected` a single assistant message (a list of one, or its
  text). The prompt is rendered with the chat template and its generation prompt; each
  completion is what the template adds for the assistant turn, up to its end-of-turn token.
- implicit prompt: `chosen` and `rejected` whole conversations without `prompt` (as in
  Anthropic's HH data); the shared messages are the prompt, the last assistant turns the answers.

Every record is checked before any tokenization, and an error names the file and line: a
missing or mistyped field, an empty completion, a pair whose chosen equals its rejected.

Length: `max_prompt_length` and `max_length` (prompt + the longer completion) are met by cutting
the prompt from the left (its end, next to the answer, is kept). A completion is never cut: a
pair whose completion alone does not fit is refused, naming the line, and with
overflow="error" any pair over a limit is refused. The dataset counts the pairs and tokens cut,
and the run reports them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..jsonl import json_objects
from ..tokenizer import ChatTemplateError, Tokenizer

OVERFLOW_MODES = ("truncate", "error")
_ACCEPTED = (
    "accepted records: {'prompt': str, 'chosen': str, 'rejected': str}, the same with 'prompt' a list of "
    "{'role', 'content'} messages and 'chosen'/'rejected' one assistant message, or 'chosen'/'rejected' "
    "whole conversations sharing their prompt messages"
)


class PreferenceDataError(ValueError):
    """A preference record or pair that cannot be turned into training data."""


@dataclass(frozen=True)
class PreferencePair:
    """One tokenized pair: the prompt's ids (shared) and each completion's, and where it came from."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""
    truncated_prompt_tokens: int = 0

    @property
    def length(self) -> int:
        """The longer of the two sequences, prompt included."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


# ------------------------------------------------------------------------------------ records
def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise PreferenceDataError(
            f"{where}: field {field!r} must be a string or a non-empty list of {{'role', 'content'}} messages, "
            f"got {type(value).__name__}"
        )
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise PreferenceDataError(f"{where}: {field}[{index}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise PreferenceDataError(
                f"{where}: {field}[{index}] needs a non-empty string 'role' and a string 'content' (has {dict(message)})"
            )
        messages.append({"role": role, "content": content})
    return messages


def _answer(value: Any, field: str, where: str) -> dict[str, str]:
    """A completion in chat form: one assistant message (a list of one, or its text)."""
    if isinstance(value, str):
        message = {"role": "assistant", "content": value}
    else:
        listed = _messages(value, field, where)
        if len(listed) != 1 or listed[0]["role"] != "assistant":
            raise PreferenceDataError(
                f"{where}: field {field!r} must be one assistant message (got roles {[m['role'] for m in listed]})"
            )
        message = listed[0]
    if not message["content"].strip():
        raise PreferenceDataError(f"{where}: the {field} completion is empty; a pair needs two non-empty answers")
    return message


def parse_preference_record(record: Mapping[str, Any], where: str = "record") -> dict[str, Any]:
    """The record in one of two normal forms, checked (see the module doc):
    {"chat": False, "prompt": str, "chosen": str, "rejected": str} or
    {"chat": True, "prompt": [messages], "chosen": message, "rejected": message}."""
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise PreferenceDataError(f"{where}: missing field(s) {missing} (has {sorted(record)}); {_ACCEPTED}")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if prompt is None:
        if "prompt" in record or not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise PreferenceDataError(
                f"{where}: missing field 'prompt' (or chosen and rejected as whole conversations); {_ACCEPTED}"
            )
        chosen_turns, rejected_turns = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
        shared = 0
        while shared < min(len(chosen_turns), len(rejected_turns)) and chosen_turns[shared] == rejected_turns[shared]:
            shared += 1
        if shared == 0 or len(chosen_turns) != shared + 1 or len(rejected_turns) != shared + 1:
            raise PreferenceDataError(
                f"{where}: without 'prompt', chosen and rejected must be conversations that share every message "
                "but their last (the answer)"
            )
        prompt, chosen, rejected = chosen_turns[:shared], chosen_turns[-1:], rejected_turns[-1:]
    chat = isinstance(prompt, list) or isinstance(chosen, list) or isinstance(rejected, list)
    if chat:
        prompt_messages = _messages(
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt, "prompt", where
        )
        parsed = {
            "chat": True,
            "prompt": prompt_messages,
            "chosen": _answer(chosen, "chosen", where),
            "rejected": _answer(rejected, "rejected", where),
        }
        same = parsed["chosen"]["content"] == parsed["rejected"]["content"]
    else:
        for field, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise PreferenceDataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise PreferenceDataError(
                    f"{where}: the {field} completion is empty; a pair needs two non-empty answers"
                )
        parsed = {"chat": False, "prompt": prompt, "chosen": chosen, "rejected": rejected}
        same = chosen == rejected
    if same:
        raise PreferenceDataError(f"{where}: chosen and rejected are the same text, so the pair prefers nothing")
    return parsed


def read_preference_records(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(where, parsed record) for each line of a JSONL file, `where` being 'path:line'; every
    record is checked (`parse_preference_record`) before anything is returned."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as handle:
        for line, record in json_objects(handle, str(path), PreferenceDataError):
            where = f"{path}:{line}"
            records.append((where, parse_preference_record(record, where)))
    if not records:
        raise PreferenceDataError(f"{path}: holds no records; expected one JSON object per line ({_ACCEPTED})")
    return records


# ------------------------------------------------------------------------------- tokenization
def _render(tokenizer: Tokenizer, messages, generation_prompt: bool, chat_template: str | None, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, chat_template=chat_template
        )
    except ChatTemplateError as err:
        raise PreferenceDataError(f"{where}: {err}") from err


def _chat_texts(tokenizer: Tokenizer, parsed: dict, chat_template: str | None, where: str) -> tuple[str, str, str]:
    """The prompt rendered with its generation prompt, and each answer as the text the template
    adds after it for the assistant turn (trailing whitespace, the template's, left out as SFT
    does)."""
    if chat_template is None and tokenizer.chat_template is None:
        raise PreferenceDataError(
            f"{where}: a chat-message record needs a chat template and the tokenizer has none; pass "
            "chat_template=<Jinja source> (or use plain-text records)"
        )
    prompt = _render(tokenizer, parsed["prompt"], True, chat_template, where)
    answers = []
    for field in ("chosen", "rejected"):
        whole = _render(tokenizer, parsed["prompt"] + [parsed[field]], False, chat_template, where)
        if not whole.startswith(prompt):
            raise PreferenceDataError(
                f"{where}: the chat template renders the prompt with its generation prompt differently from the "
                f"conversation with the {field} answer, so the answer's text cannot be located"
            )
        answer = whole[len(prompt) :].rstrip()
        if not answer:
            raise PreferenceDataError(f"{where}: the {field} answer renders to nothing with this chat template")
        answers.append(answer)
    return prompt, answers[0], answers[1]


def tokenize_preference_record(
    tokenizer: Tokenizer,
    parsed: dict[str, Any],
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    overflow: str = "truncate",
    where: str = "record",
    chat_template: str | None = None,
) -> PreferencePair:
    """A parsed record (`parse_preference_record`) as token ids, within the length limits (see
    the module doc)."""
    if overflow not in OVERFLOW_MODES:
        raise PreferenceDataError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    encode = tokenizer.backend.encode
    if parsed["chat"]:
        prompt_text, chosen_text, rejected_text = _chat_texts(tokenizer, parsed, chat_template, where)
        prompt = list(encode(prompt_text, add_special_tokens=False).ids)
        chosen = list(encode(chosen_text, add_special_tokens=False).ids)
        rejected = list(encode(rejected_text, add_special_tokens=False).ids)
    else:
        if tokenizer.eos_token_id is None:
            raise PreferenceDataError(
                f"{where}: plain-text completions end with the eos token and the tokenizer has none"
            )
        prompt = list(encode(parsed["prompt"], add_special_tokens=True).ids)
        chosen = list(encode(parsed["chosen"], add_special_tokens=False).ids) + [tokenizer.eos_token_id]
        rejected = list(encode(parsed["rejected"], add_special_tokens=False).ids) + [tokenizer.eos_token_id]
    if not prompt:
        raise PreferenceDataError(
            f"{where}: the prompt has no tokens; a completion needs at least one token before it to be scored"
        )
    if chosen == rejected:
        raise PreferenceDataError(f"{where}: chosen and rejected tokenize to the same ids, so the pair prefers nothing")
    longest = max(len(chosen), len(rejected))
    keep = len(prompt)
    if max_prompt_length is not None:
        keep = min(keep, max_prompt_length)
    if max_length is not None:
        if longest >= max_length:
            raise PreferenceDataError(
                f"{where}: a completion of {longest} tokens leaves no room for the prompt within max_length="
                f"{max_length}; completions are never cut: raise max_length or drop the pair"
            )
        keep = min(keep, max_length - longest)
    cut = len(prompt) - keep
    if cut and overflow == "error":
        raise PreferenceDataError(
            f"{where}: {len(prompt)} prompt tokens + {longest} completion tokens exceed the limits (max_length="
            f"{max_length}, max_prompt_length={max_prompt_length}); raise them, drop the pair, or pass "
            "overflow='truncate' to cut the prompt from the left (the cut is counted and reported)"
        )
    return PreferencePair(prompt[cut:], chosen, rejected, where, cut)


class PreferenceDataset:
    """Tokenized preference pairs. `truncated_pairs` / `truncated_tokens` count the prompts cut."""

    def __init__(self, pairs: Sequence[PreferencePair]) -> None:
        self.pairs = list(pairs)
        self.truncated_pairs = sum(1 for pair in self.pairs if pair.truncated_prompt_tokens)
        self.truncated_tokens = sum(pair.truncated_prompt_tokens for pair in self.pairs)

    @classmethod
    def from_records(
        cls,
        records: Iterable[tuple[str, dict[str, Any]]],
        tokenizer: Tokenizer,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        overflow: str = "truncate",
        chat_template: str | None = None,
    ) -> PreferenceDataset:
        """Tokenize (where, parsed record) pairs, as `read_preference_records` returns them."""
        for name, limit in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
                raise PreferenceDataError(f"{name} must be an integer >= 2 or None, got {limit!r}")
        return cls(
            [
                tokenize_preference_record(
                    tokenizer, parsed, max_length, max_prompt_length, overflow, where, chat_template
                )
                for where, parsed in records
            ]
        )

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, tokenizer: Tokenizer, **limits) -> PreferenceDataset:
        return cls.from_records(read_preference_records(path), tokenizer, **limits)

    def __len__(self) -> int:
        return len(self.pairs)


def pairs_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    """A hash of the pairs' token ids, in order: cached reference log-probabilities are reused
    only for the same pairs."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


class PreferenceRows:
    """Preference pairs as the batch source `genforge.train.Trainer` draws from (`len`,
    `batch(indices)`, `seq_len`, `max_token_id`).

    `batch` gives (pairs, 2, longest) tensors, row 0 of each pair prompt + chosen and row 1
    prompt + rejected, right-padded to the batch's longest sequence: `input_ids`,
    `attention_mask`, `completion_mask` (the answer's tokens), and `reference_logps` (pairs, 2)
    when the reference log-probabilities are set (`set_reference`).
    """

    def __init__(self, pairs: Sequence[PreferencePair], pad_id: int) -> None:
        self.pairs = list(pairs)
        if not self.pairs:
            raise PreferenceDataError("no preference pairs to train on")
        self.pad_id = int(pad_id)
        self.seq_len = max(pair.length for pair in self.pairs)
        self.max_token_id = max(max(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in self.pairs)
        self.reference_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def set_reference(self, logps: torch.Tensor) -> None:
        """The reference model's summed completion log-probabilities, (pairs, 2): chosen, rejected."""
        if tuple(logps.shape) != (len(self.pairs), 2):
            raise PreferenceDataError(
                f"reference log-probabilities must have shape ({len(self.pairs)}, 2), got {tuple(logps.shape)}"
            )
        self.reference_logps = logps.float()

    def batch(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        chosen = [self.pairs[i] for i in indices]
        width = max(pair.length for pair in chosen)
        shape = (len(chosen), 2, width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention = torch.zeros(shape, dtype=torch.long)
        completion = torch.zeros(shape, dtype=torch.long)
        for row, pair in enumerate(chosen):
            start = len(pair.prompt_ids)
            for side, answer in enumerate((pair.chosen_ids, pair.rejected_ids)):
                end = start + len(answer)
                input_ids[row, side, :end] = torch.tensor(pair.prompt_ids + answer)
                attention[row, side, :end] = 1
                completion[row, side, start:end] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
        if self.reference_logps is not None:
            batch["reference_logps"] = self.reference_logps[torch.tensor(indices)]
        return batch


__all__ = [
    "OVERFLOW_MODES",
    "PreferenceDataError",
    "PreferenceDataset",
    "PreferencePair",
    "PreferenceRows",
    "pairs_fingerprint",
    "parse_preference_record",
    "read_preference_records",
    "tokenize_preference_record",
]
