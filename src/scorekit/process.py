"""Forward noising processes, each mapped to the sigma frame.

A process adds noise as ``x_t = alpha(t) * x0 + s(t) * noise``. Dividing by ``alpha(t)`` gives the
sigma frame used everywhere else in scorekit::

    x = x_t / alpha(t),    sigma(t) = s(t) / alpha(t),    x = x0 + sigma * noise.

Only training and the network adapters (``scorekit.denoiser``) need ``t`` and ``alpha(t)``; samplers,
guidance and likelihoods see ``sigma`` alone. Every process gives ``sigma(t)``, ``alpha(t)``, its
inverse ``t(sigma)``, its range, its prior (``N(0, sigma_max**2 I)`` in the sigma frame) and the noise
levels it draws during training.

References:
    Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021
    (VP and VE). Nichol & Dhariwal, "Improved DDPM", ICML 2021 (cosine). Karras et al., "Elucidating
    the Design Space of Diffusion-Based Generative Models", NeurIPS 2022 (EDM, Table 1). Liu et al.,
    "Flow Straight and Fast", ICLR 2023 and Esser et al., "Scaling Rectified Flow Transformers", 2024
    (linear interpolant, logit-normal t). Ho et al., "DDPM", NeurIPS 2020 (discrete table).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims

__all__ = [
    "EDM",
    "PROCESSES",
    "VE",
    "DiscreteProcess",
    "Process",
    "RectifiedFlow",
    "VPCosine",
    "VPLinear",
    "get_process",
]


class Process(ABC):
    """A forward process ``x_t = alpha(t) x0 + s(t) noise`` seen in the sigma frame.

    Subclasses define ``sigma(t)``, ``alpha(t)``, ``t(sigma)`` and ``t_min`` / ``t_max``; everything
    else is derived here. All methods take and return tensors of any shape (elementwise).
    """

    name: str = "process"
    t_min: float
    t_max: float

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise level in the sigma frame, ``s(t) / alpha(t)``; increasing in ``t``."""

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale ``alpha(t)`` of the process's own frame."""

    @abstractmethod
    def t(self, sigma: Tensor) -> Tensor:
        """Inverse of ``sigma(t)``."""

    def s(self, t: Tensor) -> Tensor:
        """Noise scale ``s(t) = alpha(t) * sigma(t)`` of the process's own frame."""
        return self.alpha(t) * self.sigma(t)

    def alpha_from_sigma(self, sigma: Tensor) -> Tensor:
        """``alpha(t(sigma))``; processes where alpha is a closed form in sigma override this.

        The closed forms (``1 / sqrt(1 + sigma**2)`` for variance-preserving processes,
        ``1 / (1 + sigma)`` for the linear interpolant) avoid the float32 rounding of the round
        trip through ``t`` (``1 - t`` near ``t = 1`` loses digits).
        """
        return self.alpha(self.t(sigma))

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(d alpha / dt, d s / dt)`` at ``t``.

        The built-in processes override this with closed forms; this fallback differentiates
        ``alpha`` and ``s`` by autograd, and works under ``torch.no_grad`` and
        ``torch.inference_mode`` too (where a plain autograd call would silently give zeros).
        """

        def grad(fn):
            with torch.inference_mode(False), torch.enable_grad():
                tt = t.detach().clone().requires_grad_(True)
                out = fn(tt)
                if not out.requires_grad:  # constant in t (alpha = 1 for VE and EDM)
                    return torch.zeros_like(tt).detach()
                return torch.autograd.grad(out.sum(), tt)[0]

        return grad(self.alpha), grad(self.s)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def to_frame(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Map a noised sample of the process's own frame to ``(x, sigma)``; ``t`` is ``[B]``."""
        return x_t / append_dims(self.alpha(t), x_t.ndim), self.sigma(t)

    def from_frame(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``(x, sigma)`` of the sigma frame back to ``(x_t, t)``; ``sigma`` is ``[B]``."""
        t = self.t(sigma)
        return x * append_dims(self.alpha(t), x.ndim), t

    def prior(self, shape, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
        """A draw from the prior in the sigma frame, ``N(0, sigma_max**2 I)``."""
        return self.sigma_max * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def training_sigma(self, n: int, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
        """The noise levels ``[n]`` this process draws during training (default: ``t`` uniform)."""
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.sigma(self.t_min + (self.t_max - self.t_min) * u).to(dtype)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(t in [{self.t_min:g}, {self.t_max:g}], "
            f"sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}])"
        )


class VPLinear(Process):
    """Variance-preserving process with linear ``beta(t) = beta_min + t (beta_max - beta_min)``.

    ``log alpha(t) = -t**2 (beta_max - beta_min) / 4 - t beta_min / 2`` and
    ``sigma(t) = sqrt(expm1(t**2 (beta_max - beta_min) / 2 + t beta_min))`` (Song et al. 2021, eq. 33;
    EDM Table 1).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        if not 0 <= beta_min < beta_max:
            raise ValueError(
                f"need 0 <= beta_min < beta_max; got beta_min={beta_min}, beta_max={beta_max}"
            )
        self.beta_min, self.beta_d = float(beta_min), float(beta_max - beta_min)
        self.t_min, self.t_max = float(t_min), 1.0

    def _log_snr_inv(self, t: Tensor) -> Tensor:  # log(1 + sigma**2) = -2 log alpha
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def sigma(self, t):
        return torch.expm1(self._log_snr_inv(t)).sqrt()

    def alpha(self, t):
        return torch.exp(-0.5 * self._log_snr_inv(t))

    def t(self, sigma):
        big_l = torch.log1p(sigma**2)
        # Root of beta_d/2 t^2 + beta_min t - L = 0, in the form without cancellation.
        return 2 * big_l / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self.beta_d * big_l))

    def derivatives(self, t):
        # alpha = exp(-L/2), s^2 = 1 - alpha^2 with L' = beta(t): alpha' = -L' alpha / 2, s' = alpha^2 L' / (2 s).
        dl = self.beta_min + self.beta_d * t
        alpha = self.alpha(t)
        s = torch.sqrt(-torch.expm1(-self._log_snr_inv(t)))
        return -0.5 * dl * alpha, 0.5 * alpha**2 * dl / s

    def alpha_from_sigma(self, sigma):
        return torch.rsqrt(1 + sigma**2)


class VPCosine(Process):
    """Variance-preserving cosine schedule ``alpha(t)**2 = f(t) / f(0)``, ``f(t) = cos((t+s)/(1+s) pi/2)**2``.

    ``t_max`` stays below 1, where ``sigma`` is infinite (Nichol & Dhariwal 2021).
    """

    name = "vp_cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-4, t_max: float = 0.9946):
        if not 0 <= t_min < t_max < 1:
            raise ValueError(f"need 0 <= t_min < t_max < 1; got t_min={t_min}, t_max={t_max}")
        self.s_offset = float(s)
        self.f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
        self.t_min, self.t_max = float(t_min), float(t_max)

    def _angle(self, t):
        return (t + self.s_offset) / (1 + self.s_offset) * (math.pi / 2)

    def alpha(self, t):
        return torch.cos(self._angle(t)) / math.sqrt(self.f0)

    def sigma(self, t):
        # sqrt(1/alpha^2 - 1) = sqrt(f0 - cos^2) / cos, with f0 - cos^2 = sin^2 - (1 - f0).
        c = torch.cos(self._angle(t))
        return torch.sqrt(torch.clamp(torch.sin(self._angle(t)) ** 2 - (1 - self.f0), min=0)) / c

    def t(self, sigma):
        # tan(angle) = sqrt(sigma^2 + 1 - f0) / sqrt(f0): atan2 is accurate at both ends.
        ang = torch.atan2(
            torch.sqrt(sigma**2 + (1 - self.f0)), torch.full_like(sigma, self.f0).sqrt()
        )
        return ang * (2 * (1 + self.s_offset) / math.pi) - self.s_offset

    def derivatives(self, t):
        # alpha' = -sin(angle) angle' / sqrt(f0); s^2 = 1 - alpha^2 gives s' = -alpha alpha' / s.
        dang = math.pi / (2 * (1 + self.s_offset))
        alpha = self.alpha(t)
        da = -torch.sin(self._angle(t)) * dang / math.sqrt(self.f0)
        return da, -alpha * da / self.s(t)

    def alpha_from_sigma(self, sigma):
        return torch.rsqrt(1 + sigma**2)


class VE(Process):
    """Variance-exploding process ``sigma(t) = sigma_min (sigma_max / sigma_min)**t``, ``alpha = 1``."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self._smin, self._log_ratio = float(sigma_min), math.log(sigma_max / sigma_min)
        self.t_min, self.t_max = 0.0, 1.0

    def sigma(self, t):
        return self._smin * torch.exp(t * self._log_ratio)

    def alpha(self, t):
        return torch.ones_like(t)

    def t(self, sigma):
        return torch.log(sigma / self._smin) / self._log_ratio

    def derivatives(self, t):
        return torch.zeros_like(t), self.sigma(t) * self._log_ratio

    def alpha_from_sigma(self, sigma):
        return torch.ones_like(sigma)


class EDM(Process):
    """EDM's process: ``sigma(t) = t``, ``alpha = 1``; training draws ``ln sigma ~ N(P_mean, P_std**2)``."""

    name = "edm"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sigma(self, t):
        return t

    def alpha(self, t):
        return torch.ones_like(t)

    def t(self, sigma):
        return sigma

    def derivatives(self, t):
        return torch.zeros_like(t), torch.ones_like(t)

    def alpha_from_sigma(self, sigma):
        return torch.ones_like(sigma)

    def training_sigma(self, n, *, generator=None, device=None, dtype=torch.float32):
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        return torch.exp(self.p_mean + self.p_std * z).to(dtype)


class RectifiedFlow(Process):
    """Linear interpolant ``x_t = (1 - t) x0 + t noise``: ``sigma = t / (1 - t)``, ``t = sigma / (1 + sigma)``.

    Training draws ``t`` logit-normal, ``logit(t) ~ N(m, s**2)`` (Esser et al. 2024, section 3.1).
    """

    name = "flow"

    def __init__(
        self,
        t_min: float = 1e-3,
        t_max: float = 1 - 1e-3,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1; got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def sigma(self, t):
        return t / (1 - t)

    def alpha(self, t):
        return 1 - t

    def t(self, sigma):
        return sigma / (1 + sigma)

    def derivatives(self, t):
        return -torch.ones_like(t), torch.ones_like(t)

    def alpha_from_sigma(self, sigma):
        return 1 / (1 + sigma)

    def training_sigma(self, n, *, generator=None, device=None, dtype=torch.float32):
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        t = torch.sigmoid(self.logit_mean + self.logit_std * z).clamp(self.t_min, self.t_max)
        return self.sigma(t).to(dtype)


class DiscreteProcess(Process):
    """A DDPM-style table of ``alphas_cumprod`` (the form most published checkpoints use).

    ``sigma_i = sqrt((1 - abar_i) / abar_i)`` at integer steps ``i = 0 .. N-1``; between steps,
    ``log sigma`` is interpolated linearly in ``t`` so that ``t(sigma)`` is continuous and exact at the
    table's entries. ``alpha(t) = 1 / sqrt(1 + sigma(t)**2)``. Training draws integer steps uniformly.
    """

    name = "ddpm"

    def __init__(self, alphas_cumprod: Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2:
            raise ValueError(f"alphas_cumprod needs at least 2 entries, got {ac.numel()}")
        if not ((ac > 0) & (ac < 1)).all() or not (ac[1:] < ac[:-1]).all():
            raise ValueError("alphas_cumprod must lie in (0, 1) and strictly decrease")
        self.alphas_cumprod = ac
        self.log_sigmas = 0.5 * torch.log((1 - ac) / ac)
        self.t_min, self.t_max = 0.0, float(ac.numel() - 1)

    @classmethod
    def from_betas(cls, betas: Tensor) -> DiscreteProcess:
        return cls(torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0))

    @classmethod
    def linear(
        cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> DiscreteProcess:
        """DDPM's linear beta table (Ho et al. 2020)."""
        return cls.from_betas(torch.linspace(beta_start, beta_end, n, dtype=torch.float64))

    @classmethod
    def scaled_linear(
        cls, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> DiscreteProcess:
        """Latent-diffusion's table: betas linear in sqrt."""
        b = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        return cls.from_betas(b)

    def sigma(self, t):
        ls = self.log_sigmas.to(device=t.device, dtype=t.dtype)
        tc = t.clamp(self.t_min, self.t_max)
        lo = tc.floor().long().clamp(max=len(ls) - 2)
        w = tc - lo.to(t.dtype)
        return torch.exp(torch.lerp(ls[lo], ls[lo + 1], w))

    def alpha(self, t):
        return torch.rsqrt(1 + self.sigma(t) ** 2)

    def t(self, sigma):
        ls = self.log_sigmas.to(device=sigma.device, dtype=sigma.dtype)
        log_s = sigma.log().clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_s.contiguous()).clamp(1, len(ls) - 1)
        lo = hi - 1
        w = (log_s - ls[lo]) / (ls[hi] - ls[lo])
        return lo.to(sigma.dtype) + w

    def derivatives(self, t):
        # Within step [i, i+1]: sigma' = sigma (log_sigma_{i+1} - log_sigma_i); with
        # alpha = (1 + sigma^2)^(-1/2): alpha' = -alpha^3 sigma sigma', s' = alpha^3 sigma'.
        # At an integer t this is the slope of the step that starts there (the last step at t_max).
        ls = self.log_sigmas.to(device=t.device, dtype=t.dtype)
        lo = t.clamp(self.t_min, self.t_max).floor().long().clamp(max=len(ls) - 2)
        sigma = self.sigma(t)
        dsigma = sigma * (ls[lo + 1] - ls[lo])
        a3 = self.alpha(t) ** 3
        return -a3 * sigma * dsigma, a3 * dsigma

    def alpha_from_sigma(self, sigma):
        return torch.rsqrt(1 + sigma**2)

    def training_sigma(self, n, *, generator=None, device=None, dtype=torch.float32):
        i = torch.randint(0, len(self.log_sigmas), (n,), generator=generator, device=device)
        return self.log_sigmas.to(device)[i].exp().to(dtype)


#: Process name -> factory. ``get_process(name, **kwargs)`` passes keyword arguments through.
PROCESSES: dict[str, Callable[..., Process]] = {
    "vp": VPLinear,
    "vp_cosine": VPCosine,
    "ve": VE,
    "edm": EDM,
    "flow": RectifiedFlow,
    "ddpm": DiscreteProcess.linear,
    "ddpm_scaled_linear": DiscreteProcess.scaled_linear,
}


def get_process(name: str | Process, **kwargs) -> Process:
    """Build a process by name (see ``PROCESSES``); a ``Process`` instance is returned as is."""
    if isinstance(name, Process):
        return name
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; allowed: {sorted(PROCESSES)}")
    return PROCESSES[name](**kwargs)
