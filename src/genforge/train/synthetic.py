"""Synthetic instruction data: self-instruct (Wang et al. 2023, "Self-Instruct: Aligning
Language Models with Self-Generated Instructions").

From a small pool of human-written seed tasks, a generator model is shown a few tasks at a time
(seeds and, as the pool grows, its own earlier ones) and asked for a new one; each candidate is
filtered for quality, dropped when it nearly repeats a task already in the pool (MinHash over
word shingles, `prepare.NearDuplicateIndex`, where the paper used ROUGE-L), then answered by the
same model. The output is Alpaca-style JSONL (`instruction`, `input`, `output`) that
`genforge finetune` reads, with a report of what was filtered and how diverse the result is.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..chat_models import ChatModel
from .data import DataError
from .prepare import DedupSettings, NearDuplicateIndex

# Tasks a text model cannot do: the paper drops instructions that mention them.
UNSUITABLE = re.compile(r"\b(image|picture|photo|graph|diagram|video|audio|draw|plot|file)s?\b", re.IGNORECASE)


@dataclass(frozen=True)
class Task:
    instruction: str
    input: str = ""
    output: str = ""


@dataclass
class SelfInstructSettings:
    num_tasks: int = 100  # new tasks to produce
    examples_per_prompt: int = 6  # in-context tasks shown per request
    seed_share: float = 0.75  # share of those drawn from the seeds (the rest from generated tasks)
    min_words: int = 3
    max_words: int = 150
    near_duplicate: float = 0.7  # estimated Jaccard at which a candidate repeats a pool task
    max_requests: int | None = None  # stop after this many generator calls (default 4 x num_tasks)
    temperature: float = 1.0
    max_tokens: int = 256  # per generated task and per answer
    seed: int = 0

    def validate(self) -> None:
        if self.num_tasks < 1 or self.examples_per_prompt < 1:
            raise DataError("num_tasks and examples_per_prompt must be positive")
        if not 0.0 <= self.seed_share <= 1.0 or not 0.0 < self.near_duplicate <= 1.0:
            raise DataError("seed_share must be in [0, 1] and near_duplicate in (0, 1]")
        if not 0 < self.min_words <= self.max_words:
            raise DataError("need 0 < min_words <= max_words")


@dataclass
class SelfInstructReport:
    generated: int
    requests: int
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    diversity: dict[str, float] = field(default_factory=dict)
    top_first_words: list[tuple[str, int]] = field(default_factory=list)


def read_seed_tasks(path: str | Path) -> list[Task]:
    """Seed tasks from JSONL: `instruction` (required), `input` and `output` (optional)."""
    tasks = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not str(record.get("instruction", "")).strip():
            raise DataError(f"{path}:{number}: each seed task needs a non-empty 'instruction'")
        tasks.append(
            Task(str(record["instruction"]).strip(), str(record.get("input", "")), str(record.get("output", "")))
        )
    if not tasks:
        raise DataError(f"{path} holds no seed tasks")
    return tasks


def _task_prompt(examples: Sequence[Task]) -> str:
    lines = ["Come up with a new, different task for an assistant. Here are some tasks:", ""]
    for number, task in enumerate(examples, 1):
        lines.append(f"Task {number}: {task.instruction}")
        if task.input:
            lines.append(f"Input {number}: {task.input}")
    lines += [
        "",
        f"Write Task {len(examples) + 1} on one line as 'Task {len(examples) + 1}: ...', and an "
        f"'Input {len(examples) + 1}: ...' line only if the task needs an input.",
    ]
    return "\n".join(lines)


def parse_task(reply: str, number: int) -> Task | None:
    """The task and optional input a reply proposes, or None when it proposes none."""
    instruction = re.search(rf"Task {number}\s*:\s*(.+)", reply)
    if instruction is None:
        return None
    given = re.search(rf"Input {number}\s*:\s*(.+)", reply)
    text = given.group(1).strip() if given else ""
    return Task(instruction.group(1).strip(), "" if text.lower() in ("", "none", "n/a", "<noinput>") else text)


def quality_problem(task: Task, settings: SelfInstructSettings) -> str | None:
    """Why a candidate instruction is unusable (the paper's heuristics), or None."""
    words = task.instruction.split()
    if len(words) < settings.min_words:
        return "too_short"
    if len(words) > settings.max_words:
        return "too_long"
    if UNSUITABLE.search(task.instruction):
        return "needs_non_text"
    if not task.instruction[0].isalnum():
        return "starts_with_punctuation"
    if not task.instruction.isascii():
        return "non_ascii"
    return None


def self_instruct(
    generator: ChatModel,
    seeds: Sequence[Task],
    settings: SelfInstructSettings,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Task], SelfInstructReport]:
    """Grow `settings.num_tasks` new tasks (with answers) from `seeds`; see the module doc."""
    settings.validate()
    if not seeds:
        raise DataError("self-instruct needs at least one seed task")
    rng = random.Random(settings.seed)
    index = NearDuplicateIndex(DedupSettings(threshold=settings.near_duplicate, shingle_size=2))
    for number, task in enumerate(seeds):
        index.check_and_add(f"seed-{number}", _words(task.instruction))
    generated: list[Task] = []
    rejected: Counter = Counter()
    budget = settings.max_requests or 4 * settings.num_tasks
    requests = 0
    while len(generated) < settings.num_tasks and requests < budget:
        from_generated = min(len(generated), round(settings.examples_per_prompt * (1 - settings.seed_share)))
        examples = rng.sample(list(seeds), min(len(seeds), settings.examples_per_prompt - from_generated))
        examples += rng.sample(generated, from_generated)
        rng.shuffle(examples)
        requests += 1
        reply = generator.chat(
            [{"role": "user", "content": _task_prompt(examples)}],
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
            seed=settings.seed + requests,
        ).content
        candidate = parse_task(reply, len(examples) + 1)
        if candidate is None:
            rejected["unparsed"] += 1
            continue
        problem = quality_problem(candidate, settings)
        if problem is None and index.check_and_add(f"task-{requests}", _words(candidate.instruction)) is not None:
            problem = "near_duplicate"
        if problem:
            rejected[problem] += 1
            continue
        question = candidate.instruction + (f"\n\n{candidate.input}" if candidate.input else "")
        answer = generator.chat(
            [{"role": "user", "content": question}], temperature=0.0, max_tokens=settings.max_tokens
        ).content.strip()
        if not answer:
            rejected["empty_output"] += 1
            continue
        generated.append(Task(candidate.instruction, candidate.input, answer))
        if progress:
            progress(len(generated), settings.num_tasks)
    return generated, _report(generated, requests, rejected)


def _words(text: str) -> str:
    """Lower-cased words without punctuation, so "happy." and "happy, please" share a word."""
    return re.sub(r"[^\w\s]", " ", text.lower())


def _report(tasks: Sequence[Task], requests: int, rejected: Counter) -> SelfInstructReport:
    from ..evaluate.metrics import distinct_n

    instructions = [task.instruction for task in tasks]
    diversity = {}
    if instructions:
        diversity = distinct_n(instructions, orders=(1, 2), lowercase=True).details
        diversity["unique_first_words"] = len({text.split()[0].lower() for text in instructions})
    first_words = Counter(text.split()[0].lower() for text in instructions).most_common(10)
    return SelfInstructReport(len(tasks), requests, dict(rejected), diversity, first_words)


def write_tasks(tasks: Sequence[Task], report: SelfInstructReport, path: str | Path) -> Path:
    """Alpaca-format JSONL at `path` and the report beside it (`<path>.report.json`), atomically."""
    path = Path(path)
    lines = [json.dumps(asdict(task), ensure_ascii=False) for task in tasks]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    atomic_write_text(path.with_name(path.name + ".report.json"), json.dumps(asdict(report), indent=2) + "\n")
    return path
