"""The denoising UNet of DDPM (Ronneberger et al. 2015, "U-Net"; as adapted by Ho et al. 2020).

A noisy image and its timestep go in, the predicted noise (or `x_0`, or `v`) comes out at the
same size. The timestep becomes a sinusoidal embedding (as the Transformer's positions do) and a
two-layer MLP; an optional class embedding is added to it, with one extra "null" class that
classifier-free guidance trains and samples with (Ho & Salimans 2022). The image path is an
encoder of residual blocks (GroupNorm, SiLU, 3x3 convolutions, the time embedding added
between the convolutions) that halves the resolution after each level, a middle of
resnet-attention-resnet, and a decoder that doubles it back, each of its blocks taking the
matching encoder activation through a skip connection (concatenated on channels). Levels marked
for attention add a self-attention layer after each residual block: at low resolution, where
its cost in positions squared is small.

The layout is diffusers' `UNet2DModel` with blocks `DownBlock2D` / `AttnDownBlock2D` /
`UpBlock2D` / `AttnUpBlock2D`, so its checkpoints load (`load_diffusers_unet`); the one
difference is that attention keeps queries, keys and values as one fused product (`qkv`), split
and joined by `DIFFUSERS_RENAMES` and `from_diffusers_state_dict` / `to_diffusers_state_dict`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class UNetConfigError(ValueError):
    """A UNet setting genforge does not build; the message says what is accepted."""


@dataclass(frozen=True)
class UNetConfig:
    """The UNet's shape, in the field names of diffusers' `UNet2DModel` config."""

    sample_size: int = 16
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    attention_head_dim: int | None = 8  # None: one head as wide as the block
    norm_num_groups: int = 8
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    num_class_embeds: int | None = None  # classes + 1 for classifier-free guidance's null class
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    center_input_sample: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        levels = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == levels):
            raise UNetConfigError(
                f"block_out_channels, down_block_types and up_block_types need one entry per level; got "
                f"{levels}, {len(self.down_block_types)}, {len(self.up_block_types)}"
            )
        for kind in self.down_block_types:
            if kind not in DOWN_BLOCKS:
                raise UNetConfigError(f"down block {kind!r} is not supported; use {' or '.join(DOWN_BLOCKS)}")
        for kind in self.up_block_types:
            if kind not in UP_BLOCKS:
                raise UNetConfigError(f"up block {kind!r} is not supported; use {' or '.join(UP_BLOCKS)}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise UNetConfigError("resnet_time_scale_shift must be 'default' or 'scale_shift'")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise UNetConfigError(f"{channels} channels do not split into {self.norm_num_groups} norm groups")
        if self.sample_size % (2 ** (levels - 1)):
            raise UNetConfigError(f"sample_size {self.sample_size} must be divisible by 2^{levels - 1} (one per level)")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, values: dict) -> UNetConfig:
        """From a `UNet2DModel` config dict, refusing settings this UNet does not implement."""
        unsupported = {
            "time_embedding_type": "positional",
            "class_embed_type": None,
            "downsample_type": "conv",
            "upsample_type": "conv",
            "mid_block_type": "UNetMidBlock2D",
            "act_fn": "silu",
            "time_embedding_dim": None,
        }
        for name, accepted in unsupported.items():
            if values.get(name, accepted) != accepted:
                raise UNetConfigError(f"{name}={values[name]!r} is not supported; genforge's UNet takes {accepted!r}")
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0, max_period: float = 10000
) -> torch.Tensor:
    """Sinusoidal features `[N, dim]` of (possibly fractional) timesteps, frequencies spaced
    geometrically from 1 to 1/max_period (Vaswani et al. 2017, as used by Ho et al. 2020)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    angles = timesteps[:, None].float() * torch.exp(exponent / (half - freq_shift))[None, :]
    parts = (angles.cos(), angles.sin()) if flip_sin_to_cos else (angles.sin(), angles.cos())
    embedding = torch.cat(parts, dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


class TimeEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added (or as scale and shift) between, and
    a 1x1 convolution on the shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig, output_scale: float = 1.0) -> None:
        super().__init__()
        self.scale_shift = config.resnet_time_scale_shift == "scale_shift"
        self.norm1 = nn.GroupNorm(config.norm_num_groups, in_channels, eps=config.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(config.time_embed_dim, out_channels * (2 if self.scale_shift else 1))
        self.norm2 = nn.GroupNorm(config.norm_num_groups, out_channels, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        """`time_features` is SiLU of the time embedding, computed once per forward for all blocks."""
        hidden = self.conv1(F.silu(self.norm1(x)))
        time = self.time_emb_proj(time_features)[:, :, None, None]
        if self.scale_shift:
            scale, shift = time.chunk(2, dim=1)
            hidden = self.norm2(hidden) * (1 + scale) + shift
        else:
            hidden = self.norm2(hidden + time)
        hidden = self.conv2(self.dropout(F.silu(hidden)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = shortcut + hidden
        return out if self.output_scale == 1.0 else out / self.output_scale


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, GroupNorm first and a
    residual after; queries, keys and values from one fused linear layer."""

    def __init__(self, channels: int, head_dim: int | None, groups: int | None, eps: float, output_scale: float):
        super().__init__()
        head_dim = head_dim or channels
        if channels % head_dim:
            raise UNetConfigError(f"attention over {channels} channels cannot use heads of {head_dim}")
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        hidden = self.norm(x) if self.norm is not None else x
        tokens = hidden.flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(tokens).view(batch, -1, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        tokens = self.out(attended.transpose(1, 2).reshape(batch, -1, channels))
        out = tokens.transpose(1, 2).reshape(batch, channels, height, width) + x
        return out if self.output_scale == 1.0 else out / self.output_scale


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding 0 pads right and bottom only, so odd kernels still halve the size exactly.
        return self.conv(x if self.padding else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """One encoder level: residual blocks (each followed by attention on attention levels),
    then a stride-2 convolution except at the last level. Every output is kept for a skip."""

    def __init__(self, in_channels: int, out_channels: int, attention: bool, last: bool, config: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualBlock(in_channels if i == 0 else out_channels, out_channels, config)
            for i in range(config.layers_per_block)
        )
        if attention:
            groups = config.attn_norm_num_groups or config.norm_num_groups
            self.attentions = nn.ModuleList(
                SpatialSelfAttention(out_channels, config.attention_head_dim, groups, config.norm_eps, 1.0)
                for _ in range(config.layers_per_block)
            )
        else:
            self.attentions = None
        self.downsamplers = None if last else nn.ModuleList([Downsample(out_channels, config.downsample_padding)])

    def forward(self, x: torch.Tensor, time_features: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for index, resnet in enumerate(self.resnets):
            x = resnet(x, time_features)
            if self.attentions is not None:
                x = self.attentions[index](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class UpLevel(nn.Module):
    """One decoder level: `layers_per_block + 1` residual blocks, each on its input concatenated
    with the latest unused encoder activation, then nearest-neighbour upsampling and a conv."""

    def __init__(
        self, in_channels: int, out_channels: int, prev_channels: int, attention: bool, last: bool, config: UNetConfig
    ):
        super().__init__()
        count = config.layers_per_block + 1
        blocks = []
        for i in range(count):
            skip_channels = in_channels if i == count - 1 else out_channels
            input_channels = prev_channels if i == 0 else out_channels
            blocks.append(ResidualBlock(input_channels + skip_channels, out_channels, config))
        self.resnets = nn.ModuleList(blocks)
        if attention:
            groups = config.attn_norm_num_groups or config.norm_num_groups
            self.attentions = nn.ModuleList(
                SpatialSelfAttention(out_channels, config.attention_head_dim, groups, config.norm_eps, 1.0)
                for _ in range(count)
            )
        else:
            self.attentions = None
        self.upsamplers = None if last else nn.ModuleList([Upsample(out_channels)])

    def forward(self, x: torch.Tensor, time_features: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for index, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), time_features)
            if self.attentions is not None:
                x = self.attentions[index](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MiddleBlock(nn.Module):
    def __init__(self, channels: int, config: UNetConfig) -> None:
        super().__init__()
        scale = config.mid_block_scale_factor
        self.resnets = nn.ModuleList(ResidualBlock(channels, channels, config, scale) for _ in range(2))
        if config.add_attention:
            groups = config.attn_norm_num_groups
            if groups is None and config.resnet_time_scale_shift == "default":
                groups = config.norm_num_groups
            head_dim = config.attention_head_dim or channels
            self.attentions = nn.ModuleList([SpatialSelfAttention(channels, head_dim, groups, config.norm_eps, scale)])
        else:
            self.attentions = None

    def forward(self, x: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, time_features)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, time_features)


class UNet(nn.Module):
    """`forward(sample [B,C,H,W], timesteps [B] or scalar, class_labels [B] | None) -> [B,C',H,W]`."""

    def __init__(self, config: UNetConfig | None = None, **settings) -> None:
        super().__init__()
        config = config if config is not None else UNetConfig(**settings)
        self.config = config
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimeEmbedding(channels[0], config.time_embed_dim)
        self.class_embedding = (
            nn.Embedding(config.num_class_embeds, config.time_embed_dim) if config.num_class_embeds else None
        )
        levels = len(channels)
        self.down_blocks = nn.ModuleList()
        width = channels[0]
        for level, kind in enumerate(config.down_block_types):
            self.down_blocks.append(
                DownLevel(width, channels[level], kind == "AttnDownBlock2D", level == levels - 1, config)
            )
            width = channels[level]
        self.mid_block = MiddleBlock(channels[-1], config)
        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        out = reversed_channels[0]
        for level, kind in enumerate(config.up_block_types):
            prev, out = out, reversed_channels[level]
            skip_in = reversed_channels[min(level + 1, levels - 1)]
            self.up_blocks.append(UpLevel(skip_in, out, prev, kind == "AttnUpBlock2D", level == levels - 1, config))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    @property
    def is_conditional(self) -> bool:
        return self.class_embedding is not None

    def forward(
        self, sample: torch.Tensor, timesteps: torch.Tensor | int | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        config = self.config
        if sample.dim() != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(f"the UNet takes images [B, {config.in_channels}, H, W]; got {tuple(sample.shape)}")
        factor = 2 ** (len(config.block_out_channels) - 1)
        if sample.shape[-1] % factor or sample.shape[-2] % factor:
            raise ValueError(f"image sides must be divisible by {factor}; got {tuple(sample.shape[-2:])}")
        if config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = torch.as_tensor(timesteps, device=sample.device)
        if timesteps.dim() == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(sample.shape[0])
        features = timestep_embedding(
            timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift
        ).to(sample.dtype)
        embedding = self.time_embedding(features)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels (the null class for unconditional)")
            embedding = embedding + self.class_embedding(class_labels).to(embedding.dtype)
        elif class_labels is not None:
            raise ValueError("this UNet has no class embedding; it takes no class_labels")
        time_features = F.silu(embedding)
        x = self.conv_in(sample)
        skips = [x]
        for level in self.down_blocks:
            x = level(x, time_features, skips)
        x = self.mid_block(x, time_features)
        for level in self.up_blocks:
            x = level(x, time_features, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# The weight map to diffusers' UNet2DModel: renames of key parts (genforge, diffusers); the
# attention's fused `qkv` holds diffusers' to_q, to_k and to_v concatenated on the output rows.
DIFFUSERS_RENAMES = ((r"\.norm\.", ".group_norm."), (r"\.out\.", ".to_out.0."))
FUSED_QKV = ("to_q", "to_k", "to_v")


def to_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """genforge UNet weights under diffusers' `UNet2DModel` keys."""
    converted = {}
    for key, tensor in state.items():
        if ".attentions." in key:
            if ".qkv." in key:
                for name, part in zip(FUSED_QKV, tensor.chunk(3, dim=0)):
                    converted[key.replace(".qkv.", f".{name}.")] = part.contiguous()
                continue
            for ours, theirs in DIFFUSERS_RENAMES:
                key = re.sub(ours, theirs, key)
        converted[key] = tensor
    return converted


def from_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `UNet2DModel` weights under genforge's keys (to_q/to_k/to_v fused)."""
    converted, parts = {}, {}
    for key, tensor in state.items():
        if ".attentions." in key:
            match = re.search(r"\.(to_q|to_k|to_v)\.", key)
            if match:
                parts.setdefault(key.replace(match.group(0), ".qkv."), {})[match.group(1)] = tensor
                continue
            for ours, theirs in DIFFUSERS_RENAMES:
                key = re.sub(re.escape(theirs), ours.replace("\\", ""), key)
        converted[key] = tensor
    for key, named in parts.items():
        if set(named) != set(FUSED_QKV):
            raise ValueError(f"attention weights for {key} lack {sorted(set(FUSED_QKV) - set(named))}")
        converted[key] = torch.cat([named[name] for name in FUSED_QKV], dim=0)
    return converted


def load_diffusers_unet(directory: str | Path) -> UNet:
    """A diffusers `UNet2DModel` saved with `save_pretrained` (config.json + safetensors)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / DIFFUSERS_CONFIG, directory / DIFFUSERS_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} needs {DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS} (a diffusers UNet2DModel in safetensors)"
        )
    values = json.loads(config_path.read_text())
    if values.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UNetConfigError(f"{directory} holds a {values['_class_name']}; genforge loads UNet2DModel checkpoints")
    model = UNet(UNetConfig.from_diffusers(values))
    model.load_state_dict(from_diffusers_state_dict(load_file(weights_path)))
    return model.eval()
