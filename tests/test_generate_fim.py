"""Fill-in-the-middle prompts over tokenizers that spell the sentinels each family's way."""

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from genforge.generate.fim import FIM_STYLES, fim_prompt, find_fim_tokens
from genforge.tokenizer import Tokenizer

CODE = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 20

SENTINELS = {
    "starcoder": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
    "qwen": ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
    "codellama": ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"],
    "deepseek": ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
}


def _tokenizer(special: list[str], bos: bool = False) -> Tokenizer:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", *special],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([CODE], trainer)
    if bos:  # Llama-style: the post-processor puts <s> in front of every text
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": special})


@pytest.mark.parametrize("style", sorted(SENTINELS))
@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_prompt_layout_for_each_style(style, mode):
    tok = _tokenizer(SENTINELS[style], bos=style == "codellama")
    fim = find_fim_tokens(tok)
    assert fim.style == style
    pre_id, suf_id, mid_id = (tok.token_to_id(t) for t in SENTINELS[style][:3])
    assert (fim.prefix, fim.suffix, fim.middle) == (pre_id, suf_id, mid_id)
    assert fim.end == (tok.token_to_id("▁<EOT>") if style == "codellama" else None)

    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    ids = fim_prompt(tok, prefix, suffix, mode=mode)
    head = [0] if style == "codellama" else []
    pre = tok.encode(prefix, add_special_tokens=False)
    suf = tok.encode(suffix, add_special_tokens=False)
    if mode == "psm":
        assert ids == [*head, pre_id, *pre, suf_id, *suf, mid_id]
    else:
        assert ids == [*head, pre_id, suf_id, *suf, mid_id, *pre]
    # The text round-trips: the sentinels are single ids, never split or merged with the text.
    assert tok.decode(ids, skip_special_tokens=True) == (prefix + suffix if mode == "psm" else suffix + prefix)


def test_empty_prefix_and_suffix():
    tok = _tokenizer(SENTINELS["starcoder"])
    fim = find_fim_tokens(tok)
    assert fim_prompt(tok, "", "") == [fim.prefix, fim.suffix, fim.middle]


def test_no_fim_tokens_lists_the_names_looked_for():
    tok = _tokenizer([])
    with pytest.raises(ValueError, match="no fill-in-the-middle tokens") as info:
        fim_prompt(tok, "a", "b")
    for names in FIM_STYLES.values():
        for spellings in names[:3]:
            assert spellings[0] in str(info.value)


def test_an_incomplete_set_is_not_used():
    tok = _tokenizer(["<fim_prefix>", "<fim_suffix>"])  # no <fim_middle>
    with pytest.raises(ValueError, match="<fim_middle>"):
        find_fim_tokens(tok)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "pms"}, "mode must be one of"),
        ({"prefix": b"x"}, "must be strings"),
        ({"suffix": None}, "must be strings"),
    ],
)
def test_bad_arguments(kwargs, message):
    tok = _tokenizer(SENTINELS["qwen"])
    args = {"prefix": "a", "suffix": "b", **kwargs}
    with pytest.raises(ValueError, match=message):
        fim_prompt(tok, **args)


def test_not_a_tokenizer():
    with pytest.raises(TypeError, match="genforge.tokenizer.Tokenizer"):
        fim_prompt(object(), "a", "b")
