"""Peer posterior samplers (deepinv, azula) on the bench's exact problems: an optional benchmark extra.

azula 0.11.1 was run here (``pip install --no-deps azula einops``: its core needs only torch and
einops; torchvision and gdown are for its pretrained-model plugins and hub, which this adapter does not
import). deepinv was not installed (it needs torchvision, which here would come as a CUDA build
replacing the CPU torch). Each
adapter is checked first with ``prior_check`` (an uninformative measurement, ``A = 0``, must reproduce
prior samples: sliced W2 near the exact-vs-exact floor), which tests the noise mapping below before any
posterior number is trusted (tests/test_inverse_bench.py). ``available()`` names what is missing;
``scorekit bench inverse --peers`` prints that and skips.

How each library's noise parameterisation maps to scorekit's sigma frame (``x = x0 + sigma n``,
``D(x, sigma) = E[x0 | x]``; DESIGN.md):

* **azula** perturbs ``x_t = alpha_t x0 + sigma_t eps`` with a ``Schedule`` returning ``(alpha_t,
  sigma_t)`` for ``t`` in [0, 1]; a denoiser maps ``(x_t, t)`` to a posterior whose ``mean`` is
  ``E[x0 | x_t]``. Dividing by ``alpha_t``: ``x_t / alpha_t = x0 + (sigma_t / alpha_t) eps``, so the
  wrapper returns ``DiracPosterior(D(x_t / alpha_t, sigma_t / alpha_t))``. The schedule is azula's own
  ``VESchedule(sigma_min, sigma_max)`` (``alpha = 1``, sigma log-linear in ``t``), so scorekit's sigma
  is azula's ``sigma_t``; its samplers step ``t`` uniformly from 1 to 0 (``steps = NFE``, one
  denoiser call each) and end at ``sigma_min = 2e-3`` without a final denoising. Peers: MMPS, TMPD and
  DiffPIR (guided denoisers, their default options) under ``DDPMSampler``; PiGDM (``PGDMSampler``,
  DDIM with ``eta = 0``, ``A_inv = pinv(A)``); TDS (``TDSSampler``), which treats the whole batch as
  one particle system for one measurement, so its ``n`` samples are one resampled population (cost
  per sample = steps), twisted here by PiGDM's Gaussian likelihood. azula's DPS is not run: its step
  normalises by the norm of the whole batch's residual, so samples are coupled through the batch.
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

import torch

__all__ = ["PEERS", "available", "prior_check", "run_peer"]

#: peer name -> (library, what it runs)
PEERS = {
    "azula-mmps": (
        "azula",
        "azula.guidance.MMPSDenoiser (its defaults: GMRES, 1 iteration) + DDPMSampler",
    ),
    "azula-tmpd": ("azula", "azula.guidance.TMPDenoiser + azula.sample.DDPMSampler"),
    "azula-diffpir": ("azula", "azula.guidance.DiffPIRDenoiser (lmbda 10, GMRES 1) + DDPMSampler"),
    "azula-pgdm": ("azula", "azula.guidance.PGDMSampler (DDIM, eta 0; A_inv = pinv(A))"),
    "azula-tds": ("azula", "azula.guidance.TDSSampler, the n samples as one particle system"),
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


def _azula(kind: str, prior, y, A, sy: float, x1: torch.Tensor, nfe: int, smin: float, smax: float):
    """One azula 0.11 sampler: ``nfe`` steps of its log-linear VE time grid, one denoiser call each."""
    from azula.denoise import Denoiser, DiracPosterior
    from azula.guidance import DiffPIRDenoiser, MMPSDenoiser, PGDMSampler, TDSSampler, TMPDenoiser
    from azula.linalg.covariance import IsotropicCovariance
    from azula.noise import VESchedule
    from azula.sample import DDPMSampler

    class Exact(Denoiser):  # azula's (x_t, t) -> posterior, from scorekit's D(x, sigma)
        def __init__(self):
            super().__init__()
            self.schedule = VESchedule(sigma_min=smin, sigma_max=smax)

        def forward(self, x_t, t, **kwargs):
            alpha, sigma = self.schedule(t)
            s = (sigma / alpha).reshape(-1).expand(x_t.shape[0])
            return DiracPosterior(mean=prior(x_t / alpha, s))

    def op(x):
        return x @ A.T

    base, kw = Exact(), {"steps": nfe, "silent": True, "dtype": x1.dtype}
    if kind == "azula-mmps":
        cov_y = IsotropicCovariance(sy * sy)
        return DDPMSampler(MMPSDenoiser(base, y, op, cov_y), **kw)(x1)
    if kind == "azula-tmpd":
        return DDPMSampler(TMPDenoiser(base, y, op, sy * sy), **kw)(x1)
    if kind == "azula-diffpir":
        return DDPMSampler(DiffPIRDenoiser(base, y, op, sy * sy), **kw)(x1)
    if kind == "azula-pgdm":
        pinv = torch.linalg.pinv(A)
        return PGDMSampler(base, y, op, lambda v: v @ pinv.T, **kw)(x1)
    # TDS: all rows are one particle system for the one measurement (azula's design); the twist is
    # PiGDM's Gaussian log N(y; A x_hat, sy^2 I + r^2 A A^T), r^2 = s^2 / (1 + s^2) (unit-scale data)
    gram = A @ A.T
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)

    def twist(x_hat, s):
        r = y - op(x_hat)
        cov = sy * sy * eye + (s * s / (1 + s * s)) * gram
        return -0.5 * r * torch.linalg.solve(cov, r.T).T

    return TDSSampler(base, twist, **kw)(x1)


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
        torch.manual_seed(seed)  # azula draws from the global generator
        return _azula(name, prior, ys, A, sy, x1, nfe, sigma_min, sigma_max)
    return _deepinv(name, prior, ys, A, sy, x1, nfe)


def prior_check(name: str, prior, n: int = 1000, nfe: int = 100) -> tuple[float, float]:
    """``(sliced W2 of the peer's samples with A = 0 to prior samples, exact-vs-exact floor)``."""
    from scorekit.metrics import sliced_wasserstein

    d = prior.means.shape[1]
    A = torch.zeros(1, d, dtype=prior.means.dtype)
    out = run_peer(name, prior, torch.zeros(1, dtype=A.dtype), A, 1.0, n, nfe).reshape(n, d)
    ref = [prior.sample(n, torch.Generator().manual_seed(10 + i)) for i in range(2)]
    return float(sliced_wasserstein(out, ref[0])), float(sliced_wasserstein(ref[1], ref[0]))
