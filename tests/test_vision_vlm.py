"""The LLaVA-style vision-language model (genforge.vision.vlm): marker placement, the embedding
splice, stage freezing, save/load, asking a question, and a short training run."""

from __future__ import annotations

import pytest
import torch

from genforge.config import Config
from genforge.finetune.lora import LoraLinear
from genforge.vision.clip import ClipConfig, ClipVisionEncoder
from genforge.vision.clip_cli import ask_vlm, read_image_file
from genforge.vision.data import DIGIT_NAMES, save_grid
from genforge.vision.vlm import (
    DIGIT_QUESTION,
    END_TOKEN,
    IMAGE_TOKEN,
    USER_TOKEN,
    VisionLanguageModel,
    VlmConfig,
    VlmError,
    answer,
    answer_loss,
    build_conversations,
    expand_image_markers,
    load_vlm,
    prepare_image,
    prompt_ids,
    save_vlm,
    set_stage,
    splice_image_features,
    train_vlm,
    vlm_tokenizer,
)

# Tiny models are per-op overhead: one intra-op thread is faster on shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = ClipConfig(
    vocab_size=8, eos_token_id=3, image_size=8, patch_size=4, vision_width=16, vision_mlp=32, vision_layers=1
)


@pytest.fixture(scope="module")
def tokenizer():
    return vlm_tokenizer(DIGIT_NAMES)


def _model(tokenizer, projector: str = "mlp") -> VisionLanguageModel:
    torch.manual_seed(0)
    lm = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    config = VlmConfig(
        clip=CLIP.to_dict(),
        lm=lm.to_dict(),
        image_token_id=tokenizer.token_to_id(IMAGE_TOKEN),
        end_token_id=tokenizer.token_to_id(END_TOKEN),
        projector=projector,
        class_names=DIGIT_NAMES,
    )
    return VisionLanguageModel(config).eval()


def test_the_marker_is_one_special_token_widened_to_one_slot_per_patch(tokenizer):
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    prompt = prompt_ids(tokenizer, DIGIT_QUESTION)
    assert prompt.count(image_id) == 1
    assert prompt[0] == tokenizer.token_to_id(USER_TOKEN) and prompt[1] == image_id  # the image opens the turn
    expanded = expand_image_markers(prompt, image_id, 4)
    assert expanded[1:5] == [image_id] * 4 and expanded[5:] == prompt[2:] and len(expanded) == len(prompt) + 3
    assert tokenizer.decode(prompt[2:], skip_special_tokens=True) == DIGIT_QUESTION
    with pytest.raises(VlmError, match="exactly one"):
        expand_image_markers(prompt + [image_id], image_id, 4)


def test_without_an_image_the_model_is_its_decoder(tokenizer):
    model = _model(tokenizer)
    ids = torch.tensor([tokenizer.encode("a handwritten seven", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model.lm(ids).logits, atol=0, rtol=0)
    with pytest.raises(VlmError, match="no image"):
        model(torch.tensor([[tokenizer.token_to_id(IMAGE_TOKEN)]]))


def test_the_image_fills_its_slots_and_text_before_it_is_unchanged(tokenizer):
    model = _model(tokenizer)
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    ids = torch.tensor([expand_image_markers(prompt_ids(tokenizer, DIGIT_QUESTION), image_id, 4)] * 2)
    image_embeds = model.image_embeddings(torch.rand(2, 1, 8, 8))
    assert image_embeds.shape == (2, 4, 32)
    spliced = model.input_embeddings(ids, image_embeds)
    torch.testing.assert_close(spliced[:, 1:5], image_embeds)  # the patches, in order
    torch.testing.assert_close(spliced[:, 5:], model.lm.embed_tokens(ids[:, 5:]))  # the question, as text
    with torch.no_grad():
        logits = model(ids, image_embeds)
        before = model.lm(ids[:, :1]).logits  # causal: the turn's opening token never sees the image
    torch.testing.assert_close(logits[:, :1], before)
    assert not torch.allclose(logits[0, 5:], logits[1, 5:])  # later positions read their own image
    with pytest.raises(VlmError, match="image slots"):
        splice_image_features(model.lm.embed_tokens(ids), ids, image_id, image_embeds[:, :3])


def _trainable_after_backward(model, tokenizer, stage: int) -> set[str]:
    set_stage(model, stage)
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    talks = build_conversations(tokenizer, [7], DIGIT_NAMES, [DIGIT_QUESTION], image_slots=4, image_token_id=image_id)
    ids = torch.tensor([talks.prompts[0] + talks.answers[0]])
    labels = torch.full_like(ids, -100)
    labels[0, len(talks.prompts[0]) :] = torch.tensor(talks.answers[0])
    answer_loss(model(ids, model.image_embeddings(torch.rand(1, 1, 8, 8))), labels).backward()
    return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_stage_one_trains_the_projector_only(tokenizer):
    model = _model(tokenizer)
    got = _trainable_after_backward(model, tokenizer, 1)
    assert got == {name for name, _ in model.named_parameters() if name.startswith("projector.")}


def test_stage_two_trains_the_projector_and_lora_only(tokenizer):
    model = _model(tokenizer)
    got = _trainable_after_backward(model, tokenizer, 2)
    assert any(name.startswith("projector.") for name in got)
    assert any("lora_" in name for name in got)
    assert all(name.startswith("projector.") or "lora_" in name for name in got), got
    assert isinstance(model.lm.blocks[0].attn.qkv, LoraLinear)
    with pytest.raises(VlmError, match="stage must be"):
        set_stage(model, 3)


def test_save_load_round_trip_and_ask(tokenizer, tmp_path):
    model = _model(tokenizer, projector="linear")
    images = torch.rand(3, 1, 8, 8)
    save_vlm(model, tokenizer, tmp_path, {"size": 8, "channels": 1})
    loaded, loaded_tokenizer = load_vlm(tmp_path)
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    ids = torch.tensor([expand_image_markers(prompt_ids(tokenizer, DIGIT_QUESTION), image_id, 4)] * 3)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, loaded.image_embeddings(images)), model(ids, model.image_embeddings(images))
        )
    replies = answer(loaded, loaded_tokenizer, images, DIGIT_QUESTION, max_new_tokens=3)
    assert replies == answer(model, tokenizer, images, DIGIT_QUESTION, max_new_tokens=3)
    assert all(isinstance(reply, str) for reply in replies)
    # ask() takes one [C, H, W] image of any square size and resizes it to the model's.
    image = torch.rand(1, 16, 16)
    expected = answer(loaded, loaded_tokenizer, prepare_image(image, 1, 8), DIGIT_QUESTION)[0]
    assert ask_vlm(tmp_path, image, DIGIT_QUESTION) == expected


def test_ask_checks_the_image_and_question(tokenizer, tmp_path):
    model = _model(tokenizer)
    with pytest.raises(VlmError, match="3 channel"):
        prepare_image(torch.rand(3, 8, 8), 1, 8)
    with pytest.raises(VlmError, match="square"):
        prepare_image(torch.rand(1, 8, 10), 1, 8)
    with pytest.raises(VlmError, match="leave <image> out"):
        answer(model, tokenizer, torch.rand(1, 1, 8, 8), f"{IMAGE_TOKEN} which digit?")
    with pytest.raises(ValueError, match="does not exist"):
        read_image_file(tmp_path / "missing.png", 1, 8)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        read_image_file(tmp_path / "notes.png", 1, 8)
    rgb = torch.rand(1, 3, 5, 5)
    save_grid(rgb, tmp_path / "rgb.png", scale=1)
    gray = read_image_file(tmp_path / "rgb.png", 1, 8)  # colour converted to the model's one channel
    assert gray.shape == (1, 8, 8) and 0 <= float(gray.min()) and float(gray.max()) <= 1


@pytest.mark.slow
def test_a_short_training_run_learns_all_stages(digits16):
    torch.manual_seed(0)
    vision = ClipVisionEncoder(
        ClipConfig(vocab_size=8, eos_token_id=3, vision_width=16, vision_mlp=32, vision_layers=1)
    )
    train = slice(0, 200)
    result = train_vlm(
        vision,
        digits16.train.images[train],
        digits16.train.labels[train],
        DIGIT_NAMES,
        hidden_size=32,
        pretrain_steps=60,
        stage1_steps=20,
        stage2_steps=20,
        batch_size=32,
    )
    pretrain = result.losses["pretrain"]
    assert sum(pretrain[-5:]) / 5 < sum(pretrain[:5]) / 5 - 1.0  # the decoder learns the conversations
    assert set(result.seconds) == {"pretrain", "stage1", "stage2"}
    assert not any(isinstance(m, LoraLinear) for m in result.model.modules())  # adapters merged at the end
    replies = answer(result.model, result.tokenizer, digits16.test.images[:4], DIGIT_QUESTION)
    assert len(replies) == 4


def _kind_parser(kind):
    import argparse

    parser = argparse.ArgumentParser()  # no conflict_handler: a kind's flags must not clash with each other
    for flag, default in (("--data", "digits"), ("--out", ""), ("--size", 16), ("--seed", 0)):
        parser.add_argument(flag, default=default, type=type(default))
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--labels", default=None)
    kind.add_train_arguments(parser)
    return parser


def test_vlm_flags_keep_their_own_lr_and_name_clip_flags_apart():
    from genforge.vision.clip_cli import VLM_KIND

    args = _kind_parser(VLM_KIND).parse_args(["--lr", "0.01", "--clip-lr", "0.002", "--clip-epochs", "3"])
    assert (args.lr, args.clip_lr, args.clip_epochs, args.clip) == (0.01, 0.002, 3, None)


@pytest.mark.slow
def test_vlm_kind_trains_on_a_saved_clip_evaluates_and_answers(tmp_path, digits16):
    from genforge.vision.clip import ClipModel, caption_tokenizer, save_clip
    from genforge.vision.clip_cli import VLM_KIND
    from genforge.vision.data import CAPTION_TEMPLATES, caption

    names = ("seven", "three")
    for name in names:  # a folder of images labelled by sub-folder: five sevens, five threes
        picks = digits16.train.images[digits16.train.labels == DIGIT_NAMES.index(name)][:5]
        for index, image in enumerate(picks):
            save_grid(image[None], tmp_path / "data" / name / f"{index}.png", scale=1)
    clip_tokenizer = caption_tokenizer([caption(n, t) for n in names for t in CAPTION_TEMPLATES])
    clip = ClipModel(ClipConfig(vocab_size=clip_tokenizer.vocab_size, eos_token_id=3, vision_width=16, vision_mlp=32))
    save_clip(clip, clip_tokenizer, tmp_path / "clip", {"size": 16, "channels": 1})
    args = _kind_parser(VLM_KIND).parse_args(
        ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "vlm"), "--clip", str(tmp_path / "clip")]
        + ["--hidden", "16", "--batch-size", "8", "--pretrain-steps", "3", "--stage1-steps", "2", "--stage2-steps", "2"]
    )
    out = VLM_KIND.train(args)
    metrics = VLM_KIND.evaluate(out, args)
    assert set(metrics) == {"digit_accuracy", "caption_accuracy"}
    assert isinstance(VLM_KIND.ask(out, torch.rand(1, 16, 16), DIGIT_QUESTION), str)
