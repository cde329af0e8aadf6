"""genforge.finetune.tasks: the docstring task from Python source (signature -> summary), its
exclusions, and the exact-match score."""

from __future__ import annotations

import json

import pytest
from finetune_shared import tiny_chat_model_dir

from genforge.checkpoint import load_model
from genforge.finetune.tasks import docstring_task, exact_match, fits, write_jsonl
from genforge.tokenizer import Tokenizer

SOURCE = '''
def add(a, b=1) -> int:
    """Return the sum of a and b."""
    return a + b


class Box:
    async def fetch(self, *keys, timeout=None):
        """Fetch every key,
        waiting at most timeout seconds.

        Longer notes that are not the summary.
        """

    def _hidden(self):
        """Private helpers are not asked about."""

    def long(self):
        """This summary runs on far too long to be a target for a short one-line answer at all."""


def add(a, b=1) -> int:
    """A second definition of the same signature is left out."""
'''


@pytest.fixture
def source_root(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tools.py").write_text(SOURCE)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "skipped.py").write_text('def tested():\n    """Never read from a tests folder."""\n')
    return tmp_path


def test_records_pair_signatures_with_one_line_summaries(source_root):
    records = sorted(docstring_task(root=source_root), key=lambda r: r["prompt"])
    assert records == [
        {
            "prompt": 'async def fetch(self, *keys, timeout=None):\n    """',
            "completion": 'Fetch every key, waiting at most timeout seconds."""',
        },
        {"prompt": 'def add(a, b=1) -> int:\n    """', "completion": 'Return the sum of a and b."""'},
    ]


def test_excluded_files_and_counts(source_root):
    with pytest.raises(ValueError, match="no documented functions"):
        docstring_task(root=source_root, exclude=[source_root / "pkg" / "tools.py"])
    assert len(docstring_task(1, root=source_root)) == 1
    assert docstring_task(root=source_root, seed=3) == docstring_task(root=source_root, seed=3)


def test_exact_match_counts_greedy_continuations_that_start_with_the_completion(tmp_path):
    from genforge.generate.generator import generate
    from genforge.generate.sampling import SamplingParams

    directory = tiny_chat_model_dir(tmp_path / "model")
    model, tokenizer = load_model(directory).eval(), Tokenizer.from_dir(directory)
    prompt = "What is two plus three?"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    said = generate(model, [ids], SamplingParams(temperature=0, max_new_tokens=4), eos_token_ids=[])
    first = tokenizer.decode(said[0].token_ids[:2], skip_special_tokens=True)
    assert first  # the tiny tokenizer's tokens all have text
    records = [{"prompt": prompt, "completion": first}, {"prompt": prompt, "completion": first + "\u2603"}]
    assert exact_match(model, tokenizer, records) == 0.5
    assert fits(tokenizer, records[0], context=len(ids) + 10) and not fits(tokenizer, records[0], context=len(ids))
    path = write_jsonl(records, tmp_path / "out" / "records.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
