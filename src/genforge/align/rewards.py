"""Ready-made reward functions for GRPO (`align.grpo`): verifiable rewards as plain callables.

GRPO (Shao et al. 2024) needs no value model, only a score per sampled completion, and the
scores that make it work best are checkable facts rather than a learned preference: the
answer is right, the output has the required form, the code passes its tests (the
"verifiable rewards" of DeepSeek-R1 and Tulu 3). Every function here has the signature the
trainer calls, TRL's:

    reward(prompts, completions, **columns) -> list[float]

`prompts` are the prompts as the data gave them (a string, or a list of chat messages),
`completions` the sampled texts (for chat prompts, TRL's form: a list holding one assistant
message), and `columns` every other field of the data records, one value per completion (the
reference answer, the unit tests). Each returned callable has a `__name__`, which names its
column in the logs.

- `exact_match_reward`: 1.0 when the completion's answer equals a reference column, after
  answer extraction (`extract_answer`: a boxed answer, "#### x", "answer: x", or the last
  number) and normalisation (whitespace, case, numbers by value).
- `format_reward`: 1.0 when the completion matches a regular expression, parses as JSON, or
  validates against a JSON schema.
- `reward_model_reward`: a trained `align.reward.RewardModel`'s score of prompt + completion.
- `unit_test_reward`: 1.0 when the completion's code, followed by a column's tests, exits
  cleanly in the pass@k sandbox (`evaluate.code_eval`: a subprocess with time, memory and
  network limits).

`reward_from_spec` builds one from the command line's `--reward` text (`exact_match:answer`,
`format:json`, ...).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RewardCallable = Callable[..., list]

# ----------------------------------------------------------------------------- completions


def completion_text(completion: Any) -> str:
    """The text of a completion as the trainer passes it: a string, or (for chat prompts) a
    list of messages whose last one is the assistant's."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise TypeError(
        f"a completion must be a string or a list of chat messages ending with one that has a 'content' string, "
        f"got {type(completion).__name__}"
    )


def prompt_text(prompt: Any) -> str:
    """A prompt as one string: itself, or its messages' contents joined by new lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(message.get("content", "")) for message in prompt)


def _column(columns: Mapping[str, Any], name: str, function: str, count: int) -> list:
    if name not in columns:
        available = ", ".join(sorted(columns)) or "none"
        raise KeyError(f"{function} reads the column {name!r}, which the data does not have (columns: {available})")
    values = list(columns[name])
    if len(values) != count:
        raise ValueError(f"{function}: column {name!r} has {len(values)} values for {count} completions")
    return values


# -------------------------------------------------------------------------------- exact match
_BOXED = re.compile(r"\\boxed\{")
_HASHES = re.compile(r"####\s*(.+)")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
EXTRACTIONS = ("auto", "boxed", "hashes", "last_number", "none")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                found = text[start:index]
                break
    return found


def extract_answer(text: str, method: str = "auto") -> str | None:
    """The answer a completion states, or None when it states none the method finds.

    "boxed": the last \\boxed{...} (MATH's convention); "hashes": what follows the last "####"
    (GSM8K's); "last_number": the last number in the text; "none": the whole text. "auto"
    tries boxed, hashes, "answer is x" / "answer: x", then the last number, then the text.
    """
    if method not in EXTRACTIONS:
        raise ValueError(f"unknown answer extraction {method!r}; accepted: {', '.join(EXTRACTIONS)}")
    if method == "none":
        return text.strip()
    if method in ("auto", "boxed"):
        boxed = _boxed(text)
        if boxed is not None or method == "boxed":
            return boxed
    if method in ("auto", "hashes"):
        hashes = _HASHES.findall(text)
        if hashes or method == "hashes":
            return hashes[-1].strip() if hashes else None
    if method == "auto":
        stated = _ANSWER_IS.findall(text)
        if stated:
            return stated[-1].strip().rstrip(".")
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return text.strip() if method == "auto" else None


def normalise_answer(answer: str) -> str:
    """Whitespace collapsed, case folded, a trailing full stop and surrounding $ dropped; a
    number written as its value ("1,000.0" -> "1000")."""
    text = " ".join(str(answer).split()).strip().strip("$").rstrip(".").casefold()
    number = text.replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return text
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def exact_match_reward(column: str = "answer", extract: str = "auto") -> RewardCallable:
    """1.0 where a completion's answer (`extract_answer` with `extract`) equals the record's
    `column` (both normalised, `normalise_answer`), or the whole completion does; else 0.0."""
    extract_answer("", extract)  # check the method now, not at the first step

    def exact_match(prompts, completions, **columns) -> list[float]:
        references = _column(columns, column, "exact_match", len(completions))
        scores = []
        for completion, reference in zip(completions, references):
            text = completion_text(completion)
            wanted = normalise_answer(str(reference))
            answer = extract_answer(text, extract)
            matched = normalise_answer(text) == wanted or (answer is not None and normalise_answer(answer) == wanted)
            scores.append(1.0 if matched else 0.0)
        return scores

    return exact_match


# ------------------------------------------------------------------------------------- format
def format_reward(
    pattern: str | None = None, *, json_object: bool = False, schema: Mapping | str | Path | None = None
) -> RewardCallable:
    """1.0 where a completion has the required form, else 0.0. Exactly one of:

    pattern: a regular expression the whole completion (surrounding whitespace stripped)
        must match (`re.fullmatch`, with DOTALL so `.` spans lines);
    json_object: the completion parses as JSON;
    schema: a JSON schema (a mapping, or the path of a JSON file) the parsed completion must
        satisfy (`jsonschema`, the schema's own draft).
    """
    chosen = [name for name, given in (("pattern", pattern), ("json", json_object), ("schema", schema)) if given]
    if len(chosen) != 1:
        raise ValueError(f"format_reward takes exactly one of pattern, json_object, schema; got {chosen or 'none'}")
    if pattern is not None:
        try:
            compiled = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ValueError(f"format pattern {pattern!r} is not a regular expression: {err}") from None

        def format_regex(prompts, completions, **columns) -> list[float]:
            return [1.0 if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

        return format_regex

    validator = None
    if schema is not None:
        import jsonschema

        if not isinstance(schema, Mapping):
            path = Path(schema)
            if not path.is_file():
                raise ValueError(f"JSON schema file {path} does not exist")
            try:
                schema = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"JSON schema file {path} is not valid JSON: {err}") from None
        try:
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
        except jsonschema.SchemaError as err:
            raise ValueError(f"not a valid JSON schema: {err.message}") from None
        validator = cls(schema)

    def format_json(prompts, completions, **columns) -> list[float]:
        scores = []
        for completion in completions:
            try:
                value = json.loads(completion_text(completion).strip())
            except (json.JSONDecodeError, ValueError):
                scores.append(0.0)
                continue
            scores.append(1.0 if validator is None or validator.is_valid(value) else 0.0)
        return scores

    format_json.__name__ = "format_schema" if validator is not None else "format_json"
    return format_json


# ------------------------------------------------------------------------------- reward model
def reward_model_reward(model, tokenizer, batch_size: int = 16, chat_template: str | None = None) -> RewardCallable:
    """The score of a reward model (`align.reward.RewardModel`, or the directory of one) for
    each prompt + completion, tokenized with the reward model's `tokenizer` (a genforge
    `Tokenizer`, or None to read the directory's). Chat prompts are rendered with its chat
    template, the completion as the assistant's turn."""
    from ..tokenizer import Tokenizer
    from .reward import RewardModel, score_sequences

    if isinstance(model, (str, Path)):
        directory = Path(model)
        model = RewardModel.from_pretrained(directory)
        tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_dir(directory)
    if not isinstance(model, RewardModel):
        raise TypeError(f"reward_model_reward needs a RewardModel or its directory, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("reward_model_reward needs the reward model's tokenizer")
    model.eval()

    def reward_model(prompts, completions, **columns) -> list[float]:
        sequences = []
        for prompt, completion in zip(prompts, completions):
            answer = completion_text(completion)
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt + answer)
            else:
                messages = list(prompt) + [{"role": "assistant", "content": answer}]
                ids = tokenizer.apply_chat_template(messages, tokenize=True, chat_template=chat_template)
            sequences.append(ids)
        return score_sequences(model, sequences, batch_size).tolist()

    return reward_model


# --------------------------------------------------------------------------------- unit tests
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def code_of(text: str) -> str:
    """The code of a completion: the first fenced ```python block when there is one, else the
    whole text."""
    fenced = _FENCE.search(text)
    return fenced.group(1) if fenced else text


def unit_test_reward(
    column: str = "tests",
    *,
    include_prompt: bool = False,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    workers: int = 1,
) -> RewardCallable:
    """1.0 where the completion's code (`code_of`), followed by the record's `column` (test
    code that raises or exits non-zero on failure), runs cleanly in the pass@k sandbox
    (`evaluate.code_eval`: a fresh isolated process per program with time, memory and network
    limits), else 0.0. include_prompt: the program is prompt + completion (HumanEval's layout,
    where the prompt holds the signature)."""
    from ..evaluate.code_eval import _check_sandbox_settings

    _check_sandbox_settings(timeout_s, memory_mb, workers, 2000)

    def unit_tests(prompts, completions, **columns) -> list[float]:
        from ..evaluate.code_eval import evaluate_code

        tests = _column(columns, column, "unit_tests", len(completions))
        candidates, checks = {}, {}
        for index, (prompt, completion, test) in enumerate(zip(prompts, completions, tests)):
            code = code_of(completion_text(completion))
            candidates[index] = [(prompt_text(prompt) + code) if include_prompt else code]
            checks[index] = str(test)
        result = evaluate_code(
            candidates, checks, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers, show_progress=False
        )
        return [1.0 if result.executions[index][0].passed else 0.0 for index in range(len(completions))]

    return unit_tests


# ------------------------------------------------------------------------------ command line
REWARD_SPECS = {
    "exact_match": "exact_match[:COLUMN]: 1 when the extracted answer equals the column (default 'answer')",
    "format": "format:json | format:schema:FILE | format:REGEX: 1 when the completion has that form",
    "reward_model": "reward_model:DIR: the score of a reward model directory (a ...ForSequenceClassification)",
    "unit_tests": "unit_tests[:COLUMN]: 1 when the code passes the column's tests (default 'tests') in the sandbox",
}
# A comma starts a new spec only before a spec name: a regular expression may hold commas.
_SPEC_NAMES = "|".join(REWARD_SPECS)
_SPEC_SPLIT = re.compile(rf",(?=\s*(?:{_SPEC_NAMES})(?::|,|$))")


def split_reward_specs(text: str) -> list[str]:
    """`exact_match:answer,format:^\\d+$` -> ["exact_match:answer", "format:^\\d+$"]."""
    return [part.strip() for part in _SPEC_SPLIT.split(text) if part.strip()]


def reward_from_spec(spec: str) -> RewardCallable:
    """A reward function from its command-line form (`REWARD_SPECS`)."""
    name, _, argument = spec.partition(":")
    name = name.strip()
    if name == "exact_match":
        return exact_match_reward(argument or "answer")
    if name == "format":
        if not argument:
            raise ValueError("format needs a form: format:json, format:schema:FILE or format:REGEX")
        if argument == "json":
            return format_reward(json_object=True)
        if argument.startswith("schema:"):
            return format_reward(schema=argument[len("schema:") :])
        return format_reward(argument)
    if name == "reward_model":
        if not argument:
            raise ValueError("reward_model needs a directory: reward_model:DIR")
        if not (Path(argument) / "config.json").is_file():
            raise ValueError(f"reward model {argument} is not a Hugging Face model directory (no config.json)")
        return reward_model_reward(argument, None)
    if name == "unit_tests":
        return unit_test_reward(argument or "tests")
    if argument:
        return _imported_reward(name, argument)
    accepted = "\n  ".join(REWARD_SPECS.values())
    raise ValueError(
        f"unknown reward {spec!r}; accepted:\n  {accepted}\n  package.module:function: your own reward function"
    )


def _imported_reward(module_name: str, attribute: str) -> RewardCallable:
    """`package.module:function`: a reward function of the user's own."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {module_name}:{attribute}: cannot import module {module_name!r} ({err})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"reward {module_name}:{attribute}: module {module_name!r} has no callable {attribute!r}")
    return function


__all__ = [
    "EXTRACTIONS",
    "REWARD_SPECS",
    "code_of",
    "completion_text",
    "exact_match_reward",
    "extract_answer",
    "format_reward",
    "normalise_answer",
    "prompt_text",
    "reward_from_spec",
    "reward_model_reward",
    "split_reward_specs",
    "unit_test_reward",
]
