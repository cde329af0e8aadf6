"""genforge's BERT token classifier against transformers' BertForTokenClassification, and the
entity spans against transformers' token-classification pipeline ("average" aggregation)."""

import pytest
import torch
import transformers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from genforge.checkpoint import CheckpointError
from genforge.safety.pii import PIIDetector
from genforge.safety.pii_ner import BertTokenClassifier, NERTagger, entities_from_scores

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
WORDS = "alice bob works at acme corp in paris with the team of contoso and ran to london on monday".split()
PIECES = ["##s", "##ing", "##er", "##a", "##o", "##ce", "##rp", "##ris"]
TEXTS = [
    "Alice works at Acme Corp in Paris.",
    "bob and alice ran to london with the team of contoso on monday",
    "Bobs workinger alicea, parisris!",  # word pieces and unknown words
    "",
]


def build_checkpoint(directory, max_positions=64, seed=0):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES, ".", ",", "!"]
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz"] + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = list(dict.fromkeys(vocab))
    backend = BackendTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    backend.decoder = decoders.WordPiece()
    tokenizer = transformers.BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    torch.manual_seed(seed)
    model = transformers.BertForTokenClassification(config).eval()
    with torch.no_grad():  # perturb norms and biases so that a wrong mapping shows; spread the labels
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        model.classifier.weight.mul_(40)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ner")
    model, tokenizer = build_checkpoint(directory)
    return directory, model, tokenizer


def test_logits_equal_transformers(checkpoint):
    directory, reference, tokenizer = checkpoint
    ours = BertTokenClassifier.from_pretrained(directory)
    batch = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert got.shape == expected.shape
    assert (got[real] - expected[real]).abs().max() < 1e-5


def test_entity_spans_equal_the_transformers_pipeline(checkpoint):
    directory, reference, tokenizer = checkpoint
    pipe = transformers.pipeline(
        "token-classification", model=reference, tokenizer=tokenizer, aggregation_strategy="average", device="cpu"
    )
    tagger = NERTagger(directory)
    total = 0
    for text in TEXTS:
        expected = [(e["entity_group"], e["start"], e["end"], round(float(e["score"]), 4)) for e in pipe(text)]
        got = [(e.label, e.start, e.end, round(e.score, 4)) for e in tagger(text)]
        assert got == expected, text
        total += len(got)
    assert total >= 4  # the random head spreads its labels, so the grouping rules are exercised


def test_bio_grouping_rules():
    # Five single-piece words; rows are the label probabilities over LABELS.
    id2label = dict(enumerate(LABELS))
    chosen = ["B-PER", "I-PER", "I-ORG", "B-ORG", "O"]
    probabilities = torch.stack(
        [torch.nn.functional.one_hot(torch.tensor(LABELS.index(c)), len(LABELS)) for c in chosen]
    )
    offsets = [(0, 3), (4, 7), (8, 11), (12, 15), (16, 19)]
    spans = entities_from_scores(probabilities.float(), [0, 1, 2, 3, 4], offsets, id2label)
    assert [(s.label, s.type, s.start, s.end) for s in spans] == [
        ("PER", "PERSON", 0, 7),
        ("ORG", "ORGANIZATION", 8, 11),
        ("ORG", "ORGANIZATION", 12, 15),
    ]
    # A word's pieces are averaged: B-PER, then two pieces leaning to O and I-PER but I-PER on average.
    pieces = torch.zeros(3, len(LABELS))
    pieces[0, 1] = 1.0
    pieces[1, LABELS.index("I-PER")], pieces[1, 0] = 0.9, 0.1
    pieces[2, LABELS.index("I-PER")], pieces[2, 0] = 0.4, 0.6
    spans = entities_from_scores(pieces, [0, 1, 1], [(0, 3), (4, 6), (6, 9)], id2label)
    assert [(s.start, s.end) for s in spans] == [(0, 9)]
    assert spans[0].score == pytest.approx((1.0 + 0.65) / 2)


def test_long_text_is_tagged_in_windows(tmp_path):
    build_checkpoint(tmp_path, max_positions=12, seed=1)
    tagger = NERTagger(tmp_path)
    text = " ".join(["alice works at acme corp in paris."] * 12)
    spans = tagger(text)
    assert spans, "the random head labels some words"
    assert all(0 <= s.start < s.end <= len(text) for s in spans)
    assert [s.start for s in spans] == sorted(s.start for s in spans)
    assert spans[-1].end > len(text) // 2  # the windows cover the text's end


def test_detector_reports_names_from_the_model(checkpoint):
    directory, _, _ = checkpoint
    detector = PIIDetector(ner=directory)
    text = "Alice works at Acme Corp in Paris, mail alice@example.com"
    findings = detector.detect(text)
    assert any(f.source == "ner" for f in findings)
    assert any(f.type == "EMAIL" and text[f.start : f.end] == "alice@example.com" for f in findings)


def test_refuses_a_checkpoint_without_a_token_head(tmp_path):
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="BertForTokenClassification"):
        BertTokenClassifier.from_pretrained(tmp_path)
