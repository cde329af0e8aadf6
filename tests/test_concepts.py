"""The concept map stays true: everything it names exists, and the command shows and runs it."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genforge.cli import main
from genforge.concepts import (
    GROUPS,
    ConceptError,
    check_concept,
    demos,
    find_concept,
    heading_anchors,
    load_concept_map,
    repository_root,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_CONCEPTS = ROOT.parent / "shared" / "concepts.yaml"
CONCEPTS = load_concept_map()
DEMOS = sorted(
    name
    for name, function in inspect.getmembers(demos, inspect.isfunction)
    if not name.startswith("_") and function.__module__ == demos.__name__
)

# Concepts of the shared list that genforge does not implement yet: each lands from another
# branch (generative vision from issue 20, the rest of the architecture canon from issue 21).
# Remove an id here when its map entry arrives; the test below fails if an id listed here is
# already mapped, so this list can only shrink.
NOT_YET_IMPLEMENTED: set[str] = set()  # every code concept of ../shared/concepts.yaml is mapped


def test_the_map_is_read_from_a_source_checkout():
    assert repository_root() == ROOT


@pytest.mark.parametrize("concept", CONCEPTS, ids=lambda c: c.id)
def test_everything_a_concept_names_exists(concept):
    assert check_concept(concept, ROOT) == []
    assert concept.summary.strip() and concept.reference.strip() and concept.tests


def test_a_broken_entry_is_reported(tmp_path):
    broken = CONCEPTS[0].__class__(
        **{**CONCEPTS[0].__dict__, "code": ("genforge.model:no_such_function",), "doc": "docs/model.md#no-such-heading"}
    )
    broken = broken.__class__(**{**broken.__dict__, "tests": ("tests/test_model.py::test_that_does_not_exist",)})
    problems = check_concept(broken, ROOT)
    assert len(problems) == 3 and any("no_such_function" in p for p in problems)


@pytest.mark.skipif(not SHARED_CONCEPTS.is_file(), reason="../shared/concepts.yaml is not beside the checkout")
def test_ids_and_groups_are_the_fields_own():
    shared = yaml.safe_load(SHARED_CONCEPTS.read_text())
    shared_group = {entry["id"]: group for group, entries in shared.items() for entry in entries}
    for concept in CONCEPTS:
        assert concept.id in shared_group, f"{concept.id} is not a concept of ../shared/concepts.yaml"
        assert concept.group == shared_group[concept.id], concept.id
    assert set(GROUPS) == set(shared) | {"prompting_agents"} - set()


def test_github_anchors():
    text = "# Models: one transformer\n## RoPE scaling\n```\n# not a heading\n```\n## RoPE scaling\n### `decode()` and Q&A\n"
    assert heading_anchors(text) == {"models-one-transformer", "rope-scaling", "rope-scaling-1", "decode-and-qa"}


def test_unknown_concept_suggests_close_ids():
    with pytest.raises(ConceptError, match="did you mean rope"):
        find_concept("rop")


def test_list_json_and_show(capsys):
    assert main(["concepts", "--json", "--group", "decoding"]) == 0
    listed = __import__("json").loads(capsys.readouterr().out)
    assert listed and all(entry["group"] == "decoding" for entry in listed)
    assert {"name", "group", "summary", "module", "function", "test", "reference", "doc", "demo"} <= set(listed[0])
    assert main(["concepts", "show", "rope"]) == 0
    shown = capsys.readouterr().out
    assert "genforge.model:apply_rope" in shown and "src/genforge/model.py:" in shown
    assert "m-n=  2" in shown  # the demo ran


def test_unknown_concept_is_one_line_on_the_command_line(capsys):
    assert main(["concepts", "show", "no_such_thing"]) == 2
    assert "no concept 'no_such_thing'" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_CONCEPTS.is_file(), reason="../shared/concepts.yaml is not beside the checkout")
def test_every_implemented_concept_is_mapped():
    shared = yaml.safe_load(SHARED_CONCEPTS.read_text())
    kinds = {entry["id"]: entry["kind"] for entries in shared.values() for entry in entries}
    mapped = {concept.id for concept in CONCEPTS}
    assert NOT_YET_IMPLEMENTED <= set(kinds), "an allow-listed id is not a concept of the shared list"
    assert all(kinds[name] == "code" for name in NOT_YET_IMPLEMENTED)
    assert not NOT_YET_IMPLEMENTED & mapped, (
        f"mapped now, take them off NOT_YET_IMPLEMENTED: {NOT_YET_IMPLEMENTED & mapped}"
    )
    missing_code = sorted(
        name for name, kind in kinds.items() if kind == "code" and name not in mapped | NOT_YET_IMPLEMENTED
    )
    assert missing_code == [], f"concepts of kind code with no map entry: {missing_code}"
    missing_doc = sorted(name for name, kind in kinds.items() if kind == "doc" and name not in mapped)
    assert missing_doc == [], f"concepts of kind doc with no map entry: {missing_doc}"


def test_every_demo_is_shown_by_a_concept():
    shown = {concept.demo for concept in CONCEPTS if concept.demo}
    assert shown == {f"genforge.concepts.demos:{name}" for name in DEMOS}


@pytest.mark.slow  # about 30 demos of a second or two each
@pytest.mark.parametrize("name", DEMOS)
def test_every_demo_runs_and_prints(name, capsys):
    getattr(demos, name)()
    printed = capsys.readouterr().out
    assert len(printed.strip().splitlines()) >= 2, printed


@pytest.mark.slow  # collects the test files that parametrised ids point into
def test_parametrised_test_ids_name_collected_cases():
    # check_concept finds the test function; a case id ("test_x[gpt2]") must also be one pytest collects.
    with_cases = sorted({test for concept in CONCEPTS for test in concept.tests if "[" in test})
    files = sorted({test.partition("::")[0] for test in with_cases})
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])},
    ).stdout.split()
    assert [test for test in with_cases if test not in collected] == []
