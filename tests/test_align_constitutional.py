"""genforge.align.constitutional: principles read and checked from JSON, YAML and plain text;
the critique -> revise loop sends exactly the paper's conversation and writes (revised >
original) pairs the preference trainer reads; unchanged and empty revisions are skipped and
counted; one run through LocalChatModel on a tiny model; the command's flags."""

from __future__ import annotations

import argparse
import json
import random

import pytest
from finetune_shared import tiny_chat_model_dir

from genforge.align.constitutional import (
    ConstitutionError,
    CritiqueSettings,
    Principle,
    add_arguments,
    constitutional_pairs,
    critique_and_revise,
    load_principles,
    load_prompts,
    run,
)
from genforge.align.data import read_preference_records
from genforge.chat_models import ChatModel, LocalChatModel, Reply

# Tiny models: a second intra-op thread only adds synchronisation.
pytestmark = pytest.mark.usefixtures("one_thread")

HONEST = {"name": "honest", "critique_request": "Is it honest?", "revision_request": "Make it honest."}
KIND = {"name": "kind", "critique_request": "Is it kind?", "revision_request": "Make it kind."}


class ScriptedChatModel:
    """A ChatModel whose replies are a function of the conversation; it records every request."""

    def __init__(self, respond):
        self.respond, self.requests = respond, []

    def chat(self, messages, *, max_tokens=256, temperature=0.0, stop=(), seed=None, tools=None, tool_choice=None):
        self.requests.append({"messages": [dict(m) for m in messages], "max_tokens": max_tokens, "seed": seed})
        return Reply(content=self.respond(messages))

    def sample_replies(self, messages, n, *, max_tokens=256, temperature=1.0, stop=(), seed=None):
        return [self.chat(messages, max_tokens=max_tokens) for _ in range(n)]

    def complete(self, prompt, max_tokens=256, **options):
        return self.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens).content


def editor(messages):
    """Answers 'draft: <question>'; critiques name the request; a revision appends the
    principle's word to the answer being revised."""
    last = messages[-1]["content"]
    if len(messages) == 1:
        return f"draft: {last}"
    if last.startswith("Make it"):
        return f"{messages[-4]['content']} +{last.split()[-1].rstrip('.')}"
    return f"critique of {messages[-2]['content']!r} for {last!r}"


def write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ principles
def test_principles_from_json_yaml_and_text(tmp_path):
    from_json = load_principles(write(tmp_path / "p.json", json.dumps([HONEST, KIND])))
    assert from_json == [Principle(**HONEST), Principle(**KIND)]
    yaml_text = (
        "- name: honest\n  critique_request: Is it honest?\n  revision_request: Make it honest.\n"
        "- name: kind\n  critique_request: Is it kind?\n  revision_request: Make it kind.\n"
    )
    assert load_principles(write(tmp_path / "p.yaml", yaml_text)) == from_json
    lines = load_principles(write(tmp_path / "p.txt", "# a comment\n\nBe honest.\n  Be kind.  \n"))
    assert [p.name for p in lines] == ["line-3", "line-4"]
    assert lines[0].critique_request.endswith("this principle: Be honest.")
    assert lines[1].revision_request.startswith(
        "Rewrite your last response so that it follows this principle: Be kind."
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "non-empty list"),
        ('{"name": "x"}', "non-empty list"),
        ("[1]", "principle 0 is a int"),
        (json.dumps([{"name": "x", "critique_request": "c"}]), "missing ['revision_request']"),
        (json.dumps([HONEST | {"critque": "typo"}]), "unknown ['critque']"),
        (json.dumps([HONEST | {"revision_request": "  "}]), "'revision_request' must be a non-empty string"),
        (json.dumps([HONEST, HONEST]), "'honest' is used twice"),
        ("[{", "is not valid JSON"),
    ],
)
def test_bad_principles_are_refused_with_what_is_wrong(tmp_path, content, message):
    with pytest.raises(ConstitutionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_principles(write(tmp_path / "p.json", content))


def test_empty_or_missing_principles_files(tmp_path):
    with pytest.raises(ConstitutionError, match="holds no principles"):
        load_principles(write(tmp_path / "p.txt", "# only a comment\n\n"))
    with pytest.raises(ConstitutionError, match="does not exist"):
        load_principles(tmp_path / "none.json")
    with pytest.raises(ConstitutionError, match="not valid YAML"):
        load_principles(write(tmp_path / "p.yml", "- [unclosed"))


def test_prompts_from_jsonl_and_text(tmp_path):
    jsonl = write(
        tmp_path / "q.jsonl",
        json.dumps({"prompt": "Hi?"})
        + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]})
        + "\n",
    )
    assert load_prompts(jsonl) == [
        [{"role": "user", "content": "Hi?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    ]
    assert load_prompts(write(tmp_path / "q.txt", "One?\n\nTwo?\n")) == [
        [{"role": "user", "content": "One?"}],
        [{"role": "user", "content": "Two?"}],
    ]
    with pytest.raises(ConstitutionError, match="q2.jsonl:1: needs a 'prompt'"):
        load_prompts(write(tmp_path / "q2.jsonl", json.dumps({"text": "x"}) + "\n"))
    with pytest.raises(ConstitutionError, match="last message must be the user's"):
        load_prompts(write(tmp_path / "q3.jsonl", json.dumps({"prompt": [{"role": "assistant", "content": "x"}]})))


# ---------------------------------------------------------------------------------- the loop
def test_the_exact_conversation_sent_and_the_pair_written(tmp_path):
    model = ScriptedChatModel(editor)
    assert isinstance(model, ChatModel)
    settings = CritiqueSettings(rounds=1, selection="all", max_tokens=32)
    result = constitutional_pairs(model, ["2+2?"], [Principle(**HONEST)], tmp_path / "pairs.jsonl", settings)
    user = {"role": "user", "content": "2+2?"}
    critique = "critique of 'draft: 2+2?' for 'Is it honest?'"
    assert [r["messages"] for r in model.requests] == [
        [user],
        [user, {"role": "assistant", "content": "draft: 2+2?"}, {"role": "user", "content": "Is it honest?"}],
        [
            user,
            {"role": "assistant", "content": "draft: 2+2?"},
            {"role": "user", "content": "Is it honest?"},
            {"role": "assistant", "content": critique},
            {"role": "user", "content": "Make it honest."},
        ],
    ]
    assert all(r["max_tokens"] == 32 and r["seed"] is None for r in model.requests)  # greedy: no seed
    records = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert records == [
        {
            "prompt": [user],
            "chosen": "draft: 2+2? +honest",
            "rejected": "draft: 2+2?",
            "principle": ["honest"],
            "critique": [critique],
            "revisions": ["draft: 2+2? +honest"],
        }
    ]
    assert (result.prompts, result.pairs, result.skipped_unchanged, result.skipped_empty) == (1, 1, 0, 0)
    # The preference trainer reads it as a chat pair.
    ((_, parsed),) = read_preference_records(tmp_path / "pairs.jsonl")
    assert parsed["chat"] and parsed["chosen"]["content"] == "draft: 2+2? +honest"


def test_rounds_with_every_principle_revise_the_last_revision(tmp_path):
    model = ScriptedChatModel(editor)
    principles = [Principle(**HONEST), Principle(**KIND)]
    settings = CritiqueSettings(rounds=2, selection="all")
    constitutional_pairs(model, ["Q"], principles, tmp_path / "pairs.jsonl", settings)
    (record,) = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert record["principle"] == ["honest", "kind", "honest", "kind"]
    assert record["revisions"][-1] == record["chosen"] == "draft: Q +honest +kind +honest +kind"
    assert record["rejected"] == "draft: Q"
    # The third critique is asked about the second revision.
    assert model.requests[5]["messages"][1]["content"] == "draft: Q +honest +kind"
    assert len(model.requests) == 1 + 2 * 4


def test_sampled_principles_follow_the_seed():
    principles = [Principle(**HONEST), Principle(**KIND), Principle("brief", "Is it brief?", "Make it brief.")]
    settings = CritiqueSettings(rounds=6, selection="sample", seed=3)
    outcome = critique_and_revise(
        ScriptedChatModel(editor), [{"role": "user", "content": "Q"}], principles, settings, random.Random(3)
    )
    expected = random.Random(3)
    assert [step.principle for step in outcome.steps] == [expected.choice(principles).name for _ in range(6)]
    # Sampling at a temperature passes a seed per reply, drawn from the same generator.
    model = ScriptedChatModel(editor)
    critique_and_revise(
        model, [{"role": "user", "content": "Q"}], principles, CritiqueSettings(temperature=0.7), random.Random(0)
    )
    assert all(isinstance(r["seed"], int) for r in model.requests)


def test_unchanged_and_empty_revisions_are_skipped_and_counted(tmp_path):
    def respond(messages):
        question = messages[0]["content"]
        if len(messages) == 1:
            return "" if question == "silent" else f"answer to {question}"
        if messages[-1]["content"].startswith("Make it"):
            return {"same": messages[-4]["content"] + "  ", "blank": " \n"}.get(question, "better")
        return "a critique"

    model = ScriptedChatModel(respond)
    result = constitutional_pairs(
        model, ["same", "blank", "silent", "fine"], [Principle(**HONEST)], tmp_path / "pairs.jsonl"
    )
    assert (result.pairs, result.skipped_unchanged, result.skipped_empty) == (1, 1, 2)
    (record,) = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert (record["chosen"], record["rejected"]) == ("better", "answer to fine")
    # An empty first answer is not critiqued.
    assert sum(r["messages"][0]["content"] == "silent" for r in model.requests) == 1


def test_bad_settings_are_refused_before_any_reply(tmp_path):
    model = ScriptedChatModel(editor)
    principles = [Principle(**HONEST)]
    for settings, message in [
        (CritiqueSettings(rounds=0), "rounds must be a positive integer"),
        (CritiqueSettings(selection="every"), "selection must be one of"),
        (CritiqueSettings(max_tokens=0), "max_tokens must be a positive integer"),
        (CritiqueSettings(temperature=-1.0), "temperature must be >= 0"),
    ]:
        with pytest.raises(ConstitutionError, match=message):
            constitutional_pairs(model, ["Q"], principles, tmp_path / "p.jsonl", settings)
    with pytest.raises(ConstitutionError, match="no principles"):
        constitutional_pairs(model, ["Q"], [], tmp_path / "p.jsonl")
    with pytest.raises(ConstitutionError, match="prompt 1: the prompt is empty"):
        constitutional_pairs(model, ["Q", " "], principles, tmp_path / "p.jsonl")
    with pytest.raises(ConstitutionError, match="must be a ChatModel"):
        constitutional_pairs(object(), ["Q"], principles, tmp_path / "p.jsonl")
    assert model.requests == [] and not (tmp_path / "p.jsonl").exists()


# ------------------------------------------------------------------------ a local model, the CLI
@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return tiny_chat_model_dir(tmp_path_factory.mktemp("chat"))


def test_a_local_chat_model_drives_the_loop(tmp_path, chat_model_dir):
    model = LocalChatModel(chat_model_dir)
    prompts = ["What is two plus three?", "Name the colour of the sky."]
    settings = CritiqueSettings(rounds=1, max_tokens=6, temperature=1.0, seed=0)
    result = constitutional_pairs(model, prompts, [Principle(**HONEST)], tmp_path / "pairs.jsonl", settings)
    assert result.prompts == 2
    assert result.pairs + result.skipped_unchanged + result.skipped_empty == 2
    # Each reply is what the model writes for the conversation so far: the same seed, the same text.
    again = constitutional_pairs(model, prompts, [Principle(**HONEST)], tmp_path / "again.jsonl", settings)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "pairs.jsonl").read_text()
    assert again.pairs == result.pairs


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_the_command_checks_its_flags_then_writes_pairs(tmp_path, chat_model_dir, capsys):
    principles = write(tmp_path / "p.json", json.dumps([HONEST]))
    prompts = write(tmp_path / "q.txt", "What is two plus three?\n")
    common = ["--principles", str(principles), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    for extra, message in [
        ([], "give exactly one model"),
        (["--model", str(chat_model_dir), "--endpoint", "http://x/v1"], "give exactly one model"),
        (["--endpoint", "http://x/v1"], "needs --endpoint-model"),
        (["--model", str(chat_model_dir), "--endpoint-model", "m"], "goes with --endpoint"),
        (["--model", str(chat_model_dir), "--rounds", "0"], "rounds must be a positive integer"),
    ]:
        with pytest.raises(ConstitutionError, match=message):
            run(parse(common + extra))
    assert run(parse(common + ["--model", str(chat_model_dir), "--max-tokens", "4", "--temperature", "1"])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 1 and summary["path"] == str(tmp_path / "o.jsonl")
    assert (tmp_path / "o.jsonl").exists()
