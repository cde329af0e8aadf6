"""Answers: extractive with citations, generative with a fake or a tiny real generator, support
checks that flag what the cited passage does not say, and the "not covered" refusal.
(Extractive answers over the real seeds corpus are checked in test_rag_evaluate.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_rag_retrieve import FakeGenerator, HashEmbedder, tiny_chunks

from genforge.rag import HybridIndex, Retriever
from genforge.rag.answer import (
    NOT_COVERED,
    AnswerConfig,
    Answerer,
    SupportChecker,
    chunk_units,
)
from genforge.rag.chunking import Chunk

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def retriever():
    embedder = HashEmbedder()
    return Retriever(HybridIndex.build(tiny_chunks(), embedder), embedder)


def loose(**kw):
    # The hashed bag-of-words embedder has its own cosine scale; these tests set the threshold.
    return AnswerConfig(min_confidence=0.2, **kw)


def test_chunk_units_split_answers_not_wrapped_prose():
    text = "12. Q: What is BPE?\n\nA:\n\nMerges frequent pairs.\nStarts from characters.\n\nA long sentence that\nwraps in the source. Next one."
    units = [text[s:e] for s, e in chunk_units(Chunk(text, "x", 0, len(text)))]
    assert units == [
        "What is BPE?",
        "Merges frequent pairs.",
        "Starts from characters.",
        "A long sentence that\nwraps in the source.",
        "Next one.",
    ]


def test_extractive_answer_cites_the_chunks_it_quotes(retriever):
    answer = Answerer(retriever, config=loose(max_sentences=2)).ask(
        "how does paged attention store the key value cache"
    )
    assert answer.covered and answer.mode == "extractive"
    chunks = {c.chunk_id: c for c in retriever.index.chunks}
    for sentence in answer.sentences:
        (n,) = sentence.citations
        citation = answer.citations[n - 1]
        chunk = chunks[citation.chunk_id]
        assert sentence.text in chunk.text and sentence.supported and sentence.support == pytest.approx(1.0)
        assert (citation.source, citation.start, citation.end) == (chunk.source, chunk.start, chunk.end)
    assert answer.citations[0].source == "paged.md"
    rendered = answer.render()
    assert "[1]" in rendered and "Sources:" in rendered and "paged.md:" in rendered


def test_low_confidence_gives_the_not_covered_answer(retriever):
    answer = Answerer(retriever, config=AnswerConfig(min_confidence=0.99)).ask("paged attention")
    assert not answer.covered and answer.text == NOT_COVERED and answer.render() == NOT_COVERED
    assert answer.citations == [] and answer.confidence < 0.99


def test_generative_answer_sentences_are_checked_against_their_citations(retriever):
    generator = FakeGenerator(
        {
            "NOT COVERED": (
                "Paged attention stores the key value cache in fixed size blocks [1]. "
                "The dough must rise for two hours before baking [1]. "
                "A block table maps sequences to physical blocks. "
                "It is like virtual memory pages [7]."
            )
        }
    )
    answerer = Answerer(retriever, generator, loose(mode="generative", k=3))
    answer = answerer.ask("how does paged attention store the key value cache")
    prompt = generator.prompts[-1]
    assert "[1] paged.md" in prompt and "cite" in prompt and "Question: how does paged attention" in prompt
    good, wrong, uncited, unknown = answer.sentences
    assert good.supported and good.citations == [1] and good.support > 0.8
    assert not wrong.supported and wrong.problem == "low support" and wrong.support < 0.5
    assert not uncited.supported and uncited.problem == "no citation"
    assert not unknown.supported and unknown.problem == "cites an unknown passage"
    assert [c.number for c in answer.citations] == [1]
    assert answer.citations[0].source == "paged.md"
    assert answer.text.count("(unsupported)") == 3


def test_generator_saying_not_covered_is_respected(retriever):
    generator = FakeGenerator({"Question:": "NOT COVERED"})
    answer = Answerer(retriever, generator, loose(mode="generative")).ask("paged attention blocks")
    assert not answer.covered and answer.text == NOT_COVERED


def test_citation_after_the_full_stop_joins_its_sentence(retriever):
    generator = FakeGenerator({"Question:": "LoRA trains two small low rank matrices. [1]"})
    answer = Answerer(retriever, generator, loose(mode="generative", k=2)).ask("lora low rank matrices")
    (sentence,) = answer.sentences
    assert sentence.citations == [1] and sentence.supported


def test_bad_configuration_is_refused(retriever):
    with pytest.raises(ValueError, match="accepted: extractive, generative"):
        AnswerConfig(mode="poem")
    with pytest.raises(ValueError, match="need a generator"):
        Answerer(retriever, None, AnswerConfig(mode="generative"))
    with pytest.raises(ValueError, match="threshold"):
        SupportChecker(HashEmbedder(), threshold=2.0)
    with pytest.raises(ValueError, match="empty"):
        Answerer(retriever).ask("  ")


def test_openai_generator_sends_a_chat_request():
    from genforge.rag.expand import OpenAIGenerator

    calls = []

    def create(**request):
        calls.append(request)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content="Blocks [1]."))])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    generator = OpenAIGenerator("my-model", client=client)
    assert generator.complete("hello", max_tokens=7) == "Blocks [1]."
    assert calls == [
        {"model": "my-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 7, "temperature": 0.0}
    ]


def test_genforge_model_as_generator(text_model_dir, retriever):
    from genforge.rag.expand import GenforgeGenerator

    generator = GenforgeGenerator(text_model_dir)
    text = generator.complete("Say something.", max_tokens=5)
    assert isinstance(text, str)
    # A random model cites nothing: whatever it writes is flagged, never passed off as grounded.
    answer = Answerer(retriever, generator, loose(mode="generative", max_tokens=8)).ask("paged attention blocks")
    assert all(not s.supported for s in answer.sentences)


def test_genforge_generator_refuses_a_non_model_directory(tmp_path):
    from genforge.rag.expand import GenforgeGenerator

    with pytest.raises(ValueError, match="no config.json"):
        GenforgeGenerator(tmp_path)


def test_openai_generator_through_the_official_client():
    """The real `openai` client against a local stand-in endpoint: the request it sends and the
    reply it parses are the wire format any OpenAI-compatible server speaks."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from genforge.rag.expand import OpenAIGenerator

    seen = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            body = json.dumps(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "Blocks hold the cache [1]."},
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        generator = OpenAIGenerator("m", base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="k")
        assert generator.complete("where is the cache?", max_tokens=9) == "Blocks hold the cache [1]."
    finally:
        server.shutdown()
        server.server_close()
    path, request = seen[0]
    assert path == "/v1/chat/completions"
    assert request["model"] == "m" and request["max_tokens"] == 9
    assert request["messages"] == [{"role": "user", "content": "where is the cache?"}]


# -- what happens to unsupported sentences ------------------------------------------------------

MIXED_REPLY = (
    "Paged attention stores the key value cache in fixed size blocks [1]. "
    "The dough must rise for two hours before baking [1]."
)


def mixed_answerer(retriever, policy, reply=MIXED_REPLY, **kw):
    generator = FakeGenerator({"Question:": reply})
    return Answerer(retriever, generator, loose(mode="generative", k=3, unsupported=policy, **kw))


def test_flag_policy_keeps_and_marks_unsupported_sentences(retriever):
    answer = mixed_answerer(retriever, "flag").ask("how does paged attention store the key value cache")
    assert answer.unsupported_action == "flagged" and answer.removed == []
    assert [s.supported for s in answer.sentences] == [True, False]
    assert answer.text.count("(unsupported)") == 1
    assert answer.to_dict()["unsupported_action"] == "flagged"


def test_drop_policy_removes_unsupported_sentences(retriever):
    answer = mixed_answerer(retriever, "drop").ask("how does paged attention store the key value cache")
    assert answer.unsupported_action == "dropped" and answer.mode == "generative"
    (kept,) = answer.sentences
    assert kept.supported and kept.text.startswith("Paged attention stores")
    assert [s.text for s in answer.removed] == ["The dough must rise for two hours before baking."]
    assert "(unsupported)" not in answer.text and "dough" not in answer.text
    data = answer.to_dict()
    assert data["unsupported_action"] == "dropped" and data["removed_sentences"][0]["problem"] == "low support"


def test_extractive_fallback_quotes_the_best_supported_passages(retriever):
    answer = mixed_answerer(retriever, "extractive", max_sentences=2, fallback_passages=1).ask(
        "how does paged attention store the key value cache"
    )
    assert answer.unsupported_action == "extractive_fallback" and answer.mode == "extractive"
    # The generated sentences are kept aside, and every quoted one is supported by its passage.
    assert [s.text for s in answer.removed][1].startswith("The dough")
    assert answer.sentences and all(s.supported for s in answer.sentences)
    # One passage allowed: the one that best supports what was generated (the paged-attention one).
    (citation,) = answer.citations
    assert citation.source == "paged.md" and "fixed size blocks" in answer.text


def test_drop_with_nothing_supported_falls_back_to_extractive(retriever):
    reply = "The dough must rise for two hours before baking [1]. It snows in July [2]."
    answer = mixed_answerer(retriever, "drop", reply=reply).ask("how does paged attention store the key value cache")
    assert answer.unsupported_action == "extractive_fallback" and len(answer.removed) == 2
    assert answer.covered and all(s.supported for s in answer.sentences)


def test_a_fully_supported_answer_is_left_alone(retriever):
    reply = "Paged attention stores the key value cache in fixed size blocks [1]."
    for policy in ("flag", "drop", "extractive"):
        answer = mixed_answerer(retriever, policy, reply=reply).ask("how does paged attention store the cache")
        assert answer.unsupported_action == "none" and answer.mode == "generative" and answer.removed == []


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="accepted: flag, drop, extractive"):
        AnswerConfig(unsupported="rewrite")
    with pytest.raises(ValueError, match="fallback_passages"):
        AnswerConfig(fallback_passages=0)


def test_memories_reach_the_generator_prompt_but_not_the_citations(retriever):
    generator = FakeGenerator({"Question:": "Paged attention stores the key value cache in fixed size blocks [1]."})
    answerer = Answerer(retriever, generator, loose(mode="generative", k=2))
    answer = answerer.ask("how does paged attention store the cache", memories=["The user prefers short answers."])
    prompt = generator.prompts[-1]
    assert "What you remember about the user (do not cite):\n- The user prefers short answers." in prompt
    assert prompt.index("prefers short") < prompt.index("Question:") and prompt.index("[2]") < prompt.index("prefers")
    assert answer.memories == ["The user prefers short answers."] and [c.number for c in answer.citations] == [1]
