"""Peer posterior samplers (deepinv, azula) on the bench's exact problems: an optional benchmark extra.

**Not run in scorekit's own environment** (neither library is installed there; deepinv needs
torchvision built for a CUDA torch): this adapter is written against the libraries' documented APIs
and must be checked where they are installed, first with ``prior_check`` (an uninformative
measurement, ``A = 0``, must reproduce prior samples: sliced W2 near the exact-vs-exact floor), which
tests the noise mapping below before any posterior number is trusted. ``available()`` names what is
missing; ``scorekit bench inverse --peers`` prints that and skips.

How each library's noise parameterisation maps to scorekit's sigma frame (``x = x0 + sigma n``,
``D(x, sigma) = E[x0 | x]``; DESIGN.md):

* **azula** perturbs ``x_t = alpha_t x0 + sigma_t eps`` with a ``Schedule`` returning ``(alpha_t,
  sigma_t)`` for ``t`` in [0, 1], and its denoisers map ``(x_t, t)`` to ``E[x0 | x_t]`` (a ``Gaussian``
  with ``mean`` and ``var`` in recent versions). Dividing by ``alpha_t``: ``x_t / alpha_t = x0 +
  (sigma_t / alpha_t) eps``, so the wrapper returns ``D(x_t / alpha_t, sigma_t / alpha_t)``. The
  schedule used here is variance exploding (``alpha = 1``), log-linear in sigma from ``sigma_max`` at
  ``t = 1`` to ``sigma_min`` at ``t = 0``, so scorekit's sigma is azula's ``sigma_t`` itself; ``var`` is
  ``sigma^2 / (1 + sigma^2)`` (the variance of ``x0 | x`` for a unit-variance Gaussian prior, what
  azula's Gaussian denoisers report for data of unit scale). MMPS: ``azula.guidance.MMPSDenoiser(
  denoiser, y, A, var_y = sigma_y^2)`` sampled by ``azula.sample.DDPMSampler(steps = NFE)``.
* **deepinv** denoisers are called ``model(x, sigma)`` on ``x = x0 + sigma n`` (variance exploding,
  the same frame), so the exact denoiser is passed as it is; its diffusion samplers (``DiffPIR``,
  ``DPS``) run a DDPM schedule internally and convert ``alpha_bar`` to ``sigma = sqrt(1 -
  alpha_bar) / sqrt(alpha_bar)`` before calling the model. They assume image data in [0, 1] (rescaled
  inside to [-1, 1]); the bench's mixtures are centred with unit variance, which is why
  ``prior_check`` must pass before the numbers mean anything. The measurement is a
  ``deepinv.physics.LinearPhysics(A, A_adjoint, noise_model=GaussianNoise(sigma_y))``.
"""

from __future__ import annotations

import importlib
import math

import torch

__all__ = ["PEERS", "available", "prior_check", "run_peer"]

#: peer name -> (library, what it runs)
PEERS = {
    "azula-mmps": ("azula", "azula.guidance.MMPSDenoiser + azula.sample.DDPMSampler"),
    "deepinv-diffpir": ("deepinv", "deepinv.sampling.DiffPIR"),
    "deepinv-dps": ("deepinv", "deepinv.sampling.DPS"),
}


def available() -> dict[str, str | None]:
    """Library -> installed version, or None when it cannot be imported."""
    out = {}
    for lib in sorted({lib for lib, _ in PEERS.values()}):
        try:
            out[lib] = getattr(importlib.import_module(lib), "__version__", "unknown")
        except ImportError:
            out[lib] = None
    return out


def _azula(prior, y, A, sy: float, x1: torch.Tensor, nfe: int, smin: float, smax: float):
    import azula.denoise as adn
    from azula.guidance import MMPSDenoiser
    from azula.noise import Schedule
    from azula.sample import DDPMSampler

    class LogLinearVE(Schedule):
        def forward(self, t):
            sigma = torch.exp(math.log(smin) + t * (math.log(smax) - math.log(smin)))
            return torch.ones_like(sigma), sigma

    class Exact(adn.GaussianDenoiser):
        def __init__(self):
            super().__init__()
            self._schedule = LogLinearVE()

        @property
        def schedule(self):
            return self._schedule

        def forward(self, x_t, t, **kwargs):
            alpha, sigma = self._schedule(t)
            s = (sigma / alpha).reshape(-1).expand(x_t.shape[0])
            mean = prior(x_t / alpha, s)
            var = (sigma / alpha) ** 2 / (1 + (sigma / alpha) ** 2)
            return adn.Gaussian(mean=mean, var=var * torch.ones_like(mean))

    guided = MMPSDenoiser(
        Exact(), y, lambda x: x @ A.T, torch.tensor(sy * sy), solver="cg", iterations=4
    )
    return DDPMSampler(guided, steps=nfe)(x1)


def _deepinv(kind: str, prior, y, A, sy: float, x1: torch.Tensor, nfe: int):
    import deepinv as dinv

    physics = dinv.physics.LinearPhysics(
        A=lambda x: x @ A.T,
        A_adjoint=lambda v: v @ A,
        noise_model=dinv.physics.GaussianNoise(sigma=sy),
    )

    class Exact(torch.nn.Module):
        def forward(self, x, sigma):
            s = (
                torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
                .reshape(-1)
                .expand(x.shape[0])
            )
            return prior(x, s)

    fidelity = dinv.optim.data_fidelity.L2()
    if kind == "deepinv-diffpir":
        sampler = dinv.sampling.DiffPIR(Exact(), data_fidelity=fidelity, sigma=sy, max_iter=nfe)
    else:
        sampler = dinv.sampling.DPS(Exact(), data_fidelity=fidelity, max_iter=nfe)
    return sampler(y, physics)


def run_peer(name: str, prior, y, A, sy: float, n: int, nfe: int, *, seed: int = 0,
             sigma_min: float = 2e-3, sigma_max: float = 80.0) -> torch.Tensor:  # fmt: skip
    """``n`` samples ``[n, d]`` of peer ``name`` for one measurement ``y`` ``[m]`` with matrix ``A``."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; allowed: {sorted(PEERS)}")
    lib = PEERS[name][0]
    if available()[lib] is None:
        raise ModuleNotFoundError(f"{name} needs {lib}, which is not installed (pip install {lib})")
    g = torch.Generator().manual_seed(seed)
    x1 = sigma_max * torch.randn(n, A.shape[1], generator=g, dtype=A.dtype)
    ys = y.expand(n, -1)
    if lib == "azula":
        return _azula(prior, ys, A, sy, x1, nfe, sigma_min, sigma_max)
    return _deepinv(name, prior, ys, A, sy, x1, nfe)


def prior_check(name: str, prior, n: int = 1000, nfe: int = 100) -> tuple[float, float]:
    """``(sliced W2 of the peer's samples with A = 0 to prior samples, exact-vs-exact floor)``."""
    from scorekit.metrics import sliced_wasserstein

    d = prior.means.shape[1]
    A = torch.zeros(1, d, dtype=prior.means.dtype)
    out = run_peer(name, prior, torch.zeros(1, dtype=A.dtype), A, 1.0, n, nfe).reshape(n, d)
    ref = [prior.sample(n, torch.Generator().manual_seed(10 + i)) for i in range(2)]
    return float(sliced_wasserstein(out, ref[0])), float(sliced_wasserstein(ref[1], ref[0]))
