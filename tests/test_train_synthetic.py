"""Self-instruct: new tasks parsed from the generator, filtered, deduplicated against the pool,
answered, written for fine-tuning, with a report of what was dropped and why."""

import json

import pytest
from prompting_fakes import ScriptedChatModel

from genforge.finetune.sft import detect_format
from genforge.train.data import DataError
from genforge.train.synthetic import SelfInstructSettings, Task, parse_task, quality_problem, self_instruct, write_tasks

SEEDS = [
    Task("Give three synonyms for the word happy.", "", "glad, cheerful, joyful"),
    Task("Translate the sentence into French.", "The cat sleeps.", "Le chat dort."),
    Task("Sort the numbers in ascending order.", "5, 2, 9", "2, 5, 9"),
]

PROPOSALS = {
    # reply -> what should happen to it
    "Task 4: Summarize the paragraph in one sentence.\nInput 4: Rivers carry water to the sea.": "kept",
    "Task 4: Draw a picture of a cat in the style of Monet.": "needs_non_text",
    "Task 4: Hi": "too_short",
    "I cannot think of one.": "unparsed",
    "Task 4: Give three synonyms for the word happy, please.": "near_duplicate",
    "Task 4: Write a haiku about autumn leaves falling.\nInput 4: none": "kept",
    "Task 4: - list some fruits that are red": "starts_with_punctuation",
}


def responder(messages):
    prompt = messages[-1]["content"]
    if prompt.startswith("Come up with"):
        return next(iter(responder.queue))
    return f"answer to: {prompt.splitlines()[0]}"


def test_parse_task_and_quality_rules():
    assert parse_task("Task 7: Name a color.\nInput 7: <noinput>", 7) == Task("Name a color.")
    assert parse_task("Task 3: wrong number", 7) is None
    settings = SelfInstructSettings()
    assert quality_problem(Task("Plot the sales over time."), settings) == "needs_non_text"
    assert quality_problem(Task("Explain what a prime number is."), settings) is None


def test_self_instruct_filters_dedups_answers_and_reports(tmp_path):
    replies = list(PROPOSALS)
    calls = {"n": 0}

    def respond(messages):
        prompt = messages[-1]["content"]
        if prompt.startswith("Come up with"):
            # The requested task number depends on how many examples were shown.
            number = prompt.count("\nTask ") + 1 if not prompt.startswith("Task") else 0
            reply = replies[calls["n"] % len(replies)]
            calls["n"] += 1
            return reply.replace("Task 4", f"Task {number}").replace("Input 4", f"Input {number}")
        return f"answer to: {prompt.splitlines()[0]}"

    settings = SelfInstructSettings(num_tasks=2, examples_per_prompt=3, max_requests=len(replies))
    tasks, report = self_instruct(ScriptedChatModel(respond=respond), SEEDS, settings)
    assert [t.instruction for t in tasks] == [
        "Summarize the paragraph in one sentence.",
        "Write a haiku about autumn leaves falling.",
    ]
    assert tasks[0].input == "Rivers carry water to the sea." and tasks[1].input == ""
    assert tasks[0].output.startswith("answer to: Summarize")
    assert report.rejected == {
        "needs_non_text": 1,
        "too_short": 1,
        "unparsed": 1,
        "near_duplicate": 1,
    }
    assert report.requests == 6 and report.diversity["unique_first_words"] == 2
    path = write_tasks(tasks, report, tmp_path / "tasks.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(detect_format(record) == "alpaca" for record in records)
    assert json.loads((tmp_path / "tasks.jsonl.report.json").read_text())["generated"] == 2


def test_bad_settings_and_seeds(tmp_path):
    with pytest.raises(DataError, match="near_duplicate"):
        SelfInstructSettings(near_duplicate=0).validate()
    from genforge.train.synthetic import read_seed_tasks

    (tmp_path / "seeds.jsonl").write_text('{"input": "no instruction"}\n')
    with pytest.raises(DataError, match="needs a non-empty 'instruction'"):
        read_seed_tasks(tmp_path / "seeds.jsonl")


def test_synthesize_command_end_to_end_on_a_local_model(text_model_dir, tmp_path, capsys):
    """The whole path through a real (tiny, random) model: what it writes is checked, not its quality."""
    from genforge.cli import main

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": t.instruction, "input": t.input}) + "\n" for t in SEEDS))
    args = ["data", "synthesize", "--seeds", str(seeds), "--model", str(text_model_dir), "--num", "1"]
    args += ["--max-tokens", "48"]
    assert main([*args, "--out", str(tmp_path / "out.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "requests" in err and (tmp_path / "out.jsonl.report.json").is_file()
