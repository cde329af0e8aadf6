"""A LLaVA-style vision-language model (Liu et al. 2023, "Visual Instruction Tuning"; the MLP
projector of LLaVA-1.5, Liu et al. 2023b).

A frozen image encoder (the CLIP ViT of `clip.py`) turns an image into one feature per patch;
a projector (a linear layer or a two-layer MLP) maps each feature into the embedding space of a
genforge decoder. The chat prompt holds an `<image>` marker (a special token of the tokenizer);
it is expanded to one slot per patch, and at those slots the decoder's input embeddings are
replaced by the projected patch features (`splice_image_features`, through the decoder's
`inputs_embeds=`). Every other position is the plain language model, so with no image the
model is exactly its decoder.

Training has LLaVA's two stages, after a brief text-only pretraining of the small decoder:

0. the decoder learns the chat format and to answer from its context on text-only
   conversations in which the caption is written out where the image will go ("a handwritten
   seven . which digit is this?" -> "seven"); a real LLaVA starts from a pretrained LLM that
   already can, and this is the smallest stand-in for one that fits 2 CPU cores.
1. feature alignment: only the projector trains, on image-caption pairs ("describe the
   image." -> the caption), so the image comes to read to the frozen decoder like its caption;
2. instruction tuning: the projector and LoRA adapters on the decoder (Hu et al. 2021;
   `genforge.finetune.lora`) train on questions ("which digit is this?" -> "seven") and
   captions. The adapters are merged into the decoder when the model is saved.

Answers are decoded greedily: the prompt with its spliced image is run once into a KV cache,
then one token per step until the end-of-turn token.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, atomic_write_text, staged_directory
from ..cache import ContiguousKVCache
from ..config import Config
from ..finetune.lora import LoraConfig, apply_lora, merge_and_unload
from ..model import Transformer
from ..tokenizer import Tokenizer
from .clip import ClipConfig, ClipVisionEncoder, caption_tokenizer
from .data import CAPTION_TEMPLATES, caption, resize
from .kinds import MODEL_CONFIG, MODEL_WEIGHTS

IMAGE_TOKEN = "<image>"
USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN = "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
# One turn per message, each closed by <|end|>; the reply starts after <|assistant|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('roles must be user or assistant, not ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DIGIT_QUESTION = "which digit is this?"
CAPTION_QUESTION = "describe the image."
# Questions asked in training, with the kind of answer each wants.
QUESTIONS = {
    DIGIT_QUESTION: "name",
    "what number is written here?": "name",
    "what digit is shown?": "name",
    CAPTION_QUESTION: "caption",
}
TOKENIZER_DIR = "tokenizer"
PROJECTORS = ("linear", "mlp")
TIED_HEAD = "lm.lm_head.weight"


class VlmError(ValueError):
    """Input the vision-language model cannot use; the message says what is accepted."""


@dataclass
class VlmConfig:
    clip: dict  # ClipConfig.to_dict() of the image encoder
    lm: dict  # genforge Config.to_dict() of the decoder
    image_token_id: int
    end_token_id: int
    projector: str = "mlp"
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise VlmError(f"projector {self.projector!r} is not supported; accepted: {', '.join(PROJECTORS)}")
        self.class_names = tuple(self.class_names)

    def clip_config(self) -> ClipConfig:
        return ClipConfig.from_dict(self.clip)

    def lm_config(self) -> Config:
        return Config(**self.lm)


def make_projector(kind: str, in_features: int, out_features: int) -> nn.Module:
    """LLaVA's linear projector, or LLaVA-1.5's two-layer MLP with a GELU between."""
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


def splice_image_features(
    token_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, image_features: torch.Tensor | None
) -> torch.Tensor:
    """`token_embeds` `[B, S, D]` with the image slots (`input_ids == image_token_id`) replaced
    by `image_features` `[B, slots, D]`, in order. Without features there must be no slots."""
    slots = input_ids == image_token_id
    if image_features is None:
        if bool(slots.any()):
            raise VlmError(f"the prompt holds {IMAGE_TOKEN} but no image was given; pass one or drop the marker")
        return token_embeds
    per_row = slots.sum(dim=1)
    if bool((per_row != image_features.shape[1]).any()):
        raise VlmError(
            f"rows hold {per_row.tolist()} image slots but each image gives {image_features.shape[1]} features; "
            f"put one {IMAGE_TOKEN} in each prompt (expand_image_markers makes its slots)"
        )
    return token_embeds.masked_scatter(slots[..., None], image_features.to(token_embeds.dtype))


def expand_image_markers(ids: Sequence[int], image_token_id: int, slots: int) -> list[int]:
    """Prompt ids with the one `<image>` marker widened to `slots` copies (one per patch)."""
    count = sum(1 for token in ids if token == image_token_id)
    if count != 1:
        raise VlmError(f"a prompt must hold exactly one {IMAGE_TOKEN} marker, found {count}")
    out: list[int] = []
    for token in ids:
        out.extend([token] * slots if token == image_token_id else [token])
    return out


class VisionLanguageModel(nn.Module):
    """Frozen CLIP image encoder + projector + genforge decoder."""

    def __init__(self, config: VlmConfig) -> None:
        super().__init__()
        self.config = config
        clip_config, lm_config = config.clip_config(), config.lm_config()
        self.vision = ClipVisionEncoder(clip_config)
        self.projector = make_projector(config.projector, clip_config.vision_width, lm_config.hidden_size)
        self.lm = Transformer(lm_config)
        self.num_image_tokens = clip_config.num_patches
        self.vision.requires_grad_(False)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """`[N, patches, hidden]`: projected patch features (the encoder runs without gradients)."""
        with torch.no_grad():
            features = self.vision.patch_features(images)
        return self.project(features)

    def project(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.projector(patch_features)

    def input_embeddings(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        return splice_image_features(
            self.lm.embed_tokens(input_ids), input_ids, self.config.image_token_id, image_embeds
        )

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Logits `[B, S, vocab]` for ids whose image slots take `image_embeds` `[B, patches, hidden]`."""
        return self.lm(None, inputs_embeds=self.input_embeddings(input_ids, image_embeds), cache=cache).logits

    def train(self, mode: bool = True) -> VisionLanguageModel:
        super().train(mode)
        self.vision.eval()  # frozen: its norms and dropout stay in inference mode
        return self


# ------------------------------------------------------------------------------- conversations
@dataclass
class Conversations:
    """Tokenized single-turn conversations: prompt ids (with one `<image>` marker, or the
    caption written out for text-only pretraining), answer ids, and which image each uses."""

    prompts: list[list[int]]
    answers: list[list[int]]
    image_index: list[int] = field(default_factory=list)


def answer_text(question: str, name: str, template: str) -> str:
    return caption(name, template) if QUESTIONS.get(question) == "caption" else name


def build_conversations(
    tokenizer: Tokenizer,
    labels: Sequence[int],
    class_names: Sequence[str],
    questions: Sequence[str],
    *,
    image_slots: int | None,
    image_token_id: int,
    seed: int = 0,
) -> Conversations:
    """One conversation per (image, question): a random caption template per pair. With
    `image_slots`, the prompt's marker is widened to that many slots; with None, the caption is
    written in the marker's place (the text-only pretraining of the decoder)."""
    rng = torch.Generator().manual_seed(seed)
    templates = torch.randint(len(CAPTION_TEMPLATES), (len(labels), len(questions), 2), generator=rng).tolist()
    encoded: dict[tuple, list[int]] = {}  # a few dozen distinct texts: render and encode each once

    def once(make, *args) -> list[int]:
        key = (make.__name__, *args)
        if key not in encoded:
            encoded[key] = make(*args)
        return encoded[key]

    def image_prompt(question: str) -> list[int]:
        return expand_image_markers(prompt_ids(tokenizer, question), image_token_id, image_slots)

    def text_prompt(question: str, described: str) -> list[int]:
        return prompt_ids(tokenizer, question, image_text=described)

    def reply_ids(reply: str) -> list[int]:
        return tokenizer.encode(f"{reply} {END_TOKEN}", add_special_tokens=False)

    prompts, answers, index = [], [], []
    for image, label in enumerate(labels):
        name = class_names[label]
        for number, question in enumerate(questions):
            answer_template, context_template = (CAPTION_TEMPLATES[t] for t in templates[image][number])
            if image_slots is None:
                prompts.append(once(text_prompt, question, caption(name, context_template)))
            else:
                prompts.append(once(image_prompt, question))
            answers.append(once(reply_ids, answer_text(question, name, answer_template)))
            index.append(image)
    return Conversations(prompts, answers, index)


def prompt_ids(tokenizer: Tokenizer, question: str, image_text: str | None = None) -> list[int]:
    """The chat prompt for `question` about an image (the `<image>` marker, or `image_text`)."""
    content = f"{image_text if image_text is not None else IMAGE_TOKEN} {question}"
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )


def _batch(conversations: Conversations, rows: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on the prompt and the padding: only answers are learned)."""
    sequences = [conversations.prompts[r] + conversations.answers[r] for r in rows.tolist()]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (r, sequence) in enumerate(zip(rows.tolist(), sequences)):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        start = len(conversations.prompts[r])
        labels[row, start : len(sequence)] = torch.tensor(conversations.answers[r])
    return ids, labels


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens only."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


# ------------------------------------------------------------------------------------ stages
def set_stage(model: VisionLanguageModel, stage: int, lora: LoraConfig | None = None) -> None:
    """Which parameters train. 0: the decoder alone (text-only pretraining); 1: the projector
    alone; 2: the projector and LoRA adapters put on the decoder (its own weights frozen).
    The image encoder never trains."""
    if stage not in (0, 1, 2):
        raise VlmError(f"stage must be 0 (decoder pretraining), 1 (projector) or 2 (projector + LoRA), not {stage}")
    model.requires_grad_(False)
    if stage == 0:
        model.lm.requires_grad_(True)
    elif stage == 1:
        model.projector.requires_grad_(True)
    else:
        apply_lora(model.lm, lora or default_lora())  # freezes the decoder, adds trainable A and B
        model.projector.requires_grad_(True)


def default_lora() -> LoraConfig:
    return LoraConfig(target_modules=["qkv", "o", "gate_up", "down"], r=8, lora_alpha=16)


def _run_stage(
    model: VisionLanguageModel,
    conversations: Conversations,
    patch_features: torch.Tensor | None,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    seed: int,
    progress=None,
    name: str = "",
) -> list[float]:
    """AdamW with warm-up and cosine decay over the trainable parameters for `steps` batches."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    model.train()
    losses = []
    count = len(conversations.prompts)
    for step in range(steps):
        rows = torch.randint(count, (min(batch_size, count),), generator=generator)
        ids, labels = _batch(conversations, rows, pad_id)
        image_embeds = None
        if patch_features is not None:
            image_embeds = model.project(patch_features[torch.tensor(conversations.image_index)[rows]])
        loss = answer_loss(model(ids, image_embeds), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None and (step + 1) % max(1, steps // 10) == 0:
            progress(name, step + 1, steps, losses[-1])
    model.eval()
    return losses


# ----------------------------------------------------------------------------------- training
@dataclass
class VlmTrainResult:
    model: VisionLanguageModel
    tokenizer: Tokenizer
    losses: dict[str, list[float]]
    seconds: dict[str, float]
    stage1_accuracy: float | None = None  # digit accuracy on the given eval images after stage 1


def vlm_tokenizer(class_names: Sequence[str]) -> Tokenizer:
    """WordPiece over every caption and question, with the chat tokens and `<image>` as special
    tokens (never split, never produced by ordinary text), and the chat template."""
    texts = [caption(name, template) for name in class_names for template in CAPTION_TEMPLATES]
    texts += list(QUESTIONS) + [f"{text} ." for text in texts[:1]]
    tokenizer = caption_tokenizer(texts, extra_special_tokens=CHAT_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_vlm(
    vision: ClipVisionEncoder,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    projector: str = "mlp",
    pretrain_steps: int = 400,
    stage1_steps: int = 300,
    stage2_steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    lora: LoraConfig | None = None,
    seed: int = 0,
    eval_images: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    progress=None,
) -> VlmTrainResult:
    """Decoder pretraining (text only), stage 1 (projector) and stage 2 (projector + LoRA), on
    `images` `[N, C, H, W]` with integer `labels` naming `class_names`. `vision` (a trained
    CLIP image encoder) is copied in and frozen; its patch features are computed once."""
    if len(images) != len(labels):
        raise VlmError(f"{len(images)} images but {len(labels)} labels")
    torch.manual_seed(seed)
    tokenizer = vlm_tokenizer(class_names)
    lm_config = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.token_to_id(END_TOKEN),
        pad_token_id=tokenizer.token_to_id("[PAD]"),
    )
    config = VlmConfig(
        clip=vision.config.to_dict(),
        lm=lm_config.to_dict(),
        image_token_id=tokenizer.token_to_id(IMAGE_TOKEN),
        end_token_id=tokenizer.token_to_id(END_TOKEN),
        projector=projector,
        class_names=tuple(class_names),
    )
    model = VisionLanguageModel(config)
    model.vision.load_state_dict(vision.state_dict())
    pad_id = lm_config.pad_token_id
    with torch.no_grad():
        features = torch.cat([model.vision.patch_features(chunk) for chunk in images.split(256)])
    slots, image_id = model.num_image_tokens, config.image_token_id
    names = list(class_names)
    common = dict(batch_size=batch_size, pad_id=pad_id, progress=progress)
    losses, seconds = {}, {}

    start = time.perf_counter()
    set_stage(model, 0)
    text_only = build_conversations(
        tokenizer, labels.tolist(), names, list(QUESTIONS), image_slots=None, image_token_id=image_id, seed=seed
    )
    losses["pretrain"] = _run_stage(
        model, text_only, None, steps=pretrain_steps, lr=lr, seed=seed, name="pretrain", **common
    )
    seconds["pretrain"] = time.perf_counter() - start

    start = time.perf_counter()
    set_stage(model, 1)
    captions = build_conversations(
        tokenizer, labels.tolist(), names, [CAPTION_QUESTION], image_slots=slots, image_token_id=image_id, seed=seed + 1
    )
    losses["stage1"] = _run_stage(
        model, captions, features, steps=stage1_steps, lr=lr, seed=seed + 1, name="stage1", **common
    )
    seconds["stage1"] = time.perf_counter() - start
    stage1_accuracy = None
    if eval_images is not None:
        stage1_accuracy = digit_accuracy(model, tokenizer, eval_images, eval_labels)

    start = time.perf_counter()
    set_stage(model, 2, lora)
    instructions = build_conversations(
        tokenizer, labels.tolist(), names, list(QUESTIONS), image_slots=slots, image_token_id=image_id, seed=seed + 2
    )
    losses["stage2"] = _run_stage(
        model, instructions, features, steps=stage2_steps, lr=lr, seed=seed + 2, name="stage2", **common
    )
    merge_and_unload(model.lm)  # the adapters become part of the decoder's weights
    model.requires_grad_(False)
    seconds["stage2"] = time.perf_counter() - start
    return VlmTrainResult(model.eval(), tokenizer, losses, seconds, stage1_accuracy)


# ------------------------------------------------------------------------------------ answers
@torch.no_grad()
def answer(
    model: VisionLanguageModel, tokenizer: Tokenizer, images: torch.Tensor, question: str, max_new_tokens: int = 12
) -> list[str]:
    """Greedy answers to one `question` about each image `[N, C, H, W]`: the spliced prompt is
    run once into a KV cache, then one token per step until every row has ended its turn."""
    if not question.strip():
        raise VlmError("the question is empty; ask something about the image, e.g. 'which digit is this?'")
    if IMAGE_TOKEN in question:
        raise VlmError(f"leave {IMAGE_TOKEN} out of the question; the model puts the image before it")
    model.eval()
    prompt = expand_image_markers(prompt_ids(tokenizer, question), model.config.image_token_id, model.num_image_tokens)
    limit = model.lm.config.max_position_embeddings
    if len(prompt) + max_new_tokens > limit:
        raise VlmError(
            f"the prompt is {len(prompt)} tokens with the image; with {max_new_tokens} new tokens that passes the "
            f"decoder's {limit} positions; ask a shorter question"
        )
    replies: list[str] = []
    end = model.config.end_token_id
    for chunk in images.split(256):
        ids = torch.tensor(prompt).expand(len(chunk), -1)
        cache = ContiguousKVCache(model.lm.config, len(chunk), len(prompt) + max_new_tokens)
        logits = model(ids, model.image_embeddings(chunk), cache=cache)[:, -1]
        generated = []
        finished = torch.zeros(len(chunk), dtype=torch.bool)
        for _ in range(max_new_tokens):
            token = logits.argmax(dim=-1)
            generated.append(token)
            finished |= token == end
            if bool(finished.all()):
                break
            logits = model.lm(token[:, None], cache=cache).logits[:, -1]
        tokens = torch.stack(generated, dim=1).tolist()
        for row in tokens:
            row = row[: row.index(end)] if end in row else row
            replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return replies


def digit_accuracy(
    model: VisionLanguageModel, tokenizer: Tokenizer, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Share of images whose greedy answer to "which digit is this?" is exactly their class name."""
    replies = answer(model, tokenizer, images, DIGIT_QUESTION)
    names = model.config.class_names
    return sum(reply == names[label] for reply, label in zip(replies, labels.tolist())) / len(labels)


def caption_accuracy(
    model: VisionLanguageModel, tokenizer: Tokenizer, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Share of generated captions that name the image's class and no other class."""
    replies = answer(model, tokenizer, images, CAPTION_QUESTION)
    names = model.config.class_names
    hits = 0
    for reply, label in zip(replies, labels.tolist()):
        words = set(reply.replace(",", " ").split())
        hits += names[label] in words and not any(name in words for i, name in enumerate(names) if i != label)
    return hits / len(labels)


def prepare_image(image: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """One image `[C, H, W]` in [0, 1] as `[1, channels, size, size]`: resized when square and
    of another size; refused when its channels differ or it is not square."""
    if image.dim() != 3:
        raise VlmError(f"an image must be [channels, height, width]; got shape {tuple(image.shape)}")
    if image.shape[0] != channels:
        raise VlmError(
            f"the image has {image.shape[0]} channel(s) but the model takes {channels} "
            f"({'grayscale' if channels == 1 else 'RGB'}); convert it first"
        )
    if image.shape[1] != image.shape[2]:
        raise VlmError(f"the image is {image.shape[2]}x{image.shape[1]}; give a square image")
    return resize(image[None].float(), size)


# ------------------------------------------------------------------------------- save and load
def save_vlm(
    model: VisionLanguageModel, tokenizer: Tokenizer, directory: str | Path, extra: dict | None = None
) -> Path:
    """`vision.json` (kind "vlm" and the configs), `model.safetensors` and `tokenizer/`, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.lm.config.tie_word_embeddings:
        weights.pop(TIED_HEAD)  # the head is the embedding table, stored once
    with atomic_path(directory / MODEL_WEIGHTS) as staged:
        save_file(weights, staged)
    with staged_directory(directory / TOKENIZER_DIR) as staging:
        tokenizer.save(staging)
    settings = {"kind": "vlm", **asdict(model.config), **(extra or {})}
    atomic_write_text(directory / MODEL_CONFIG, json.dumps(settings, indent=2))
    return directory


def load_vlm(directory: str | Path) -> tuple[VisionLanguageModel, Tokenizer]:
    directory = Path(directory)
    settings = json.loads((directory / MODEL_CONFIG).read_text())
    if settings.get("kind") != "vlm":
        raise VlmError(f"{directory} holds a {settings.get('kind')!r} model, not a vision-language model ('vlm')")
    known = {name for name in VlmConfig.__dataclass_fields__}
    model = VisionLanguageModel(VlmConfig(**{k: v for k, v in settings.items() if k in known}))
    missing, unexpected = model.load_state_dict(load_file(directory / MODEL_WEIGHTS), strict=False)
    tied = {TIED_HEAD} if model.lm.config.tie_word_embeddings else set()
    if set(missing) != tied or unexpected:
        raise VlmError(
            f"{directory}/{MODEL_WEIGHTS} does not fit its vision.json: missing {missing}, unexpected {unexpected}"
        )
    tokenizer = Tokenizer.from_dir(directory / TOKENIZER_DIR)
    return model.eval(), tokenizer
