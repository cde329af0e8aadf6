"""An embedded alignment task with a verifiable answer: multi-digit addition.

A prompt is "012+345=" and the answer is the sum written one column wider, "0357", so a
checker, not a judge, says which completion is right (the kind of reward GRPO's verifiable-
reward training uses, Shao et al. 2024, "DeepSeekMath"). Nothing is downloaded:

- `addition_tokenizer`: one token per character (the ten digits, "+", "="), built with the
  `tokenizers` library as a WordLevel model, with <bos>, <eos>, <pad> and <unk>. A prompt is
  encoded with <bos> in front; a completion ends with <eos>.
- `AdditionTask`: operands drawn uniformly below 10**digits; whether a problem is held out,
  dev or training is a keyed hash of (seed, a, b), so training problems never meet held-out
  ones, however many are drawn, and every split is the same on every machine.
- `pretrain_addition`: a small Llama-style decoder trained from scratch to add (the loss on
  the answer tokens only, examples packed into rows: `finetune.sft.SFTRows` over
  `genforge.train.Trainer`), then briefly on sums written by a buggy adder that loses the
  carry out of the top column ("overflow"), so that its greedy answers are right on the sums
  that do not overflow and mostly wrong on those that do: a systematic flaw, with room for
  alignment to fix it (see `PretrainSettings`). Saved as a Hugging Face model directory.
- `exact_match_reward(prompts, completions)`: 1.0 where the completion is the sum, else 0.0, a
  plain callable in the form GRPO reward functions take.
- `exact_match_accuracy` (greedy) and `held_out_kl`: the mean per-token KL of a policy to its
  reference on the policy's own samples of held-out prompts, computed exactly over the
  vocabulary (16 entries here) rather than estimated (k1/k3) from the sampled token alone.
- `dpo_on_addition`: DPO on (correct > incorrect) pairs built from the base's own samples of
  training problems (`preference_pairs_from_samples`), trained by `align.preference`, and its
  `AlignmentReport` (held-out accuracy before and after, the KL).
- `grpo_on_addition`: GRPO from the same base with `exact_match_reward` (`align.grpo`),
  reported through the same `evaluate_alignment`.
"""

from __future__ import annotations

import json
import math
import random
import re
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..tokenizer import Tokenizer

ADDITION_CHARACTERS = "0123456789+="
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
TASK_RECORD = "addition_task.json"
SPLITS = ("train", "dev", "held_out")
# Where a pair's chosen answer comes from: the correct sum for every prompt with a wrong sample
# ("answer"), or only prompts where the model itself sampled the correct sum ("sample", on-policy).
CHOSEN_SOURCES = ("answer", "sample")
_PROMPT = re.compile(r"\s*(\d+)\+(\d+)=\s*")


class AdditionTaskError(ValueError):
    """Bad input to the addition task (a prompt that is not "a+b=", impossible sizes)."""


# -------------------------------------------------------------------------------- the tokenizer
def addition_tokenizer() -> Tokenizer:
    """A character-level tokenizer for the task: ids 0-3 are <pad>, <bos>, <eos>, <unk>, then one
    id per character of `ADDITION_CHARACTERS`. Anything else is <unk>."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors

    names = [SPECIAL_TOKENS[key] for key in ("pad_token", "bos_token", "eos_token", "unk_token")]
    vocabulary = {token: index for index, token in enumerate(names + list(ADDITION_CHARACTERS))}
    backend = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Every character its own word; the decoder joins them back without spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocabulary[bos])])
    return Tokenizer(backend, dict(SPECIAL_TOKENS))


# ------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class AdditionProblem:
    """a + b written in columns: both operands zero-padded to `digits`, the answer to
    `digits + 1` (its first digit is the carry out of the top column), so "012+345=" is answered
    "0357". Fixed columns let each answer digit be read from fixed positions."""

    a: int
    b: int
    digits: int

    def __post_init__(self) -> None:
        if not (0 <= self.a < 10**self.digits and 0 <= self.b < 10**self.digits):
            raise AdditionTaskError(f"operands {self.a} and {self.b} do not fit in {self.digits} digits")

    @property
    def prompt(self) -> str:
        return f"{self.a:0{self.digits}d}+{self.b:0{self.digits}d}="

    @property
    def answer(self) -> str:
        return f"{self.a + self.b:0{self.digits + 1}d}"

    @property
    def overflowed_answer(self) -> str:
        """The sum as an adder with a `digits`-wide register writes it: the carry out of the top
        column lost (057+068 -> "0025", not "0125"). The same as `answer` when nothing overflows."""
        return f"{(self.a + self.b) % 10**self.digits:0{self.digits + 1}d}"

    @property
    def overflows(self) -> bool:
        return self.a + self.b >= 10**self.digits


def parse_prompt(prompt: str, where: str = "prompt") -> AdditionProblem:
    """The problem a prompt "a+b=" asks, its operands of one width (surrounding whitespace
    allowed)."""
    if not isinstance(prompt, str):
        raise AdditionTaskError(f"{where}: a prompt must be a string like '012+345=', got {type(prompt).__name__}")
    match = _PROMPT.fullmatch(prompt)
    if match is None or len(match.group(1)) != len(match.group(2)):
        raise AdditionTaskError(
            f"{where}: {prompt!r} is not an addition prompt; expected 'a+b=' with operands of one width, "
            "like '012+345='"
        )
    return AdditionProblem(int(match.group(1)), int(match.group(2)), len(match.group(1)))


@dataclass(frozen=True)
class AdditionTask:
    """Sums of two operands drawn uniformly from [0, 10**digits).

    held_out_percent: the share of all (a, b) problems that are held out (and again that are the
    dev split), chosen by a CRC32 of (seed, a, b): membership does not depend on how many
    problems are drawn or in what order.
    """

    digits: int = 3
    seed: int = 0
    held_out_percent: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not 1 <= self.digits <= 9:
            raise AdditionTaskError(f"digits must be an integer in [1, 9], got {self.digits!r}")
        if not 0 < self.held_out_percent < 50:
            raise AdditionTaskError(f"held_out_percent must be in (0, 50), got {self.held_out_percent!r}")

    @property
    def max_answer_tokens(self) -> int:
        """The longest answer (digits + 1, a carry out of the top digit) and its <eos>."""
        return self.digits + 2

    def split_of(self, problem: AdditionProblem) -> str:
        """The split of `problem`, "held_out", "dev" or "train", by a CRC32 of (seed, a, b): held_out_percent of all
        problems are held out (measured once, at the end), as many again are the dev split
        (watched while pretraining), the rest train."""
        bucket = zlib.crc32(f"{self.seed}:{problem.a}+{problem.b}".encode()) % 100
        if bucket < self.held_out_percent:
            return "held_out"
        return "dev" if bucket < 2 * self.held_out_percent else "train"

    def problems_in(self, split: str) -> int:
        """About how many problems `split` holds."""
        share = 100 - 2 * self.held_out_percent if split == "train" else self.held_out_percent
        return 10 ** (2 * self.digits) * share // 100

    def problems(self, split: str, count: int, stream: int = 0) -> list[AdditionProblem]:
        """`count` distinct problems of `split` ("train", "dev" or "held_out"), the same for the
        same (task, split, count, stream); another `stream` draws another sample of the split."""
        if split not in SPLITS:
            raise AdditionTaskError(f"split must be one of {SPLITS}, got {split!r}")
        available = self.problems_in(split)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= available // 2:
            raise AdditionTaskError(
                f"count must be a positive integer up to half the {split} split ({available // 2} problems with "
                f"{self.digits} digits), got {count!r}"
            )
        rng = random.Random(f"addition:{self.seed}:{split}:{stream}")
        chosen, seen = [], set()
        limit = 10**self.digits
        while len(chosen) < count:
            problem = AdditionProblem(rng.randrange(limit), rng.randrange(limit), self.digits)
            if problem not in seen and self.split_of(problem) == split:
                seen.add(problem)
                chosen.append(problem)
        return chosen

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------- the reward
def _completion_text(completion: Any, where: str) -> str:
    """A completion as text: a string, or (TRL's conversational form) a list of messages whose
    last one is the answer."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise AdditionTaskError(
        f"{where}: a completion must be a string or a list of messages ending in one with string 'content', "
        f"got {completion!r:.80}"
    )


def exact_match_reward(prompts: Sequence[Any], completions: Sequence[Any], **_columns: Any) -> list[float]:
    """1.0 for each completion that is exactly the sum its prompt "a+b=" asks for (whitespace
    around it ignored, so "357\\n" counts), else 0.0. Extra keyword arguments (the dataset
    columns TRL passes to reward functions) are accepted and ignored. A prompt may be a string or
    a list of messages whose last one holds "a+b="."""
    if len(prompts) != len(completions):
        raise AdditionTaskError(f"got {len(prompts)} prompts but {len(completions)} completions; one each")
    rewards = []
    for number, (prompt, completion) in enumerate(zip(prompts, completions)):
        where = f"sample {number}"
        problem = parse_prompt(_completion_text(prompt, where), where)
        rewards.append(1.0 if _completion_text(completion, where).strip() == problem.answer else 0.0)
    return rewards


# --------------------------------------------------------------------------------- pretraining
@dataclass
class PretrainSettings:
    """The base model and its two training phases.

    1. `steps` steps on correct sums of `train_problems` training problems: the model learns to
       add (small transformers do so in a sudden jump after a plateau).
    2. `imitation_steps` steps at `imitation_lr` on the same problems as written by a buggy adder
       whose register is `digits` wide: in `overflow_rate` of the examples whose sum overflows,
       the carry out of the top column is lost ("057+068=" -> "0025"). The model imitates the
       mixture, so where a sum overflows it mostly writes the overflowed answer: its held-out
       accuracy falls to about the share of sums that do not overflow (about half), a
       systematic flaw that its own samples show and a checker catches.

    Stopping phase 1 early instead (on the way up the jump) also gives a partial accuracy, but a
    fragile one: DPO and SFT steps on such a model moved it more by noise than by signal, and
    its held-out accuracy fell (measured; see docs/alignment.md).
    """

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    train_problems: int = 4000
    steps: int = 300
    batch_size: int = 32
    seq_len: int = 64
    lr: float = 1e-2
    imitation_steps: int = 40
    imitation_lr: float = 1e-3
    overflow_rate: float = 0.7
    seed: int = 0

    def check(self, task: AdditionTask) -> None:
        for name in ("hidden", "layers", "heads", "train_problems", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdditionTaskError(f"{name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.imitation_steps, bool)
            or not isinstance(self.imitation_steps, int)
            or self.imitation_steps < 0
        ):
            raise AdditionTaskError(f"imitation_steps must be an integer >= 0, got {self.imitation_steps!r}")
        longest = 2 * task.digits + 3 + task.max_answer_tokens  # <bos>a+b= then the answer and <eos>
        if self.seq_len < longest:
            raise AdditionTaskError(
                f"seq_len {self.seq_len} is shorter than one {task.digits}-digit example ({longest})"
            )
        if not 0 <= self.overflow_rate <= 1:
            raise AdditionTaskError(f"overflow_rate must be in [0, 1], got {self.overflow_rate!r}")


def _model_config(tokenizer: Tokenizer, settings: PretrainSettings):
    from ..config import Config

    return Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=settings.hidden,
        num_layers=settings.layers,
        num_heads=settings.heads,
        num_kv_heads=settings.heads,
        intermediate_size=4 * settings.hidden,
        max_position_embeddings=settings.seq_len,
        # Untied: with a tied embedding the model learnt the task markedly slower (measured: 5% vs
        # 76% held-out accuracy after 320 steps, 2 digits).
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _train_phase(model, tokenizer: Tokenizer, records, settings: PretrainSettings, steps: int, lr: float) -> float:
    """`steps` steps of answer-only cross-entropy on (prompt, answer) records, examples packed
    into rows, with the training loop of `genforge.train`. Returns the last step's loss."""
    from ..finetune.sft import SFTRows, tokenize_prompt_completion
    from ..train.trainer import TrainConfig, Trainer

    examples = [tokenize_prompt_completion(tokenizer, prompt, answer, where=prompt) for prompt, answer in records]
    rows = SFTRows(examples, settings.seq_len, tokenizer.pad_token_id, packing=True)
    with tempfile.TemporaryDirectory(prefix="addition-pretrain-") as scratch:
        config = TrainConfig(
            out_dir=Path(scratch),
            max_steps=steps,
            batch_size=settings.batch_size,
            lr=lr,
            warmup_steps=max(1, steps // 20),
            seed=settings.seed,
            progress=False,
            export=False,
        )
        result = Trainer(model, rows, config).train()
    return result.losses[-1][1]


def pretrain_addition(
    directory: str | Path, task: AdditionTask | None = None, settings: PretrainSettings | None = None
) -> dict:
    """Train a decoder from scratch on `task` in the two phases of `PretrainSettings` and save it
    with its tokenizer to `directory` (a Hugging Face model directory), with
    `addition_task.json`: the task, the settings, the losses, the dev accuracy after each phase
    and the time. Returns that record."""
    from ..checkpoint import save_model
    from ..model import Transformer

    task = task or AdditionTask()
    settings = settings or PretrainSettings()
    settings.check(task)
    started = time.perf_counter()
    tokenizer = addition_tokenizer()
    problems = task.problems("train", settings.train_problems)
    dev = task.problems("dev", min(300, task.problems_in("dev") // 2))
    torch.manual_seed(settings.seed)
    model = Transformer(_model_config(tokenizer, settings))
    record: dict[str, Any] = {"task": task.to_json(), "settings": asdict(settings)}
    record["parameters"] = model.config.num_parameters()
    record["pretrain_loss"] = _train_phase(
        model, tokenizer, [(p.prompt, p.answer) for p in problems], settings, settings.steps, settings.lr
    )
    record["dev_accuracy_pretrained"] = exact_match_accuracy(model, tokenizer, dev)
    if settings.imitation_steps:
        buggy = random.Random(f"overflow:{settings.seed}")
        written = [
            (p.prompt, p.overflowed_answer if p.overflows and buggy.random() < settings.overflow_rate else p.answer)
            for p in problems
        ]
        record["imitation_loss"] = _train_phase(
            model, tokenizer, written, settings, settings.imitation_steps, settings.imitation_lr
        )
        record["dev_accuracy"] = exact_match_accuracy(model, tokenizer, dev)
    else:
        record["dev_accuracy"] = record["dev_accuracy_pretrained"]
    model.eval()
    save_model(model, directory, tokenizer)
    record["seconds"] = time.perf_counter() - started
    atomic_write_text(Path(directory) / TASK_RECORD, json.dumps(record, indent=2))
    return record


def read_task(directory: str | Path) -> AdditionTask:
    """The task a base made by `pretrain_addition` was trained on."""
    path = Path(directory) / TASK_RECORD
    if not path.is_file():
        raise AdditionTaskError(f"{directory} has no {TASK_RECORD}: give a base made by pretrain_addition")
    return AdditionTask(**json.loads(path.read_text())["task"])


# ------------------------------------------------------------------------------- measurements
def _prompt_ids(tokenizer: Tokenizer, problems: Sequence[AdditionProblem]) -> list[list[int]]:
    return tokenizer.encode_batch([problem.prompt for problem in problems])


def sample_answers(
    model,
    tokenizer: Tokenizer,
    problems: Sequence[AdditionProblem],
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> list[list[str]]:
    """`samples` completions of each problem's prompt (temperature 0: greedy), in one batched
    decode: a list per problem."""
    from ..generate.decode import decode
    from ..generate.sampling import SamplingParams

    if max_new_tokens is None:
        max_new_tokens = task_answer_tokens(problems)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    prompts = [ids for ids in _prompt_ids(tokenizer, problems) for _ in range(samples)]
    training = model.training
    model.eval()
    try:
        outputs = decode("sample", model, tokenizer, prompts, params, eos_token_ids=[tokenizer.eos_token_id])
    finally:
        model.train(training)
    texts = [output.text or "" for output in outputs]
    return [texts[index * samples : (index + 1) * samples] for index in range(len(problems))]


def greedy_correct(model, tokenizer: Tokenizer, problems: Sequence[AdditionProblem]) -> list[bool]:
    """Whether each problem's greedy completion is exactly its sum."""
    answers = sample_answers(model, tokenizer, problems)
    rewards = exact_match_reward([p.prompt for p in problems], [texts[0] for texts in answers])
    return [reward == 1.0 for reward in rewards]


def exact_match_accuracy(model, tokenizer: Tokenizer, problems: Sequence[AdditionProblem]) -> float:
    """The share of `problems` whose greedy completion is exactly the sum (held-out accuracy,
    given held-out problems)."""
    correct = greedy_correct(model, tokenizer, problems)
    return sum(correct) / len(correct)


@torch.no_grad()
def held_out_kl(
    policy,
    reference,
    tokenizer: Tokenizer,
    problems: Sequence[AdditionProblem],
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Mean per-token KL(policy || reference) on completions the policy samples (temperature 1)
    for `problems`: at each generated position (the <eos> included) the exact divergence
    sum_v p(v) log(p(v) / q(v)) over the whole vocabulary, averaged over every generated token.
    This is the quantity whose sample average the k1/k3 estimators approximate."""
    from ..generate.sampling import SamplingParams
    from .rollout import generate_rollout

    params = SamplingParams(temperature=1.0, max_new_tokens=task_answer_tokens(problems), seed=seed)
    rollout = generate_rollout(
        policy,
        tokenizer,
        _prompt_ids(tokenizer, problems),
        samples,
        params,
        eos_token_ids=[tokenizer.eos_token_id],
    )
    total, tokens = 0.0, 0
    modes = [model.training for model in (policy, reference)]
    policy.eval(), reference.eval()
    try:
        for start in range(0, rollout.rows, batch_size):
            part = slice(start, start + batch_size)
            sequences, attention = rollout.sequences[part], rollout.attention_mask[part]
            # Position t predicts token t + 1: the predictors of completion tokens.
            predicts = rollout.completion_mask[part][:, 1:].bool()
            policy_logp, reference_logp = (
                F.log_softmax(model(sequences, attention_mask=attention).logits[:, :-1][predicts].float(), -1)
                for model in (policy, reference)
            )
            total += float((policy_logp.exp() * (policy_logp - reference_logp)).sum())
            tokens += int(predicts.sum())
    finally:
        policy.train(modes[0]), reference.train(modes[1])
    return total / max(tokens, 1)


def task_answer_tokens(problems: Sequence[AdditionProblem]) -> int:
    """New tokens enough for the longest answer among `problems`, its <eos>, and one more (so a
    model that does not stop is seen not to)."""
    return max(p.digits for p in problems) + 3


# ------------------------------------------------------------------------------------------ DPO
@dataclass
class SampledPairs:
    """What `preference_pairs_from_samples` drew and kept."""

    path: Path
    pairs: int
    prompts: int
    samples_per_prompt: int
    sample_accuracy: float  # share of all samples that were correct
    prompts_all_correct: int  # no incorrect sample: nothing to push down, no pair
    prompts_with_correct_sample: int
    empty_samples: int  # an immediate <eos>: an empty completion cannot be in a pair


def preference_pairs_from_samples(
    model,
    tokenizer: Tokenizer,
    problems: Sequence[AdditionProblem],
    path: str | Path,
    samples_per_prompt: int = 8,
    max_pairs_per_prompt: int = 2,
    temperature: float = 1.0,
    seed: int = 0,
    chosen: str = "answer",
) -> SampledPairs:
    """Sample `samples_per_prompt` answers of each problem and write (correct > incorrect) pairs
    as preference JSONL ({prompt, chosen, rejected, chosen_sampled}): rejected is a distinct
    incorrect sample (up to `max_pairs_per_prompt` of them, the most frequent first), chosen is
    the correct sum, which is also what a correct sample reads (`chosen_sampled` says whether
    the model sampled it). Written atomically."""
    if samples_per_prompt < 1 or max_pairs_per_prompt < 1:
        raise AdditionTaskError("samples_per_prompt and max_pairs_per_prompt must be positive integers")
    if chosen not in CHOSEN_SOURCES:
        raise AdditionTaskError(f"chosen must be one of {CHOSEN_SOURCES}, got {chosen!r}")
    answers = sample_answers(model, tokenizer, problems, samples_per_prompt, temperature, seed)
    records, correct, all_correct, with_correct, empty = [], 0, 0, 0, 0
    for problem, texts in zip(problems, answers):
        texts = [text.strip() for text in texts]
        right = sum(text == problem.answer for text in texts)
        correct += right
        with_correct += right > 0
        empty += sum(not text for text in texts)
        wrong: dict[str, int] = {}
        for text in texts:
            if text and text != problem.answer:
                wrong[text] = wrong.get(text, 0) + 1
        if not wrong:
            all_correct += right == len(texts)
            continue
        if chosen == "sample" and not right:
            continue
        for rejected, _ in sorted(wrong.items(), key=lambda item: -item[1])[:max_pairs_per_prompt]:
            records.append(
                {"prompt": problem.prompt, "chosen": problem.answer, "rejected": rejected, "chosen_sampled": right > 0}
            )
    if not records:
        raise AdditionTaskError("every sample was correct (or empty): no (correct > incorrect) pair to train on")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))
    return SampledPairs(
        path=path,
        pairs=len(records),
        prompts=len(problems),
        samples_per_prompt=samples_per_prompt,
        sample_accuracy=correct / (len(problems) * samples_per_prompt),
        prompts_all_correct=all_correct,
        prompts_with_correct_sample=with_correct,
        empty_samples=empty,
    )


@dataclass
class AlignmentReport:
    """Held-out accuracy (greedy exact match) before and after one alignment method on the task,
    and the KL of the aligned policy to the base (`held_out_kl`: exact over the vocabulary, on
    the policy's samples). `details`: the method's own numbers (pairs, steps, losses)."""

    method: str
    held_out_problems: int
    accuracy_before: float
    accuracy_after: float
    kl_to_reference: float
    seconds: float
    output_dir: str
    details: dict = field(default_factory=dict)

    @property
    def gain(self) -> float:
        return self.accuracy_after - self.accuracy_before

    def to_json(self) -> dict:
        return asdict(self) | {"gain": self.gain}


@dataclass
class DPOSettings:
    """Pairs from the base's own samples of `prompts` training problems (`samples_per_prompt` at
    `temperature`; `chosen` and `max_pairs_per_prompt` as `preference_pairs_from_samples`
    takes them), then `steps` steps of `loss` over `method` (default: every weight).

    beta 1.0 rather than LLM practice's 0.1: completions here are 4-5 tokens, so log-ratios are
    small, and a strong pull to the reference kept the update from drifting (beta 0.1 lowered
    held-out accuracy; 0.5, 1.0 and 2.0 raised it, 1.0 most; measured on the 2-digit task)."""

    prompts: int = 300
    samples_per_prompt: int = 8
    max_pairs_per_prompt: int = 2
    temperature: float = 1.0
    chosen: str = "answer"
    loss: str = "dpo"
    method: str = "full"
    beta: float = 1.0
    lr: float = 3e-4
    steps: int = 40
    batch_size: int = 32
    seed: int = 0


def evaluate_alignment(
    method: str,
    base_dir: str | Path,
    aligned_dir: str | Path,
    problems: Sequence[AdditionProblem],
    seconds: float,
    details: dict,
    kl_samples: int = 4,
    seed: int = 0,
) -> AlignmentReport:
    """The `AlignmentReport` of an aligned model against the base it started from: the common
    end of every method's run on this task. `aligned_dir` is a model directory, or an adapter
    directory (PEFT layout) to put on the base."""
    from ..checkpoint import load_model
    from ..loading import load_for_inference

    tokenizer = Tokenizer.from_dir(base_dir)
    base = load_model(base_dir, dtype=torch.float32)
    if (Path(aligned_dir) / "config.json").is_file():
        aligned = load_model(aligned_dir, dtype=torch.float32)
    else:
        aligned = load_for_inference(base_dir, dtype=torch.float32, adapter=aligned_dir, pack=False).model
    before, after = greedy_correct(base, tokenizer, problems), greedy_correct(aligned, tokenizer, problems)

    def by_overflow(correct: list[bool]) -> dict[str, float | None]:
        parts = {"overflowing": [c for c, p in zip(correct, problems) if p.overflows]}
        parts["not_overflowing"] = [c for c, p in zip(correct, problems) if not p.overflows]
        return {name: sum(part) / len(part) if part else None for name, part in parts.items()}

    details = details | {"accuracy_before_by_sum": by_overflow(before), "accuracy_after_by_sum": by_overflow(after)}
    return AlignmentReport(
        method=method,
        held_out_problems=len(problems),
        accuracy_before=sum(before) / len(before),
        accuracy_after=sum(after) / len(after),
        kl_to_reference=held_out_kl(aligned, base, tokenizer, problems, kl_samples, seed),
        seconds=seconds,
        output_dir=str(aligned_dir),
        details=details,
    )


def dpo_on_addition(
    base_dir: str | Path,
    out_dir: str | Path,
    settings: DPOSettings | None = None,
    held_out: int = 500,
    progress: bool = False,
) -> AlignmentReport:
    """DPO on the addition task from a base made by `pretrain_addition`: sample pairs from the
    base (`preference_pairs_from_samples` on training problems), train every weight with
    `train_preferences` (reference: the base), and report held-out accuracy before and after
    and the KL to the base (`evaluate_alignment`). Writes `out_dir/pairs.jsonl`, the
    preference run under `out_dir/dpo/` and `out_dir/report.json`."""
    from ..checkpoint import load_model
    from .preference import PreferenceConfig, train_preferences

    settings = settings or DPOSettings()
    started = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    task = read_task(base_dir)
    tokenizer = Tokenizer.from_dir(base_dir)
    base = load_model(base_dir, dtype=torch.float32)
    # Another stream than pretraining's: prompts the base was not trained on, still training-split.
    prompts = task.problems("train", settings.prompts, stream=1)
    sampled = preference_pairs_from_samples(
        base,
        tokenizer,
        prompts,
        out_dir / "pairs.jsonl",
        settings.samples_per_prompt,
        settings.max_pairs_per_prompt,
        settings.temperature,
        settings.seed,
        settings.chosen,
    )
    del base
    result = train_preferences(
        PreferenceConfig(
            model_dir=base_dir,
            data=sampled.path,
            out_dir=out_dir / "dpo",
            loss=settings.loss,
            method=settings.method,
            beta=settings.beta,
            lr=settings.lr,
            max_steps=settings.steps,
            batch_size=settings.batch_size,
            warmup_steps=max(1, settings.steps // 10),
            eval_fraction=0.05,
            seed=settings.seed,
            progress=progress,
        )
    )
    details = {
        "settings": asdict(settings),
        "pairs": {k: v for k, v in asdict(sampled).items() if k != "path"},
        "held_out_pairs_before": result.before,
        "held_out_pairs_after": result.after,
        "steps": result.steps,
        "train_seconds": result.seconds,
    }
    report = evaluate_alignment(
        "dpo",
        base_dir,
        result.output_dir,
        task.problems("held_out", held_out),
        time.perf_counter() - started,
        details,
        seed=settings.seed,
    )
    atomic_write_text(out_dir / "report.json", json.dumps(report.to_json(), indent=2))
    return report


@dataclass
class GRPOSettings:
    """GRPO on `prompts` training problems per run: `steps` steps of `prompts_per_step` prompts
    with `samples_per_prompt` samples each at `temperature`, rewarded by `exact_match_reward`,
    over `method` (default: every weight; LoRA barely moves a model this small), with the
    k3 KL penalty `beta` to the base."""

    prompts: int = 600
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    temperature: float = 1.0
    method: str = "full"
    beta: float = 0.04
    lr: float = 3e-4
    steps: int = 100
    seed: int = 0


def grpo_on_addition(
    base_dir: str | Path,
    out_dir: str | Path,
    settings: GRPOSettings | None = None,
    held_out: int = 500,
    progress: bool = False,
) -> AlignmentReport:
    """GRPO on the addition task from a base made by `pretrain_addition`, with the exact-match
    reward: the base samples groups of answers to training problems, the right ones are
    reinforced against their group (`align.grpo`). Reports like `dpo_on_addition` and writes
    the run under `out_dir/grpo/` and `out_dir/report.json`."""
    from .grpo import GRPOConfig, train_grpo

    settings = settings or GRPOSettings()
    started = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    task = read_task(base_dir)
    # Another stream than pretraining's: prompts the base was not trained on, still training-split.
    problems = task.problems("train", settings.prompts, stream=2)
    result = train_grpo(
        base_dir,
        [{"prompt": p.prompt} for p in problems],
        exact_match_reward,
        GRPOConfig(
            out_dir=out_dir / "grpo",
            method=settings.method,
            prompts_per_step=settings.prompts_per_step,
            samples_per_prompt=settings.samples_per_prompt,
            max_new_tokens=task.digits + 2,  # the answer, one column wider, and <eos>
            temperature=settings.temperature,
            beta=settings.beta,
            lr=settings.lr,
            max_steps=settings.steps,
            seed=settings.seed,
            progress=progress,
        ),
    )
    details = {
        "settings": asdict(settings),
        "first_step_reward": result.first_reward,
        "last_step_reward": result.last_reward,
        "steps": result.steps,
    }
    report = evaluate_alignment(
        "grpo",
        base_dir,
        result.output_dir,
        task.problems("held_out", held_out),
        time.perf_counter() - started,
        details,
        seed=settings.seed,
    )
    atomic_write_text(out_dir / "report.json", json.dumps(report.to_json(), indent=2))
    return report


def accuracy_interval(accuracy: float, count: int) -> float:
    """Half-width of the 95% normal interval of an accuracy measured on `count` problems."""
    return 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / count)


__all__ = [
    "ADDITION_CHARACTERS",
    "AdditionProblem",
    "AdditionTask",
    "AdditionTaskError",
    "AlignmentReport",
    "DPOSettings",
    "PretrainSettings",
    "SampledPairs",
    "accuracy_interval",
    "addition_tokenizer",
    "dpo_on_addition",
    "evaluate_alignment",
    "exact_match_reward",
    "exact_match_accuracy",
    "greedy_correct",
    "held_out_kl",
    "parse_prompt",
    "preference_pairs_from_samples",
    "pretrain_addition",
    "read_task",
    "sample_answers",
    "task_answer_tokens",
]
