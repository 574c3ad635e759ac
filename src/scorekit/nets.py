"""Raw networks ``F(x_in, c_noise, class_labels=None)``: an MLP for vectors and a small U-Net for images.

A raw network is never a denoiser by itself: ``scorekit.denoiser.NetDenoiser`` wraps it as
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with the parameterisation's scalings, so the same
network serves eps-, x0-, v-, score-, flow- and EDM-parameterised training. Shapes:

    x_in          [B, dim] (MLP) or [B, C, H, W] (UNet), float
    c_noise       [B] float (a 0-d tensor or Python number is broadcast to the batch)
    class_labels  [B] integer in 0..num_classes-1, or -1 for "no label" (a learned null embedding);
                  ``None`` means every row is unconditional. Classifier-free guidance (Ho & Salimans
                  2022) trains with labels randomly replaced by -1 and samples both branches.
    class_embedding  optional [B, emb_dim] float, used *instead of* the embedding looked up for
                  ``class_labels`` (which must then be ``None``): the hook for condition-annealed
                  sampling (``scorekit.guidance.cads``), which adds noise to the embedding. The
                  looked-up embedding of labels ``y`` is ``net.class_emb.embed(y)``.
    result        x_in's shape

The noise level enters through a sinusoidal embedding of ``c_noise`` (``_NoiseEmbedding``), a small MLP,
and a per-block scale and shift (FiLM, Perez et al. 2018) of the normalised activations.

``build(config)`` makes a network from a JSON-able dict through the explicit two-entry table ``NETS``;
``default_config(kind, shape, num_classes)`` gives CPU-sized defaults for data of that kind and shape.

References:
    Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (sinusoidal embedding, Sec. 3.5).
    Tancik et al., "Fourier Features Let Networks Learn High Frequency Functions in Low Dimensional
    Domains", NeurIPS 2020 (Fourier features of a low-dimensional input).
    Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (U-Net with GroupNorm,
    time embedding, self-attention at 16x16). Dhariwal & Nichol, "Diffusion Models Beat GANs on Image
    Synthesis", NeurIPS 2021 (adaptive GroupNorm scale/shift from the embedding, Sec. 3).
    Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018.
    Ho & Salimans, "Classifier-Free Diffusion Guidance", NeurIPS 2021 workshop (null label).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scorekit._util import append_dims, check_int, check_number

__all__ = ["MLP", "NETS", "UNet", "build", "default_config", "num_parameters"]


# --------------------------------------------------------------------------------------------------
# Shared pieces: input checks, noise and class embeddings.


def _check_c_noise(c_noise: Tensor | float, x: Tensor) -> Tensor:
    """``c_noise`` as a float ``[B]`` tensor on x's device and dtype (a scalar is broadcast)."""
    batch = x.shape[0]
    if not isinstance(c_noise, Tensor):
        if not isinstance(c_noise, (int, float)):
            raise TypeError(f"c_noise must be a number or a tensor, got {type(c_noise).__name__}")
        return torch.full((batch,), float(c_noise), device=x.device, dtype=x.dtype)
    c_noise = c_noise.to(device=x.device, dtype=x.dtype)
    if c_noise.ndim == 0:
        return c_noise.expand(batch)
    if c_noise.shape != (batch,):
        raise ValueError(
            f"c_noise must be a scalar or have shape [B] = [{batch}]; got shape {tuple(c_noise.shape)}"
        )
    return c_noise


class _NoiseEmbedding(nn.Module):
    """Sinusoidal features of a scalar noise coordinate, then a two-layer MLP.

    ``phi(c) = [cos(w_1 c), ..., cos(w_k c), sin(w_1 c), ..., sin(w_k c)]`` with ``k = dim / 2``
    angular frequencies spaced geometrically from ``w_max = 1e3`` down to ``w_min = 1e-2`` (Vaswani et al.
    2017, Sec. 3.5, with the frequency band moved to cover the ``c_noise`` of every adapter: ``t`` in
    [0, 1] for VP/VE/flow, ``ln(sigma)/4`` in about [-2, 1.5] for EDM, ``t = sigma`` up to 80 for the
    EDM process and a discrete step index up to 999); a deterministic stand-in for Tancik et al.'s
    random Fourier features. The MLP ``Linear -> SiLU -> Linear`` maps ``phi`` to ``out_dim``.
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"the noise embedding size must be even and >= 2, got {dim}")
        k = dim // 2
        exponent = torch.arange(k, dtype=torch.float64) / max(k - 1, 1)
        freqs = 1e3 * (1e-2 / 1e3) ** exponent
        self.register_buffer("freqs", freqs.to(torch.float32), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        # The phase is formed in float32 at least (w c reaches ~1e5, where half precision loses it) and
        # in float64 for float64 inputs, so double-precision callers get a smooth embedding.
        dtype = torch.promote_types(c_noise.dtype, torch.float32)
        arg = c_noise.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]
        phi = torch.cat([arg.cos(), arg.sin()], dim=1).to(c_noise.dtype)
        return self.mlp(phi)


class _ClassEmbedding(nn.Module):
    """A learned vector per class plus one learned "null" vector used for label ``-1``."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)  # row ``num_classes`` is the null label

    def forward(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if class_labels is None:
            idx = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            idx = torch.where(class_labels < 0, self.num_classes, class_labels)
        return self.table(idx)

    def embed(self, class_labels: Tensor) -> Tensor:
        """The embedding ``[B, emb_dim]`` of integer labels ``[B]`` (-1: the null label)."""
        _check_labels(class_labels, self.num_classes, class_labels.shape[0])
        return self(class_labels, class_labels.shape[0], class_labels.device)


def _check_labels(class_labels: Tensor | None, num_classes: int, batch: int) -> None:
    """Raise a clear error unless ``class_labels`` is ``None`` or an integer ``[B]`` in ``-1..K-1``."""
    if class_labels is None:
        return
    if not isinstance(class_labels, Tensor):
        raise TypeError(
            f"class_labels must be a LongTensor [B] or None, got {type(class_labels).__name__}"
        )
    if num_classes == 0:
        raise ValueError(
            "class_labels were given but this network is unconditional (num_classes=0); "
            "build it with num_classes > 0 or pass class_labels=None"
        )
    if class_labels.dtype.is_floating_point or class_labels.dtype.is_complex:
        raise TypeError(f"class_labels must be an integer tensor, got dtype {class_labels.dtype}")
    if class_labels.shape != (batch,):
        raise ValueError(
            f"class_labels must have shape [B] = [{batch}]; got {tuple(class_labels.shape)}"
        )
    if batch and (class_labels.min() < -1 or class_labels.max() >= num_classes):
        lo, hi = int(class_labels.min()), int(class_labels.max())
        raise ValueError(
            f"class_labels must be in 0..{num_classes - 1} or -1 (no label); got values in [{lo}, {hi}]"
        )


def _conditioning(
    net: nn.Module,
    x: Tensor,
    c_noise: Tensor | float,
    class_labels: Tensor | None,
    class_embedding: Tensor | None = None,
) -> Tensor:
    """The embedding both networks feed their blocks: ``silu(noise_emb(c_noise) + class_emb(labels))``,
    with ``class_embedding`` in place of ``class_emb(labels)`` when it is given."""
    c_noise = _check_c_noise(c_noise, x)
    _check_labels(class_labels, net.num_classes, x.shape[0])
    emb = net.noise_emb(c_noise)
    if class_embedding is not None:
        _check_embedding(class_embedding, class_labels, net, x)
        return F.silu(emb + class_embedding.to(emb.dtype))
    if net.class_emb is not None:
        emb = emb + net.class_emb(class_labels, x.shape[0], x.device)
    return F.silu(emb)


def _check_embedding(c: Tensor, class_labels: Tensor | None, net: nn.Module, x: Tensor) -> None:
    """A one-line error unless ``c`` is a float ``[B, emb_dim]`` given without labels to a conditional net."""
    if net.class_emb is None:
        raise ValueError(
            "class_embedding was given but this network is unconditional (num_classes=0)"
        )
    if class_labels is not None:
        raise ValueError("give class_labels or class_embedding, not both")
    want = (x.shape[0], net.class_emb.table.embedding_dim)
    if not isinstance(c, Tensor) or not c.is_floating_point() or tuple(c.shape) != want:
        got = f"{tuple(c.shape)} {c.dtype}" if isinstance(c, Tensor) else type(c).__name__
        raise ValueError(
            f"class_embedding must be a float tensor of shape [B, emb_dim] = {list(want)}; got {got}"
        )


# --------------------------------------------------------------------------------------------------
# MLP for vectors.


class _MLPBlock(nn.Module):
    """``h + W2 drop(SiLU(FiLM(LN(W1 SiLU(LN(h))), emb)))`` with ``FiLM(a) = a (1 + s) + b``."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)
        a = self.norm2(self.fc1(F.silu(self.norm1(h))))
        a = F.silu(a * (1 + scale) + shift)
        return h + self.fc2(self.drop(a))


class MLP(nn.Module):
    """A residual MLP ``F(x [B, dim], c_noise [B], class_labels=None) -> [B, dim]`` for vector data.

    ``x -> Linear(dim, hidden) -> depth x residual block -> LayerNorm -> SiLU -> Linear(hidden, dim)``.
    The embedding ``e = MLP(phi(c_noise)) + class_emb(label)`` (``phi`` sinusoidal, see
    ``_NoiseEmbedding``) goes through SiLU and sets a per-block scale and shift (FiLM). The output layer
    starts at zero, so the untrained network returns 0 and the denoiser starts at ``c_skip x``.

    Args:
        dim: the data dimension ``d``.
        hidden: width of the residual stream.
        depth: number of residual blocks.
        emb_dim: size of the noise (and class) embedding.
        num_classes: number of classes for conditioning (0: unconditional; labels then not allowed).
        dropout: dropout rate inside the blocks.
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 128,
        num_classes: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, v in {"dim": dim, "hidden": hidden, "depth": depth, "emb_dim": emb_dim}.items():
            check_int(name, v)
        check_int("num_classes", num_classes, least=0)
        self.dim, self.num_classes = dim, num_classes
        self.noise_emb = _NoiseEmbedding(emb_dim, emb_dim)
        self.class_emb = _ClassEmbedding(num_classes, emb_dim) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            _MLPBlock(
                hidden, emb_dim, check_number("dropout", dropout, low=0, high=1, high_ok=False)
            )
            for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor | float,
        class_labels: Tensor | None = None,
        class_embedding: Tensor | None = None,
    ) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"MLP(dim={self.dim}) expects x of shape [B, {self.dim}]; got {tuple(x.shape)}"
            )
        emb = _conditioning(self, x, c_noise, class_labels, class_embedding)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))


# --------------------------------------------------------------------------------------------------
# U-Net for small images.


def _groups(channels: int) -> int:
    """GroupNorm groups: a divisor of ``channels``, at most 32, with at least 4 channels per group."""
    g = math.gcd(channels, 32)
    while g > 1 and channels // g < 4:
        g //= 2
    return g


class _ResBlock(nn.Module):
    """``skip(h) + conv(drop(SiLU(GN(conv(SiLU(GN(h)))) (1 + s) + b)))``; ``(s, b)`` from the embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout, affine=False)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.emb(emb).chunk(2, dim=1)
        a = self.norm2(self.conv1(F.silu(self.norm1(h))))
        a = F.silu(_film(a, scale, shift))
        return self.skip(h) + self.conv2(self.drop(a))


def _film(a: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``a (1 + scale) + shift`` for ``a [B, C, H, W]`` and per-channel ``scale, shift [B, C]``."""
    return a * append_dims(1 + scale, a.ndim) + append_dims(shift, a.ndim)


class _Attention(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions, residual: ``h + proj(attn(GN(h)))``."""

    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            self.heads = 1
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        b, c, hh, ww = h.shape
        q, k, v = (
            self.qkv(self.norm(h)).reshape(b, 3, self.heads, c // self.heads, hh * ww).unbind(1)
        )
        # [B, heads, positions, head_dim] for scaled_dot_product_attention.
        out = F.scaled_dot_product_attention(q.mT, k.mT, v.mT)
        return h + self.proj(out.mT.reshape(b, c, hh, ww))


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return self.conv(h)


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """A small U-Net ``F(x [B, C, H, W], c_noise [B], class_labels=None) -> [B, C, H, W]``.

    Layout (DDPM / ADM style): a 3x3 input conv to ``base_channels``; for each level ``i`` with
    multiplier ``channel_mults[i]``, ``num_res_blocks`` residual blocks at ``base_channels * mult``
    (self-attention after each block when the level's spatial size is in ``attn_resolutions``), then a
    stride-2 conv down (not after the last level); a middle ResBlock-Attention-ResBlock; the mirror path
    up with ``num_res_blocks + 1`` blocks per level, each taking the matching skip (concatenated),
    nearest-neighbour upsampling + 3x3 conv; GroupNorm, SiLU and a zero-initialised 3x3 output conv.
    Residual blocks use GroupNorm + SiLU, and the embedding ``SiLU(MLP(phi(c_noise)) + class_emb)``
    sets a per-channel scale and shift after the second GroupNorm (Dhariwal & Nichol 2021, Sec. 3).

    Args:
        in_channels: image channels ``C`` (the output has the same).
        image_size: ``H`` (square) or ``(H, W)``; both divisible by ``2 ** (len(channel_mults) - 1)``.
            The attention placement depends on it, so the network checks inputs against it.
        base_channels: channels of the first level.
        channel_mults: per-level channel multipliers; one level per entry, halving the size each time.
        num_res_blocks: residual blocks per level on the way down.
        attn_resolutions: spatial sizes (the level's height) at which self-attention is used.
        num_classes: classes for conditioning (0: unconditional).
        dropout: dropout rate in the residual blocks.
        emb_dim: size of the noise/class embedding (default ``4 * base_channels``).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        image_size: int | Sequence[int] = 8,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (4,),
        num_classes: int = 0,
        dropout: float = 0.0,
        emb_dim: int | None = None,
    ):
        super().__init__()
        emb_dim = 4 * base_channels if emb_dim is None else emb_dim
        sizes = {"in_channels": in_channels, "base_channels": base_channels,
                 "num_res_blocks": num_res_blocks, "emb_dim": emb_dim}  # fmt: skip
        for name, v in sizes.items():
            check_int(name, v)
        check_int("num_classes", num_classes, least=0)
        channel_mults = tuple(channel_mults)
        if not channel_mults:
            raise ValueError("channel_mults must have at least one entry")
        for m in channel_mults:
            check_int("channel_mults", m)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(
                f"image_size must be an int or (H, W) of positive ints; got {image_size!r}"
            )
        factor = 2 ** (len(channel_mults) - 1)
        if size[0] % factor or size[1] % factor:
            raise ValueError(
                f"image_size {size[0]}x{size[1]} must be divisible by 2**(len(channel_mults)-1) = "
                f"{factor} for channel_mults={channel_mults}"
            )
        levels = [size[0] // 2**i for i in range(len(channel_mults))]
        attn_resolutions = tuple(attn_resolutions)
        unused = [r for r in attn_resolutions if r not in levels]
        if unused:
            raise ValueError(
                f"attn_resolutions {unused} match no level; the levels' heights are {levels} "
                f"for image_size {size[0]}x{size[1]} and channel_mults={channel_mults}"
            )
        dropout = check_number("dropout", dropout, low=0, high=1, high_ok=False)
        self.in_channels, self.image_size, self.num_classes = in_channels, size, num_classes

        self.noise_emb = _NoiseEmbedding(2 * ((base_channels + 1) // 2), emb_dim)
        self.class_emb = _ClassEmbedding(num_classes, emb_dim) if num_classes else None
        self.inp = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down path: every module's output is pushed as a skip (the input conv's too).
        self.down = nn.ModuleList()
        skips = [base_channels]
        ch = base_channels
        for i, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                block = [_ResBlock(ch, base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                if levels[i] in attn_resolutions:
                    block.append(_Attention(ch))
                self.down.append(nn.ModuleList(block))
                skips.append(ch)
            if i < len(channel_mults) - 1:
                self.down.append(nn.ModuleList([_Down(ch)]))
                skips.append(ch)

        self.mid = nn.ModuleList(
            [
                _ResBlock(ch, ch, emb_dim, dropout),
                _Attention(ch),
                _ResBlock(ch, ch, emb_dim, dropout),
            ]
        )

        # Up path: each block takes one skip; the last block of a level is followed by upsampling.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for j in range(num_res_blocks + 1):
                block = [_ResBlock(ch + skips.pop(), base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                if levels[i] in attn_resolutions:
                    block.append(_Attention(ch))
                if i > 0 and j == num_res_blocks:
                    block.append(_Up(ch))
                self.up.append(nn.ModuleList(block))
        self.out_norm = nn.GroupNorm(_groups(ch), ch)
        self.out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor | float,
        class_labels: Tensor | None = None,
        class_embedding: Tensor | None = None,
    ) -> Tensor:
        h_, w_ = self.image_size
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"UNet(in_channels={self.in_channels}, image_size={h_}x{w_}) expects x of shape "
                f"[B, {self.in_channels}, {h_}, {w_}]; got {tuple(x.shape)}"
            )
        emb = _conditioning(self, x, c_noise, class_labels, class_embedding)

        h = self.inp(x)
        skips = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for block in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in block:
                h = layer(h, emb)
        return self.out(F.silu(self.out_norm(h)))


# --------------------------------------------------------------------------------------------------
# Build from a JSON-able config.


def _diffusers_unet2d(in_channels: int, **kwargs) -> nn.Module:
    """A diffusers ``UNet2DModel`` as a raw network (``scorekit._diffusers_unet``; diffusers is lazy)."""
    from scorekit._diffusers_unet import DiffusersUNet2D

    return DiffusersUNet2D(in_channels, **kwargs)


def _diffusers_unet2d_size(in_channels: int, **kwargs) -> int:
    from scorekit._diffusers_unet import num_parameters_meta

    return num_parameters_meta(in_channels, **kwargs)


#: Network type -> class. ``build`` looks names up here only (no import-by-name).
NETS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "unet": UNet,
                                             "diffusers-unet2d": _diffusers_unet2d}  # fmt: skip

_POSITIONAL = {"mlp": "dim", "unet": "in_channels", "diffusers-unet2d": "in_channels"}


#: Bounds ``(least, most)`` on every size in a network config (each entry of a list-valued one),
#: checked by ``build`` before anything is allocated: a config read from a checkpoint's state file
#: or given as ``--net`` is a one-line error, not a multi-terabyte allocation.
LIMITS: dict[str, tuple[int, int]] = {
    "dim": (1, 1 << 20), "hidden": (1, 1 << 14), "depth": (1, 256), "emb_dim": (1, 1 << 14),
    "num_classes": (0, 100_000), "in_channels": (1, 1024), "image_size": (1, 4096),
    "base_channels": (1, 4096), "channel_mults": (1, 64), "num_res_blocks": (1, 64),
    "attn_resolutions": (1, 4096), "block_out_channels": (1, 4096), "layers_per_block": (1, 64),
    "norm_num_groups": (1, 4096),
}  # fmt: skip
#: Most entries of a list-valued size (``channel_mults``: levels; ``image_size``: 2).
_MAX_ENTRIES = 8
#: Most parameters ``build`` makes (4 GiB of float32 weights; the CPU defaults have about 1M).
MAX_PARAMETERS = 1_000_000_000


def _check_sizes(kwargs: dict[str, Any]) -> None:
    """A one-line ValueError unless every size in ``kwargs`` is an integer within ``LIMITS``."""
    for name, (least, most) in LIMITS.items():
        value = kwargs.get(name)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) > _MAX_ENTRIES:
            raise ValueError(
                f"config[{name!r}] has {len(values)} entries; at most {_MAX_ENTRIES} allowed"
            )
        for v in values:
            check_int(f"config[{name!r}]", v, least=least, most=most)


def _linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _res_size(cin: int, cout: int, emb: int) -> int:
    skip = _conv(cin, cout, 1) if cin != cout else 0
    return 2 * cin + _conv(cin, cout, 3) + _linear(emb, 2 * cout) + _conv(cout, cout, 3) + skip


def _attn_size(ch: int) -> int:
    return 2 * ch + _conv(ch, 3 * ch, 1) + _conv(ch, ch, 1)


def _embedding_size(noise_dim: int, emb: int, num_classes: int) -> int:
    table = (num_classes + 1) * emb if num_classes else 0
    return _linear(noise_dim, emb) + _linear(emb, emb) + table


def _mlp_size(dim: int, *, hidden: int = 256, depth: int = 4, emb_dim: int = 128,
              num_classes: int = 0, dropout: float = 0.0) -> int:  # fmt: skip
    """``MLP(dim, ...)``'s parameter count, without building it (keep in step with ``MLP``)."""
    block = 2 * hidden + 2 * _linear(hidden, hidden) + _linear(emb_dim, 2 * hidden)
    ends = _linear(dim, hidden) + 2 * hidden + _linear(hidden, dim)
    return _embedding_size(emb_dim, emb_dim, num_classes) + depth * block + ends


def _unet_size(in_channels: int, *, image_size: int | Sequence[int] = 8, base_channels: int = 32,
               channel_mults: Sequence[int] = (1, 2), num_res_blocks: int = 2,
               attn_resolutions: Sequence[int] = (4,), num_classes: int = 0,
               dropout: float = 0.0, emb_dim: int | None = None) -> int:  # fmt: skip
    """``UNet(in_channels, ...)``'s parameter count, without building it (keep in step with ``UNet``)."""
    e = 4 * base_channels if emb_dim is None else emb_dim
    height = image_size if isinstance(image_size, int) else image_size[0]
    levels = [height // 2**i for i in range(len(channel_mults))]
    n = _embedding_size(2 * ((base_channels + 1) // 2), e, num_classes)
    n += _conv(in_channels, base_channels, 3)
    skips, ch = [base_channels], base_channels
    for i, mult in enumerate(channel_mults):
        for _ in range(num_res_blocks):
            n += _res_size(ch, base_channels * mult, e)
            ch = base_channels * mult
            n += _attn_size(ch) if levels[i] in attn_resolutions else 0
            skips.append(ch)
        if i < len(channel_mults) - 1:
            n += _conv(ch, ch, 3)
            skips.append(ch)
    n += 2 * _res_size(ch, ch, e) + _attn_size(ch)
    for i, mult in reversed(list(enumerate(channel_mults))):
        for j in range(num_res_blocks + 1):
            n += _res_size(ch + skips.pop(), base_channels * mult, e)
            ch = base_channels * mult
            n += _attn_size(ch) if levels[i] in attn_resolutions else 0
            n += _conv(ch, ch, 3) if i > 0 and j == num_res_blocks else 0
    return n + 2 * ch + _conv(ch, in_channels, 3)


_SIZES: dict[str, Callable[..., int]] = {"mlp": _mlp_size, "unet": _unet_size,
                                         "diffusers-unet2d": _diffusers_unet2d_size}  # fmt: skip


def build(config: dict[str, Any]) -> nn.Module:
    """Build a raw network from a JSON-able config, e.g. ``{"type": "mlp", "dim": 2, "hidden": 256}``.

    ``type`` picks the class from ``NETS``; every other key is passed as a keyword argument, so a
    misspelt key is a ``TypeError`` naming it. Lists (from JSON) are accepted where tuples are expected.
    The sizes are checked against ``LIMITS`` and the parameter count against ``MAX_PARAMETERS``
    before anything is allocated (a config may come from a checkpoint someone else wrote).
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    kind = config.get("type")
    if kind not in NETS:
        raise ValueError(f"config['type'] must be one of {sorted(NETS)}; got {kind!r}")
    kwargs = {k: v for k, v in config.items() if k != "type"}
    first = _POSITIONAL[kind]
    if first not in kwargs:
        raise ValueError(f"config for {kind!r} needs the key {first!r}; got keys {sorted(config)}")
    _check_sizes(kwargs)
    try:
        count = _SIZES[kind](**kwargs)
        if count > MAX_PARAMETERS:
            raise ValueError(
                f"config for {kind!r} makes a network of {count:,} parameters; at most "
                f"{MAX_PARAMETERS:,} allowed (about {4 * count / 2**30:,.0f} GiB of float32 weights)"
            )
        return NETS[kind](kwargs.pop(first), **kwargs)
    except TypeError as err:
        raise TypeError(f"bad config for {kind!r}: {err}") from None


def default_config(
    kind: str, shape: Sequence[int], num_classes: int = 0, net_type: str | None = None
) -> dict[str, Any]:
    """CPU-sized defaults for data of ``kind`` and per-example ``shape``, a JSON-able config for ``build``.

    Args:
        kind: ``"vector"`` (``shape = [dim]``) or ``"image"`` (``shape = [C, H, W]``).
        shape: one example's shape.
        num_classes: the number of class labels (0: unconditional).
        net_type: ``"diffusers-unet2d"`` for a small diffusers ``UNet2DModel`` (images); else the default.

    Vectors: ``MLP(hidden=256, depth=4, emb_dim=128)`` (about 0.8M parameters for 2-D data).
    Images: a two-level U-Net (32 and 64 channels, two residual blocks per level, attention at the
    lower level when it is at most 16 pixels high), about 1.08M parameters for 8x8 digits with 10
    classes. With the data set's number of classes, class-conditional training (and classifier-free
    guidance) is available whenever the data carries labels.
    """
    if kind == "vector":
        (dim,) = shape
        return {
            "type": "mlp",
            "dim": int(dim),
            "hidden": 256,
            "depth": 4,
            "emb_dim": 128,
            "num_classes": int(num_classes),
            "dropout": 0.0,
        }
    if kind == "image" and net_type == "diffusers-unet2d":
        from scorekit._diffusers_unet import default_config as diffusers_default

        return diffusers_default(shape, num_classes)
    if kind == "image":
        c, h, w = shape
        mults = [1, 2] if h % 2 == 0 and w % 2 == 0 else [1]
        low = h // 2 ** (len(mults) - 1)
        return {
            "type": "unet",
            "in_channels": int(c),
            "image_size": [int(h), int(w)],
            "base_channels": 32,
            "channel_mults": mults,
            "num_res_blocks": 2,
            "attn_resolutions": [low] if low <= 16 else [],
            "num_classes": int(num_classes),
            "dropout": 0.0,
        }
    raise ValueError(f"kind must be 'vector' or 'image', got {kind!r}")


def num_parameters(net: nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
