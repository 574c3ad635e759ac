"""A diffusers ``UNet2DModel`` as scorekit's raw network ``F(x_in, c_noise, class_labels)``.

``scorekit.nets.build({"type": "diffusers-unet2d", "in_channels": 1, "image_size": [8, 8], ...})``
builds it (``scorekit train --net '{"type": "diffusers-unet2d"}'`` trains it), so a run's network is
a diffusers class and ``scorekit export --diffusers-pipeline`` can write it as a diffusers folder.

The UNet's timestep input receives scorekit's ``c_noise`` as a float (``ln(sigma) / 4`` under EDM
preconditioning, which is what diffusers' ``EDMEulerScheduler.precondition_noise`` gives). Class
labels ``0..K-1`` are the UNet's class embeddings; scorekit's "no class" label ``-1`` (and
``class_labels=None``) is the extra row ``K`` (``num_class_embeds = K + 1``).

diffusers is optional and imported only when such a network is built; without it the error is one
line naming the extra (``pip install 'scorekit[diffusers]'``). Building reads a bounded JSON config
only (sizes checked by ``scorekit.nets.build``); the parameter count is taken on the meta device,
before anything is allocated.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MISSING", "DiffusersUNet2D", "default_config", "num_parameters_meta", "unet_config"]

MISSING = "a diffusers-unet2d network needs diffusers: pip install 'scorekit[diffusers]'"


def _diffusers():
    try:
        return importlib.import_module("diffusers")
    except ImportError:
        raise ModuleNotFoundError(MISSING, name="diffusers") from None


def unet_config(in_channels: int, *, image_size: int | Sequence[int] = 8,
                block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
                norm_num_groups: int = 8, num_classes: int = 0,
                attention: bool = False) -> dict[str, Any]:  # fmt: skip
    """The ``UNet2DModel`` keyword arguments of a scorekit config (``attention``: at the lowest level)."""
    size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"image_size must be square for a diffusers UNet2DModel; got {size}")
    chans = [int(c) for c in block_out_channels]
    if not chans or any(c % norm_num_groups for c in chans):
        raise ValueError(
            f"block_out_channels {chans} must be non-empty multiples of norm_num_groups "
            f"{norm_num_groups}"
        )
    if size[0] % 2 ** (len(chans) - 1):
        raise ValueError(f"image_size {size} is not divisible by 2**{len(chans) - 1} (levels - 1)")
    n = len(chans)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return {
        "sample_size": int(size[0]),
        "in_channels": int(in_channels),
        "out_channels": int(in_channels),
        "block_out_channels": tuple(chans),
        "layers_per_block": int(layers_per_block),
        "norm_num_groups": int(norm_num_groups),
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "num_class_embeds": int(num_classes) + 1 if num_classes else None,
        "attention_head_dim": min(chans[-1], 8),
    }


class DiffusersUNet2D(nn.Module):
    """``F(x_in [B, C, H, W], c_noise [B], class_labels [B] or None) -> [B, C, H, W]`` on a UNet2DModel.

    Attributes: ``unet`` (the ``diffusers.UNet2DModel``), ``in_channels``, ``image_size`` ([H, W]),
    ``num_classes`` (K; the UNet has K + 1 class embeddings, the last one for label -1).
    """

    def __init__(self, in_channels: int, *, image_size: int | Sequence[int] = 8,
                 block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
                 norm_num_groups: int = 8, num_classes: int = 0,
                 attention: bool = False):  # fmt: skip
        super().__init__()
        kwargs = unet_config(in_channels, image_size=image_size,
                             block_out_channels=block_out_channels,
                             layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                             num_classes=num_classes, attention=attention)  # fmt: skip
        self.unet = _diffusers().UNet2DModel(**kwargs)
        self.in_channels = int(in_channels)
        self.image_size = [kwargs["sample_size"]] * 2
        self.num_classes = int(num_classes)

    def forward(self, x: Tensor, c_noise: Tensor | float, class_labels: Tensor | None = None,
                **cond) -> Tensor:  # fmt: skip
        if cond:
            raise TypeError(
                f"a diffusers-unet2d network takes class_labels only; got {sorted(cond)}"
            )
        c = torch.as_tensor(c_noise, dtype=torch.float32, device=x.device)
        c = c.expand(x.shape[0]) if c.ndim == 0 else c.reshape(x.shape[0])
        labels = None
        if self.num_classes:
            if class_labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, device=x.device)
            else:
                bad = (class_labels < -1) | (class_labels >= self.num_classes)
                if class_labels.shape != (x.shape[0],) or bool(bad.any()):
                    raise ValueError(
                        f"class_labels must be [B] = [{x.shape[0]}] in 0..{self.num_classes - 1} "
                        f"or -1; got shape {tuple(class_labels.shape)}"
                    )
                labels = torch.where(class_labels < 0, self.num_classes, class_labels).long()
        elif class_labels is not None:
            raise ValueError("class_labels were given but this network is unconditional")
        return self.unet(x, c, class_labels=labels, return_dict=False)[0]


def num_parameters_meta(in_channels: int, **kwargs) -> int:
    """The parameter count of ``DiffusersUNet2D(in_channels, **kwargs)``, built on the meta device."""
    with torch.device("meta"):
        net = _diffusers().UNet2DModel(**unet_config(in_channels, **kwargs))
    return sum(p.numel() for p in net.parameters())


def default_config(shape: Sequence[int], num_classes: int = 0) -> dict[str, Any]:
    """A small ``diffusers-unet2d`` config for images of ``shape = [C, H, W]`` (two levels, 32/64)."""
    c, h, w = shape
    return {
        "type": "diffusers-unet2d",
        "in_channels": int(c),
        "image_size": [int(h), int(w)],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "num_classes": int(num_classes),
    }
