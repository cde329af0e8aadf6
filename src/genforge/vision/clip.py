"""CLIP: contrastive language-image pretraining (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision").

Two encoders map an image and a text into one embedding space; training pulls each image
towards its own caption and away from the other captions of the batch with a symmetric
InfoNCE loss (van den Oord et al. 2018) over cosine similarities scaled by a learned
temperature, `exp(logit_scale)`, clamped at 100 as the paper does. A classifier then needs no
training: embed one prompt per class ("a handwritten seven") and pick the closest class
(zero-shot classification), averaging the embeddings of several prompt templates per class
(prompt ensembling, section 3.1.4 of the paper).

Both towers are genforge's `Transformer` (model.py), configured as data:

- the image encoder is a Vision Transformer (Dosovitskiy et al. 2021): a strided convolution
  cuts the image into patches and embeds each one, a learned class token goes first, learned
  positions are added, then CLIP's extra LayerNorm ("pre_layrnorm", the Transformer's
  `embedding_norm`), pre-LN bidirectional blocks (`causal=False`), a final LayerNorm
  ("post_layernorm") and a linear projection of the class token. The class token is the
  tower's one-word vocabulary: row 0 of its token embedding.
- the text encoder is the causal decoder stack with learned positions and a final LayerNorm,
  read at the end-of-text token and projected; it has no LM head.

`ClipModel.from_hf` loads a transformers `CLIPModel` checkpoint (config.json + safetensors) by a
weight map, so real CLIP weights a user has give the same embeddings here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..config import Config
from ..model import Transformer

LOGIT_SCALE_MAX = 100.0  # the paper clamps the temperature so logits are scaled by at most 100
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # the paper's initial temperature 0.07


class ClipError(ValueError):
    """Input or a checkpoint the CLIP model cannot use; the message says what is accepted."""


@dataclass
class ClipConfig:
    """The sizes of both towers. Defaults are the small model trained on 16x16 digits."""

    vocab_size: int
    eos_token_id: int | None  # the token the text is read at (None or 2: the largest id, as old CLIP configs)
    image_size: int = 16
    patch_size: int = 4
    channels: int = 1
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 128
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_mlp: int = 128
    text_context: int = 16
    projection_dim: int = 64
    activation: str = "quick_gelu"
    vision_norm_eps: float = 1e-5
    text_norm_eps: float = 1e-5
    logit_scale_init: float = LOGIT_SCALE_INIT

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ClipError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.channels not in (1, 3):
            raise ClipError(f"channels must be 1 (grayscale) or 3 (RGB), not {self.channels}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def vision_config(self) -> Config:
        """The ViT as a genforge Config: bidirectional, learned positions over class token +
        patches, LayerNorm on the embeddings (CLIP's pre_layrnorm), plain MLP with biases."""
        return Config(
            family="clip_vision_model",
            vocab_size=1,  # the class token
            hidden_size=self.vision_width,
            num_layers=self.vision_layers,
            num_heads=self.vision_heads,
            intermediate_size=self.vision_mlp,
            max_position_embeddings=self.num_patches + 1,
            causal=False,
            norm="layernorm",
            norm_eps=self.vision_norm_eps,
            activation=self.activation,
            gated_mlp=False,
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            position="learned",
            embedding_norm=True,
        )

    def text_config(self) -> Config:
        return Config(
            family="clip_text_model",
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            num_layers=self.text_layers,
            num_heads=self.text_heads,
            intermediate_size=self.text_mlp,
            max_position_embeddings=self.text_context,
            causal=True,
            norm="layernorm",
            norm_eps=self.text_norm_eps,
            activation=self.activation,
            gated_mlp=False,
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            position="learned",
            eos_token_id=self.eos_token_id,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClipConfig:
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict) -> ClipConfig:
        """Read a transformers `CLIPModel` config.json."""
        if hf.get("model_type") != "clip":
            raise ClipError(f"model_type {hf.get('model_type')!r} is not a CLIP model; expected 'clip'")
        text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
        activations = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
        if len(activations) > 1 or not activations <= {"quick_gelu", "gelu"}:
            raise ClipError(f"hidden_act {sorted(activations)} is not supported; accepted: quick_gelu or gelu in both")
        return cls(
            vocab_size=text.get("vocab_size", 49408),
            eos_token_id=text.get("eos_token_id", 49407),
            image_size=vision.get("image_size", 224),
            patch_size=vision.get("patch_size", 32),
            channels=vision.get("num_channels", 3),
            vision_width=vision.get("hidden_size", 768),
            vision_layers=vision.get("num_hidden_layers", 12),
            vision_heads=vision.get("num_attention_heads", 12),
            vision_mlp=vision.get("intermediate_size", 3072),
            text_width=text.get("hidden_size", 512),
            text_layers=text.get("num_hidden_layers", 12),
            text_heads=text.get("num_attention_heads", 8),
            text_mlp=text.get("intermediate_size", 2048),
            text_context=text.get("max_position_embeddings", 77),
            projection_dim=hf.get("projection_dim", 512),
            activation=activations.pop(),
            vision_norm_eps=vision.get("layer_norm_eps", 1e-5),
            text_norm_eps=text.get("layer_norm_eps", 1e-5),
            logit_scale_init=hf.get("logit_scale_init_value", LOGIT_SCALE_INIT),
        )


def clip_init(tower: Transformer, projection: nn.Linear) -> None:
    """CLIP's initialisation (the paper's released code), in place of the Transformer's GPT-2
    one: attention and MLP weights scaled by the width and depth. With GPT-2's N(0, 0.02)
    everywhere a small tower starts with nearly the same embedding for every input, and
    contrastive training sits at chance for many steps before it finds a direction."""
    config = tower.config
    width, layers = config.hidden_size, config.num_layers
    attention_std, fc_std = width**-0.5, (2 * width) ** -0.5
    output_std = width**-0.5 * (2 * layers) ** -0.5
    with torch.no_grad():
        tower.embed_tokens.weight.normal_(std=0.02)
        tower.embed_positions.weight.normal_(std=0.01)
        for block in tower.blocks:
            block.attn.qkv.weight.normal_(std=attention_std)
            block.attn.o.weight.normal_(std=output_std)
            block.mlp.up.weight.normal_(std=fc_std)
            block.mlp.down.weight.normal_(std=output_std)
        projection.weight.normal_(std=width**-0.5)


class ClipVisionEncoder(nn.Module):
    """Patch embedding + ViT (genforge Transformer, bidirectional) + projection."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        width = config.vision_width
        self.patch_embed = nn.Conv2d(config.channels, width, config.patch_size, stride=config.patch_size, bias=False)
        self.tower = Transformer(config.vision_config())
        self.projection = nn.Linear(width, config.projection_dim, bias=False)
        clip_init(self.tower, self.projection)

    def check_images(self, images: torch.Tensor) -> None:
        config = self.config
        expected = (config.channels, config.image_size, config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ClipError(
                f"images have shape {tuple(images.shape)}; this encoder takes [N, {config.channels}, "
                f"{config.image_size}, {config.image_size}] (channels, height, width)"
            )

    def hidden_states(self, images: torch.Tensor) -> torch.Tensor:
        """`[N, 1 + patches, width]`: the class token then the patches, after the final LayerNorm."""
        self.check_images(images)
        patches = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        class_token = self.tower.embed_tokens.weight[None].expand(len(images), 1, -1)
        return self.tower(None, inputs_embeds=torch.cat((class_token, patches), dim=1)).hidden_states

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """`[N, patches, width]`: one feature per patch, row by row (what a VLM's projector reads)."""
        return self.hidden_states(images)[:, 1:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings `[N, projection_dim]` (not normalised), read at the class token."""
        return self.projection(self.hidden_states(images)[:, 0])


class ClipTextEncoder(nn.Module):
    """genforge's causal text Transformer read at the end-of-text token, projected."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        self.tower = Transformer(config.text_config())
        self.tower.lm_head = None  # an encoder: the pooled state is projected, never turned into logits
        self.projection = nn.Linear(config.text_width, config.projection_dim, bias=False)
        clip_init(self.tower, self.projection)

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each row is read: the first end-of-text token, or (configs whose eos_token_id
        is 2 or unset, as CLIP's first releases) the largest id, the end token of CLIP's vocabulary."""
        eos = self.config.eos_token_id
        if eos is None or eos == 2:
            return input_ids.argmax(dim=-1)
        is_eos = input_ids == eos
        if not bool(is_eos.any(dim=-1).all()):
            raise ClipError(
                f"every text row must hold the end-of-text token id {eos}; tokenize with the model's tokenizer"
            )
        return is_eos.int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings `[N, projection_dim]` for right-padded ids `[N, seq]` (causal, so the
        padding after the end token never reaches it and needs no mask)."""
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.text_context:
            raise ClipError(
                f"input_ids have shape {tuple(input_ids.shape)}; expected [N, seq] with seq <= "
                f"{self.config.text_context} (the text context)"
            )
        states = self.tower(input_ids, compute_logits=False).hidden_states
        pooled = states[torch.arange(len(input_ids), device=states.device), self.pooled_positions(input_ids)]
        return self.projection(pooled)


class ClipModel(nn.Module):
    """Image and text encoders with a learned temperature."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = ClipVisionEncoder(config)
        self.text = ClipTextEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision(images)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of a batch of matching (image, text) pairs."""
        return clip_loss(self.encode_image(images), self.encode_text(input_ids), self.logit_scale)

    @classmethod
    def from_hf(cls, directory: str | Path) -> ClipModel:
        """A transformers `CLIPModel` directory (config.json + *.safetensors), mapped by name."""
        directory = Path(directory)
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise ClipError(f"no config.json in {directory}; give a transformers CLIPModel directory")
        config = ClipConfig.from_hf(json.loads(config_file.read_text()))
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ClipError(f"no *.safetensors in {directory}; genforge reads safetensors only (never pickles)")
        hf: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                hf.update({key: handle.get_tensor(key) for key in handle.keys()})
        model = cls(config)
        model.load_state_dict(state_dict_from_hf(hf, config))
        return model.eval()


# ------------------------------------------------------------------------------- weight map
def _tower_map(prefix: str, tower: str, layers: int) -> dict[str, tuple[str, ...]]:
    """genforge name -> Hugging Face names (several: concatenated along dim 0) for one tower."""
    names: dict[str, tuple[str, ...]] = {}
    for i in range(layers):
        hf, gf = f"{prefix}.encoder.layers.{i}", f"{tower}.blocks.{i}"
        for kind in ("weight", "bias"):
            names[f"{gf}.attn.qkv.{kind}"] = tuple(f"{hf}.self_attn.{p}_proj.{kind}" for p in "qkv")
            names[f"{gf}.attn.o.{kind}"] = (f"{hf}.self_attn.out_proj.{kind}",)
            names[f"{gf}.attn_norm.{kind}"] = (f"{hf}.layer_norm1.{kind}",)
            names[f"{gf}.mlp_norm.{kind}"] = (f"{hf}.layer_norm2.{kind}",)
            names[f"{gf}.mlp.up.{kind}"] = (f"{hf}.mlp.fc1.{kind}",)
            names[f"{gf}.mlp.down.{kind}"] = (f"{hf}.mlp.fc2.{kind}",)
    return names


def hf_weight_map(config: ClipConfig) -> dict[str, tuple[str, ...]]:
    """Every genforge parameter of `ClipModel` and the transformers `CLIPModel` tensors it holds."""
    names = _tower_map("vision_model", "vision.tower", config.vision_layers)
    names |= _tower_map("text_model", "text.tower", config.text_layers)
    for kind in ("weight", "bias"):
        names[f"vision.tower.embed_norm.{kind}"] = (f"vision_model.pre_layrnorm.{kind}",)
        names[f"vision.tower.final_norm.{kind}"] = (f"vision_model.post_layernorm.{kind}",)
        names[f"text.tower.final_norm.{kind}"] = (f"text_model.final_layer_norm.{kind}",)
    names |= {
        "vision.patch_embed.weight": ("vision_model.embeddings.patch_embedding.weight",),
        "vision.tower.embed_tokens.weight": ("vision_model.embeddings.class_embedding",),
        "vision.tower.embed_positions.weight": ("vision_model.embeddings.position_embedding.weight",),
        "vision.projection.weight": ("visual_projection.weight",),
        "text.tower.embed_tokens.weight": ("text_model.embeddings.token_embedding.weight",),
        "text.tower.embed_positions.weight": ("text_model.embeddings.position_embedding.weight",),
        "text.projection.weight": ("text_projection.weight",),
        "logit_scale": ("logit_scale",),
    }
    return names


def state_dict_from_hf(hf: dict[str, torch.Tensor], config: ClipConfig) -> dict[str, torch.Tensor]:
    """A genforge `ClipModel` state dict from a transformers `CLIPModel` one (checked complete)."""
    out = {}
    for gf, parts in hf_weight_map(config).items():
        missing = [name for name in parts if name not in hf]
        if missing:
            raise ClipError(f"the checkpoint lacks {missing[0]} (for {gf}); is it a transformers CLIPModel?")
        tensor = torch.cat([hf[name].float() for name in parts]) if len(parts) > 1 else hf[parts[0]].float()
        if gf == "vision.tower.embed_tokens.weight":
            tensor = tensor.reshape(1, -1)  # the class embedding is the tower's one token
        out[gf] = tensor
    return out


# ------------------------------------------------------------------------------------- loss
def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of the images matches row i of the texts. Cross-entropy of
    image->text and text->image similarity logits, averaged; logits are cosine similarities
    times `exp(logit_scale)`, clamped at 100."""
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ClipError(
            f"image and text embeddings must both be [N, dim] for N matching pairs; got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    logits = similarity_logits(image_embeds, text_embeds, logit_scale)
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def similarity_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """`[images, texts]` scaled cosine similarities."""
    scale = logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)
    return scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T


# ------------------------------------------------------------------------------- tokenizing
def encode_texts(tokenizer, texts: Sequence[str], context: int, pad_id: int) -> torch.Tensor:
    """Right-padded ids `[N, context]` with the tokenizer's start and end tokens; a text that
    does not fit is refused rather than cut (cutting would drop the end token CLIP reads)."""
    if not texts:
        raise ClipError("no texts to encode; give at least one")
    rows = tokenizer.encode_batch(list(texts))
    longest = max(rows, key=len)
    if len(longest) > context:
        raise ClipError(
            f"text {texts[rows.index(longest)]!r} is {len(longest)} tokens; this model reads at most {context}"
        )
    ids = torch.full((len(rows), context), pad_id, dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


# ---------------------------------------------------------------------------- zero-shot, recall
@torch.no_grad()
def class_text_embeddings(model: ClipModel, prompt_ids: torch.Tensor) -> torch.Tensor:
    """`[classes, dim]` unit vectors from prompt ids `[classes, templates, seq]`: each class's
    normalised prompt embeddings averaged over the templates and normalised again."""
    classes, templates, seq = prompt_ids.shape
    embeds = F.normalize(model.encode_text(prompt_ids.reshape(-1, seq)), dim=-1).view(classes, templates, -1)
    return F.normalize(embeds.mean(dim=1), dim=-1)


@torch.no_grad()
def encode_images(model: ClipModel, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([model.encode_image(chunk) for chunk in images.split(batch_size)])


@torch.no_grad()
def zero_shot_predict(model: ClipModel, images: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """The class whose prompt ensemble is closest to each image, `[N]`."""
    classes = class_text_embeddings(model, prompt_ids)
    return (F.normalize(encode_images(model, images), dim=-1) @ classes.T).argmax(dim=-1)


@torch.no_grad()
def retrieval_recall_at_1(
    model: ClipModel,
    images: torch.Tensor,
    image_labels: torch.Tensor,
    text_ids: torch.Tensor,
    text_labels: torch.Tensor,
) -> dict[str, float]:
    """Image->text and text->image recall@1 where a hit is a retrieved item of the query's
    class: captions made from labels repeat (every image of a class shares a handful of
    captions), so the exact paired item is not a meaningful target."""
    image_embeds = F.normalize(encode_images(model, images), dim=-1)
    text_embeds = F.normalize(model.encode_text(text_ids), dim=-1)
    similarity = image_embeds @ text_embeds.T
    image_to_text = (text_labels[similarity.argmax(dim=1)] == image_labels).float().mean().item()
    text_to_image = (image_labels[similarity.argmax(dim=0)] == text_labels).float().mean().item()
    return {"image_to_text_recall@1": image_to_text, "text_to_image_recall@1": text_to_image}


# ---------------------------------------------------------------------------------- training
@dataclass
class ClipTrainResult:
    model: ClipModel
    losses: list[float]  # one per step
    seconds: float


def shift_jitter(images: torch.Tensor, generator: torch.Generator, reach: int) -> torch.Tensor:
    """Each image moved by up to `reach` pixels in each direction (zeros shifted in): the
    augmentation that keeps a small ViT from memorising 1,400 digits."""
    if reach <= 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (reach, reach, reach, reach))
    offsets = torch.randint(0, 2 * reach + 1, (len(images), 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(size)  # [N, size]
    cols = offsets[:, 1, None] + torch.arange(size)
    batch = torch.arange(len(images))[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_clip(
    model: ClipModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    caption_ids: torch.Tensor,
    *,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    jitter: int = 1,
    seed: int = 0,
    progress=None,
) -> ClipTrainResult:
    """InfoNCE on (image, caption) pairs. `caption_ids` `[classes, templates, seq]` holds every
    caption an image of each class may get; each step draws one template per image, so an
    image meets all its captions over the epochs. AdamW, linear warm-up then cosine decay;
    no weight decay on norms, biases, embeddings and the temperature."""
    if len(images) != len(labels):
        raise ClipError(f"{len(images)} images but {len(labels)} labels")
    if batch_size < 2:
        raise ClipError("contrastive training needs batches of at least 2 pairs")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    decayed = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    others = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = len(images) // batch_size or 1
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)),
    )
    templates = caption_ids.shape[1]
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)[: steps_per_epoch * batch_size]
        for batch in order.view(steps_per_epoch, -1):
            picks = torch.randint(templates, (len(batch),), generator=generator)
            texts = caption_ids[labels[batch], picks]
            loss = model(shift_jitter(images[batch], generator, jitter), texts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if progress is not None:
            progress(epoch + 1, epochs, losses[-1])
    model.eval()
    return ClipTrainResult(model=model, losses=losses, seconds=time.perf_counter() - start)


CAPTION_SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}


def caption_tokenizer(texts: Sequence[str], extra_special_tokens: Sequence[str] = ()):
    """A lowercase word-level tokenizer (the `tokenizers` library) over `texts`: captions made
    from a few templates and class names need no sub-words, and one token per word keeps the
    text tower's job (and the decoder's answers) one step each. BERT's normalisation and
    pre-tokenisation split words and punctuation; encoding adds [CLS] before and [SEP] after,
    the start and end tokens CLIP reads; words never seen become [UNK]. The special tokens
    come first, then the words in sorted order, so the same texts always give the same ids."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    from ..tokenizer import Tokenizer

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = sorted(
        {word for text in texts for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))}
        - set(CAPTION_SPECIAL_TOKENS.values())
        - set(extra_special_tokens)
    )
    if not words:
        raise ClipError("no words to build a tokenizer from; give captions with text")
    specials = [*CAPTION_SPECIAL_TOKENS.values(), *extra_special_tokens]
    vocab = {token: index for index, token in enumerate([*specials, *words])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizer, splitter
    backend.decoder = decoders.WordPiece(cleanup=True)  # words joined by spaces, " ," -> ","
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    config = {**CAPTION_SPECIAL_TOKENS, "extra_special_tokens": list(extra_special_tokens), "do_lower_case": True}
    return Tokenizer(backend, config)


# ------------------------------------------------------------------------------- save and load
CLIP_TOKENIZER_DIR = "tokenizer"


def save_clip(model: ClipModel, tokenizer, directory: str | Path, extra: dict | None = None) -> Path:
    """`vision.json` (kind "clip", the config and `extra`: class names, templates, metrics),
    `model.safetensors` and `tokenizer/`, each written atomically."""
    from safetensors.torch import save_file

    from ..atomic import atomic_path, atomic_write_text, staged_directory
    from .kinds import MODEL_CONFIG, MODEL_WEIGHTS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / MODEL_WEIGHTS) as staged:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, staged)
    with staged_directory(directory / CLIP_TOKENIZER_DIR) as staging:
        tokenizer.save(staging)
    settings = {"kind": "clip", "config": model.config.to_dict(), **(extra or {})}
    atomic_write_text(directory / MODEL_CONFIG, json.dumps(settings, indent=2))
    return directory


def load_clip(directory: str | Path):
    """(model, tokenizer, settings) of a directory `save_clip` wrote."""
    from safetensors.torch import load_file

    from ..tokenizer import Tokenizer
    from .kinds import MODEL_CONFIG, MODEL_WEIGHTS

    directory = Path(directory)
    path = directory / MODEL_CONFIG
    if not path.is_file():
        raise ClipError(f"{directory} holds no {MODEL_CONFIG}; train a model with `genforge vision train clip`")
    settings = json.loads(path.read_text())
    if settings.get("kind") != "clip":
        raise ClipError(f"{directory} holds a {settings.get('kind')!r} model, not a CLIP model ('clip')")
    model = ClipModel(ClipConfig.from_dict(settings["config"]))
    model.load_state_dict(load_file(directory / MODEL_WEIGHTS))
    return model.eval(), Tokenizer.from_dir(directory / CLIP_TOKENIZER_DIR), settings
