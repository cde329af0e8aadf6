"""CLIP (genforge.vision.clip): parity with transformers' CLIPModel, the InfoNCE loss against
its formula, a short training run, zero-shot and retrieval plumbing, save/load, the CLI kind."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genforge.vision.clip import (
    ClipConfig,
    ClipError,
    ClipModel,
    caption_tokenizer,
    class_text_embeddings,
    clip_loss,
    encode_texts,
    load_clip,
    retrieval_recall_at_1,
    save_clip,
    shift_jitter,
    similarity_logits,
    train_clip,
    zero_shot_predict,
)
from genforge.vision.clip_cli import CLIP_KIND, caption_table
from genforge.vision.data import CAPTION_TEMPLATES, DIGIT_NAMES, caption

# Tiny models are per-op overhead: one intra-op thread is faster on shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_hf_clip(tmp_path, eos: int, channels: int = 3):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=20,
            eos_token_id=eos,
            bos_token_id=1,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=4,
            num_channels=channels,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=24,
        logit_scale_init_value=3.1,
    )
    torch.manual_seed(0)
    reference = CLIPModel(config).eval()
    reference.save_pretrained(tmp_path)
    return reference


@pytest.mark.parametrize("eos", [98, 2])  # 98: read at the first eos token; 2: the legacy argmax rule
def test_loads_transformers_clip_with_equal_embeddings(tmp_path, eos):
    reference = _tiny_hf_clip(tmp_path, eos)
    model = ClipModel.from_hf(tmp_path)
    images = torch.randn(3, 3, 16, 16)
    ids = torch.randint(3, 90, (3, 12))
    ids[:, 7] = 98 if eos == 98 else 97  # the argmax rule reads the largest id
    ids[0, 9] = 98 if eos == 98 else 3  # a second eos after the first must not move the read position
    with torch.no_grad():
        expected_image = reference.get_image_features(pixel_values=images).pooler_output
        expected_text = reference.get_text_features(input_ids=ids).pooler_output
        expected_logits = reference(input_ids=ids, pixel_values=images).logits_per_image
        image, text = model.encode_image(images), model.encode_text(ids)
        logits = similarity_logits(image, text, model.logit_scale)
    assert expected_image.abs().mean() > 1e-3  # a real comparison, not of zeros
    torch.testing.assert_close(image, expected_image, atol=1e-4, rtol=0)
    torch.testing.assert_close(text, expected_text, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_from_hf_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ClipError, match="no config.json"):
        ClipModel.from_hf(tmp_path)
    with pytest.raises(ClipError, match="not a CLIP model"):
        ClipConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ClipError, match="hidden_act"):
        ClipConfig.from_hf({"model_type": "clip", "text_config": {"hidden_act": "relu"}})


def test_info_nce_equals_the_direct_formula():
    torch.manual_seed(0)
    images, texts, scale = torch.randn(5, 8), torch.randn(5, 8), torch.tensor(2.0)
    cosine = torch.tensor(
        [[F.cosine_similarity(images[i], texts[j], dim=0).item() for j in range(5)] for i in range(5)]
    )
    logits = math.exp(2.0) * cosine
    image_to_text = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(5)) / 5
    text_to_image = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(5)) / 5
    expected = (image_to_text + text_to_image) / 2
    torch.testing.assert_close(clip_loss(images, texts, scale), expected, atol=1e-5, rtol=1e-5)


def test_temperature_is_clamped_at_100():
    images = torch.eye(3)
    logits = similarity_logits(images, images, torch.tensor(10.0))  # exp(10) far above 100
    torch.testing.assert_close(logits.diagonal(), torch.full((3,), 100.0))
    with pytest.raises(ClipError, match="matching pairs"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(1.0))


def _digits_tokenizer():
    return caption_tokenizer([caption(name, template) for name in DIGIT_NAMES for template in CAPTION_TEMPLATES])


def _tiny_config(tokenizer, **overrides) -> ClipConfig:
    fields = dict(
        vocab_size=tokenizer.vocab_size,
        eos_token_id=tokenizer.token_to_id("[SEP]"),
        vision_width=32,
        vision_mlp=64,
        text_width=32,
        text_mlp=64,
        projection_dim=32,
        vision_layers=1,
        text_layers=1,
        text_context=12,
    )
    return ClipConfig(**{**fields, **overrides})


def test_a_short_training_run_lowers_the_loss(digits16):
    tokenizer = _digits_tokenizer()
    torch.manual_seed(0)
    model = ClipModel(_tiny_config(tokenizer))
    captions = caption_table(tokenizer, DIGIT_NAMES, 12, tokenizer.token_to_id("[PAD]"))
    images, labels = digits16.train.images[:64], digits16.train.labels[:64]

    def held_loss() -> float:  # the loss on fixed pairs: the first template for every image
        with torch.no_grad():
            return model.eval()(images[:32], captions[labels[:32], 0]).item()

    before = held_loss()
    train_clip(model, images, labels, captions, epochs=20, batch_size=16, lr=5e-3, jitter=0)
    assert held_loss() < before - 0.5, (before, held_loss())


def test_text_encoding_refuses_long_texts_and_missing_end_tokens():
    tokenizer = _digits_tokenizer()
    pad = tokenizer.token_to_id("[PAD]")
    ids = encode_texts(tokenizer, ["a handwritten seven"], 8, pad)
    assert ids[0].tolist()[:5] == tokenizer.encode("a handwritten seven")
    assert ids[0, 5:].eq(pad).all()
    with pytest.raises(ClipError, match="at most 4"):
        encode_texts(tokenizer, ["a handwritten seven"], 4, pad)
    model = ClipModel(_tiny_config(tokenizer))
    with pytest.raises(ClipError, match="end-of-text"):
        model.encode_text(torch.full((1, 5), 7))
    with pytest.raises(ClipError, match=r"\[N, 1, 16, 16\]"):
        model.encode_image(torch.rand(2, 3, 16, 16))


class _LookupClip(nn.Module):
    """Embeddings chosen by hand: image i embeds as one-hot(image class), text as one-hot(text
    class), so every zero-shot and retrieval answer is known in advance."""

    def __init__(self, image_classes, text_classes, classes: int) -> None:
        super().__init__()
        self.image_classes, self.text_classes, self.classes = image_classes, text_classes, classes

    def encode_image(self, images):
        return F.one_hot(self.image_classes[images[:, 0, 0, 0].long()], self.classes).float()

    def encode_text(self, ids):
        return F.one_hot(self.text_classes[ids[:, 0]], self.classes).float()


def test_zero_shot_and_retrieval_follow_the_embeddings():
    images = torch.arange(4.0).view(4, 1, 1, 1)  # image i carries its index in its pixel
    true_labels = torch.tensor([0, 1, 2, 2])
    believed = torch.tensor([0, 1, 2, 1])  # the model mistakes image 3 for class 1
    prompts = torch.arange(3 * 2).view(3, 2, 1)  # class c's two prompts have ids 2c and 2c + 1
    model = _LookupClip(believed, torch.arange(6) // 2, 3)
    assert zero_shot_predict(model, images, prompts).tolist() == [0, 1, 2, 1]
    torch.testing.assert_close(class_text_embeddings(model, prompts), torch.eye(3))
    texts = torch.tensor([[0], [2], [4], [4]])  # captions of classes 0, 1, 2, 2
    recall = retrieval_recall_at_1(model, images, true_labels, texts, true_labels)
    assert recall["image_to_text_recall@1"] == pytest.approx(3 / 4)
    # Text->image: each caption's top image is the first of its believed class; all right.
    assert recall["text_to_image_recall@1"] == pytest.approx(1.0)


def test_shift_jitter_moves_without_changing_content():
    image = torch.zeros(1, 1, 6, 6)
    image[0, 0, 2, 3] = 1.0
    moved = shift_jitter(image.repeat(50, 1, 1, 1), torch.Generator().manual_seed(0), 1)
    assert moved.sum(dim=(1, 2, 3)).eq(1).all()  # the dot is kept, only moved
    rows, cols = moved[:, 0].nonzero()[:, 1], moved[:, 0].nonzero()[:, 2]
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {2, 3, 4}


def test_save_load_round_trip(tmp_path):
    tokenizer = _digits_tokenizer()
    model = ClipModel(_tiny_config(tokenizer)).eval()
    save_clip(model, tokenizer, tmp_path, {"size": 16, "channels": 1})
    loaded, loaded_tokenizer, settings = load_clip(tmp_path)
    images = torch.rand(2, 1, 16, 16)
    ids = encode_texts(loaded_tokenizer, ["a handwritten two", "a drawing of a six"], 12, 0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(loaded.encode_text(ids), model.encode_text(ids))
    assert settings["kind"] == "clip" and settings["size"] == 16


@pytest.mark.slow
def test_clip_kind_trains_and_evaluates_from_flags(tmp_path):
    parser = argparse.ArgumentParser()
    for flag, default in (("--data", "digits"), ("--out", str(tmp_path)), ("--size", 16), ("--seed", 0)):
        parser.add_argument(flag, default=default, type=type(default))
    CLIP_KIND.add_train_arguments(parser)
    args = parser.parse_args(["--epochs", "1", "--width", "16", "--layers", "1", "--batch-size", "128"])
    out = CLIP_KIND.train(args)
    metrics = CLIP_KIND.evaluate(out, args)
    assert set(metrics) == {"zero_shot_accuracy", "image_to_text_recall@1", "text_to_image_recall@1"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
