"""The web playground of `genforge serve`: its routes through the in-process app, then the page
itself in a real headless Chromium (Debian's, driven by Selenium) against a live server started
through `genforge serve`'s own command, on a tiny random Llama whose chat template supports tools.

The references: the tokenizer for /v1/tokenize, the retriever's own search for the sources'
scores, the chunks of the index for their texts, the non-streamed reply of the same seeded
request for the text the page streamed, and jsonschema for a tool call's arguments.

Set GENFORGE_PLAYGROUND_SCREENSHOTS=DIR to keep the browser tests' screenshots in DIR
(`benchmarks/playground_screenshots.py` does, for docs/images).
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
from live_server import LiveServer
from starlette.testclient import TestClient
from tool_calling_shared import WEATHER, tool_model_dir, tool_tokenizer

from genforge.checkpoint import load_model
from genforge.concepts import load_concept_map
from genforge.rag.answer import NOT_COVERED
from genforge.serve.api import create_app
from genforge.serve.engine import AsyncEngine, Engine
from genforge.serve.playground import CONCEPT_FIELDS, STATIC_DIR, STATIC_FILES, RagService
from genforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny"
KEY = "playground-test-key"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tool_model_dir(tmp_path_factory.mktemp("playground") / "model", tool_tokenizer(), context=512)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def rag_service():
    """A RAG service over the RAG tests' tiny corpus, embedded by hashed bags of words."""
    from test_rag_retrieve import HashEmbedder, tiny_chunks

    from genforge.rag import HybridIndex, Retriever
    from genforge.rag.answer import AnswerConfig

    embedder = HashEmbedder()
    retriever = Retriever(HybridIndex.build(tiny_chunks(), embedder), embedder)
    # The hashed embedder has its own cosine scale (test_rag_answer.py sets the same threshold).
    return RagService(retriever, AnswerConfig(min_confidence=0.2, max_sentences=2))


def _app(model_dir, tokenizer, **options):
    engine = AsyncEngine({MODEL: Engine(load_model(model_dir), tokenizer, block_size=16, max_num_batched_tokens=256)})
    return create_app(engine, tokenizers={MODEL: tokenizer}, **options)


@pytest.fixture(scope="module")
def client(model_dir, tokenizer, rag_service):
    with TestClient(_app(model_dir, tokenizer, rag=rag_service)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def keyed_client(model_dir, tokenizer):
    with TestClient(_app(model_dir, tokenizer, api_keys=[KEY])) as test_client:
        yield test_client


def _error(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- the page and its files ------------------------------------------------------------------


def test_the_page_and_its_files_are_served_with_a_policy_that_loads_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    assert page.text == (STATIC_DIR / "index.html").read_text()
    head = client.head("/")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-security-policy"] == policy
    for name, media_type in STATIC_FILES.items():
        response = client.get(f"/playground/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
        assert response.text == (STATIC_DIR / name).read_text()
    # Only the allow-listed files: nothing else beside them, nor above them, is reachable.
    assert _error(client.get("/playground/index.html"), 404)["message"] == "no playground file 'index.html'"
    assert client.get("/playground/..%2Fplayground.py").status_code == 404
    assert client.get("/playground/../api.py").status_code == 404


def test_the_static_files_reference_only_the_servers_own_paths():
    html = (STATIC_DIR / "index.html").read_text()
    references = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(references) == ["/playground/app.js", "/playground/style.css", "data:,"]  # data:, an empty icon
    script, style = (STATIC_DIR / "app.js").read_text(), (STATIC_DIR / "style.css").read_text()
    assert "<script>" not in html and " style=" not in html  # the policy refuses inline code and styles
    assert not re.search(r"https?://|wss?://", script + style)
    assert "@import" not in style and "url(" not in style
    fetched = set(re.findall(r'(?:fetch|api)\(\s*"([^"]+)"', script))
    assert fetched == {
        "/v1/models",
        "/v1/chat/completions",
        "/v1/rag/answer",
        "/v1/tokenize",
        "/v1/completions",
        "/v1/concepts",
    }
    # The key is sent as a Bearer header and never written into a URL.
    assert '"Bearer " + key' in script and "location" not in script and "history." not in script


def test_the_page_can_be_turned_off_and_the_api_stays(model_dir, tokenizer):
    with TestClient(_app(model_dir, tokenizer, playground=False)) as no_page:
        assert no_page.get("/").status_code == 404 and no_page.get("/playground/app.js").status_code == 404
        assert no_page.post("/v1/tokenize", json={"model": MODEL, "prompt": "hi"}).status_code == 200


# -- /v1/tokenize and the token view's completion ----------------------------------------------


def test_tokenize_gives_the_ids_and_texts_the_tokenizer_gives(client, tokenizer):
    prompt = 'def load(fp): return {"ok": true}'
    body = client.post("/v1/tokenize", json={"model": MODEL, "prompt": prompt}).json()
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    assert body["tokens"] == ids and body["count"] == len(ids) > 5 and body["max_model_len"] == 512
    assert body["token_strs"] == [tokenizer.decode([i]) for i in ids]
    assert "".join(body["token_strs"]) == tokenizer.decode(ids)


def test_tokenize_refuses_bad_requests_clearly(client):
    error = _error(client.post("/v1/tokenize", json={"model": "nope", "prompt": "hi"}), 404)
    assert "'nope' does not exist" in error["message"] and "served: tiny" in error["message"]
    assert _error(client.post("/v1/tokenize", json={"model": MODEL, "prompt": ""}), 400)["param"] == "prompt"
    lone_surrogate = '{"model": "tiny", "prompt": "a\\ud800b"}'
    error = _error(
        client.post("/v1/tokenize", content=lone_surrogate, headers={"content-type": "application/json"}), 400
    )
    assert error["param"] == "prompt" and "unicode" in error["message"]  # refused before any tokenizer sees it
    assert (
        _error(client.post("/v1/tokenize", json={"model": MODEL, "text": "hi", "prompt": "x"}), 400)["param"] == "text"
    )


def test_the_echoed_completion_lines_up_with_the_tokenized_prompt(client):
    """What the token view joins: the echoed prompt's tokens are the tokenized prompt's, the first
    without a log-probability, then the completion's tokens, each with its alternatives."""
    prompt = 'import json\nprint(json.dumps({"ok": true}))'
    tokens = client.post("/v1/tokenize", json={"model": MODEL, "prompt": prompt}).json()
    body = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 6, "temperature": 0}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    count = tokens["count"]
    assert logprobs["tokens"][:count] == tokens["token_strs"]
    assert logprobs["token_logprobs"][0] is None and all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert 1 <= len(logprobs["tokens"]) - count <= 6
    for alternatives, lp in zip(logprobs["top_logprobs"][count:], logprobs["token_logprobs"][count:]):
        assert len(alternatives) >= 1 and max(alternatives.values()) == pytest.approx(lp, abs=1e-5)  # greedy


# -- /v1/rag/answer --------------------------------------------------------------------------


def test_a_rag_answer_cites_sources_with_their_text_and_retrieval_score(client, rag_service):
    question = "how does paged attention store the key value cache"
    answer = client.post("/v1/rag/answer", json={"question": question, "k": 3}).json()
    assert answer["covered"] and answer["mode"] == "extractive" and answer["sources"]
    chunks = {c.chunk_id: c for c in rag_service.retriever.index.chunks}
    hits = {h.chunk.chunk_id: h for h in rag_service.retriever.search(question, k=3)}
    by_place = {(h.chunk.source, h.chunk.start, h.chunk.end): h for h in hits.values()}
    assert [s["number"] for s in answer["sources"]] == list(range(1, len(answer["sources"]) + 1))
    assert answer["sources"][0]["source"] == "paged.md"
    for source in answer["sources"]:
        hit = by_place[(source["source"], source["start"], source["end"])]
        assert source["text"] == hit.chunk.text == chunks[hit.chunk.chunk_id].text
        assert source["score"] == pytest.approx(hit.score) and 0 < source["support"] <= 1
        assert source["title"] == hit.chunk.title
    for sentence in answer["sentences"]:
        (n,) = sentence["citations"]
        assert sentence["text"] in answer["sources"][n - 1]["text"] and f"[{n}]" in answer["answer"]


def test_a_question_the_sources_do_not_cover_gets_the_refusal_without_sources(rag_service):
    strict = RagService(rag_service.retriever, dataclasses.replace(rag_service.config, min_confidence=0.99))
    answer = strict.answer("zebra migration patterns in Kenya")
    assert not answer["covered"] and answer["sources"] == [] and answer["sentences"] == []
    assert answer["answer"] == NOT_COVERED and answer["confidence"] < 0.99


def test_rag_answer_errors_are_clear(client, keyed_client):
    assert _error(client.post("/v1/rag/answer", json={"question": "x", "k": 0}), 400)["param"] == "k"
    assert _error(client.post("/v1/rag/answer", json={"question": "   "}), 400)["message"] == "the question is empty"
    error = _error(keyed_client.post("/v1/rag/answer", json={"question": "x"}, headers=_bearer()), 404)
    assert error["code"] == "rag_index_not_configured" and "--rag-index DIR" in error["message"]


# -- /v1/concepts ----------------------------------------------------------------------------


def test_concepts_are_listed_from_the_concept_map(client):
    data = client.get("/v1/concepts").json()["data"]
    assert data == json.loads(json.dumps([concept.as_dict() for concept in load_concept_map()]))
    assert all(set(CONCEPT_FIELDS) <= set(record) for record in data)


# -- keys --------------------------------------------------------------------------------------


def _bearer(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_the_page_needs_no_key_and_every_playground_route_does(keyed_client):
    assert keyed_client.get("/").status_code == 200 and keyed_client.get("/playground/app.js").status_code == 200
    for method, path, body in (
        ("post", "/v1/tokenize", {"model": MODEL, "prompt": "hi"}),
        ("post", "/v1/rag/answer", {"question": "hi"}),
        ("get", "/v1/concepts", None),
    ):
        error = _error(getattr(keyed_client, method)(path, **({"json": body} if body else {})), 401)
        assert error["code"] == "invalid_api_key" and "Bearer" in error["message"]
    assert (
        keyed_client.post("/v1/tokenize", json={"model": MODEL, "prompt": "hi"}, headers=_bearer()).status_code == 200
    )


# -- the `genforge serve` flags ----------------------------------------------------------------


def _serve_args(*argv):
    from genforge.cli import build_parser

    return build_parser().parse_args(["serve", "--model", "m=/nowhere", *argv])


def test_serve_flags_reach_the_app_options(tmp_path):
    from genforge.serve.playground import app_options

    assert app_options(_serve_args()) == {"playground": True, "rag": None}
    assert app_options(_serve_args("--no-playground"))["playground"] is False
    with pytest.raises(ValueError, match="--rag-encoder is only used with --rag-index"):
        app_options(_serve_args("--rag-encoder", str(tmp_path)))
    with pytest.raises(ValueError, match="is not a directory; build one with `genforge rag index"):
        app_options(_serve_args("--rag-index", str(tmp_path / "missing")))


# -- the page in a real browser ----------------------------------------------------------------

browser = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="the browser tests need Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)
DOCUMENTS = {
    "kv_cache.md": "# The KV cache\n\nPaged attention stores the key and value cache in fixed-size blocks. "
    "A block table maps each sequence to its physical blocks, like pages of virtual memory.\n",
    "lora.md": "# LoRA\n\nLoRA freezes the pretrained weights and trains two small low-rank matrices "
    "beside each linear layer.\n",
    "bread.md": "# Bread\n\nKnead the dough, let it rise for two hours, then bake it in a hot oven.\n",
}


@pytest.fixture(scope="module")
def rag_index(tmp_path_factory):
    """A real RAG index (the bundled MiniLM encoder) over three small Markdown files."""
    from genforge.rag import EncoderEmbedder, index_documents

    root = tmp_path_factory.mktemp("playground_docs")
    for name, text in DOCUMENTS.items():
        (root / name).write_text(text)
    here = os.getcwd()
    os.chdir(root)  # sources are recorded as given: relative names read better on the page
    try:
        index, skipped = index_documents(sorted(DOCUMENTS), EncoderEmbedder(), "markdown")
    finally:
        os.chdir(here)
    assert not skipped
    index.save(root / "index")
    return root / "index"


@pytest.fixture(scope="module")
def live(model_dir, rag_index):
    """`genforge serve --model tiny=DIR --rag-index IDX --api-key KEY`, run through the CLI up to
    uvicorn, which then serves the app it was handed on a free local port."""
    import uvicorn

    from genforge.cli import main

    apps = []
    original = uvicorn.run
    uvicorn.run = lambda app, **options: apps.append((app, options))
    try:
        argv = ["serve", "--model", f"{MODEL}={model_dir}", "--rag-index", str(rag_index), "--api-key", KEY]
        assert main(argv + ["--max-num-seqs", "8", "--log-level", "warning"]) == 0
    finally:
        uvicorn.run = original
    ((app, options),) = apps
    assert options["host"] == "127.0.0.1"  # the default binds to this machine only
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    chrome = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield chrome
    chrome.quit()


def _wait(driver, condition, timeout=30.0, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, f"timed out waiting for {what}")


def _by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _ready(driver, live) -> None:
    """The page loaded with the key entered, for a test run alone as well as after the first."""
    if driver.current_url != live.url + "/":
        driver.get(live.url + "/")
        _wait(driver, lambda d: d.find_element("css selector", "body[data-ready='true']"))
    if _by_id(driver, "key-status").text != "key set for this tab":
        _by_id(driver, "api-key").send_keys(KEY)
        _by_id(driver, "key-set").click()
    _wait(
        driver, lambda d: [o.text for o in d.find_elements("css selector", "#model option")] == [MODEL], what="models"
    )


def _screenshot(driver, tmp_path, name):
    directory = Path(os.environ.get("GENFORGE_PLAYGROUND_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"playground_{name}.png"
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _hue(element) -> float:
    """The hue in degrees of an element's background colour (red 0, yellow 60, green 120)."""
    red, green, blue = (int(v) / 255 for v in re.findall(r"\d+", element.value_of_css_property("background-color"))[:3])
    return colorsys.rgb_to_hls(red, green, blue)[0] * 360


def _page_errors(driver) -> list[str]:
    """The browser console's errors, less the 401s the page itself shows (the key test makes them)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]


@browser
@pytest.mark.slow
def test_the_page_shows_the_missing_key_then_lists_the_models_once_the_key_is_entered(live, driver):
    driver.get(live.url + "/")
    _wait(driver, lambda d: d.find_element("css selector", "body[data-ready='true']"))
    banner = _by_id(driver, "global-error")
    _wait(driver, lambda d: banner.is_displayed(), what="the missing-key error")
    assert (
        "401" in banner.text
        and "missing or invalid API key" in banner.text
        and "enter the server's API key" in banner.text
    )
    _by_id(driver, "api-key").send_keys(KEY)
    _by_id(driver, "key-set").click()
    _wait(
        driver, lambda d: [o.text for o in d.find_elements("css selector", "#model option")] == [MODEL], what="models"
    )
    assert not banner.is_displayed() and _by_id(driver, "key-status").text == "key set for this tab"
    assert _by_id(driver, "api-key").get_attribute("value") == ""
    assert KEY not in driver.current_url and driver.current_url == live.url + "/"
    assert _page_errors(driver) == []


@browser
@pytest.mark.slow
def test_a_chat_reply_streams_into_the_page(live, driver, tmp_path):
    _ready(driver, live)
    _by_id(driver, "tab-chat").click()
    _by_id(driver, "chat-clear").click()
    # A MutationObserver records every length the reply's text takes as chunks arrive.
    driver.execute_script(
        """
        window.replyLengths = [];
        new MutationObserver(() => {
          const replies = document.querySelectorAll('#transcript .message.assistant .content');
          if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('transcript'), {childList: true, subtree: true, characterData: true});
        """
    )
    _by_id(driver, "system").clear()
    _by_id(driver, "system").send_keys("You answer briefly.")
    for field, value in (("temperature", "1"), ("max-tokens", "40"), ("seed", "7")):
        _by_id(driver, field).clear()
        _by_id(driver, field).send_keys(value)
    _by_id(driver, "chat-input").send_keys("Tell me about JSON.")
    _by_id(driver, "chat-send").click()
    reply = _wait(
        driver,
        lambda d: d.find_element("css selector", ".message.assistant:not(.streaming)[data-finish]"),
        what="a reply",
    )
    text = reply.find_element("css selector", ".content").get_attribute("textContent")
    lengths = sorted(set(driver.execute_script("return window.replyLengths")) - {0})
    assert len(lengths) >= 2 and lengths[-1] == len(text) > 0, lengths  # it grew in more than one step
    assert "finish: " in reply.find_element("css selector", ".meta").text
    # The same seeded request without streaming writes the same reply.
    expected = live.client(api_key=KEY).chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Tell me about JSON."},
        ],
        temperature=1,
        top_p=1,
        max_tokens=40,
        seed=7,
    )
    assert text == expected.choices[0].message.content
    assert reply.get_attribute("data-finish") == expected.choices[0].finish_reason
    _screenshot(driver, tmp_path, "chat")


@browser
@pytest.mark.slow
def test_a_tool_call_is_shown_with_its_name_and_arguments(live, driver, tmp_path):
    _ready(driver, live)
    _by_id(driver, "tab-chat").click()
    _by_id(driver, "chat-clear").click()
    driver.execute_script("document.querySelector('#panel-chat details').open = true")
    _by_id(driver, "tools").clear()
    _by_id(driver, "tools").send_keys(json.dumps([WEATHER]))
    driver.execute_script("document.getElementById('tool-choice').value = 'required'")
    # A seeded request with room for the whole call, whichever test ran before.
    for field, value in (("temperature", "1"), ("max-tokens", "160"), ("seed", "11")):
        _by_id(driver, field).clear()
        _by_id(driver, field).send_keys(value)
    replies = len(driver.find_elements("css selector", ".message.assistant"))
    _by_id(driver, "chat-input").send_keys("Is it warm in Paris?")
    _by_id(driver, "chat-send").click()
    finished = ".message.assistant[data-finish]"
    _wait(driver, lambda d: len(d.find_elements("css selector", finished)) == replies + 1, what="a call")
    reply = driver.find_elements("css selector", ".message.assistant")[-1]
    assert reply.get_attribute("data-finish") == "tool_calls"
    calls = reply.find_elements("css selector", ".tool-call")
    assert calls  # the model may make several calls at once; each is shown
    for call in calls:
        assert call.find_element("css selector", ".tool-name").text == "tool call: get_weather"
        arguments = json.loads(call.find_element("css selector", ".tool-arguments").text)
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    _screenshot(driver, tmp_path, "tools")
    _by_id(driver, "tools").clear()  # later chats go without tools
    assert _page_errors(driver) == []


@browser
@pytest.mark.slow
def test_a_question_over_the_documents_shows_its_linked_sources(live, driver, tmp_path):
    _ready(driver, live)
    _by_id(driver, "tab-rag").click()
    _by_id(driver, "rag-question").clear()
    _by_id(driver, "rag-question").send_keys("How does paged attention store the KV cache?")
    _by_id(driver, "rag-ask").click()
    _wait(driver, lambda d: d.find_elements("css selector", "#rag-sources .source"), what="the sources")
    sources = driver.find_elements("css selector", "#rag-sources .source")
    first = sources[0]
    assert first.get_attribute("id") == "source-1" and first.find_element(
        "css selector", ".source-title"
    ).text.startswith("The KV cache — kv_cache.md:0-")
    assert "fixed-size blocks" in first.find_element("css selector", "blockquote").text
    assert re.search(r"score \d\.\d{3} · support \d\.\d\d", first.find_element("css selector", ".meta").text)
    citation = driver.find_element("css selector", "#rag-answer a.citation")
    assert citation.text == "[1]" and citation.get_attribute("href").endswith("#source-1")
    url = driver.current_url
    citation.click()
    _wait(driver, lambda d: "flash" in first.get_attribute("class"), what="the cited source to be highlighted")
    assert driver.current_url == url
    _screenshot(driver, tmp_path, "rag")
    assert _page_errors(driver) == []


@browser
@pytest.mark.slow
def test_the_token_view_shows_ids_and_colours_tokens_by_probability(live, driver, tokenizer, tmp_path):
    _ready(driver, live)
    _by_id(driver, "tab-tokens").click()
    prompt = 'print(json.dumps({"ok": true}))'
    _by_id(driver, "tokens-prompt").clear()
    _by_id(driver, "tokens-prompt").send_keys(prompt)
    _by_id(driver, "tokens-max").clear()
    _by_id(driver, "tokens-max").send_keys("8")
    _by_id(driver, "tokens-run").click()
    _wait(driver, lambda d: d.find_elements("css selector", "#completion-tokens .token"), what="the tokens")
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    chips = driver.find_elements("css selector", "#prompt-tokens .token")
    assert [int(c.find_element("css selector", "sub").text) for c in chips] == ids
    completion = driver.find_elements("css selector", "#completion-tokens .token")
    assert 1 <= len(completion) <= 8
    # Coloured by probability: the likelier token never has the redder colour, and the greedy
    # completion's tokens (each its step's likeliest) are greener than the least likely prompt token.
    scored = [(float(c.get_attribute("data-logprob")), _hue(c)) for c in chips[1:] + completion]
    assert all(lp <= 0 for lp, _ in scored)
    hues_by_logprob = [hue for _, hue in sorted(scored)]
    assert hues_by_logprob == sorted(hues_by_logprob)
    assert max(_hue(c) for c in completion) > min(_hue(c) for c in chips[1:])
    assert chips[0].get_attribute("data-logprob") is None and "unscored" in chips[0].get_attribute("class")
    assert f"id {ids[1]}" in chips[1].get_attribute("title")
    assert f"{len(ids)} tokens of 512" in _by_id(driver, "tokens-summary").text
    _screenshot(driver, tmp_path, "tokens")
    assert _page_errors(driver) == []


@browser
@pytest.mark.slow
def test_the_concepts_page_groups_and_filters_the_concept_map(live, driver, tmp_path):
    concepts = load_concept_map()
    _ready(driver, live)
    _by_id(driver, "tab-concepts").click()
    _wait(driver, lambda d: d.find_elements("css selector", ".concept-group"), what="the concept table")
    groups = [g.get_attribute("textContent") for g in driver.find_elements("css selector", ".concept-group h2")]
    assert groups == list(dict.fromkeys(c.group for c in concepts))
    total = len(concepts)
    assert _by_id(driver, "concepts-count").text == f"{total} of {total} concepts"
    _screenshot(driver, tmp_path, "concepts")
    _by_id(driver, "concepts-search").clear()
    _by_id(driver, "concepts-search").send_keys("PagedAttention")
    _wait(driver, lambda d: _by_id(d, "concepts-count").text == f"1 of {total} concepts", what="the filter")
    (row,) = driver.find_elements("css selector", "tr.concept")
    assert row.find_element("css selector", ".concept-name").text == "paged KV cache (PagedAttention)"
    assert "genforge.serve.paged_cache.PagedKVCache" in row.text
    assert _page_errors(driver) == []


@browser
@pytest.mark.slow
def test_a_wrong_key_shows_the_servers_error_on_the_request_that_needed_it(live, driver):
    _ready(driver, live)
    _by_id(driver, "key-forget").click()
    _by_id(driver, "api-key").send_keys("wrong-key")
    _by_id(driver, "key-set").click()
    _by_id(driver, "tab-chat").click()
    _by_id(driver, "chat-input").send_keys("hello?")
    _by_id(driver, "chat-send").click()
    error = _by_id(driver, "chat-error")
    _wait(driver, lambda d: error.is_displayed(), what="the chat error")
    assert error.text.startswith("401: missing or invalid API key")
    assert "wrong-key" not in driver.current_url
