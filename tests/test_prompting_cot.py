"""Chain-of-thought prompting: zero- and few-shot prompts, answer extraction, self-consistency."""

from __future__ import annotations

import pytest
from prompting_fakes import ScriptedChatModel

from genforge.chat_models import LocalChatModel
from genforge.generate.self_consistency import vote_on_texts
from genforge.prompting import (
    ZERO_SHOT_TRIGGER,
    answer_extractor,
    chain_of_thought,
    cot_examples_prompt,
    extract_choice,
    extract_number,
    self_consistent_cot,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds overhead

RATIONALES = [
    {
        "question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
        "rationale": "Tom starts with 3 apples. 3 + 2 = 5.",
        "answer": "5",
    },
    {
        "question": "A box holds 4 rows of 6 eggs. How many eggs?",
        "rationale": "4 rows of 6 is 4 * 6 = 24.",
        "answer": "24",
    },
]


def test_answer_extractors():
    assert extract_number("so 1,200.0 dollars in all") == "1200"
    assert extract_number("no digits") is None
    assert extract_choice("Between (A) and (C), the answer is (C).", ["A", "B", "C"]) == "C"
    assert extract_choice("I pick b", ["A", "B"]) == "B"
    assert extract_choice("Answer is unclear, but A fits best", ["A", "B"]) == "A"
    assert extract_choice("nothing", ["A", "B"]) is None
    assert answer_extractor("final")("so the answer is $18.") == "18"
    assert answer_extractor(r"ANSWER: (\w+)")("ANSWER: x ... ANSWER: y") == "y"
    assert answer_extractor(["yes", "no"])("Yes, it does.") == "yes"
    with pytest.raises(ValueError, match="not 'final', 'number' or a valid regular expression"):
        answer_extractor("(unclosed")


def test_zero_shot_asks_to_think_step_by_step_and_reads_the_final_answer():
    model = ScriptedChatModel(["There are 3 + 4 = 7 cats, minus 2 is 5. The answer is 5."])
    result = chain_of_thought(model, "7 cats, 2 leave. How many?")
    assert result.answer == "5" and result.answer_reply is None
    assert model.calls[0][1] == [{"role": "user", "content": f"Q: 7 cats, 2 leave. How many?\nA: {ZERO_SHOT_TRIGGER}"}]


def test_an_unreadable_chain_gets_kojimas_second_stage():
    model = ScriptedChatModel(["Some cats leave, so fewer remain.", "five"])
    result = chain_of_thought(model, "7 cats, 2 leave. How many?", extract="final")
    assert result.answer == "five" and result.answer_reply == "five"
    follow_up = model.calls[1][1]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]
    assert follow_up[2]["content"] == "Therefore, the answer is"


def test_few_shot_prompt_shows_rationales_then_the_question():
    prompt = cot_examples_prompt(RATIONALES, k=2)
    model = ScriptedChatModel(["3 boxes of 4 is 12. The answer is 12."])
    result = chain_of_thought(model, "3 boxes of 4 pens. How many pens?", examples=prompt)
    assert result.answer == "12"
    sent = model.calls[0][1][0]["content"]
    assert sent.startswith("Q: Tom has 3 apples") and "A: Tom starts with 3 apples. 3 + 2 = 5. The answer is 5." in sent
    assert sent.endswith("Q: 3 boxes of 4 pens. How many pens?\nA:")


def test_self_consistency_votes_over_sampled_chains_with_the_shared_vote():
    chains = [
        "6 * 3 = 18. The answer is 18.",
        "6 + 3 = 9... no, 18. The answer is $18.00",
        "The answer is 20.",
        "I am not sure.",
        "3 * 6 is 20? The answer is 20.",
        "Total is 18",
    ]
    model = ScriptedChatModel(chains)
    vote = self_consistent_cot(model, "6 bags of 3. How many?", n=6, seed=7)
    assert vote.answer == "18"
    assert vote.vote.counts == {"18": 3, "20": 2} and vote.vote.num_unparsed == 1
    assert vote.vote.counts == vote_on_texts(chains).counts
    kind, _, options = model.calls[0]
    assert kind == "sample" and options["n"] == 6 and options["seed"] == 7 and options["temperature"] == 0.7
    with pytest.raises(ValueError, match="temperature must be > 0"):
        self_consistent_cot(model, "q", n=3, temperature=0)


def test_self_consistency_through_a_local_model(text_model_dir):
    """Sampled chains from a tiny random model: seeded, so the same seed gives the same vote,
    and the vote is the shared one over exactly those chains."""
    model = LocalChatModel(text_model_dir)
    first = self_consistent_cot(model, "2 plus 2?", n=3, max_tokens=8, seed=3)
    second = self_consistent_cot(model, "2 plus 2?", n=3, max_tokens=8, seed=3)
    assert len(first.chains) == 3 and first.chains == second.chains
    assert first.vote.counts == vote_on_texts(first.chains).counts
