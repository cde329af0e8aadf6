"""SentencePiece models read into genforge's tokenizer: encode and decode exactly as the
`sentencepiece` library does (unigram and BPE, byte fallback, NFKC, whitespace runs), and as
transformers' tokenizers do where those follow the library."""

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece

from genforge.quickstart import stdlib_source_files
from genforge.tokenizer import Tokenizer, TokenizerError
from genforge.train.tokenizer_training import train_sentencepiece

CASES = [
    "Hello world",
    "  leading, inner   runs and trailing   ",
    "tabs\tand\nnewlines\r\n",
    "naïve café 東京 🙂 Ωmega",  # Unicode; the CJK and the emoji fall back to bytes
    "def f(x):\n    return x**2  # comment",
    "ＡＢＣ full-width and ﬁ ligature",  # NFKC folds these
    "12345 digits 3.14159",
    "",
    " ",
]


@pytest.fixture(scope="module")
def corpus():
    lines = []
    for path in stdlib_source_files(200_000):
        lines += [line for line in Path(path).read_text(errors="ignore").splitlines() if line.strip()]
    return lines


# T5 (unigram, NFKC, runs of spaces collapsed) and Llama 2 (BPE, identity, spaces kept, digits split).
SETTINGS = {
    "unigram": dict(model_type="unigram"),
    "unigram-t5": dict(model_type="unigram", byte_fallback=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
    "bpe-llama2": dict(
        model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True
    ),
}


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def trained(request, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "tok"
    tokenizer = train_sentencepiece(corpus, out, vocab_size=800, **SETTINGS[request.param])
    return request.param, out, tokenizer


def test_encode_and_decode_equal_the_sentencepiece_library(trained):
    name, out, tokenizer = trained
    reference = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for text in CASES:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), (name, text)
        if reference.unk_id() not in ids:  # SentencePiece spells <unk> as " ⁇ " when decoding
            assert tokenizer.decode(ids) == reference.decode(ids), (name, text)
    assert tokenizer.vocab_size == reference.get_piece_size()


@pytest.mark.parametrize("trained", ["unigram", "bpe-llama2"], indirect=True)  # T5 has no byte fallback
def test_byte_fallback_spells_unseen_characters_as_bytes(trained):
    name, _, tokenizer = trained
    ids = tokenizer.encode("東", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p.startswith("<0x")] == ["<0xE6>", "<0x9D>", "<0xB1>"]
    assert tokenizer.decode(ids) == "東"


# transformers' SentencePiece converters assume T5's or Llama's settings, so those two are compared.
@pytest.mark.parametrize("trained", ["unigram-t5", "bpe-llama2"], indirect=True)
def test_transformers_reads_the_same_ids(trained, tmp_path):
    """transformers converts the same .model file; its T5 conversion equals the library, and its
    Llama conversion too except at leading spaces, where it drops the dummy prefix (the library
    and genforge keep it)."""
    from transformers import AutoTokenizer

    name, out, tokenizer = trained
    shutil.copy(out / "tokenizer.model", tmp_path / "tokenizer.model")
    cls = "T5Tokenizer" if name == "unigram-t5" else "LlamaTokenizer"
    config = {"tokenizer_class": cls, "extra_ids": 0, "add_bos_token": False, "legacy": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CASES:
        if name == "bpe-llama2" and text.startswith(" "):
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False), (name, text)
        assert tokenizer.decode(ids) == reference.decode(ids), (name, text)


def test_a_directory_with_only_tokenizer_model_loads(trained, tmp_path):
    _, out, tokenizer = trained
    shutil.copy(out / "tokenizer.model", tmp_path / "tokenizer.model")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encode(CASES[4], add_special_tokens=False) == tokenizer.encode(CASES[4], add_special_tokens=False)
    assert loaded.eos_token == tokenizer.eos_token


def test_not_a_model_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00 not a protobuf")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer.from_sentencepiece(tmp_path / "tokenizer.model")


def test_tokenizer_train_command_unigram(tmp_path, capsys):
    from genforge.cli import main

    sources = [str(p) for p in stdlib_source_files(100_000)]
    assert (
        main(["tokenizer", "train", *sources, "--kind", "unigram", "--vocab-size", "600", "--out", str(tmp_path / "t")])
        == 0
    )
    assert "SentencePiece unigram tokenizer of 600 pieces" in capsys.readouterr().err
    assert {p.name for p in (tmp_path / "t").iterdir()} >= {"tokenizer.model", "tokenizer.json"}
