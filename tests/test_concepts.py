"""The concept map stays true: everything it names exists, and the command shows and runs it."""

from pathlib import Path

import pytest
import yaml

from genforge.cli import main
from genforge.concepts import (
    GROUPS,
    ConceptError,
    check_concept,
    find_concept,
    heading_anchors,
    load_concept_map,
    repository_root,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_CONCEPTS = ROOT.parent / "shared" / "concepts.yaml"
CONCEPTS = load_concept_map()


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
