"""Tokenizer training (genforge.train.tokenizer_training): the saved directory loads in
transformers' AutoTokenizer and in genforge's Tokenizer with the same ids, and bad input is
refused before anything is written."""

from __future__ import annotations

import json
import random

import pytest

from genforge.cli import main
from genforge.tokenizer import Tokenizer
from genforge.train.tokenizer_training import TokenizerTrainingError, tokenizer_sha256, train_tokenizer

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
    "phi chi psi omega def return class import yield lambda while for if else"
).split()
PROBES = [
    "alpha beta gamma",
    "def f(x):\n    return x ** 2  # comment",
    "  leading and trailing spaces  ",
    "unicode: héllo wörld, 漢字, emoji 🙂 and tabs\tinside",
    "never seen: zzqqxj 12345 !!",
    "<|endoftext|>alpha<|pad|> beta",
]


def corpus(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 4))]
        docs.append("\n".join(lines) + f"\nvalue = {rng.randint(0, 999)}")
    return docs


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "tok"
    result = train_tokenizer(corpus(), kind="bpe", vocab_size=400, out_dir=out)
    assert result.vocab_size == 400 and result.requested_vocab_size == 400
    return out


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wp") / "tok"
    train_tokenizer(corpus(), kind="wordpiece", vocab_size=150, out_dir=out)
    return out


def test_bpe_loads_in_transformers_with_the_same_ids(bpe_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(bpe_dir)
    ours = Tokenizer.from_dir(bpe_dir)
    assert len(reference) == ours.vocab_size == 400
    for text in PROBES:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        # Byte-level BPE is lossless: every text decodes back exactly, unknown characters included.
        assert ours.decode(ids) == reference.decode(ids) == text
    assert reference.eos_token == ours.eos_token == "<|endoftext|>"
    assert reference.pad_token == ours.pad_token == "<|pad|>"
    # Special tokens come first and are matched whole in text.
    assert (ours.eos_token_id, ours.pad_token_id) == (0, 1)
    assert ours.encode("<|endoftext|>") == [0]
    # Frequent words became single tokens: the merges were learned from the corpus.
    assert len(ours.encode("alpha beta gamma")) == 3


def test_wordpiece_loads_in_transformers_with_the_same_ids(wordpiece_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(wordpiece_dir)
    ours = Tokenizer.from_dir(wordpiece_dir)
    for text in PROBES:
        assert ours.encode(text) == reference(text)["input_ids"], text
    assert ours.encode("Alpha Beta", add_special_tokens=False) == ours.encode("alpha beta", add_special_tokens=False)
    ids = ours.encode("alpha 漢")
    assert ids[0] == ours.cls_token_id and ids[-1] == ours.sep_token_id  # BERT's [CLS] ... [SEP]
    assert ours.unk_token_id in ids  # a character never seen in training
    assert reference.mask_token == "[MASK]" and reference.pad_token_id == ours.pad_token_id == 0
    assert reference("alpha", "beta")["input_ids"][-1] == ours.sep_token_id


def test_files_and_jsonl_train_the_same_tokenizer_as_texts(tmp_path):
    docs = corpus(120, seed=3)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs[:60]):
        (folder / f"{i:03d}.txt").write_text(doc)
    (folder / "skipped.bin").write_text("zzzz " * 50)  # not a --ext file: never read
    (tmp_path / "rest.jsonl").write_text(
        "".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(docs[60:]))
    )
    from_files = train_tokenizer(
        files=[folder, tmp_path / "rest.jsonl"], text_field="body", vocab_size=330, out_dir=tmp_path / "a"
    )
    train_tokenizer(iter(docs), vocab_size=330, out_dir=tmp_path / "b")  # a one-pass generator
    assert from_files.documents == 120 and from_files.characters == sum(map(len, docs))
    assert tokenizer_sha256(tmp_path / "a") == tokenizer_sha256(tmp_path / "b") == from_files.sha256
    assert "zzzz" not in Tokenizer.from_dir(tmp_path / "a").get_vocab()


def test_custom_special_tokens_get_the_first_ids(tmp_path):
    result = train_tokenizer(
        corpus(100),
        vocab_size=320,
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
        extra_special_tokens=["<|im_start|>"],
        out_dir=tmp_path / "tok",
    )
    tokenizer = Tokenizer.from_dir(tmp_path / "tok")
    assert [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.token_to_id("<|im_start|>")] == [0, 1, 2]
    assert tokenizer.encode("<|im_start|>alpha")[0] == 2
    assert result.tokenizer.all_special_tokens == tokenizer.all_special_tokens


@pytest.mark.parametrize(
    "texts, match",
    [([], "corpus is empty"), (["", "   ", "\n\n"], "corpus is empty")],
)
def test_empty_corpus_is_refused_and_nothing_is_written(tmp_path, texts, match):
    with pytest.raises(TokenizerTrainingError, match=match):
        train_tokenizer(texts, vocab_size=300, out_dir=tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_empty_files_are_an_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("\n  \n")
    with pytest.raises(TokenizerTrainingError, match="corpus is empty"):
        train_tokenizer(files=[tmp_path], vocab_size=300, out_dir=tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_vocab_too_small_for_the_byte_alphabet(tmp_path):
    with pytest.raises(TokenizerTrainingError, match=r"at least 258"):
        train_tokenizer(corpus(10), vocab_size=257, out_dir=tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_vocab_larger_than_the_corpus_supports_says_requested_and_reached(tmp_path):
    with pytest.raises(TokenizerTrainingError) as info:
        train_tokenizer(["tiny tiny corpus"], vocab_size=5000, out_dir=tmp_path / "tok")
    message = str(info.value)
    reached = train_tokenizer(["tiny tiny corpus"], vocab_size=5000, allow_smaller_vocab=True).vocab_size
    assert "requested vocab_size 5000" in message and f"only {reached} tokens" in message
    assert 258 < reached < 300
    assert not (tmp_path / "tok").exists()


def test_wordpiece_vocab_smaller_than_the_alphabet(tmp_path):
    with pytest.raises(TokenizerTrainingError, match=r"alphabet and the special tokens alone need \d+ tokens"):
        train_tokenizer(corpus(20), kind="wordpiece", vocab_size=20, out_dir=tmp_path / "tok")
    with pytest.raises(TokenizerTrainingError, match="special tokens alone fill it"):
        train_tokenizer(corpus(20), kind="wordpiece", vocab_size=5)


def test_bad_options_are_refused_before_reading(tmp_path):
    def never():
        raise AssertionError("the corpus must not be read")
        yield  # pragma: no cover

    for kwargs, match in [
        ({"kind": "unigram"}, "unknown tokenizer kind"),
        ({"vocab_size": 0}, "positive integer"),
        ({"min_frequency": 0}, "min_frequency"),
        ({"special_tokens": {"start_token": "<s>"}}, "unknown special-token role"),
        ({"kind": "wordpiece", "special_tokens": {"cls_token": "[CLS]"}}, "needs an unk_token"),
    ]:
        with pytest.raises(TokenizerTrainingError, match=match):
            train_tokenizer(never(), **{"vocab_size": 300, **kwargs})
    with pytest.raises(TokenizerTrainingError, match="not one str"):
        train_tokenizer("a single string", vocab_size=300)
    with pytest.raises(TokenizerTrainingError, match="either texts"):
        train_tokenizer(["a"], files=["x"], vocab_size=300)


def test_an_existing_directory_is_not_overwritten(tmp_path, bpe_dir):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    with pytest.raises(TokenizerTrainingError, match="already exists"):
        train_tokenizer(corpus(50), vocab_size=300, out_dir=out)
    assert (out / "keep.txt").read_text() == "earlier work"
    # With overwrite, a failed training still leaves the earlier directory as it was.
    with pytest.raises(TokenizerTrainingError):
        train_tokenizer(["x y"], vocab_size=9000, out_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    train_tokenizer(corpus(50), vocab_size=300, out_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_cli_trains_and_reports_errors(tmp_path, capsys):
    def stderr() -> str:  # rich wraps long lines; compare with the wrapping undone
        return " ".join(capsys.readouterr().err.split())

    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(corpus(80)))
    assert main(["tokenizer", "train", str(source), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert "trained a bpe tokenizer of 300 tokens" in stderr()
    assert Tokenizer.from_dir(tmp_path / "tok").vocab_size == 300
    assert (
        main(
            [
                "tokenizer",
                "train",
                str(source),
                "--kind",
                "wordpiece",
                "--vocab-size",
                "120",
                "--special-token",
                "unk=[UNK]",
                "--special-token",
                "pad=[PAD]",
                "--out",
                str(tmp_path / "wp"),
            ]
        )
        == 0
    )
    assert Tokenizer.from_dir(tmp_path / "wp").unk_token == "[UNK]"
    assert main(["tokenizer", "train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in stderr()
    assert main(["tokenizer", "train", str(source), "--vocab-size", "99999", "--out", str(tmp_path / "y")]) == 2
    assert "requested vocab_size 99999" in stderr()
    assert not (tmp_path / "y").exists()
