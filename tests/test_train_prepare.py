"""`genforge data prepare` (genforge.train.prepare) and the memory-mapped datasets it feeds
(genforge.train.data): filters count what they remove, planted duplicates are removed at the
stated threshold while distinct documents survive, shards round-trip, and bad input fails
before anything is published."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from genforge.cli import main
from genforge.tokenizer import Tokenizer
from genforge.train.data import DataError, TokenDataset, load_prepared
from genforge.train.prepare import (
    DedupSettings,
    NearDuplicateIndex,
    QualityFilters,
    content_key,
    duplicate_line_ratio,
    prepare,
    repeated_ngram_ratio,
    symbol_ratio,
    token_dtype,
    val_fraction_of,
    word_shingles,
)
from genforge.train.tokenizer_training import tokenizer_sha256, train_tokenizer

LEXICON = [f"w{i}" for i in range(3000)]  # distinct word types, so random documents share few shingles


def random_document(rng: random.Random, words: int = 120) -> str:
    tokens = [rng.choice(LEXICON) for _ in range(words)]
    return "\n".join(" ".join(tokens[i : i + 12]) for i in range(0, words, 12))


def edit_words(text: str, every: int, rng: random.Random) -> str:
    """`text` with every `every`-th word replaced (line structure kept)."""
    lines, count = [], 0
    for line in text.split("\n"):
        out = []
        for word in line.split(" "):
            count += 1
            out.append(f"edit{rng.randrange(10**6)}" if count % every == 0 else word)
        lines.append(" ".join(out))
    return "\n".join(lines)


def jaccard(a: str, b: str, size: int = 5) -> float:
    x, y = word_shingles(a, size), word_shingles(b, size)
    return len(x & y) / len(x | y)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("tok") / "tok"
    texts = [random_document(rng, 60) for _ in range(200)] + ["!@#$%^&*() {}[] <> ~~ ++ -- == :: ;;"] * 5
    train_tokenizer(texts, vocab_size=1000, out_dir=out)
    return out


def write_docs(folder, docs: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / f"{name}.txt").write_text(text)
    return folder


# ------------------------------------------------------------------------------ filter rules
def test_rule_measures_on_hand_computed_cases():
    assert duplicate_line_ratio("a\nb\na\n\na\nc") == pytest.approx(2 / 5)  # 5 non-blank lines, 2 repeats
    assert duplicate_line_ratio("   \n") == 0.0
    words = "x y z x y z q".split()
    # Bigrams: xy yz zx xy yz zq -> "x y" and "y z" repeat, covering words 0-5 (not q).
    assert repeated_ngram_ratio(words, 2) == pytest.approx(6 / 7)
    assert repeated_ngram_ratio(words, 4) == 0.0
    assert symbol_ratio("ab12 !?") == pytest.approx(2 / 6)
    assert symbol_ratio("caf\ufffd \x00") == pytest.approx(2 / 5)  # U+FFFD and NUL count as non-text
    assert symbol_ratio("   ") == 1.0


def test_each_filter_counts_what_it_removed(tmp_path, tokenizer_dir):
    rng = random.Random(1)
    good = {f"good{i}": random_document(rng) for i in range(6)}
    bad = {
        "short": "w1 w2 w3 w4 w5 w6",  # < 50 characters
        "long": random_document(rng, 2000),  # > max_chars below
        "fewwords": "a" * 60,  # one word
        "lines": "\n".join(["w1 w2 w3 w4 w5 w6 w7"] * 6 + ["w8 w9 w10 w11 w12"]),  # 5 of 7 lines repeat
        "ngrams": " ".join(["w1 w2 w3 w4 w5 w6"] * 8) + " w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17",
        "symbols": "#### {{{{ }}}} ;;;; :::: !!!! ???? w1 w2 w3 ~~~~ ++++ ---- ==== @@@@ %%%% ^^^^",
    }
    assert duplicate_line_ratio(bad["lines"]) == pytest.approx(5 / 7)
    filters = QualityFilters(
        max_chars=5000, max_duplicate_line_ratio=0.5, ngram_size=5, max_repeated_ngram_ratio=0.6, max_symbol_ratio=0.5
    )
    for name, text in good.items():
        assert filters.first_failure(text) is None, name
    source = write_docs(tmp_path / "src", {**good, **bad})
    result = prepare([source], tokenizer_dir, tmp_path / "out", filters=filters, val_fraction=0)
    removed = result.meta["filters"]["removed"]
    assert removed == {
        "too_short": 1,
        "too_long": 1,
        "too_few_words": 1,
        "duplicate_lines": 1,
        "repeated_ngrams": 1,
        "non_text": 1,
    }
    logged = {
        json.loads(line)["id"].rsplit("/", 1)[-1]: json.loads(line)["rule"]
        for line in (tmp_path / "out" / "filtered.jsonl").read_text().splitlines()
    }
    assert logged == {
        "short.txt": "too_short",
        "long.txt": "too_long",
        "fewwords.txt": "too_few_words",
        "lines.txt": "duplicate_lines",
        "ngrams.txt": "repeated_ngrams",
        "symbols.txt": "non_text",
    }
    assert result.meta["documents"]["kept"] == 6
    # Switching the rules off keeps everything.
    off = QualityFilters(
        min_chars=None,
        max_chars=None,
        min_words=None,
        max_duplicate_line_ratio=None,
        max_repeated_ngram_ratio=None,
        max_symbol_ratio=None,
    )
    everything = prepare([source], tokenizer_dir, tmp_path / "all", filters=off, val_fraction=0)
    assert everything.meta["documents"]["kept"] == 12 and sum(everything.meta["filters"]["removed"].values()) == 0


# ------------------------------------------------------------------------------------- dedup
def test_planted_exact_and_near_duplicates_are_removed_and_distinct_documents_survive(tmp_path, tokenizer_dir):
    rng = random.Random(2)
    originals = {f"doc{i:02d}": random_document(rng, 200) for i in range(30)}
    planted = {
        "exact_of_03": "\n  " + originals["doc03"] + "\n\n",  # same text, other surrounding whitespace
        "near_of_05": edit_words(originals["doc05"], 100, rng),  # 2 of 200 words changed
        "near_of_11": edit_words(originals["doc11"], 66, rng),  # 3 of 200 words changed
        "near_of_exact": edit_words(originals["doc03"], 90, rng),
    }
    distinct = {
        "far_from_07": edit_words(originals["doc07"], 4, rng),  # every 4th word changed: few shingles shared
        "half_of_09": originals["doc09"][: len(originals["doc09"]) // 2] + "\n" + random_document(rng, 100),
    }
    threshold = 0.8
    # The planted near duplicates are above the threshold and the distinct variants well below it
    # (exact Jaccard of the same shingles), so the outcome is decided by the threshold alone.
    for name, source in (("near_of_05", "doc05"), ("near_of_11", "doc11"), ("near_of_exact", "doc03")):
        assert jaccard(planted[name], originals[source]) >= threshold + 0.05
    for name, source in (("far_from_07", "doc07"), ("half_of_09", "doc09")):
        assert jaccard(distinct[name], originals[source]) <= threshold - 0.3
    folder = write_docs(tmp_path / "src", {**originals, **planted, **distinct})
    result = prepare(
        [folder], tokenizer_dir, tmp_path / "out", dedup=DedupSettings(threshold=threshold), val_fraction=0
    )
    report = [json.loads(line) for line in (tmp_path / "out" / "duplicates.jsonl").read_text().splitlines()]
    found = {r["id"].rsplit("/", 1)[-1]: (r["kind"], r["duplicate_of"].rsplit("/", 1)[-1]) for r in report}
    assert found == {
        "exact_of_03.txt": ("exact", "doc03.txt"),
        "near_of_05.txt": ("near", "doc05.txt"),
        "near_of_11.txt": ("near", "doc11.txt"),
        "near_of_exact.txt": ("near", "doc03.txt"),
    }
    assert all(r["jaccard"] >= threshold for r in report)
    meta = result.meta
    assert (
        meta["documents"]["kept"] == 32 and meta["dedup"]["exact_removed"] == 1 and meta["dedup"]["near_removed"] == 3
    )
    # At a threshold above the planted pairs' similarity, only the exact duplicate goes.
    strict = prepare(
        [folder], tokenizer_dir, tmp_path / "strict", dedup=DedupSettings(threshold=0.97, num_perm=256), val_fraction=0
    )
    assert strict.meta["dedup"] == {**strict.meta["dedup"], "exact_removed": 1, "near_removed": 0}
    # And with dedup off, every document is kept.
    none = prepare(
        [folder], tokenizer_dir, tmp_path / "none", dedup=DedupSettings(exact=False, near=False), val_fraction=0
    )
    assert none.meta["documents"]["kept"] == 36


def test_near_duplicate_index_agrees_with_exact_jaccard():
    """Against brute force over every pair: pairs clearly above the threshold are caught and
    pairs clearly below are never merged (MinHash estimates have a spread of ~1/sqrt(num_perm))."""
    rng = random.Random(5)
    base = [random_document(rng, 150) for _ in range(12)]
    docs = base + [edit_words(b, every, rng) for b, every in zip(base, [3, 5, 8, 12, 20, 30, 45, 60, 80, 100, 6, 9])]
    settings = DedupSettings(threshold=0.7, num_perm=256)
    index = NearDuplicateIndex(settings)
    verdicts = {}
    for i, text in enumerate(docs):
        verdicts[i] = index.check_and_add(str(i), text)
    for i in range(12, 24):
        true = jaccard(docs[i], docs[i - 12])
        if true >= 0.8:
            assert verdicts[i] is not None and verdicts[i][0] == str(i - 12), (i, true)
        elif true <= 0.6:
            assert verdicts[i] is None, (i, true)
    assert all(verdicts[i] is None for i in range(12))


# ------------------------------------------------------------------------------------ shards
def test_shards_round_trip_with_split_and_dtype(tmp_path, tokenizer_dir):
    rng = random.Random(3)
    docs = {f"d{i:02d}": random_document(rng, 80) for i in range(40)}
    folder = write_docs(tmp_path / "src", docs)
    result = prepare([folder], tokenizer_dir, tmp_path / "out", val_fraction=0.25, seed=7, seq_len=16, shard_tokens=500)
    meta = result.meta
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    expected = {"train": [], "val": []}
    for name in sorted(docs):
        split = "val" if val_fraction_of(content_key(docs[name]), 7) < 0.25 else "train"
        expected[split].extend(tokenizer.encode(docs[name], add_special_tokens=False) + [tokenizer.eos_token_id])
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 1000
    assert (
        meta["tokenizer"]["sha256"]
        == tokenizer_sha256(tokenizer_dir)
        == tokenizer_sha256(tmp_path / "out" / "tokenizer")
    )
    assert 0 < meta["splits"]["val"]["documents"] < 20
    for split in ("train", "val"):
        shards = meta["splits"][split]["shards"]
        assert all(s["tokens"] == 500 for s in shards[:-1]) and len(shards) >= 2
        arrays = [np.load(tmp_path / "out" / s["file"], mmap_mode="r") for s in shards]
        assert all(a.dtype == np.uint16 for a in arrays)
        assert np.concatenate(arrays).tolist() == expected[split]
        assert meta["splits"][split]["tokens"] == len(expected[split])
    train, val = load_prepared(tmp_path / "out")
    for dataset, split in ((train, "train"), (val, "val")):
        assert all(isinstance(chunk, np.memmap) for chunk in dataset.sequences.chunks)  # on disk, not in memory
        reference = TokenDataset(expected[split], 16)
        assert len(dataset) == len(reference) and dataset.dropped_tokens == reference.dropped_tokens
        assert torch.equal(dataset.sequences[0 : len(dataset)], reference.sequences)
        assert dataset.max_token_id == max(expected[split]) == meta["splits"][split]["max_token_id"]
    # Another seed splits differently; the same seed the same way, even from another location
    # (the draw hashes the text, not the path).
    other = prepare([folder], tokenizer_dir, tmp_path / "other", val_fraction=0.25, seed=8, seq_len=16)
    assert other.meta["splits"]["val"]["tokens"] != meta["splits"]["val"]["tokens"]
    moved = prepare(
        [folder.rename(tmp_path / "moved")],
        tokenizer_dir,
        tmp_path / "again",
        val_fraction=0.25,
        seed=7,
        seq_len=16,
        shard_tokens=500,
    )
    assert moved.meta["splits"] == meta["splits"]
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_jsonl_glob_and_folder_sources(tmp_path, tokenizer_dir):
    rng = random.Random(4)
    (tmp_path / "a").mkdir()
    rows = [{"content": random_document(rng, 40), "id": i} for i in range(5)]
    (tmp_path / "a" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "a" / "one.txt").write_text(random_document(rng, 40))
    (tmp_path / "a" / "notes.dat").write_text(random_document(rng, 40))
    (tmp_path / "b.txt").write_text(random_document(rng, 40))
    result = prepare(
        [tmp_path / "a", str(tmp_path / "b.*")], tokenizer_dir, tmp_path / "out", text_field="content", val_fraction=0
    )
    assert result.meta["documents"]["read"] == 7  # 5 lines + one.txt + b.txt (notes.dat is not a folder --ext)
    assert sorted(s.rsplit("/", 1)[-1] for s in result.meta["sources"]) == ["b.txt", "one.txt", "rows.jsonl"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2 has no string field 'content'.*'body'"):
        prepare([bad], tokenizer_dir, tmp_path / "bad_out", text_field="content", val_fraction=0)
    assert not (tmp_path / "bad_out").exists()


# ------------------------------------------------------------------------- memory-mapped data
def test_token_dataset_over_memory_mapped_chunks_equals_the_in_memory_one(tmp_path):
    ids = np.random.default_rng(0).integers(0, 5000, size=1037).astype(np.uint16)
    paths = []
    for i, (start, stop) in enumerate([(0, 300), (300, 301), (301, 800), (800, 1037)]):  # boundaries inside sequences
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], ids[start:stop])
    chunks = [np.load(p, mmap_mode="r") for p in paths]
    lazy, eager = TokenDataset(chunks, 50), TokenDataset(torch.as_tensor(ids.astype(np.int64)), 50)
    assert len(lazy) == len(eager) == 20 and lazy.dropped_tokens == eager.dropped_tokens == 37
    assert lazy.max_token_id == eager.max_token_id
    assert torch.equal(lazy.sequences[0:20], eager.sequences)
    assert torch.equal(lazy.sequences[3], eager.sequences[3]) and torch.equal(lazy.sequences[-1], eager.sequences[-1])
    assert torch.equal(lazy.sequences[torch.tensor(7)], eager.sequences[torch.tensor(7)])
    picks = [19, 5, 5, 0, 6]
    assert torch.equal(lazy.batch(picks), eager.batch(picks)) and lazy.batch(picks).dtype == torch.long
    single = TokenDataset(np.load(paths[2], mmap_mode="r"), 100)  # ids[301:800]: 4 sequences and 99 left over
    assert len(single) == 4 and single.dropped_tokens == 99
    assert torch.equal(single.sequences[0:4], torch.as_tensor(ids[301:701].astype(np.int64)).view(4, 100))
    with pytest.raises(IndexError):
        lazy.sequences[20]
    with pytest.raises(DataError, match="must be >= 0"):
        TokenDataset(np.array([1, -2, 3, 4], dtype=np.int32), 2)
    with pytest.raises(DataError, match="1-D"):
        TokenDataset(np.zeros((4, 4), dtype=np.int64), 2)
    with pytest.raises(DataError, match="fewer than one sequence"):
        TokenDataset([np.arange(5, dtype=np.uint16)], 8)
    with pytest.raises(DataError, match="corpus is empty"):
        TokenDataset([np.zeros(0, dtype=np.uint16)], 8)


def test_trainer_evaluates_a_memory_mapped_dataset(tmp_path, tokenizer_dir):
    from genforge.config import Config
    from genforge.model import Transformer
    from genforge.train import TrainConfig, Trainer

    rng = random.Random(6)
    folder = write_docs(tmp_path / "src", {f"d{i}": random_document(rng, 60) for i in range(30)})
    prepare([folder], tokenizer_dir, tmp_path / "data", val_fraction=0.2, seq_len=32)
    train, val = load_prepared(tmp_path / "data")
    torch.manual_seed(0)
    model = Transformer(
        Config(
            family="llama",
            vocab_size=1000,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )
    trainer = Trainer(
        model,
        train,
        TrainConfig(out_dir=tmp_path / "run", max_steps=2, batch_size=4, progress=False, export=False),
        val_data=val,
    )
    result = trainer.train()
    assert result.step == 2 and result.evals[-1]["val_loss"] > 0


# ------------------------------------------------------------------------------- bad input
def test_empty_corpus_and_too_small_corpus_fail_without_touching_earlier_output(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep me")
    empty = write_docs(tmp_path / "empty", {"a": "", "b": "   \n"})
    with pytest.raises(DataError, match="already exists"):
        prepare([empty], tokenizer_dir, out)
    with pytest.raises(DataError, match="the corpus is empty"):
        prepare([empty], tokenizer_dir, out, overwrite=True)
    rng = random.Random(7)
    small = write_docs(tmp_path / "small", {"a": random_document(rng, 30)})
    with pytest.raises(DataError, match=r"train split has \d+ tokens .* fewer than one sequence of seq_len=4096"):
        prepare([small], tokenizer_dir, out, seq_len=4096, val_fraction=0, overwrite=True)
    filtered = write_docs(tmp_path / "filtered", {"a": "tiny", "b": "also tiny"})
    with pytest.raises(DataError, match="no document is left"):
        prepare([filtered], tokenizer_dir, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def test_bad_sources_and_options_fail_before_reading(tmp_path, tokenizer_dir):
    for sources, match in [
        ([tmp_path / "missing.txt"], "does not exist"),
        ([str(tmp_path / "*.none")], "matches no file"),
        ([tmp_path], "holds no file ending with"),
        ([], "no sources"),
    ]:
        with pytest.raises(DataError, match=match):
            prepare(sources, tokenizer_dir, tmp_path / "out")
    (tmp_path / "a.txt").write_text("some text " * 20)
    for kwargs, match in [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"seq_len": 1}, "seq_len"),
        ({"filters": QualityFilters(max_symbol_ratio=2)}, "max_symbol_ratio"),
        ({"filters": QualityFilters(min_chars=10, max_chars=5)}, "must not exceed"),
        ({"dedup": DedupSettings(threshold=0)}, "threshold"),
        ({"dedup": DedupSettings(num_perm=1)}, "num_perm"),
        ({"dedup": DedupSettings(threshold=0.999)}, "cannot be indexed"),
    ]:
        with pytest.raises(DataError, match=match):
            prepare([tmp_path / "a.txt"], tokenizer_dir, tmp_path / "out", **kwargs)
    with pytest.raises(FileNotFoundError):
        prepare([tmp_path / "a.txt"], tmp_path / "no_tokenizer", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_prepared_rejects_missing_and_damaged_data(tmp_path, tokenizer_dir):
    rng = random.Random(8)
    folder = write_docs(tmp_path / "src", {f"d{i}": random_document(rng, 60) for i in range(10)})
    prepare([folder], tokenizer_dir, tmp_path / "data", val_fraction=0, seq_len=16)
    train, val = load_prepared(tmp_path / "data")
    assert val is None and len(train) > 0
    assert len(load_prepared(tmp_path / "data", seq_len=8)[0]) >= 2 * len(train)
    with pytest.raises(DataError, match="no meta.json"):
        load_prepared(tmp_path / "src")
    shard = tmp_path / "data" / "train-00000.npy"
    np.save(shard, np.load(shard)[:-3])  # truncated
    with pytest.raises(DataError, match="meta.json records"):
        load_prepared(tmp_path / "data")
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        load_prepared(tmp_path / "data")


def test_cli_prepares_and_reports_errors(tmp_path, tokenizer_dir, capsys):
    rng = random.Random(9)
    folder = write_docs(tmp_path / "src", {f"d{i}": random_document(rng, 60) for i in range(20)})
    (folder / "d0_copy.txt").write_text((folder / "d0.txt").read_text())
    assert (
        main(
            [
                "data",
                "prepare",
                str(folder),
                "--tokenizer",
                str(tokenizer_dir),
                "--out",
                str(tmp_path / "out"),
                "--val-fraction",
                "0.4",
                "--seq-len",
                "16",
                "--max-symbol-ratio",
                "off",
            ]
        )
        == 0
    ), capsys.readouterr().err
    err = " ".join(capsys.readouterr().err.split())
    assert "1 exact and 0 near duplicates removed, 20 kept" in err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["filters"]["settings"]["max_symbol_ratio"] is None and meta["seq_len"] == 16
    assert (
        main(["data", "prepare", str(folder), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")]) == 2
    )
    assert "already exists" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        main(["data", "prepare", str(folder), "--tokenizer", "t", "--out", "o", "--max-symbol-ratio", "1.5"])


def test_documents_are_read_lazily_and_long_files_only_up_to_the_limit(tmp_path):
    from genforge.train.sources import iter_documents

    (tmp_path / "big.txt").write_text("word " * 400_000)  # 2 MB
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "first"}) + "\n" + "{not json\n")
    [doc] = list(iter_documents([tmp_path / "big.txt"], max_chars=1000))
    assert len(doc.text) == 1001  # enough to know it is too long, no more
    documents = iter_documents([tmp_path / "rows.jsonl"])
    assert next(documents).text == "first"  # the broken second line is not read yet
    with pytest.raises(DataError, match=r"rows\.jsonl:2 is not valid JSON"):
        next(documents)
