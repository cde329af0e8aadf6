"""genforge's UNet loads diffusers' UNet2DModel checkpoints and computes the same outputs."""

from __future__ import annotations

import pytest
import torch

from genforge.vision.unet import (
    UNet,
    UNetConfig,
    UNetConfigError,
    load_diffusers_unet,
    timestep_embedding,
    to_diffusers_state_dict,
)

diffusers = pytest.importorskip("diffusers")

# Tiny models are all per-op overhead: one intra-op thread is faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-4

LAYOUTS = {
    "attention-low": dict(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    ),
    "three-levels-one-head": dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        in_channels=3,
        out_channels=6,
    ),
    "scale-shift-no-mid-attention": dict(
        block_out_channels=(8, 16),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        resnet_time_scale_shift="scale_shift",
        add_attention=False,
        downsample_padding=0,
        mid_block_scale_factor=2.0,
        flip_sin_to_cos=False,
        freq_shift=1,
        center_input_sample=True,
    ),
}


def _diffusers_unet(layout: dict, num_class_embeds: int | None, seed: int = 0):
    torch.manual_seed(seed)
    settings = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=4)
    settings.update(layout)
    model = diffusers.UNet2DModel(**settings, num_class_embeds=num_class_embeds).eval()
    # Random biases and norm affines too, so a mis-mapped parameter cannot hide behind a zero.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("num_class_embeds", [None, 11])
def test_loads_a_diffusers_checkpoint_and_matches_its_outputs(tmp_path, layout, num_class_embeds):
    reference = _diffusers_unet(LAYOUTS[layout], num_class_embeds)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_diffusers_unet(tmp_path)
    channels = reference.config.in_channels
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(3, channels, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 417, 999])
    labels = torch.tensor([0, 5, 10]) if num_class_embeds else None
    with torch.no_grad():
        expected = reference(sample, timesteps, class_labels=labels).sample
        got = ours(sample, timesteps, class_labels=labels)
        scalar = ours(sample, 250, class_labels=labels)
        expected_scalar = reference(sample, 250, class_labels=labels).sample
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert (scalar - expected_scalar).abs().max().item() <= TOLERANCE


def test_export_to_diffusers_round_trips():
    ours = UNet(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        num_class_embeds=3,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    reference = diffusers.UNet2DModel(**{k: v for k, v in ours.config.to_dict().items()}).eval()
    reference.load_state_dict(to_diffusers_state_dict(ours.state_dict()))
    sample = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.allclose(ours(sample, 10, labels), reference(sample, 10, class_labels=labels).sample, atol=1e-5)


def test_timestep_embedding_is_sinusoidal():
    embedding = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert embedding.shape == (2, 8)
    assert torch.allclose(embedding[0, :4], torch.ones(4)) and torch.allclose(embedding[0, 4:], torch.zeros(4))
    assert torch.isclose(embedding[1, 0], torch.cos(torch.tensor(3.0)))


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(UNetConfigError, match="CrossAttnDownBlock2D"):
        UNetConfig(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"))
    with pytest.raises(UNetConfigError, match="time_embedding_type"):
        UNetConfig.from_diffusers({"time_embedding_type": "fourier"})
    model = UNet(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        num_class_embeds=3,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.zeros(1, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 7, 7), 3, torch.tensor([0]))
