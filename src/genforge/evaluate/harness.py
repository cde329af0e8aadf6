"""A benchmark harness whose tasks are YAML files in lm-evaluation-harness's format.

lm-evaluation-harness (Gao et al., "A framework for few-shot language model evaluation",
EleutherAI 2021-) is the harness most published numbers come from, so genforge reads its
task files rather than inventing a format: a task names its data (`dataset_kwargs:
{data_files: ...}`, local JSON lines only here), its split (`test_split` or
`validation_split`), how a document becomes a prompt (`doc_to_text`), a target
(`doc_to_target`) and answer options (`doc_to_choice`), each a field name or a Jinja2 template,
and one of four request kinds (`output_type`):

- `multiple_choice`: each choice is scored as the log-likelihood of `target_delimiter + choice`
  after the prompt; `acc` takes the argmax, `acc_norm` the argmax of log-likelihood divided by
  the choice's length in characters (lm-eval's normalisation, which offsets the penalty long
  answers pay for having more tokens).
- `loglikelihood`: the target's log-likelihood after the prompt; `acc` is 1 when greedy
  decoding would have produced the target, `perplexity` is exp of minus the mean log-likelihood.
- `loglikelihood_rolling`: the log-likelihood of the whole target text (a language-modelling
  corpus), reported as word and byte perplexity and bits per byte.
- `generate_until`: greedy generation until a stop string or `max_gen_toks`, scored by
  `exact_match` or any corpus metric of `genforge.evaluate.metrics`.

Prompts are built as lm-eval builds them: an optional `description`, then `num_fewshot` solved
examples (`text + target_delimiter + target`, joined and followed by `fewshot_delimiter`),
then the document's own text. Continuations are tokenised as lm-eval's `_encode_pair` does:
trailing whitespace of the context moves to the continuation and the pair is encoded whole,
then split, so that a word's leading space is tokenised with that word.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..generate.decode import decode
from ..generate.sampling import SamplingParams
from ..jsonl import json_objects
from ..model import Transformer
from ..tokenizer import Tokenizer
from ._progress import progress
from .base import MetricError
from .metrics import METRICS, compute
from .perplexity import perplexity

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
# The metrics each request kind can report; the first ones are its defaults (lm-eval's).
TASK_METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match", *METRICS),
}
GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed

# Task YAML is data from anywhere: a sandbox keeps templates from reaching Python internals,
# and StrictUndefined turns a misspelt field into an error instead of an empty string.
_JINJA = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


# ------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One benchmark task, read from a YAML file by `load_task`."""

    name: str
    output_type: str
    docs: list[dict[str, Any]]
    fewshot_docs: list[dict[str, Any]] | None  # None: few-shot examples are the first docs
    doc_to_text: Any
    doc_to_target: Any
    doc_to_choice: Any = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: int = 0
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    metric_list: list[dict[str, Any]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # path, split, data file: for the results

    # -- fields of a document
    def text(self, doc: Mapping[str, Any]) -> str:
        return str(_resolve(self.doc_to_text, doc, "doc_to_text"))

    def choices(self, doc: Mapping[str, Any]) -> list[str]:
        if self.doc_to_choice is None:
            raise MetricError(
                f"task {self.name!r}: {self.output_type} needs doc_to_choice (a field holding a list, "
                "a list literal, or a template rendering a list)"
            )
        if isinstance(self.doc_to_choice, list):
            choices = [str(_resolve(c, doc, "doc_to_choice")) for c in self.doc_to_choice]
        else:
            value = _resolve(self.doc_to_choice, doc, "doc_to_choice")
            if isinstance(value, str):
                try:  # a template such as "{{options}}" renders a list's repr
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError) as err:
                    raise MetricError(
                        f"task {self.name!r}: doc_to_choice gave {value!r}, not a list of choices"
                    ) from err
            if not isinstance(value, (list, tuple)):
                raise MetricError(f"task {self.name!r}: doc_to_choice must give a list, got {type(value).__name__}")
            choices = [str(c) for c in value]
        if not choices:
            raise MetricError(f"task {self.name!r}: doc_to_choice gave no choices")
        return choices

    def target(self, doc: Mapping[str, Any]) -> str | int:
        """The target: a string, or for tasks with choices an index into them (lm-eval reads a
        rendered string of digits as an index, too)."""
        value = _resolve(self.doc_to_target, doc, "doc_to_target")
        if self.doc_to_choice is not None and isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise MetricError(f"task {self.name!r}: doc_to_target must give a string or a choice index, got {value!r}")
        return value

    def gold_index(self, doc: Mapping[str, Any]) -> int:
        choices, target = self.choices(doc), self.target(doc)
        if isinstance(target, int):
            if not 0 <= target < len(choices):
                raise MetricError(f"task {self.name!r}: target index {target} is outside the {len(choices)} choices")
            return target
        if target not in choices:
            raise MetricError(f"task {self.name!r}: target {target!r} is not one of the choices {choices}")
        return choices.index(target)

    def target_text(self, doc: Mapping[str, Any]) -> str:
        target = self.target(doc)
        if isinstance(target, int) and self.doc_to_choice is not None:
            return self.choices(doc)[target]
        return str(target)

    # -- prompts
    def fewshot_examples(self, index: int, rng: random.Random, num_fewshot: int) -> list[dict[str, Any]]:
        """`num_fewshot` solved examples for doc `index`: drawn with `rng` from the few-shot
        split when the task names one (lm-eval's sampler), else the first docs of the
        evaluated split other than the doc itself (so a doc never answers itself)."""
        if num_fewshot == 0:
            return []
        if self.fewshot_docs is not None:
            if num_fewshot > len(self.fewshot_docs):
                raise MetricError(
                    f"task {self.name!r}: num_fewshot {num_fewshot} exceeds the "
                    f"{len(self.fewshot_docs)} docs of the few-shot split"
                )
            return rng.sample(self.fewshot_docs, num_fewshot)
        if num_fewshot > len(self.docs) - 1:
            raise MetricError(
                f"task {self.name!r}: num_fewshot {num_fewshot} needs at least {num_fewshot + 1} docs "
                f"in the split (the doc itself is never its own example); it has {len(self.docs)}"
            )
        return [d for i, d in enumerate(self.docs) if i != index][:num_fewshot]

    def context(self, doc: Mapping[str, Any], examples: Sequence[Mapping[str, Any]]) -> str:
        """description + examples (each `text + target_delimiter + target`, each followed by
        `fewshot_delimiter`) + the doc's text."""
        shots = "".join(
            self.text(e) + self.target_delimiter + self.target_text(e) + self.fewshot_delimiter for e in examples
        )
        return self.description + shots + self.text(doc)


def _resolve(spec: Any, doc: Mapping[str, Any], what: str) -> Any:
    """A field name gives the field's value; any other string is a Jinja2 template rendered
    with the doc's fields; a number is itself (a fixed target index)."""
    if isinstance(spec, str):
        if spec in doc:
            return doc[spec]
        try:
            return _JINJA.from_string(spec).render(**doc)
        except jinja2.UndefinedError as error:
            raise MetricError(
                f"{what} {spec!r}: {error.message} in doc with fields {sorted(doc)}; use a field "
                "name or a template over those fields"
            ) from None
        except jinja2.TemplateError as error:
            raise MetricError(f"{what} {spec!r} is not a valid Jinja2 template: {error}") from None
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return spec
    raise MetricError(f"{what} must be a field name or a Jinja2 template string, got {type(spec).__name__}")


def load_task(path: str | os.PathLike) -> Task:
    """Read a task YAML (lm-eval's keys; see the module doc) and its local JSONL data. Data
    file paths are relative to the YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MetricError(f"task file {str(path)!r} does not exist; pass the path of a task .yaml")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise MetricError(f"task file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(spec, dict):
        raise MetricError(f"task file {str(path)!r} must hold a mapping of keys (task, output_type, ...)")
    where = f"task file {str(path)!r}"
    missing = [k for k in ("task", "output_type", "doc_to_text", "doc_to_target") if k not in spec]
    if spec.get("output_type") == "multiple_choice" and "doc_to_choice" not in spec:
        missing.append("doc_to_choice")
    if spec.get("output_type") == "loglikelihood_rolling" and "doc_to_target" in missing:
        missing.remove("doc_to_target")  # rolling tasks score the target; default it to the text
        spec.setdefault("doc_to_target", spec.get("doc_to_text"))
    if spec.get("output_type") == "loglikelihood_rolling" and "doc_to_text" in missing:
        missing.remove("doc_to_text")
        spec["doc_to_text"] = spec.get("doc_to_target", "")
    if missing:
        raise MetricError(f"{where} lacks required key(s) {', '.join(missing)}")
    output_type = spec["output_type"]
    if output_type not in OUTPUT_TYPES:
        raise MetricError(f"{where}: output_type {output_type!r} is unknown; accepted: {', '.join(OUTPUT_TYPES)}")
    dataset_path = spec.get("dataset_path", "json")
    if dataset_path not in ("json", "jsonl"):
        raise MetricError(
            f"{where}: dataset_path {dataset_path!r} is not supported; genforge reads local JSON lines "
            "only: dataset_path: json with dataset_kwargs: {data_files: {test: file.jsonl}}"
        )
    data_files = (spec.get("dataset_kwargs") or {}).get("data_files")
    if data_files is None:
        raise MetricError(
            f"{where}: no dataset_kwargs.data_files; give the JSONL file per split, e.g. "
            "{test: test.jsonl} (relative to the YAML file)"
        )
    if isinstance(data_files, (str, list)):
        data_files = {"train": data_files}  # Hugging Face datasets names a lone file's split "train"
    split = spec.get("test_split") or spec.get("validation_split")
    if split is None:
        raise MetricError(f"{where}: set test_split or validation_split to the split to evaluate")
    if split not in data_files:
        raise MetricError(f"{where}: split {split!r} has no data file; data_files names {sorted(data_files)}")
    fewshot_split = spec.get("fewshot_split") or spec.get("training_split")
    if fewshot_split is not None and fewshot_split not in data_files:
        raise MetricError(
            f"{where}: few-shot split {fewshot_split!r} has no data file; data_files names {sorted(data_files)}"
        )
    num_fewshot = spec.get("num_fewshot", 0)
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise MetricError(f"{where}: num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    generation_kwargs = dict(spec.get("generation_kwargs") or {})
    unknown = sorted(set(generation_kwargs) - set(GENERATION_KWARGS))
    if unknown:
        raise MetricError(
            f"{where}: generation_kwargs {unknown} are not supported; accepted: {', '.join(GENERATION_KWARGS)}"
        )
    metric_list = spec.get("metric_list") or []
    if not isinstance(metric_list, list) or not all(isinstance(m, dict) and "metric" in m for m in metric_list):
        raise MetricError(f"{where}: metric_list must be a list of mappings like {{metric: exact_match}}")
    accepted = TASK_METRICS[output_type]
    for m in metric_list:
        if m["metric"] not in accepted:
            raise MetricError(
                f"{where}: metric {m['metric']!r} is not available for {output_type}; accepted: {', '.join(accepted)}"
            )
    fewshot_docs = _read_jsonl(_data_file(path, data_files[fewshot_split])) if fewshot_split else None
    task = Task(
        name=str(spec["task"]),
        output_type=output_type,
        docs=_read_jsonl(_data_file(path, data_files[split])),
        fewshot_docs=fewshot_docs,
        doc_to_text=spec["doc_to_text"],
        doc_to_target=spec["doc_to_target"],
        doc_to_choice=spec.get("doc_to_choice"),
        target_delimiter=spec.get("target_delimiter", " "),
        fewshot_delimiter=spec.get("fewshot_delimiter", "\n\n"),
        description=spec.get("description", "") or "",
        num_fewshot=num_fewshot,
        fewshot_seed=spec.get("fewshot_seed", DEFAULT_FEWSHOT_SEED),
        generation_kwargs=generation_kwargs,
        metric_list=metric_list,
        source={"path": str(path), "split": split, "data_file": str(data_files[split]), "fewshot_split": fewshot_split},
    )
    if not task.docs:
        raise MetricError(f"{where}: split {split!r} has no documents")
    return task


def _data_file(task_path: Path, name: Any) -> Path:
    if not isinstance(name, str):
        raise MetricError(f"task file {str(task_path)!r}: a data file must be one path string, got {name!r}")
    file = Path(name) if Path(name).is_absolute() else task_path.parent / name
    if not file.is_file():
        raise MetricError(
            f"data file {str(file)!r} (named in {str(task_path)!r}) does not exist; paths are relative to the YAML file"
        )
    return file


def _read_jsonl(file: Path) -> list[dict[str, Any]]:
    return [doc for _, doc in json_objects(file.read_text(encoding="utf-8").splitlines(), str(file), MetricError)]


# ------------------------------------------------------------------------------- model requests
def _check_model(model: Transformer) -> None:
    if not model.config.causal or model.lm_head is None:
        raise MetricError(
            f"the harness needs a causal language model with an LM head; {model.config.family} is an encoder"
        )


def prefix_token_id(model: Transformer, tokenizer: Tokenizer) -> int:
    """The token an empty context is replaced by (lm-eval conditions on BOS, else EOS)."""
    for candidate in (
        tokenizer.bos_token_id,
        model.config.bos_token_id,
        tokenizer.eos_token_id,
        model.config.eos_token_id,
    ):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    raise MetricError(
        "an empty context needs a BOS or EOS token to condition on; neither the tokenizer nor the "
        "model config names one"
    )


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split the way lm-eval splits them: trailing
    whitespace of the context joins the continuation, and the pair is encoded as one text so
    that the continuation's tokens are those the model would see in running text."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def loglikelihood(
    model: Transformer,
    tokenizer: Tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    show_progress: bool | None = None,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) per (context, continuation) pair.

    is_greedy: every continuation token is the argmax of its position. Rows are batched with
    left padding; a pair longer than the model's context keeps its last tokens (the
    continuation must fit whole).
    """
    _check_model(model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MetricError(f"batch_size must be a positive integer, got {batch_size!r}")
    window = model.config.max_position_embeddings
    rows = []
    for i, (context, continuation) in enumerate(requests):
        if context:
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        else:
            context_ids = [prefix_token_id(model, tokenizer)]
            continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        if not continuation_ids:
            raise MetricError(f"request {i}: the continuation {continuation!r} has no tokens to score")
        if len(continuation_ids) > window:
            raise MetricError(
                f"request {i}: the continuation has {len(continuation_ids)} tokens, more than the "
                f"model's context of {window}"
            )
        # The last token is only predicted, never fed; truncation drops the oldest context.
        inputs = (context_ids + continuation_ids)[-(window + 1) :][:-1]
        rows.append((inputs, continuation_ids))
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = []
    batches = [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]
    try:
        for batch in progress(batches, len(batches), "loglikelihood", show_progress):
            longest = max(len(inputs) for inputs, _ in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            mask = torch.zeros(len(batch), longest, dtype=torch.long)
            for r, (inputs, _) in enumerate(batch):
                ids[r, longest - len(inputs) :] = torch.tensor(inputs)
                mask[r, longest - len(inputs) :] = 1
            keep = max(len(c) for _, c in batch)
            # Left padding lines every row's last token up in the last column, so the last
            # `keep` logits hold every row's continuation predictions.
            logits = model(ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=keep).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for r, (_, continuation_ids) in enumerate(batch):
                rows_logprobs = logprobs[r, keep - len(continuation_ids) :]
                target = torch.tensor(continuation_ids, device=rows_logprobs.device)
                ll = rows_logprobs.gather(-1, target[:, None]).sum()
                greedy = bool((rows_logprobs.argmax(-1) == target).all())
                results.append((float(ll), greedy))
    finally:
        model.train(was_training)
    return results


def loglikelihood_rolling(model: Transformer, tokenizer: Tokenizer, texts: Sequence[str]) -> list[float]:
    """log p(text) per text, every token scored, conditioned on the prefix token (BOS/EOS).

    Computed by `genforge.evaluate.perplexity` over [prefix] + tokens with windows of the
    model's whole context; for a text that fits the context this is exactly lm-eval's rolling
    log-likelihood. A longer text is read in genforge's strided windows (half-context stride),
    which gives each token more context than lm-eval's disjoint windows.
    """
    _check_model(model)
    prefix = prefix_token_id(model, tokenizer)
    totals = []
    for i, text in enumerate(texts):
        ids = [prefix] + tokenizer.encode(text, add_special_tokens=False)
        if len(ids) < 2:
            raise MetricError(f"text {i} has no tokens to score: {text!r}")
        result = perplexity(
            model, ids, max_length=min(len(ids), model.config.max_position_embeddings), show_progress=False
        )
        totals.append(-result.mean_nll * result.num_scored_tokens)
    return totals


def generate_until(
    model: Transformer,
    tokenizer: Tokenizer,
    contexts: Sequence[str],
    *,
    until: Sequence[str],
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Continuations of `contexts`, cut before the first of the `until` strings (greedy by
    default, as lm-eval runs generation). A context too long for the model keeps its last
    tokens, leaving room for `max_gen_toks`."""
    _check_model(model)
    if isinstance(until, str):
        until = [until]
    if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise MetricError(f"max_gen_toks must be a positive integer, got {max_gen_toks!r}")
    room = model.config.max_position_embeddings - max_gen_toks
    if room < 1:
        raise MetricError(
            f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the model's context of "
            f"{model.config.max_position_embeddings} tokens"
        )
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_gen_toks,
        stop=[s for s in until if s],
        seed=seed,
    )
    prompts = []
    for text in contexts:
        ids = tokenizer.encode(text, add_special_tokens=False) if text else []
        prompts.append(ids[-room:] if ids else [prefix_token_id(model, tokenizer)])
    outputs = []
    for b in range(0, len(prompts), batch_size):
        for completion in decode("sample", model, tokenizer, prompts[b : b + batch_size], params):
            text = completion.text
            for stop in until:  # the generator stops at a stop string; cut any that ended a token early
                if stop:
                    text = text.split(stop)[0]
            outputs.append(text)
    return outputs


class LocalLanguageModel:
    """The harness's view of a genforge model: the three request kinds of lm-eval's `LM`.

    Anything with these three methods can be evaluated (`endpoint.EndpointLanguageModel`
    scores a model behind an OpenAI-compatible server the same way).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 8) -> None:
        _check_model(model)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.description = {
            "family": model.config.family,
            "vocab_size": model.config.vocab_size,
            "context": model.config.max_position_embeddings,
        }

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return loglikelihood(self.model, self.tokenizer, requests, batch_size=self.batch_size)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        return loglikelihood_rolling(self.model, self.tokenizer, texts)

    def generate_until(self, contexts: Sequence[str], **options: Any) -> list[str]:
        return generate_until(self.model, self.tokenizer, contexts, batch_size=self.batch_size, **options)


def _language_model(model: Any, tokenizer: Tokenizer | None, batch_size: int) -> Any:
    if isinstance(model, Transformer):
        if tokenizer is None:
            raise MetricError("a genforge model needs its tokenizer; pass tokenizer=")
        return LocalLanguageModel(model, tokenizer, batch_size)
    if all(
        callable(getattr(model, name, None)) for name in ("loglikelihood", "loglikelihood_rolling", "generate_until")
    ):
        return model
    raise MetricError(
        f"cannot evaluate a {type(model).__name__}: pass a genforge Transformer (with its tokenizer) "
        "or an object with loglikelihood, loglikelihood_rolling and generate_until "
        "(e.g. genforge.evaluate.endpoint.EndpointLanguageModel)"
    )


# ------------------------------------------------------------------------------- evaluation
@dataclass
class TaskResult:
    """A task's metrics, their standard errors (None where lm-eval bootstraps one instead) and
    the settings that produced them; `samples` holds each doc's prompt and scores."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    num_samples: int
    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        out = {
            "task": self.task,
            "metrics": self.metrics,
            "stderr": self.stderr,
            "num_samples": self.num_samples,
            "settings": self.settings,
        }
        if include_samples:
            out["samples"] = self.samples
        return out


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample standard deviation (n - 1) over sqrt(n), lm-eval's
    formula for acc-like metrics; None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def evaluate_task(
    model: Transformer | Any,
    tokenizer: Tokenizer | None,
    task: Task | str | os.PathLike,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> TaskResult:
    """Run one task (a `Task` or the path of its YAML) against `model` and return its metrics.

    model: a genforge `Transformer` (with `tokenizer`), or any object with the harness's three
    request kinds, such as `EndpointLanguageModel` (then `tokenizer` may be None).
    num_fewshot: overrides the task's; limit: evaluate only the first `limit` docs.
    """
    if not isinstance(task, Task):
        task = load_task(task)
    lm = _language_model(model, tokenizer, batch_size)
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise MetricError(f"num_fewshot must be an integer >= 0, got {shots!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise MetricError(f"limit must be a positive integer or None, got {limit!r}")
    docs = task.docs[:limit] if limit else task.docs
    rng = random.Random(task.fewshot_seed)  # one stream in doc order, as lm-eval's sampler
    contexts = [task.context(doc, task.fewshot_examples(i, rng, shots)) for i, doc in enumerate(docs)]
    wanted = [m["metric"] for m in task.metric_list] or list(TASK_METRICS[task.output_type][:3])
    if task.output_type == "generate_until" and not task.metric_list:
        wanted = ["exact_match"]
    run = {
        "multiple_choice": _run_multiple_choice,
        "loglikelihood": _run_loglikelihood,
        "loglikelihood_rolling": _run_rolling,
        "generate_until": _run_generate,
    }[task.output_type]
    per_doc, corpus, samples, extra = run(lm, task, docs, contexts)
    metrics, stderr = {}, {}
    for name in wanted:
        if name in per_doc:
            values = per_doc[name]
            metrics[name] = sum(values) / len(values)
            stderr[name] = mean_stderr(values)
        else:
            metrics[name] = corpus(name)
            stderr[name] = None
    settings = {
        "output_type": task.output_type,
        "num_fewshot": shots,
        "fewshot_seed": task.fewshot_seed,
        "target_delimiter": task.target_delimiter,
        "fewshot_delimiter": task.fewshot_delimiter,
        "limit": limit,
        "batch_size": batch_size,
        "model": dict(lm.description),
        **task.source,
        **extra,
    }
    return TaskResult(task.name, metrics, stderr, len(docs), settings, samples)


def _run_multiple_choice(lm, task, docs, contexts):
    requests, spans = [], []
    for doc, context in zip(docs, contexts):
        choices = task.choices(doc)
        spans.append((len(requests), choices, task.gold_index(doc)))
        requests += [(context, task.target_delimiter + c) for c in choices]
    scores = lm.loglikelihood(requests)
    acc, acc_norm, samples = [], [], []
    for (start, choices, gold), context in zip(spans, contexts):
        lls = [ll for ll, _ in scores[start : start + len(choices)]]
        # Normalised by the choice's characters, without the delimiter (lm-eval's completion_len).
        normed = [ll / len(c) if c else ll for ll, c in zip(lls, choices)]
        pred, pred_norm = _argmax(lls), _argmax(normed)
        acc.append(float(pred == gold))
        acc_norm.append(float(pred_norm == gold))
        samples.append({"prompt": context, "choices": choices, "gold": gold, "loglikelihoods": lls})
    return {"acc": acc, "acc_norm": acc_norm}, None, samples, {}


def _run_loglikelihood(lm, task, docs, contexts):
    targets = [task.target_delimiter + task.target_text(doc) for doc in docs]
    scores = lm.loglikelihood(list(zip(contexts, targets)))
    lls = [ll for ll, _ in scores]
    samples = [
        {"prompt": c, "target": t, "loglikelihood": ll, "is_greedy": g}
        for c, t, (ll, g) in zip(contexts, targets, scores)
    ]
    # lm-eval's perplexity aggregation: exp of minus the mean log-likelihood per document.
    corpus = lambda name: math.exp(-sum(lls) / len(lls))  # noqa: E731
    return {"acc": [float(g) for _, g in scores]}, corpus, samples, {}


def _run_rolling(lm, task, docs, contexts):
    texts = [task.target_text(doc) for doc in docs]
    lls = lm.loglikelihood_rolling(texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)  # lm-eval's word count
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    total = sum(lls)
    values = {
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / num_bytes),
        "bits_per_byte": -total / num_bytes / math.log(2),
    }
    samples = [{"text": t, "loglikelihood": ll} for t, ll in zip(texts, lls)]
    return {}, values.__getitem__, samples, {"words": words, "bytes": num_bytes}


def _run_generate(lm, task, docs, contexts):
    kwargs = dict(task.generation_kwargs)
    until = kwargs.pop("until", [task.fewshot_delimiter])  # lm-eval's default stop
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    do_sample = kwargs.pop("do_sample", False)
    temperature = kwargs.pop("temperature", 1.0 if do_sample else 0.0)
    if not do_sample:
        temperature = 0.0
    targets = [task.target_text(doc) for doc in docs]  # bad targets fail before generation runs
    outputs = lm.generate_until(contexts, until=until, max_gen_toks=max_gen_toks, temperature=temperature, **kwargs)
    options = {m["metric"]: m for m in task.metric_list}
    em = options.get("exact_match", {})
    exact = [float(_normalise(o, em) == _normalise(t, em)) for o, t in zip(outputs, targets)]
    samples = [{"prompt": c, "output": o, "target": t} for c, o, t in zip(contexts, outputs, targets)]
    cache: dict[str, float] = {}

    def corpus(name: str) -> float:
        if name not in cache:
            cache[name] = compute(name, outputs, targets)[name].score
        return cache[name]

    settings = {
        "generation_kwargs": {"until": until, "max_gen_toks": max_gen_toks, "temperature": temperature, **kwargs}
    }
    return {"exact_match": exact}, corpus, samples, settings


def _normalise(text: str, options: Mapping[str, Any]) -> str:
    """exact_match's options, as Hugging Face evaluate's exact_match names them."""
    for pattern in options.get("regexes_to_ignore", []) or []:
        text = re.sub(pattern, "", text)
    if options.get("ignore_case"):
        text = text.lower()
    if options.get("ignore_punctuation"):
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as numpy.argmax


def evaluate(
    model: Transformer | Any,
    tokenizer: Tokenizer | None,
    tasks: Sequence[Task | str | os.PathLike] | Task | str | os.PathLike,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, TaskResult]:
    """`evaluate_task` for each task; {task name: TaskResult}. Every task file is read and
    checked before the model runs, so a bad one fails fast."""
    if isinstance(tasks, (str, os.PathLike, Task)):
        tasks = [tasks]
    loaded = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    if not loaded:
        raise MetricError("evaluate: no tasks given; pass task YAML paths or Task objects")
    return {
        t.name: evaluate_task(model, tokenizer, t, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size)
        for t in loaded
    }


def results_table(results: Mapping[str, TaskResult]) -> str:
    """A Markdown table: one row per task and metric, value and stderr."""
    lines = ["| Task | Metric | n-shot | Value | Stderr |", "|---|---|---:|---:|---:|"]
    for name, result in results.items():
        for metric, value in result.metrics.items():
            err = result.stderr.get(metric)
            lines.append(
                f"| {name} | {metric} | {result.settings['num_fewshot']} | {value:.4f} | "
                f"{'' if err is None else f'{err:.4f}'} |"
            )
    return "\n".join(lines) + "\n"


def write_results(
    results: Mapping[str, TaskResult], directory: str | os.PathLike, include_samples: bool = False
) -> tuple[Path, Path]:
    """Write results.json and results.md into `directory` (each atomically); their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {name: r.to_dict(include_samples) for name, r in results.items()}
    paths = directory / "results.json", directory / "results.md"
    for path, text in zip(paths, (json.dumps(data, indent=2, ensure_ascii=False) + "\n", results_table(results))):
        atomic_write_text(path, text)
    return paths


__all__ = [
    "OUTPUT_TYPES",
    "TASK_METRICS",
    "LocalLanguageModel",
    "Task",
    "TaskResult",
    "encode_pair",
    "evaluate",
    "evaluate_task",
    "generate_until",
    "load_task",
    "loglikelihood",
    "loglikelihood_rolling",
    "mean_stderr",
    "prefix_token_id",
    "results_table",
    "write_results",
]
