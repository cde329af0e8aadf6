"""SentencePiece models (Kudo & Richardson 2018) rebuilt in `tokenizers`.

A SentencePiece `.model` file (Llama 2, T5, Mistral, Gemma ship one) is a protobuf of pieces with
scores and types, the segmentation algorithm (unigram language model, Kudo 2018, or BPE), and
how text is normalised first. `sentencepiece_backend` reads it with the `sentencepiece` library's
own protobuf definition and rebuilds the same tokenizer in `tokenizers`, so genforge encodes with
one engine whatever the source (`Tokenizer.from_sentencepiece` wraps it;
`train.tokenizer_training.train_sentencepiece` trains one with the library).

How the spec maps onto `tokenizers`:
  normaliser   the precompiled character map (NFKC and friends), then, with
               remove_extra_whitespaces, trimming and collapsing runs of spaces
  whitespace   spaces become the meta symbol "▁"; add_dummy_prefix puts one in front of the
               text; split_by_whitespace keeps pieces from spanning words
  model        Unigram (Viterbi over piece log-probabilities) or BPE with merges recovered
               from the vocabulary; byte_fallback spells unknown characters as <0xNN> bytes
  specials     control pieces (<s>, </s>, <pad>) never match text, as in SentencePiece
"""

from __future__ import annotations

import os
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

META = "▁"
SPM_FILE = "tokenizer.model"
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
MODEL_TYPES = {"unigram": _UNIGRAM, "bpe": _BPE}


class SentencePieceError(ValueError):
    """A file that is not a SentencePiece model genforge can rebuild; the message says why."""


def read_model_proto(path: str | os.PathLike):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    data = Path(path).read_bytes()
    try:
        proto.ParseFromString(data)
    except Exception as err:  # protobuf raises its own DecodeError
        raise SentencePieceError(f"{path} is not a SentencePiece model file ({err})") from None
    if not proto.pieces:
        raise SentencePieceError(f"{path} holds no pieces; is it a SentencePiece .model file?")
    return proto


def sentencepiece_backend(path: str | os.PathLike) -> tuple[tokenizers.Tokenizer, dict]:
    """A `tokenizers` tokenizer that encodes and decodes as the SentencePiece model at `path`,
    and its special tokens by role (bos_token, eos_token, unk_token, pad_token)."""
    proto = read_model_proto(path)
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type not in (_UNIGRAM, _BPE):
        raise SentencePieceError(
            f"{path}: SentencePiece model type {trainer.model_type} (word or char) is not supported; "
            "accepted: unigram, bpe"
        )
    pieces = [(piece.piece, piece.score, piece.type) for piece in proto.pieces]
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == _UNKNOWN), trainer.unk_id)
    if trainer.model_type == _UNIGRAM:
        # Control and unused pieces score far below any real piece: SentencePiece never matches them in text.
        vocab = [(text, score if kind not in (_CONTROL, _UNUSED) else -1e9) for text, score, kind in pieces]
        model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=trainer.byte_fallback)
    else:
        vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab,
            _merges(pieces),
            unk_token=pieces[unk_id][0],
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = _normalizer(spec)
    if trainer.split_by_whitespace:
        # The normaliser has marked the spaces already; this only cuts before each one.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="never", split=True)
    steps = [decoders.Replace(META, " ")]
    if trainer.byte_fallback:
        steps += [decoders.ByteFallback()]
    steps += [decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps += [decoders.Strip(content=" ", left=1, right=0)]
    backend.decoder = decoders.Sequence(steps)
    specials = [text for text, _, kind in pieces if kind in (_CONTROL, _USER_DEFINED)]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials if t])
    config = {
        "bos_token": _piece(pieces, trainer.bos_id),
        "eos_token": _piece(pieces, trainer.eos_id),
        "unk_token": _piece(pieces, unk_id),
        "pad_token": _piece(pieces, trainer.pad_id),
    }
    return backend, {key: value for key, value in config.items() if value is not None}


def _piece(pieces, index: int) -> str | None:
    return pieces[index][0] if 0 <= index < len(pieces) else None


def _normalizer(spec):
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    # SentencePiece adds the dummy prefix even before text that starts with a space.
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(META))
    steps.append(normalizers.Replace(" ", META))
    return normalizers.Sequence(steps)


def _merges(pieces) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece BPE vocabulary: every split of a piece into two
    pieces of the vocabulary is a merge, ranked by the merged piece's rank (SentencePiece orders
    BPE pieces by when they were merged), then by the parts' ranks."""
    rank = {text: i for i, (text, _, kind) in enumerate(pieces) if kind in (_NORMAL, _USER_DEFINED)}
    found = []
    for merged, merged_rank in rank.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in rank and right in rank:
                found.append((merged_rank, rank[left], rank[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]
