"""The concept map: each generative-AI concept genforge implements, and where it lives.

`map.yaml` lists the concepts grouped as the field teaches them. Each entry names the code that
implements it (`module:qualname`), the tests that verify it and the reference they check it
against, the doc section that explains it, and a demo `genforge concepts show ID` runs. A test
(tests/test_concepts.py) keeps the map true: every module, function, test and doc anchor it
names must exist.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import yaml

MAP_PATH = Path(__file__).with_name("map.yaml")
GROUPS = (
    "architecture",
    "tokenization",
    "training",
    "finetuning",
    "alignment",
    "compression",
    "decoding",
    "serving",
    "rag",
    "evaluation",
    "safety",
    "prompting_agents",
    "generative_vision",
    "ops",
)
_FIELDS = ("id", "name", "summary", "code", "tests", "reference", "doc", "demo", "benchmark")


class ConceptError(ValueError):
    """An unknown concept id, or a map entry genforge cannot read."""


@dataclass(frozen=True)
class Concept:
    id: str
    group: str
    name: str
    summary: str  # genforge's own explanation, a few sentences
    code: tuple[str, ...]  # "genforge.model:apply_rope": what implements it
    tests: tuple[str, ...]  # "tests/test_model.py::test_name": what verifies it
    reference: str  # what the tests check it against ("transformers' LlamaForCausalLM logits")
    doc: str  # "docs/model.md#rope-scaling"
    demo: str | None = None  # "genforge.concepts.demos:rope", run by `genforge concepts show`
    benchmark: str | None = None  # "benchmarks/decode.py" where one measures it

    def as_dict(self) -> dict:
        """A JSON object for the playground and `genforge concepts --json`: the fields, plus the
        first implementing module and function spelled out."""
        module, _, function = self.code[0].partition(":")
        return asdict(self) | {"module": module, "function": function, "test": self.tests[0]}


@cache
def load_concept_map(path: str | Path = MAP_PATH) -> tuple[Concept, ...]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    unknown_groups = sorted(set(raw) - set(GROUPS))
    if unknown_groups:
        raise ConceptError(f"{path}: unknown groups {unknown_groups}; groups are {', '.join(GROUPS)}")
    concepts = []
    for group in GROUPS:
        for entry in raw.get(group) or ():
            extra = sorted(set(entry) - set(_FIELDS))
            if extra:
                raise ConceptError(f"{path}: concept {entry.get('id')!r} has unknown fields {extra}")
            concepts.append(
                Concept(
                    group=group,
                    **{key: tuple(value) if key in ("code", "tests") else value for key, value in entry.items()},
                )
            )
    ids = [concept.id for concept in concepts]
    repeated = sorted({name for name in ids if ids.count(name) > 1})
    if repeated:
        raise ConceptError(f"{path}: concept ids listed twice: {repeated}")
    return tuple(concepts)


def find_concept(concept_id: str) -> Concept:
    concepts = {concept.id: concept for concept in load_concept_map()}
    if concept_id in concepts:
        return concepts[concept_id]
    close = [name for name in concepts if concept_id.lower() in name or name in concept_id.lower()]
    hint = f"; did you mean {', '.join(close[:5])}?" if close else "; `genforge concepts` lists them"
    raise ConceptError(f"no concept {concept_id!r}{hint}")


def resolve(reference: str):
    """The object a `module:qualname` reference names (raises ImportError / AttributeError)."""
    module_name, _, qualname = reference.partition(":")
    target = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        target = getattr(target, part)
    return target


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped,
    spaces to hyphens, repeats numbered."""
    anchors: set[str] = set()
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        anchor, count = slug, 1
        while anchor in anchors:
            anchor, count = f"{slug}-{count}", count + 1
        anchors.add(anchor)
    return anchors


def repository_root() -> Path | None:
    """The source checkout genforge runs from (with docs/ and tests/), or None for a wheel install."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "tests").is_dir() and (root / "docs").is_dir() else None


def check_concept(concept: Concept, root: Path) -> list[str]:
    """What in one map entry does not exist: code, tests, doc anchor, demo, benchmark."""
    problems = []
    for reference in concept.code + ((concept.demo,) if concept.demo else ()):
        try:
            resolve(reference)
        except (ImportError, AttributeError) as err:
            problems.append(f"{reference}: {err}")
    for test in concept.tests:
        path, _, name = test.partition("::")
        source = root / path
        if not source.is_file():
            problems.append(f"{test}: no file {path}")
        elif name and not re.search(rf"^(async )?def {re.escape(name.split('[')[0])}\(", source.read_text(), re.M):
            problems.append(f"{test}: no test {name} in {path}")
    doc_path, _, anchor = concept.doc.partition("#")
    if not (root / doc_path).is_file():
        problems.append(f"{concept.doc}: no file {doc_path}")
    elif anchor and anchor not in heading_anchors((root / doc_path).read_text(encoding="utf-8")):
        problems.append(f"{concept.doc}: no heading with anchor #{anchor}")
    if concept.benchmark and not (root / concept.benchmark).is_file():
        problems.append(f"{concept.benchmark}: no such benchmark")
    return problems
