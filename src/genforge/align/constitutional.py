"""Constitutional AI's critique -> revise loop (Bai et al. 2022, "Constitutional AI:
Harmlessness from AI Feedback", the supervised stage): preference pairs from written principles.

A model answers a prompt; then, for each step, it is shown its answer with a principle's
critique request and writes a critique, and is shown that critique with the principle's
revision request and rewrites its answer. The answer after the last step is preferred to the
first one: each prompt gives one (revised > original) pair in the preference trainer's JSONL
format (`align.data`), the prompt as chat messages:

    {"prompt": [{"role": "user", "content": ...}], "chosen": <revised>, "rejected": <original>,
     "principle": [<name of each step's principle>], "critique": [<each step's critique>],
     "revisions": [<each step's answer>]}

- Principles come from a file (`load_principles`): a JSON or YAML list of
  {name, critique_request, revision_request}, or plain text with one principle per line (the
  requests are then phrased around the line).
- Steps: `rounds` rounds; in each, one principle drawn at random (selection="sample", as the
  paper draws one per revision) or every principle in file order (selection="all").
- The model is any `ChatModel` (`genforge.chat_models`): a local genforge model or an
  OpenAI-compatible endpoint. The conversation of one prompt grows turn by turn, so the model
  sees its own answer, the request and its critique, as in the paper's prompts.
- A prompt whose final answer is the original (whitespace aside) or is empty gives no pair and
  is counted; the file is written atomically once every prompt is done.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..jsonl import json_objects

SELECTIONS = ("sample", "all")
PRINCIPLE_FIELDS = ("name", "critique_request", "revision_request")


class ConstitutionError(ValueError):
    """A principles file, prompts file or critique run that cannot be used as given."""


@dataclass(frozen=True)
class Principle:
    """One written principle: what the model is asked to criticise, and how to revise."""

    name: str
    critique_request: str
    revision_request: str


def principles_from_lines(text: str, where: str = "principles") -> list[Principle]:
    """Plain-text principles, one a line (blank lines and lines starting with '#' skipped). Each
    line becomes a critique request and a revision request phrased around it."""
    principles = []
    for number, line in enumerate(text.splitlines(), start=1):
        statement = line.strip()
        if not statement or statement.startswith("#"):
            continue
        principles.append(
            Principle(
                name=f"line-{number}",
                critique_request=(
                    f"Identify specific ways in which your last response does not follow this principle: {statement}"
                ),
                revision_request=(
                    f"Rewrite your last response so that it follows this principle: {statement}\n"
                    "Reply with the rewritten response only."
                ),
            )
        )
    if not principles:
        raise ConstitutionError(f"{where}: holds no principles (every line is blank or a '#' comment)")
    return principles


def principles_from_records(records: Any, where: str = "principles") -> list[Principle]:
    """Principles from a parsed JSON/YAML list of {name, critique_request, revision_request}."""
    if not isinstance(records, list) or not records:
        raise ConstitutionError(
            f"{where}: must be a non-empty list of {{name, critique_request, revision_request}} objects, "
            f"got {type(records).__name__ if records else 'nothing'}"
        )
    principles, names = [], set()
    for index, record in enumerate(records):
        place = f"{where}: principle {index}"
        if not isinstance(record, Mapping):
            raise ConstitutionError(f"{place} is a {type(record).__name__}; expected an object with {PRINCIPLE_FIELDS}")
        unknown = sorted(set(record) - set(PRINCIPLE_FIELDS))
        missing = [key for key in PRINCIPLE_FIELDS if key not in record]
        if unknown or missing:
            raise ConstitutionError(
                f"{place}: fields must be exactly {PRINCIPLE_FIELDS}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else "")
            )
        for key in PRINCIPLE_FIELDS:
            if not isinstance(record[key], str) or not record[key].strip():
                raise ConstitutionError(f"{place}: {key!r} must be a non-empty string, got {record[key]!r:.60}")
        if record["name"] in names:
            raise ConstitutionError(f"{place}: the name {record['name']!r} is used twice; names must be unique")
        names.add(record["name"])
        principles.append(Principle(record["name"], record["critique_request"], record["revision_request"]))
    return principles


def load_principles(path: str | os.PathLike) -> list[Principle]:
    """Principles from a file: `.json`, `.yaml`/`.yml` (a list of {name, critique_request,
    revision_request}) or anything else as plain text, one principle a line."""
    path = Path(path)
    if not path.is_file():
        raise ConstitutionError(f"principles file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConstitutionError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
        return principles_from_records(records, str(path))
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            records = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConstitutionError(f"{path} is not valid YAML ({err})") from None
        return principles_from_records(records, str(path))
    return principles_from_lines(text, str(path))


def _user_prompt(value: Any, where: str) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user message; a list of messages must end with
    a user message (the turn the model answers)."""
    if isinstance(value, str):
        if not value.strip():
            raise ConstitutionError(f"{where}: the prompt is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ConstitutionError(f"{where}: a prompt must be a string or a non-empty list of messages")
    messages = []
    for index, message in enumerate(value):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ConstitutionError(f"{where}: message {index} needs a string 'role' and a string 'content'")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise ConstitutionError(f"{where}: the last message must be the user's (the turn to answer)")
    return messages


def load_prompts(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Prompts as conversations: a `.jsonl` file of {"prompt": str or [messages]} (or
    {"messages": [...]}) objects, or plain text with one prompt a line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ConstitutionError(f"prompts file {path} does not exist")
    prompts = []
    with open(path, encoding="utf-8") as handle:
        if path.suffix.lower() == ".jsonl":
            for line, record in json_objects(handle, str(path), ConstitutionError):
                key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
                if key is None:
                    raise ConstitutionError(
                        f"{path}:{line}: needs a 'prompt' (or 'messages') field; has {sorted(record)}"
                    )
                prompts.append(_user_prompt(record[key], f"{path}:{line}"))
        else:
            prompts = [_user_prompt(line.strip(), str(path)) for line in handle if line.strip()]
    if not prompts:
        raise ConstitutionError(f"{path}: holds no prompts")
    return prompts


@dataclass
class CritiqueSettings:
    """How the loop runs. max_tokens bounds each reply (answer, critique, revision);
    temperature 0 is greedy; seed fixes the principles drawn and the sampled replies."""

    rounds: int = 1
    selection: str = "sample"
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0

    def check(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConstitutionError(f"rounds must be a positive integer, got {self.rounds!r}")
        if self.selection not in SELECTIONS:
            raise ConstitutionError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConstitutionError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ConstitutionError(f"temperature must be >= 0, got {self.temperature!r}")


@dataclass
class RevisionStep:
    principle: str
    critique: str
    revision: str


@dataclass
class CritiqueOutcome:
    """One prompt's run: its first answer and each step; `pair` is its preference record, or None
    with `skipped` saying why ("unchanged" or "empty")."""

    prompt: list[dict[str, str]]
    original: str
    steps: list[RevisionStep] = field(default_factory=list)
    skipped: str | None = None

    @property
    def revised(self) -> str:
        return self.steps[-1].revision if self.steps else self.original

    def pair(self) -> dict[str, Any] | None:
        if self.skipped is not None:
            return None
        return {
            "prompt": self.prompt,
            "chosen": self.revised,
            "rejected": self.original,
            "principle": [step.principle for step in self.steps],
            "critique": [step.critique for step in self.steps],
            "revisions": [step.revision for step in self.steps],
        }


def _steps(principles: Sequence[Principle], settings: CritiqueSettings, rng: random.Random) -> list[Principle]:
    if settings.selection == "all":
        return [principle for _ in range(settings.rounds) for principle in principles]
    return [rng.choice(principles) for _ in range(settings.rounds)]


def critique_and_revise(
    model, prompt: Sequence[Mapping[str, str]], principles: Sequence[Principle], settings: CritiqueSettings, rng
) -> CritiqueOutcome:
    """Run the loop on one prompt (chat messages ending with the user's turn) with `model`, a
    `ChatModel`. `rng` (a `random.Random`) draws the principles and the replies' seeds."""
    prompt = [dict(message) for message in prompt]

    def reply(conversation: list[dict[str, str]]) -> str:
        seed = rng.randrange(2**31) if settings.temperature > 0 else None
        return model.chat(
            conversation, max_tokens=settings.max_tokens, temperature=settings.temperature, seed=seed
        ).content

    original = reply(prompt)
    outcome = CritiqueOutcome(prompt=prompt, original=original)
    if not original.strip():
        outcome.skipped = "empty"
        return outcome
    current = original
    for principle in _steps(principles, settings, rng):
        conversation = prompt + [
            {"role": "assistant", "content": current},
            {"role": "user", "content": principle.critique_request},
        ]
        critique = reply(conversation)
        conversation += [
            {"role": "assistant", "content": critique},
            {"role": "user", "content": principle.revision_request},
        ]
        current = reply(conversation)
        outcome.steps.append(RevisionStep(principle.name, critique, current))
        if not current.strip():  # nothing left to critique, and an empty answer cannot be preferred
            outcome.skipped = "empty"
            return outcome
    if current.strip() == original.strip():
        outcome.skipped = "unchanged"
    return outcome


@dataclass
class CritiqueResult:
    """What a run wrote: pairs, and the prompts that gave none and why."""

    path: Path
    prompts: int
    pairs: int
    skipped_unchanged: int
    skipped_empty: int
    steps_per_prompt: int

    def to_json(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


def constitutional_pairs(
    model,
    prompts: Sequence[Sequence[Mapping[str, str]] | str],
    principles: Sequence[Principle],
    out: str | os.PathLike,
    settings: CritiqueSettings | None = None,
    progress: bool = False,
) -> CritiqueResult:
    """Critique and revise every prompt (a string or chat messages) with `model` under
    `principles`, and write the (revised > original) pairs to `out` as JSONL, atomically.
    Everything is checked before the first reply is asked for."""
    settings = settings or CritiqueSettings()
    settings.check()
    if not principles:
        raise ConstitutionError("no principles given; a critique needs at least one")
    if not all(isinstance(principle, Principle) for principle in principles):
        raise ConstitutionError("principles must be Principle objects (see load_principles)")
    conversations = [_user_prompt(p, f"prompt {index}") for index, p in enumerate(prompts)]
    if not conversations:
        raise ConstitutionError("no prompts given")
    if not callable(getattr(model, "chat", None)):
        raise ConstitutionError(f"the model must be a ChatModel (with .chat); got {type(model).__name__}")
    rng = random.Random(settings.seed)
    records, skipped = [], {"unchanged": 0, "empty": 0}
    for conversation in _progress(conversations, progress):
        outcome = critique_and_revise(model, conversation, principles, settings, rng)
        if outcome.skipped is not None:
            skipped[outcome.skipped] += 1
        else:
            records.append(outcome.pair())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return CritiqueResult(
        path=out,
        prompts=len(conversations),
        pairs=len(records),
        skipped_unchanged=skipped["unchanged"],
        skipped_empty=skipped["empty"],
        steps_per_prompt=settings.rounds * (len(principles) if settings.selection == "all" else 1),
    )


def _progress(items: list, show: bool):
    if not show:
        yield from items
        return
    from rich.progress import track

    from ..console import console

    yield from track(items, description="critique and revise", console=console, transient=True)


# -------------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `genforge align critique`."""
    parser.add_argument(
        "--principles",
        required=True,
        help="JSON/YAML list of {name, critique_request, revision_request}, or plain text with one principle a line",
    )
    parser.add_argument("--prompts", required=True, help="JSONL of {'prompt': text or messages}, or one prompt a line")
    parser.add_argument("--out", required=True, help="where to write the preference pairs (JSONL)")
    source = parser.add_argument_group("the model (one of)")
    source.add_argument("--model", help="a local model directory (it needs a chat template)")
    source.add_argument("--endpoint", help="base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1")
    source.add_argument("--endpoint-model", help="the model name the endpoint serves")
    source.add_argument("--api-key", help="the endpoint's API key (default: $OPENAI_API_KEY)")
    source.add_argument("--device", default="cpu", help="device of a local model (default cpu)")
    loop = parser.add_argument_group("the loop")
    loop.add_argument("--rounds", type=int, default=1, help="critique-revise rounds per prompt (default 1)")
    loop.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="sample",
        help="per round: one principle drawn at random (sample, default) or every principle in turn (all)",
    )
    loop.add_argument("--max-tokens", type=int, default=256, help="longest answer, critique or revision (default 256)")
    loop.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    loop.add_argument("--seed", type=int, default=0, help="seeds the principles drawn and the sampled replies")


def run(args: argparse.Namespace) -> int:
    """`genforge align critique`: check the files and flags, build the model, write the pairs,
    print the summary as JSON on stdout."""
    from ..chat_models import EndpointChatModel, LocalChatModel
    from ..console import console

    if (args.model is None) == (args.endpoint is None):
        raise ConstitutionError("give exactly one model: --model DIR, or --endpoint URL with --endpoint-model NAME")
    if args.endpoint is not None and not args.endpoint_model:
        raise ConstitutionError("--endpoint needs --endpoint-model, the name of the model it serves")
    if args.model is not None and args.endpoint_model:
        raise ConstitutionError("--endpoint-model goes with --endpoint, not with --model")
    settings = CritiqueSettings(args.rounds, args.selection, args.max_tokens, args.temperature, args.seed)
    settings.check()
    principles = load_principles(args.principles)
    prompts = load_prompts(args.prompts)
    if args.model is not None:
        model = LocalChatModel(args.model, device=args.device)
        if not getattr(model.tokenizer, "chat_template", None):
            raise ConstitutionError(
                f"{args.model} has no chat template; critique and revision are turns of a conversation, so the "
                "model needs one (an instruction-tuned model)"
            )
    else:
        model = EndpointChatModel(
            args.endpoint_model, base_url=args.endpoint, api_key=args.api_key or os.environ.get("OPENAI_API_KEY")
        )
    result = constitutional_pairs(model, prompts, principles, args.out, settings, progress=True)
    console.print(
        f"critique: {result.pairs} pairs from {result.prompts} prompts ({result.steps_per_prompt} revision step(s) "
        f"each; skipped {result.skipped_unchanged} unchanged, {result.skipped_empty} empty); wrote {result.path}"
    )
    print(json.dumps(result.to_json()))
    return 0


__all__ = [
    "PRINCIPLE_FIELDS",
    "SELECTIONS",
    "ConstitutionError",
    "CritiqueOutcome",
    "CritiqueResult",
    "CritiqueSettings",
    "Principle",
    "RevisionStep",
    "add_arguments",
    "constitutional_pairs",
    "critique_and_revise",
    "load_principles",
    "load_prompts",
    "principles_from_lines",
    "principles_from_records",
    "run",
]
