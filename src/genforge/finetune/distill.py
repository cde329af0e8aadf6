"""Knowledge distillation for fine-tuning: a teacher model's knowledge moved into a student.

Two kinds, both over a teacher that shares the student's vocabulary:

- Soft targets (Hinton, Vinyals & Dean 2015): the student is trained towards the teacher's
  next-token distributions at every target position, mixed with the cross-entropy on the data:
  `alpha * KD + (1 - alpha) * CE`. The divergence (forward or reverse KL, total variation, the
  generalized JSD) is `distillation_loss`, and the training loop (`genforge.train.Trainer` given
  a `teacher`) computes it slice by slice through both LM heads. A fine-tuning run takes it with
  `FinetuneConfig(teacher=DIR, distill="soft")`.
- Hard targets, sequence-level distillation (Kim & Rush 2016): the teacher answers each prompt
  of the data (greedy decoding, the mode of its sequence distribution), and the student is
  fine-tuned on those answers with the ordinary loss. `teacher_answers` rewrites the records;
  `FinetuneConfig(teacher=DIR, distill="sequence")` does it before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..train.losses import DISTILLATION_KINDS, distillation_loss
from .sft import SFTDataError, detect_format, record_to_conversation

DISTILL_MODES = ("soft", "sequence")


def _prompt_of(record: dict[str, Any], where: str, templated: bool) -> tuple[list[dict] | str, dict]:
    """(what the teacher is asked, how to rebuild the record with its answer)."""
    if not templated:
        if detect_format(record, where) != "prompt_completion" or not isinstance(record.get("prompt"), str):
            raise SFTDataError(
                f"{where}: without a chat template only string prompt/completion records can be distilled"
            )
        return record["prompt"], {"prompt": record["prompt"]}
    messages = record_to_conversation(record, None, where)
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return messages[:last], {"messages": messages[:last]}


def teacher_answers(
    teacher,
    tokenizer,
    records: Sequence[dict[str, Any]],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    eos_token_ids: Sequence[int] | None = None,
    sources: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The records with their last assistant answer replaced by the teacher's greedy answer
    (sequence-level knowledge distillation). With a chat template each record becomes
    `{"messages": [...turns before the last answer, the teacher's answer]}`; without one, a
    string prompt/completion record keeps its prompt and gets the teacher's completion."""
    from ..generate.generator import generate
    from ..generate.sampling import SamplingParams

    templated = tokenizer.chat_template is not None
    where = list(sources) if sources is not None else [f"record {i + 1}" for i in range(len(records))]
    asked = [_prompt_of(dict(record), place, templated) for record, place in zip(records, where)]
    was_training = teacher.training
    teacher.eval()
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    answered = []
    for start in range(0, len(asked), batch_size):
        chunk = asked[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
            if templated
            else tokenizer.encode(question, add_special_tokens=False)
            for question, _ in chunk
        ]
        for (_, rebuilt), completion in zip(
            chunk, generate(teacher, prompts, params, tokenizer=tokenizer, eos_token_ids=eos_token_ids)
        ):
            answer = completion.text
            if templated:
                answered.append({"messages": rebuilt["messages"] + [{"role": "assistant", "content": answer}]})
            else:
                answered.append({"prompt": rebuilt["prompt"], "completion": answer})
    teacher.train(was_training)
    return answered


__all__ = ["DISTILLATION_KINDS", "DISTILL_MODES", "distillation_loss", "teacher_answers"]
