"""Named entities (people, organisations, places) for PII detection: genforge's BERT encoder
(Devlin et al. 2019) with a token-classification head, loaded from a transformers
`BertForTokenClassification` checkpoint (a linear layer from each token's final hidden state to
the BIO labels of its config.json's `id2label`, e.g. B-PER, I-PER, B-ORG, ..., O).

Token scores become entity spans the way transformers' token-classification pipeline does with
`aggregation_strategy="average"`: the label probabilities of a word's word pieces are averaged,
the word takes the most probable label, and consecutive words join one entity while their labels
continue it (I-X after X; B-X always starts a new one). Spans are character offsets into the
text. Texts longer than the model's positions are cut into windows at word boundaries.

genforge ships no trained NER weights: pass the directory of a fine-tuned checkpoint (any
BertForTokenClassification saved with safetensors and a fast tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_model_body
from ..model import Transformer
from ..tokenizer import Tokenizer

CLASSIFIER_TENSORS = ("classifier.weight", "classifier.bias")
# CoNLL-2003 and OntoNotes label names -> the PII types they mean; other labels (MISC, DATE) are ignored.
DEFAULT_LABEL_TYPES = {
    "PER": "PERSON",
    "PERSON": "PERSON",
    "ORG": "ORGANIZATION",
    "ORGANIZATION": "ORGANIZATION",
    "LOC": "LOCATION",
    "LOCATION": "LOCATION",
    "GPE": "LOCATION",
}


@dataclass(frozen=True)
class EntitySpan:
    """An entity: `label` as the model names it (PER), `type` the PII type (PERSON, or None)."""

    label: str
    type: str | None
    start: int
    end: int
    score: float


class BertTokenClassifier(nn.Module):
    """A BERT encoder and a linear head over its token states: the logits of
    `transformers.BertForTokenClassification` (dropout is off at inference)."""

    def __init__(self, encoder: Transformer, classifier: nn.Linear, id2label: dict[int, str]) -> None:
        super().__init__()
        if encoder.config.causal:
            raise ValueError("token classification needs a bidirectional encoder, got a causal model")
        self.encoder, self.classifier, self.id2label = encoder, classifier, id2label

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: str | torch.dtype | None = None, device: str = "cpu"
    ) -> BertTokenClassifier:
        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{directory} has no config.json; expected a BertForTokenClassification directory")
        config = json.loads(config_path.read_text())
        architectures = config.get("architectures") or []
        if not any(name.endswith("ForTokenClassification") for name in architectures):
            raise CheckpointError(
                f"{directory} holds {architectures or 'no architectures'}; a named-entity model must be a "
                "BertForTokenClassification checkpoint (a `classifier` head over the token states)"
            )
        id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
        encoder, head = load_model_body(directory, CLASSIFIER_TENSORS, dtype, device)
        weight, bias = head["classifier.weight"], head["classifier.bias"]
        if len(id2label) != weight.shape[0]:
            raise CheckpointError(
                f"{config_path} names {len(id2label)} labels in id2label but the classifier has {weight.shape[0]} outputs"
            )
        classifier = nn.Linear(weight.shape[1], weight.shape[0], device=device, dtype=weight.dtype)
        with torch.no_grad():
            classifier.weight.copy_(weight)
            classifier.bias.copy_(bias)
        return cls(encoder, classifier, id2label).eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, seq, labels) logits."""
        hidden = self.encoder(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, compute_logits=False
        ).hidden_states
        return self.classifier(hidden)


def _split_label(label: str) -> tuple[str, str]:
    """("B", "PER") for B-PER; a label without a B-/I- prefix continues like I- (as transformers reads it)."""
    if label[:2] in ("B-", "I-"):
        return label[0], label[2:]
    return "I", label


def entities_from_scores(
    probabilities: torch.Tensor,
    word_ids: list[int | None],
    offsets: list[tuple[int, int]],
    id2label: dict[int, str],
    label_types: dict[str, str] | None = None,
) -> list[EntitySpan]:
    """Entity spans from per-token label probabilities (tokens, labels) of one text.

    word_ids: the word each token belongs to (None for special tokens, skipped); offsets: each
    token's (start, end) characters.
    """
    label_types = DEFAULT_LABEL_TYPES if label_types is None else label_types
    words: list[tuple[str, float, int, int]] = []  # (label, score, start, end)
    index = 0
    while index < len(word_ids):
        if word_ids[index] is None:
            index += 1
            continue
        stop = index + 1
        while stop < len(word_ids) and word_ids[stop] == word_ids[index]:
            stop += 1
        mean = probabilities[index:stop].mean(0)
        best = int(mean.argmax())
        words.append((id2label[best], float(mean[best]), offsets[index][0], offsets[stop - 1][1]))
        index = stop
    entities: list[EntitySpan] = []
    group: list[tuple[str, float, int, int]] = []

    def close() -> None:
        if group:
            _, tag = _split_label(group[0][0])
            if tag != "O":
                score = sum(word[1] for word in group) / len(group)
                entities.append(EntitySpan(tag, label_types.get(tag.upper()), group[0][2], group[-1][3], score))
            group.clear()

    for word in words:
        prefix, tag = _split_label(word[0])
        if not group or prefix == "B" or tag != _split_label(group[-1][0])[1]:
            close()
        group.append(word)
    close()
    return entities


class NERTagger:
    """Runs a `BertTokenClassifier` over text of any length and returns entity spans."""

    def __init__(
        self,
        directory: str | Path,
        device: str = "cpu",
        batch_size: int = 8,
        label_types: dict[str, str] | None = None,
    ) -> None:
        self.model = BertTokenClassifier.from_pretrained(directory, device=device)
        self.tokenizer = Tokenizer.from_dir(directory)
        self.backend = self.tokenizer.backend
        self.backend.no_truncation()
        self.backend.no_padding()
        if self.tokenizer.cls_token_id is None or self.tokenizer.sep_token_id is None:
            raise CheckpointError(f"the tokenizer in {directory} has no [CLS]/[SEP] tokens; a BERT tokenizer is needed")
        self.window = self.model.encoder.config.max_position_embeddings - 2
        self.batch_size = batch_size
        self.label_types = DEFAULT_LABEL_TYPES if label_types is None else label_types

    def _windows(self, word_ids: list[int | None]) -> list[tuple[int, int]]:
        """[start, end) token ranges of at most `window` tokens, cut between words where possible."""
        ranges, start = [], 0
        while start < len(word_ids):
            end = min(start + self.window, len(word_ids))
            if end < len(word_ids):
                cut = end
                while cut > start + 1 and word_ids[cut] is not None and word_ids[cut] == word_ids[cut - 1]:
                    cut -= 1
                end = cut if cut > start + 1 else end
            ranges.append((start, end))
            start = end
        return ranges

    @torch.inference_mode()
    def __call__(self, text: str) -> list[EntitySpan]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids, word_ids, offsets = encoding.ids, list(encoding.word_ids), list(encoding.offsets)
        if not ids:
            return []
        device = self.model.classifier.weight.device
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        probabilities = []
        windows = self._windows(word_ids)
        for first in range(0, len(windows), self.batch_size):
            batch = windows[first : first + self.batch_size]
            longest = max(end - start for start, end in batch) + 2
            input_ids = torch.zeros(len(batch), longest, dtype=torch.long, device=device)
            mask = torch.zeros_like(input_ids)
            for row, (start, end) in enumerate(batch):
                row_ids = [cls_id, *ids[start:end], sep_id]
                input_ids[row, : len(row_ids)] = torch.tensor(row_ids)
                mask[row, : len(row_ids)] = 1
            scores = self.model(input_ids, attention_mask=mask).float().softmax(-1)
            for row, (start, end) in enumerate(batch):
                probabilities.append(scores[row, 1 : 1 + end - start].cpu())
        return entities_from_scores(torch.cat(probabilities), word_ids, offsets, self.model.id2label, self.label_types)


__all__ = ["BertTokenClassifier", "DEFAULT_LABEL_TYPES", "EntitySpan", "NERTagger", "entities_from_scores"]
