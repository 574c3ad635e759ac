"""Adapters from a network's raw output to a denoiser ``D(x, sigma) ~ E[x0 | x]`` in the sigma frame.

Every parameterisation is one affine map (EDM, Table 1)::

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

where ``F`` is the raw network. Each adapter is a ``Parameterization`` with one pure method,
``scalings(sigma) -> (c_skip, c_out, c_in, c_noise)``; the training target of the raw network,
``F* = (x0 - c_skip x) / c_out``, follows from the same numbers, so the forward map and its inverse can
never drift apart. Loss weights are not the adapters' business: they are functions of sigma named in
``scorekit.train.loss.WEIGHTINGS`` (whose table says for which process each equals ``|F - F*|^2``). For a process ``x_t = alpha x0 + s eps`` the network sees ``x_t = alpha x``
(``c_in = alpha``) and ``c_noise = t``; the outputs are

    eps:   F = eps                          D = x - sigma F
    x0:    F = x0                           D = F
    v:     F = alpha eps - s x0             D = (x - sigma F / alpha) / (1 + sigma**2)
    score: F = grad log p_t(x_t) = -eps/s   D = x + alpha sigma**2 F
    flow:  F = d x_t / dt = alpha' x0 + s' eps
           D = (s' alpha x - alpha sigma F) / (s' alpha - s alpha')

References:
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022
    (Table 1, Appendix B.6 for EDM preconditioning). Salimans & Ho, "Progressive Distillation", ICLR
    2022 (v-prediction). Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from scorekit._util import append_dims, as_sigma
from scorekit.process import Process, get_process

__all__ = [
    "PARAMETERIZATIONS",
    "EDMPrecond",
    "EpsPred",
    "FlowPred",
    "NetDenoiser",
    "Parameterization",
    "ScorePred",
    "VPred",
    "X0Pred",
    "build_denoiser",
    "data_scale",
    "get_parameterization",
]

Scalings = tuple[Tensor, Tensor, Tensor, Tensor]


class Parameterization(ABC):
    """How a raw network's output maps to the denoiser: ``D = c_skip x + c_out F(c_in x, c_noise)``."""

    name: str

    @abstractmethod
    def scalings(self, sigma: Tensor) -> Scalings:
        """``(c_skip, c_out, c_in, c_noise)``, each of ``sigma``'s shape ``[B]``."""

    def denoise(self, raw: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """The denoiser output from the network's raw output ``raw`` (shape of ``x``)."""
        c_skip, c_out, _, _ = self.scalings(sigma)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * raw

    def target(self, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        """The raw output that makes the denoiser return ``x0`` exactly: ``(x0 - c_skip x) / c_out``."""
        c_skip, c_out, _, _ = self.scalings(sigma)
        return (x0 - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim)


class _ProcessParam(Parameterization):
    """A parameterisation tied to a process: the network sees ``x_t = alpha x`` and ``t``."""

    def __init__(self, process: Process | str = "vp"):
        self.process = get_process(process)

    def _in(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return self.process.alpha_from_sigma(sigma), self.process.t(sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.process!r})"


class EpsPred(_ProcessParam):
    """The network predicts the noise: ``D = x - sigma F`` (Ho et al. 2020)."""

    name = "eps"

    def scalings(self, sigma):
        alpha, t = self._in(sigma)
        return torch.ones_like(sigma), -sigma, alpha, t


class X0Pred(_ProcessParam):
    """The network predicts the clean data: ``D = F``."""

    name = "x0"

    def scalings(self, sigma):
        alpha, t = self._in(sigma)
        return torch.zeros_like(sigma), torch.ones_like(sigma), alpha, t


class VPred(_ProcessParam):
    """The network predicts ``v = alpha eps - s x0`` (Salimans & Ho 2022).

    ``x0 = (alpha x_t - s v) / (alpha**2 + s**2)``, i.e. ``D = (x - sigma F / alpha) / (1 + sigma**2)``.
    """

    name = "v"

    def scalings(self, sigma):
        alpha, t = self._in(sigma)
        c_skip = 1 / (1 + sigma**2)
        return c_skip, -sigma * c_skip / alpha, alpha, t


class ScorePred(_ProcessParam):
    """The network predicts the score of ``x_t``: ``x0 = (x_t + s**2 F) / alpha``, ``D = x + alpha sigma**2 F``."""

    name = "score"

    def scalings(self, sigma):
        alpha, t = self._in(sigma)
        return torch.ones_like(sigma), alpha * sigma**2, alpha, t


class FlowPred(_ProcessParam):
    """The network predicts the velocity ``u = d x_t / dt = alpha' x0 + s' eps`` (flow matching).

    Solving ``x_t = alpha x0 + s eps`` and ``u`` for ``x0``:
    ``x0 = (s' x_t - s u) / (s' alpha - s alpha')``. For the linear interpolant ``u = eps - x0`` and
    ``x0 = x_t - t u``.
    """

    name = "flow"

    def __init__(self, process: Process | str = "flow"):
        super().__init__(process)

    def scalings(self, sigma):
        alpha, t = self._in(sigma)
        da, ds = self.process.derivatives(t)
        s = alpha * sigma
        det = ds * alpha - s * da
        return ds * alpha / det, -alpha * sigma / det, alpha, t


class EDMPrecond(Parameterization):
    """EDM's preconditioning (Karras et al. 2022, Table 1), independent of the process.

    ``c_skip = sd**2 / (sigma**2 + sd**2)``, ``c_out = sigma sd / sqrt(sigma**2 + sd**2)``,
    ``c_in = 1 / sqrt(sigma**2 + sd**2)``, ``c_noise = ln(sigma) / 4``; ``sd`` is the data's std.
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def scalings(self, sigma):
        sd2 = self.sigma_data**2
        norm = torch.rsqrt(sigma**2 + sd2)
        # ln(0) at sigma = 0 is -inf; clamp keeps the embedding finite where the output is unused.
        c_noise = torch.log(sigma.clamp(min=1e-20)) / 4
        return sd2 * norm**2, sigma * self.sigma_data * norm, norm, c_noise

    def __repr__(self) -> str:
        return f"EDMPrecond(sigma_data={self.sigma_data:g})"


#: Parameterisation name -> factory (``EDMPrecond`` takes ``sigma_data``; the others a process).
PARAMETERIZATIONS: dict[str, Callable[..., Parameterization]] = {
    "eps": EpsPred,
    "x0": X0Pred,
    "v": VPred,
    "score": ScorePred,
    "flow": FlowPred,
    "edm": EDMPrecond,
}


def get_parameterization(name: str | Parameterization, **kwargs) -> Parameterization:
    """Build a parameterisation by name (see ``PARAMETERIZATIONS``)."""
    if isinstance(name, Parameterization):
        return name
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {name!r}; allowed: {sorted(PARAMETERIZATIONS)}")
    return PARAMETERIZATIONS[name](**kwargs)


class NetDenoiser(nn.Module):
    """Wrap a raw network ``net(x_in [B, ...], c_noise [B], **cond)`` into a denoiser ``D(x, sigma, **cond)``.

    The result is a ``torch.nn.Module`` (so ``.to``, ``.eval`` and ``state_dict`` reach the network)
    and satisfies the denoiser contract of DESIGN.md. ``sigma_data`` (the data's RMS scale, default
    ``param``'s when it has one, as ``EDMPrecond``) is what ``data_scale`` reports for it.
    """

    def __init__(
        self, net: nn.Module | Callable, param: Parameterization, *, sigma_data: float | None = None
    ):
        super().__init__()
        self.net = net
        self.param = param
        if sigma_data is None:
            sigma_data = getattr(param, "sigma_data", None)
        self.sigma_data = None if sigma_data is None else float(sigma_data)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        sigma = as_sigma(sigma, x)
        _, _, c_in, c_noise = self.param.scalings(sigma)
        raw = self.net(append_dims(c_in, x.ndim) * x, c_noise, **cond)
        if raw.shape != x.shape:
            raise ValueError(
                f"the network returned shape {tuple(raw.shape)}, expected x's shape {tuple(x.shape)}"
            )
        return self.param.denoise(raw, x, sigma)


def build_denoiser(net: nn.Module, *, process: str, param: str, sigma_data: float) -> NetDenoiser:
    """Wrap a raw network as the denoiser of parameterisation ``param``.

    ``param = "edm"`` is EDM's preconditioning with the data's standard deviation ``sigma_data``
    (independent of the process); any other name is the process-tied adapter of ``PARAMETERIZATIONS``
    for the forward process ``process`` (a name of ``scorekit.process.PROCESSES``).
    """
    if param == "edm":
        return NetDenoiser(net, EDMPrecond(sigma_data))
    return NetDenoiser(
        net, get_parameterization(param, process=get_process(process)), sigma_data=sigma_data
    )


def data_scale(denoiser: Callable) -> float | None:
    """The RMS scale of the data ``denoiser`` was trained on, if it declares one: a positive finite
    ``sigma_data`` attribute (``NetDenoiser`` of an ``EDMPrecond`` or with ``sigma_data=``, scorekit's
    runs, ``from_diffusers`` models); ``None`` otherwise. ``scorekit.sample`` starts at
    ``min(80, 20 sigma_data)`` when it is known."""
    v = getattr(denoiser, "sigma_data", None)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"):
        return float(v)
    return None
