"""Prompt templates: declared variables, clear errors, files with specs or front matter."""

from __future__ import annotations

import json

import pytest

from genforge.prompting import PromptTemplate, PromptTemplateError, load_template


def test_renders_declared_variables_and_fills_defaults():
    template = PromptTemplate(
        "Translate to {{ language }}: {{ text }}",
        variables={"text": "the text", "language": {"description": "target", "default": "French"}},
        name="translate",
    )
    assert template.required == ["text"]
    assert template.render(text="cat") == "Translate to French: cat"
    assert template.render(text="cat", language="German") == "Translate to German: cat"


def test_missing_and_undeclared_variables_are_named():
    template = PromptTemplate("Q: {{ question }}", name="qa")
    with pytest.raises(PromptTemplateError, match=r"template 'qa' needs 'question'"):
        template.render()
    with pytest.raises(PromptTemplateError, match=r"got 'questoin', which it does not declare"):
        template.render(question="x", questoin="typo")


def test_a_template_reading_an_undeclared_variable_is_refused_when_made():
    with pytest.raises(PromptTemplateError, match=r"uses 'context' but declares only 'question'"):
        PromptTemplate("{{ context }} {{ question }}", variables=["question"], name="rag")


def test_loops_and_globals_are_not_taken_for_variables():
    template = PromptTemplate("{% for x in items %}{{ loop.index }}. {{ x }}\n{% endfor %}{{ range(2) | list }}")
    assert list(template.declared) == ["items"]
    assert template.render(items=["a", "b"]) == "1. a\n2. b\n[0, 1]"


def test_strict_undefined_and_the_sandbox():
    template = PromptTemplate("{{ item.name }}", name="t")
    with pytest.raises(PromptTemplateError, match="template 't'.*name"):
        template.render(item={})
    unsafe = PromptTemplate("{{ x.__class__.__mro__ }}", name="u")
    with pytest.raises(PromptTemplateError, match="unsafe"):
        unsafe.render(x=1)


def test_syntax_errors_and_bad_declarations():
    with pytest.raises(PromptTemplateError, match="not valid Jinja"):
        PromptTemplate("{{ a ")
    with pytest.raises(PromptTemplateError, match="identifiers"):
        PromptTemplate("x", variables=["not a name"])
    with pytest.raises(PromptTemplateError, match="twice"):
        PromptTemplate("{{ a }}", variables=["a", "a"])


def test_system_prompt_makes_messages():
    template = PromptTemplate("{{ q }}", system="You answer in {{ style }}.", variables=["q", "style"])
    assert template.messages(q="hi", style="haiku") == [
        {"role": "system", "content": "You answer in haiku."},
        {"role": "user", "content": "hi"},
    ]


def test_load_from_yaml_and_json_specs(tmp_path):
    yaml_file = tmp_path / "summarise.yaml"
    yaml_file.write_text(
        "name: summarise\nvariables:\n  text: the text\n  words: {default: 20}\n"
        "system: Be brief.\ntemplate: |\n  Summarise in {{ words }} words:\n  {{ text }}\n"
    )
    template = load_template(yaml_file)
    assert template.name == "summarise"
    assert template.render(text="abc") == "Summarise in 20 words:\nabc\n"
    json_file = tmp_path / "q.json"
    json_file.write_text(json.dumps({"template": "Q: {{ q }}", "variables": ["q"]}))
    assert load_template(str(json_file)).render(q="why") == "Q: why"
    bad = tmp_path / "bad.yaml"
    bad.write_text("template: x\ntemplte: y\n")
    with pytest.raises(PromptTemplateError, match="unknown spec keys 'templte'"):
        load_template(bad)


def test_front_matter_yaml_or_json_and_plain_strings(tmp_path):
    text_file = tmp_path / "ask.jinja"
    text_file.write_text("---\nvariables: [topic]\ndescription: ask\n---\nTell me about {{ topic }}.\n")
    template = load_template(text_file)
    assert template.description == "ask" and template.render(topic="tea") == "Tell me about tea.\n"
    inline = load_template('---\n{"variables": {"a": "first"}}\n---\n{{ a }}!')
    assert inline.render(a="x") == "x!"
    assert load_template("Hello {{ who }}").render(who="you") == "Hello you"
    with pytest.raises(PromptTemplateError, match="never closed"):
        load_template("---\nvariables: [a]\n{{ a }}")
    with pytest.raises(FileNotFoundError):
        load_template(tmp_path / "missing.yaml")
