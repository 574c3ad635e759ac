"""Measurement operators ``y = A(x) + sigma_y n`` on ``[B, ...]`` tensors.

A linear operator maps one sample of shape ``in_shape`` (``d`` values) to one of shape ``out_shape``
(``m`` values) and has

    forward(x)  [B, *in_shape]  -> [B, *out_shape]        A x
    adjoint(y)  [B, *out_shape] -> [B, *in_shape]         A^T y

and, where it is cheap, a singular value decomposition ``A = U diag(s) V_r^T`` applied as functions,
with ``V`` a full orthonormal basis of the ``d`` input values whose first ``r`` columns are ``V_r``:

    svd_vt(x) [B, *in_shape] -> [B, d]      V^T x   (first r: along the singular vectors, rest: null space)
    svd_v(z)  [B, d] -> [B, *in_shape]      V z
    svd_ut(y) [B, *out_shape] -> [B, r]     U^T y
    svd_u(z)  [B, r] -> [B, *out_shape]     U z
    singular_values                         s, [r] (some may be 0)

so that ``forward(x) == svd_u(s * svd_vt(x)[:, :r])``. ``has_svd`` says whether these exist; the SVD
methods of an operator without one raise a ``ValueError``. The measurement noise ``sigma_y`` is not part
of an operator: solvers take it as an argument.

``Saturate`` is the one non-linear measurement: it has ``forward`` only (``linear`` is false) and is
meant for solvers that need just a differentiable forward map (DPS).

``as_matrix(op)`` gives the dense ``[m, d]`` matrix of a linear operator (for small problems and the
exact posterior ``GaussianMixture.posterior``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "OPERATORS",
    "Blur",
    "Compose",
    "Downsample",
    "Identity",
    "Mask",
    "Matrix",
    "Operator",
    "Saturate",
    "as_matrix",
]


def _shape(shape, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in shape)
    except TypeError as err:
        raise ValueError(f"{name} must be a sequence of positive ints; got {shape!r}") from err
    if not out or min(out) < 1:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints; got {shape!r}")
    return out


def _check_rows(t: Tensor, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape[1:]) != shape or t.ndim != len(shape) + 1:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} must have shape [B, *{list(shape)}]; got {got}")


class Operator:
    """Abstract measurement operator: ``in_shape``, ``out_shape``, ``forward``; linear ones add
    ``adjoint`` and, where cheap, the SVD functions (module docstring)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    linear: bool = True
    has_svd: bool = False

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    def forward(self, x: Tensor) -> Tensor:
        _check_rows(x, self.in_shape, f"x given to {type(self).__name__}.forward")
        return self._forward(x)

    __call__ = forward

    def adjoint(self, y: Tensor) -> Tensor:
        if not self.linear:
            raise ValueError(f"{type(self).__name__} is not linear: it has no adjoint")
        _check_rows(y, self.out_shape, f"y given to {type(self).__name__}.adjoint")
        return self._adjoint(y)

    def _no_svd(self):
        raise ValueError(
            f"{type(self).__name__} has no SVD; allowed: an operator with has_svd = True "
            "(Identity, Mask, Matrix, Downsample, Blur with a point-symmetric kernel)"
        )

    def svd_vt(self, x: Tensor) -> Tensor:
        if not self.has_svd:
            self._no_svd()
        _check_rows(x, self.in_shape, f"x given to {type(self).__name__}.svd_vt")
        return self._vt(x)

    def svd_v(self, z: Tensor) -> Tensor:
        if not self.has_svd:
            self._no_svd()
        _check_rows(z, (self.in_dim,), f"z given to {type(self).__name__}.svd_v")
        return self._v(z)

    def svd_ut(self, y: Tensor) -> Tensor:
        if not self.has_svd:
            self._no_svd()
        _check_rows(y, self.out_shape, f"y given to {type(self).__name__}.svd_ut")
        return self._ut(y)

    def svd_u(self, z: Tensor) -> Tensor:
        if not self.has_svd:
            self._no_svd()
        _check_rows(z, (len(self.singular_values),), f"z given to {type(self).__name__}.svd_u")
        return self._u(z)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_shape={list(self.in_shape)}, out_shape={list(self.out_shape)})"


class Identity(Operator):
    """``A = I`` on samples of ``shape`` (denoising). ``U = V = I``, ``s = 1``."""

    has_svd = True

    def __init__(self, shape: Sequence[int]):
        self.in_shape = self.out_shape = _shape(shape, "shape")
        self.singular_values = torch.ones(self.in_dim, dtype=torch.float64)

    def _forward(self, x):
        return x

    def _adjoint(self, y):
        return y

    def _vt(self, x):
        return x.reshape(x.shape[0], -1)

    def _v(self, z):
        return z.reshape(z.shape[0], *self.in_shape)

    _ut, _u = _vt, _v


class Mask(Operator):
    """Inpainting: keep the observed values, ``y = x[mask]`` (flattened, in row-major order), ``[B, m]``.

    Args:
        mask: one sample's shape, ``1``/``True`` = observed, ``0``/``False`` = missing (per pixel; a
            box is a mask with a rectangle of zeros). Only 0/1 values are allowed.

    ``A`` is ``m`` rows of the identity; ``U = I_m``, ``s = 1``, and ``V^T x`` lists the observed values
    then the missing ones (a permutation).
    """

    has_svd = True

    def __init__(self, mask: Tensor):
        mask = torch.as_tensor(mask)
        if mask.ndim < 1 or mask.numel() == 0:
            raise ValueError(
                f"mask must have one sample's shape (rank >= 1); got {tuple(mask.shape)}"
            )
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must hold only 0 (missing) and 1 (observed); got other values")
        self.mask = mask.bool()
        self.in_shape = tuple(mask.shape)
        flat = self.mask.flatten()
        self.observed = flat.nonzero().flatten()
        self.perm = torch.cat([self.observed, (~flat).nonzero().flatten()])
        self.out_shape = (len(self.observed),)
        if not self.observed.numel():
            raise ValueError("mask observes nothing (all zeros); allowed: at least one 1")
        self.singular_values = torch.ones(len(self.observed), dtype=torch.float64)

    def _forward(self, x):
        return x.reshape(x.shape[0], -1)[:, self.observed.to(x.device)]

    def _adjoint(self, y):
        out = y.new_zeros(y.shape[0], self.in_dim)
        out[:, self.observed.to(y.device)] = y
        return out.reshape(y.shape[0], *self.in_shape)

    def _vt(self, x):
        return x.reshape(x.shape[0], -1)[:, self.perm.to(x.device)]

    def _v(self, z):
        out = torch.empty_like(z)
        out[:, self.perm.to(z.device)] = z
        return out.reshape(z.shape[0], *self.in_shape)

    def _ut(self, y):
        return y

    def _u(self, z):
        return z


class Matrix(Operator):
    """A dense matrix ``A`` ``[m, d]`` acting on flattened rows (compressed sensing, random projection).

    Args:
        A: ``[m, d]`` finite matrix.
        shape: one sample's shape (``d`` values); default ``[d]``.

    The SVD is computed once, in float64 (``torch.linalg.svd``, full ``V``), ``r = min(m, d)``.
    """

    has_svd = True

    def __init__(self, A: Tensor, shape: Sequence[int] | None = None):
        A = torch.as_tensor(A)
        if not A.is_floating_point():
            A = A.to(torch.get_default_dtype())
        if A.ndim != 2 or A.numel() == 0:
            raise ValueError(f"A must be a non-empty [m, d] matrix; got shape {tuple(A.shape)}")
        if not torch.isfinite(A).all():
            raise ValueError("A must be finite; got NaN or inf")
        self.A = A
        self.in_shape = _shape(shape, "shape") if shape is not None else (A.shape[1],)
        if self.in_dim != A.shape[1]:
            raise ValueError(
                f"shape {list(self.in_shape)} has {self.in_dim} values; A has d = {A.shape[1]} columns"
            )
        self.out_shape = (A.shape[0],)
        u, s, vh = torch.linalg.svd(A.double(), full_matrices=True)  # float64 whatever A is
        r = min(A.shape)
        self.U, self.singular_values, self.Vh = u[:, :r], s, vh

    def _forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.A.to(x).T

    def _adjoint(self, y):
        return (y @ self.A.to(y)).reshape(y.shape[0], *self.in_shape)

    def _vt(self, x):
        return x.reshape(x.shape[0], -1) @ self.Vh.to(x).T

    def _v(self, z):
        return (z @ self.Vh.to(z)).reshape(z.shape[0], *self.in_shape)

    def _ut(self, y):
        return y @ self.U.to(y)

    def _u(self, z):
        return z @ self.U.to(z).T


def _block_basis(n: int) -> Tensor:
    """An orthonormal ``[n, n]`` basis whose first column is ``1 / sqrt(n)`` (Householder-free: QR)."""
    m = torch.eye(n, dtype=torch.float64)
    m[:, 0] = 1.0
    q, r = torch.linalg.qr(m)
    return q * torch.sign(r.diagonal())[None]  # first column +1/sqrt(n)


class Downsample(Operator):
    """Super-resolution: average pooling by ``factor`` over the last two axes of ``[B, C, H, W]``.

    Args:
        factor: integer pooling factor ``f`` (``H`` and ``W`` divisible by it).
        shape: one sample's shape ``[C, H, W]``.

    Each ``f x f`` block is averaged: the row of ``A`` is ``1/f^2`` on the block, so ``s = 1/f`` for
    every output value, ``U = I`` and ``V`` is the block-wise basis ``{1/f, orthonormal complement}``.
    """

    has_svd = True

    def __init__(self, factor: int, shape: Sequence[int]):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int; got {factor!r}")
        shape = _shape(shape, "shape")
        if len(shape) != 3 or shape[1] % factor or shape[2] % factor:
            raise ValueError(
                f"shape must be [C, H, W] with H and W divisible by factor {factor}; got {list(shape)}"
            )
        c, h, w = shape
        self.factor, self.in_shape = factor, shape
        self.out_shape = (c, h // factor, w // factor)
        self.basis = _block_basis(factor * factor)
        self.singular_values = torch.full((self.out_dim,), 1.0 / factor, dtype=torch.float64)

    def _forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def _adjoint(self, y):
        f = self.factor
        return y.repeat_interleave(f, -2).repeat_interleave(f, -1) / (f * f)

    def _blocks(self, x):  # [B, C, H, W] -> [B, C*h*w, f*f]
        b, (c, h, w), f = x.shape[0], self.out_shape, self.factor
        return x.reshape(b, c, h, f, w, f).permute(0, 1, 2, 4, 3, 5).reshape(b, c * h * w, f * f)

    def _vt(self, x):
        z = self._blocks(x) @ self.basis.to(x)  # [B, m, f*f]; column 0 is along the singular vector
        return torch.cat([z[..., 0], z[..., 1:].reshape(x.shape[0], -1)], 1)

    def _v(self, z):
        b, (c, h, w), f = z.shape[0], self.out_shape, self.factor
        m = self.out_dim
        blocks = torch.cat([z[:, :m, None], z[:, m:].reshape(b, m, f * f - 1)], 2)
        x = blocks @ self.basis.to(z).T
        return x.reshape(b, c, h, w, f, f).permute(0, 1, 2, 4, 3, 5).reshape(b, *self.in_shape)

    def _ut(self, y):
        return y.reshape(y.shape[0], -1)

    def _u(self, z):
        return z.reshape(z.shape[0], *self.out_shape)


def _hartley(x: Tensor) -> Tensor:
    """Orthonormal 2-D discrete Hartley transform over the last two axes (its own inverse)."""
    f = torch.fft.fft2(x, norm="ortho")
    return f.real - f.imag


class Blur(Operator):
    """Blur: 2-D convolution of each channel of ``[B, C, H, W]``, with circular or reflect padding.

    Args:
        shape: one sample's shape ``[C, H, W]``.
        kernel: ``[k1, k2]`` kernel, centred at ``(k1 // 2, k2 // 2)``; or
        sigma: the standard deviation in pixels of a Gaussian kernel of size ``2 ceil(3 sigma) + 1``; or
        size: the side of a uniform (box) kernel (odd).
        padding: ``"circular"`` (default: the image is periodic, so ``A`` is block-circulant) or
            ``"reflect"`` (the image mirrored about its edge pixels, without repeating them, as
            ``numpy.pad(mode="reflect")``; the kernel's half-widths must be below H and W).

    Circular: ``A x = IFFT(FFT(k) FFT(x))``. When the kernel is point-symmetric (``k[-i, -j] = k[i, j]``, true of
    the Gaussian and odd box kernels), ``A`` is symmetric and diagonalised by the real orthonormal 2-D
    Hartley basis ``cas(2 pi (k1 n1 / H + k2 n2 / W))``, with eigenvalues ``lambda = Re FFT(k)``: the
    SVD is ``V = Hartley``, ``s = |lambda|``, ``U = V diag(sign lambda)``, at FFT cost.

    References:
        Bracewell, "Discrete Hartley transform", JOSA 1983 (the convolution theorem).

    Reflect: ``A x = k * pad_reflect(x)`` ("valid" part), and ``A^T`` is the exact transpose of that
    linear map, taken by one backward pass through it (``pad_reflect``'s transpose folds the mirrored
    border back onto the pixels it copied). Reflect padding breaks the circulant structure, so there
    is no cheap SVD (``has_svd = False``): DDRM, DDNM, RePaint and MCG refuse it, the others solve
    with conjugate gradients; ``Matrix(as_matrix(blur))`` gives an exact SVD for small images.
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        kernel: Tensor | None = None,
        sigma: float | None = None,
        size: int | None = None,
        padding: str = "circular",
    ):
        shape = _shape(shape, "shape")
        if len(shape) != 3:
            raise ValueError(f"shape must be [C, H, W]; got {list(shape)}")
        if padding not in ("circular", "reflect"):
            raise ValueError(
                f"padding {padding!r} is not supported; allowed: 'circular', 'reflect'"
            )
        if sum(v is not None for v in (kernel, sigma, size)) != 1:
            raise ValueError("Blur needs exactly one of kernel, sigma or size")
        if sigma is not None:
            if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
                raise ValueError(f"sigma must be a finite number > 0; got {sigma!r}")
            half = math.ceil(3 * sigma)
            t = torch.arange(-half, half + 1, dtype=torch.float64)
            g = torch.exp(-0.5 * (t / sigma) ** 2)
            kernel = torch.outer(g, g) / g.sum() ** 2
        elif size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
                raise ValueError(f"size must be an odd positive int; got {size!r}")
            kernel = torch.full((size, size), 1.0 / size**2, dtype=torch.float64)
        kernel = torch.as_tensor(kernel, dtype=torch.float64)
        c, h, w = shape
        if kernel.ndim != 2 or kernel.numel() == 0 or not torch.isfinite(kernel).all():
            raise ValueError(
                f"kernel must be a finite [k1, k2] tensor; got shape {tuple(kernel.shape)}"
            )
        self.kernel, self.in_shape, self.out_shape = kernel, shape, shape
        self.padding = padding
        if padding == "reflect":
            k1, k2 = kernel.shape
            if k1 // 2 >= h or k2 // 2 >= w or (k1 - 1) // 2 >= h or (k2 - 1) // 2 >= w:
                raise ValueError(
                    f"reflect padding needs kernel half-widths below the image size {h}x{w}; got a "
                    f"{k1}x{k2} kernel (use padding='circular' or a smaller kernel)"
                )
            self.has_svd = False
            return
        # the kernel wrapped onto the periodic H x W grid with its centre at (0, 0)
        k1, k2 = kernel.shape
        rows = (torch.arange(k1) - k1 // 2) % h
        cols = (torch.arange(k2) - k2 // 2) % w
        full = torch.zeros(h * w, dtype=torch.float64)
        full.index_add_(0, (rows[:, None] * w + cols[None]).flatten(), kernel.flatten())
        full = full.reshape(h, w)
        self.spectrum = torch.fft.fft2(full)  # [H, W] complex
        flipped = torch.roll(torch.flip(full, (0, 1)), (1, 1), (0, 1))  # k[-i, -j]
        self.has_svd = bool(torch.allclose(flipped, full, atol=1e-14))
        if self.has_svd:
            lam = self.spectrum.real
            self.sign = torch.where(lam < 0, -1.0, 1.0).expand(c, h, w).reshape(-1)
            self.singular_values = lam.abs().expand(c, h, w).reshape(-1).clone()

    def _conv(self, x, spectrum):
        return torch.fft.ifft2(torch.fft.fft2(x) * spectrum.to(x.device)).real.to(x.dtype)

    def _reflect(self, x):
        k1, k2 = self.kernel.shape
        c = x.shape[1]
        # conv2d correlates: flip the kernel so that this is a convolution centred at (k1//2, k2//2)
        weight = torch.flip(self.kernel, (0, 1)).to(x)[None, None].expand(c, 1, k1, k2)
        pad = (k2 - 1 - k2 // 2, k2 // 2, k1 - 1 - k1 // 2, k1 // 2)  # left, right, top, bottom
        return F.conv2d(F.pad(x, pad, mode="reflect"), weight, groups=c)

    def _forward(self, x):
        if self.padding == "reflect":
            return self._reflect(x)
        return self._conv(x, self.spectrum)

    def _adjoint(self, y):
        if self.padding == "reflect":  # the transpose of a linear map: one backward pass through it
            with torch.enable_grad():
                z = torch.zeros(y.shape[0], *self.in_shape, dtype=y.dtype, device=y.device)
                z.requires_grad_(True)
                (g,) = torch.autograd.grad(self._reflect(z), z, y, create_graph=y.requires_grad)
            return g
        return self._conv(y, self.spectrum.conj())

    def _vt(self, x):
        return _hartley(x).reshape(x.shape[0], -1)

    def _v(self, z):
        return _hartley(z.reshape(z.shape[0], *self.in_shape))

    def _ut(self, y):
        return _hartley(y).reshape(y.shape[0], -1) * self.sign.to(y)

    def _u(self, z):
        return _hartley((z * self.sign.to(z)).reshape(z.shape[0], *self.out_shape))


class Compose(Operator):
    """The composition ``A_1 A_2 ... A_n`` (``ops[-1]`` applied first); adjoint in reverse order.

    No SVD in general (the composition of two SVDs is not an SVD); solvers that need one can use the
    dense ``Matrix(as_matrix(op))`` on small problems.
    """

    def __init__(self, *ops: Operator):
        if not ops or not all(isinstance(o, Operator) for o in ops):
            raise ValueError("Compose needs one or more operators")
        for a, b in itertools.pairwise(ops):
            if a.in_shape != b.out_shape:
                raise ValueError(
                    f"cannot compose {a!r} after {b!r}: {list(b.out_shape)} != {list(a.in_shape)}"
                )
        self.ops = ops
        self.linear = all(o.linear for o in ops)
        self.in_shape, self.out_shape = ops[-1].in_shape, ops[0].out_shape

    def _forward(self, x):
        for o in reversed(self.ops):
            x = o.forward(x)
        return x

    def _adjoint(self, y):
        for o in self.ops:
            y = o.adjoint(y)
        return y


class Saturate(Operator):
    """A non-linear measurement ``y = scale * tanh(A x / scale)`` (a saturating sensor), ``A`` linear.

    Differentiable, so DPS-like solvers (that need only ``forward``) accept it; linear-only solvers
    refuse it. ``forward`` is about ``A x`` for ``|A x| << scale``.
    """

    linear = False

    def __init__(self, op: Operator, scale: float = 1.0):
        if not isinstance(op, Operator) or not op.linear:
            raise ValueError(f"op must be a linear Operator; got {op!r}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0; got {scale!r}")
        self.op, self.scale = op, float(scale)
        self.in_shape, self.out_shape = op.in_shape, op.out_shape

    def _forward(self, x):
        return self.scale * torch.tanh(self.op.forward(x) / self.scale)


def as_matrix(op: Operator, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense ``[m, d]`` matrix of a linear operator on flattened samples (``d`` forward calls)."""
    if not isinstance(op, Operator) or not op.linear:
        raise ValueError(f"as_matrix needs a linear Operator; got {op!r}")
    eye = torch.eye(op.in_dim, dtype=dtype).reshape(op.in_dim, *op.in_shape)
    return op.forward(eye).reshape(op.in_dim, op.out_dim).T.contiguous()


#: Every operator class by name (the contract suite checks it covers them all).
OPERATORS = {
    "identity": Identity,
    "mask": Mask,
    "matrix": Matrix,
    "downsample": Downsample,
    "blur": Blur,
    "compose": Compose,
    "saturate": Saturate,
}
