"""genforge.finetune.sft: JSONL formats, completion-only labels (checked by decoding them and against
transformers' assistant mask), refusals that name the line and field, truncation reports, collation."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from genforge.finetune import (
    IGNORE_INDEX,
    SFTDataError,
    SFTDataset,
    collate,
    detect_format,
    record_to_conversation,
    tokenize_conversation,
    tokenize_prompt_completion,
)
from genforge.tokenizer import Tokenizer

# ChatML (Qwen-style default system prompt) with `{% generation %}` around what the assistant says and
# its end-of-turn token, the region transformers' return_assistant_tokens_mask marks.
CHATML = r"""
{%- for message in messages %}
{%- if loop.first and message['role'] != 'system' %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}
{%- if message['role'] == 'assistant' %}
{{- '<|im_start|>assistant\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

# Llama-3 style: bos from the template, no default system prompt, contents trimmed, no newline after
# the end-of-turn token.
LLAMA3 = r"""
{{- bos_token }}
{%- for message in messages %}
{%- if message['role'] == 'assistant' %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}
{%- else %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""
LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATION = [
    {"role": "system", "content": "You are terse. Réponds en français si besoin."},
    {"role": "user", "content": "What is 2+2? 🤔"},
    {"role": "assistant", "content": "4. "},
    {"role": "user", "content": "And in 東京?\n  Tabs\tstay."},
    {"role": "assistant", "content": "Still four, 四.\nDone"},
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is two plus two? It is four.",
    "You are a helpful assistant. Answer the question and say when you are done.",
    "Translate the sentence into French: the cat sleeps. Le chat dort.",
] * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *LLAMA3_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    path = tmp_path_factory.mktemp("sft") / "tokenizer.json"
    bpe.save(str(path))
    return path


def _tokenizer(tokenizer_file, template: str | None = CHATML) -> Tokenizer:
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    if template is not None:
        config["chat_template"] = template
    return Tokenizer(RustTokenizer.from_file(str(tokenizer_file)), config)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return _tokenizer(tokenizer_file)


def _trained_runs(tokenizer, example) -> list[str]:
    """The labelled tokens decoded, one string per contiguous run."""
    runs, current = [], []
    for token_id, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token_id  # labels are the ids themselves (the loss shifts them)
            current.append(token_id)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def _write(path, lines) -> None:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


# ------------------------------------------------------------------------------------------ formats


def test_each_format_becomes_a_conversation():
    messages = {"messages": CONVERSATION}
    assert detect_format(messages) == "messages"
    assert record_to_conversation(messages) == CONVERSATION

    plain = {"prompt": "2+2?", "completion": "4"}
    assert detect_format(plain) == "prompt_completion"
    assert record_to_conversation(plain) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    conversational = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}
    assert record_to_conversation(conversational) == CONVERSATION[:3]

    alpaca = {"instruction": "Translate.", "input": "the cat", "output": "le chat"}
    assert detect_format(alpaca) == "alpaca"
    assert record_to_conversation(alpaca) == [
        {"role": "user", "content": "Translate.\n\nthe cat"},
        {"role": "assistant", "content": "le chat"},
    ]
    for no_input in (
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ):
        assert record_to_conversation(no_input)[0] == {"role": "user", "content": "Say hi."}
    # An explicit format reads only its own fields.
    assert record_to_conversation({**alpaca, "prompt": "x"}, format="alpaca")[1]["content"] == "le chat"


# ------------------------------------------------------------------------------------------ labels


def test_labels_keep_exactly_the_assistant_turns(tokenizer):
    example = tokenize_conversation(tokenizer, CONVERSATION)
    assert example.input_ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    assistant = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    # Fails if any system/user/header token, or the newline after <|im_end|>, carries a label.
    assert _trained_runs(tokenizer, example) == assistant
    untrained = [i for i, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    assert "4." not in tokenizer.decode(untrained) and "Still four" not in tokenizer.decode(untrained)


def test_every_assistant_turn_of_a_long_conversation_is_trained(tokenizer):
    turns = []
    for n in range(4):
        turns += [{"role": "user", "content": f"question {n}"}, {"role": "assistant", "content": f"answer {n}"}]
    example = tokenize_conversation(tokenizer, turns)
    assert _trained_runs(tokenizer, example) == [f"answer {n}<|im_end|>" for n in range(4)]


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_mask_equals_transformers_assistant_tokens_mask(tokenizer_file, template):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    reference.chat_template = template
    tokenizer = _tokenizer(tokenizer_file, template)
    for conversation in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[:3] + [{"role": "user", "content": "ok"}]):
        expected = reference.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert sum(expected["assistant_masks"]) > 0
        example = tokenize_conversation(tokenizer, conversation)
        assert example.input_ids == list(expected["input_ids"])
        assert [int(label != IGNORE_INDEX) for label in example.labels] == list(expected["assistant_masks"])


def test_llama3_template_trains_trimmed_contents_and_eot(tokenizer_file):
    llama = _tokenizer(tokenizer_file, LLAMA3)
    example = tokenize_conversation(llama, CONVERSATION)
    assert example.input_ids[0] == llama.bos_token_id and example.labels[0] == IGNORE_INDEX
    assert _trained_runs(llama, example) == ["4.<|eot_id|>", "Still four, 四.\nDone<|eot_id|>"]


def test_template_refusal_names_the_record(tokenizer):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{% endfor %}"
    )
    with pytest.raises(SFTDataError, match=r"^data\.jsonl:4: .*no system"):
        tokenize_conversation(tokenizer, CONVERSATION, where="data.jsonl:4", chat_template=strict)


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Marks the last message: the rendering of a prefix is then not a prefix of the whole.
    moving = "{% for m in messages %}{% if loop.last %}[last]{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    with pytest.raises(SFTDataError, match="is not a prefix of the whole conversation"):
        tokenize_conversation(tokenizer, CONVERSATION, chat_template=moving)


def test_prompt_completion_without_a_chat_template_masks_the_prompt(tokenizer_file, tmp_path):
    plain = _tokenizer(tokenizer_file, template=None)
    example = tokenize_prompt_completion(plain, "Question: what is two plus two?\nAnswer:", " four")
    assert _trained_runs(plain, example) == [" four<|endoftext|>"]
    assert plain.decode(example.input_ids) == "Question: what is two plus two?\nAnswer: four<|endoftext|>"

    data = tmp_path / "plain.jsonl"
    _write(data, [{"prompt": "2+2=", "completion": "4"}])
    dataset = SFTDataset.from_jsonl(data, plain)
    assert plain.decode([i for i in dataset[0]["labels"] if i != IGNORE_INDEX]) == "4<|endoftext|>"
    _write(data, [{"prompt": "2+2=", "completion": "4"}, {"messages": CONVERSATION}])
    with pytest.raises(SFTDataError, match=r"plain\.jsonl:2: a 'messages' record needs a chat template"):
        SFTDataset.from_jsonl(data, plain)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "2+2?"}, r"data\.jsonl:3: missing field 'completion'"),
        ({"instruction": "Say hi.", "input": "x"}, r"data\.jsonl:3: missing field 'output'"),
        ({"instruction": "Say hi.", "output": 4}, r"data\.jsonl:3: field 'output' must be a string, got int"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
            r":3: field 'messages\[1\]\.content'",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"data\.jsonl:3: the conversation has no assistant turn"),
        ({"messages": []}, r"data\.jsonl:3: field 'messages' must be a non-empty list"),
        ({"text": "hello"}, r"data\.jsonl:3: no known fields \(has \['text'\]\); accepted formats"),
        ({"messages": CONVERSATION, "prompt": "x"}, r"data\.jsonl:3: fields of several formats"),
        ("{not json", r"data\.jsonl:3 is not valid JSON"),
    ],
)
def test_bad_records_name_file_line_and_field(tokenizer, tmp_path, bad, message):
    data = tmp_path / "data.jsonl"
    _write(data, [{"messages": CONVERSATION}, {"prompt": "a", "completion": "b"}, bad])
    with pytest.raises(SFTDataError, match=message):
        SFTDataset.from_jsonl(data, tokenizer)


def test_conversation_opening_with_the_assistant_is_refused(tokenizer):
    with pytest.raises(SFTDataError, match="opens with an assistant message"):
        tokenize_conversation(tokenizer, CONVERSATION[2:])


# ------------------------------------------------------------------------------ truncation, collate


def test_over_long_examples_are_refused_or_truncated_with_a_report(tokenizer, tmp_path):
    data = tmp_path / "long.jsonl"
    _write(data, [{"prompt": "2+2?", "completion": "4"}, {"messages": CONVERSATION}])
    full = [
        len(tokenize_conversation(tokenizer, record_to_conversation(json.loads(line))).input_ids)
        for line in data.read_text().splitlines()
    ]
    limit = full[1] - 5  # cuts the end of the second conversation only
    with pytest.raises(SFTDataError, match=rf"long\.jsonl:2: {full[1]} tokens, more than max_length={limit}"):
        SFTDataset.from_jsonl(data, tokenizer, max_length=limit)
    with pytest.warns(UserWarning, match=rf"truncated 1 of 2 examples .* cutting {full[1] - limit} tokens"):
        dataset = SFTDataset.from_jsonl(data, tokenizer, max_length=limit, overflow="truncate")
    assert (dataset.truncated_examples, dataset.truncated_tokens) == (1, full[1] - limit)
    assert [len(dataset[i]["input_ids"]) for i in range(2)] == [full[0], limit]
    # A cut that leaves no assistant token is refused rather than kept as an example that trains nothing.
    with pytest.raises(SFTDataError, match="leaves no assistant token"):
        SFTDataset.from_jsonl(data, tokenizer, max_length=5, overflow="truncate")


def test_collate_right_pads_with_ignored_labels_and_a_mask():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in out.values())


def test_dataset_feeds_collate_and_matches_the_trainer_ignore_index(tokenizer, tmp_path):
    from genforge.train.losses import IGNORE_INDEX as TRAINER_IGNORE_INDEX

    assert IGNORE_INDEX == TRAINER_IGNORE_INDEX
    data = tmp_path / "mixed.jsonl"
    _write(data, [{"messages": CONVERSATION}, {"instruction": "Say hi.", "output": "hi"}])
    dataset = SFTDataset.from_jsonl(data, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=lambda b: collate(b, tokenizer.pad_token_id))
    batch = next(iter(loader))
    lengths = [len(dataset[i]["input_ids"]) for i in range(2)]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert _trained_runs(tokenizer, dataset.examples[1]) == ["hi<|im_end|>"]
