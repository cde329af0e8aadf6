"""genforge.finetune.distill: sequence-level distillation (the teacher's greedy answers become
the training data) and soft-target distillation in a fine-tuning run."""

from __future__ import annotations

import json

import pytest
from finetune_shared import arithmetic_records, tiny_chat_model_dir

from genforge.finetune.distill import teacher_answers
from genforge.finetune.run import FinetuneConfig, FinetuneError, finetune
from genforge.finetune.sft import read_sft_records
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.loading import load_for_inference


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    student = tiny_chat_model_dir(root / "student", seed=0)
    teacher = tiny_chat_model_dir(root / "teacher", seed=1, num_layers=3)
    data = root / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_records(40)))
    return student, teacher, data


def test_teacher_answers_replace_the_last_answer_with_greedy_decoding(dirs):
    _, teacher_dir, _ = dirs
    loaded = load_for_inference(teacher_dir)
    records = [
        {"messages": [{"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"}]},
        {"prompt": "What is two plus three?", "completion": "five"},
    ]
    answered = teacher_answers(loaded.model, loaded.tokenizer, records, max_new_tokens=6, eos_token_ids=[])
    for record, answer in zip(records, answered):
        question = record.get("messages", [{"role": "user", "content": record.get("prompt")}])[:1]
        ids = loaded.tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
        expected = generate(
            loaded.model, [ids], SamplingParams(temperature=0, max_new_tokens=6), loaded.tokenizer, eos_token_ids=[]
        )[0].text
        assert answer == {"messages": question + [{"role": "assistant", "content": expected}]}


def test_sequence_distillation_trains_on_the_teachers_answers(dirs, tmp_path):
    student, teacher, data = dirs
    config = FinetuneConfig(
        model_dir=student,
        data=data,
        out_dir=tmp_path / "run",
        teacher=teacher,
        distill="sequence",
        teacher_max_new_tokens=4,
        max_steps=2,
        batch_size=4,
        seq_len=64,
        eval_fraction=0.1,
        progress=False,
    )
    result = finetune(config)
    written = read_sft_records(tmp_path / "run" / "teacher" / "0-sums.jsonl")
    assert len(written) == result.train_examples == 36
    originals = {json.dumps(r["messages"][:1]) for r in arithmetic_records(40)}
    for _, record in written:
        assert json.dumps(record["messages"][:1]) in originals and record["messages"][-1]["role"] == "assistant"
    # resume reads the teacher's answers back instead of generating them again
    assert finetune(config, resume=True).train_examples == 36


def test_soft_distillation_reports_both_losses(dirs, tmp_path):
    student, teacher, data = dirs
    config = FinetuneConfig(
        model_dir=student,
        data=data,
        out_dir=tmp_path / "soft",
        teacher=teacher,
        distill_alpha=0.7,
        distill_temperature=2.0,
        max_steps=2,
        batch_size=4,
        seq_len=64,
        progress=False,
    )
    finetune(config)
    steps = [json.loads(line) for line in (tmp_path / "soft" / "metrics.jsonl").read_text().splitlines()]
    trained = [step for step in steps if "kd_loss" in step]
    assert len(trained) == 2 and all(step["kd_loss"] > 0 and step["ce_loss"] > 0 for step in trained)
    for step in trained:
        assert step["loss"] == pytest.approx(0.7 * step["kd_loss"] + 0.3 * step["ce_loss"], rel=1e-5)


def test_bad_teachers_are_refused_before_work(dirs, tmp_path):
    student, _, data = dirs
    with pytest.raises(FinetuneError, match="no config.json"):
        finetune(FinetuneConfig(model_dir=student, data=data, out_dir=tmp_path / "a", teacher=tmp_path))
    with pytest.raises(FinetuneError, match="distill 'hard' is not supported; accepted: soft, sequence"):
        finetune(FinetuneConfig(model_dir=student, data=data, out_dir=tmp_path / "b", teacher=student, distill="hard"))
