"""Training losses in the sigma frame: weighted denoising score matching and flow matching.

Every loss here is one equation. For data ``x0 [B, ...]``, noise levels ``sigma [B]`` drawn from the
process's training distribution and noise ``n ~ N(0, I)``::

    L(x0) = w(sigma) * mean_i (D(x0 + sigma n, sigma)_i - x0_i)**2          (per example, shape [B])

The minimiser over all functions is Tweedie's ``D = E[x0 | x]`` for any positive weighting ``w``;
the weighting only decides which noise levels the finite network is best at. ``w`` is a function of
sigma named in ``WEIGHTINGS`` (the only place loss weights are defined); each parameterisation has a
default (``default_weighting``), which is the plain MSE of its network's output for the process
pairings listed there.

References:
    Vincent, "A Connection Between Score Matching and Denoising Autoencoders", Neural Computation 2011.
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022
    (eq. 2 and Table 1: loss weighting lambda(sigma) and the noise distribution p_train).
    Kingma & Gao, "Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation",
    NeurIPS 2023 (weightings as functions of the log-SNR). Lipman et al., "Flow Matching for Generative
    Modeling", ICLR 2023; Liu et al., "Flow Straight and Fast", ICLR 2023 (rectified flow).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims

__all__ = [
    "WEIGHTINGS",
    "default_weighting",
    "denoising_loss",
    "drop_labels",
    "flow_matching_loss",
    "get_weighting",
    "guidance_free_loss",
]


def _eps(sigma: Tensor, sigma_data: float) -> Tensor:
    # eps-MSE: D = x - sigma eps_hat, so |eps_hat - eps|^2 = |D - x0|^2 / sigma^2.
    return sigma**-2


def _x0(sigma: Tensor, sigma_data: float) -> Tensor:
    return torch.ones_like(sigma)


def _v(sigma: Tensor, sigma_data: float) -> Tensor:
    # v = alpha eps - s x0 with alpha = 1/sqrt(1 + sigma^2) (VP): |v_hat - v|^2 = (1 + sigma^2)/sigma^2 |D - x0|^2.
    return (1 + sigma**2) / sigma**2


def _edm(sigma: Tensor, sigma_data: float) -> Tensor:
    # lambda = 1 / c_out^2 = (sigma^2 + sd^2) / (sigma sd)^2 (EDM eq. 8 / Table 1).
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _flow(sigma: Tensor, sigma_data: float) -> Tensor:
    # Linear interpolant, t = sigma/(1+sigma): |u_hat - u|^2 = |D - x0|^2 / t^2 (see flow_matching_loss).
    return ((1 + sigma) / sigma) ** 2


#: Weighting name -> ``w(sigma, sigma_data)``: the one source of the loss weight. Each is a function of
#: sigma (and the data's std ``sd``) alone, the same under every process; ``default_weighting(param)``
#: names the one training uses for a parameterisation unless ``--weighting`` says otherwise. What
#: ``w |D - x0|^2`` equals, with ``F`` the network's output and ``F*`` its target
#: (``Parameterization.target``; ``c_out`` of ``scorekit.denoiser``, ``|D - x0| = |c_out| |F - F*|``):
#:
#: - ``eps``, 1 / sigma^2 (default for ``eps`` and ``score``): the ``eps`` MSE under every process
#:   (``c_out = -sigma``); for ``score``, ``s(t)^2 |F - F*|^2`` (Song et al. 2021, eq. 7, lambda = s^2),
#:   not the plain score MSE.
#: - ``x0``, 1 (default for ``x0``): the ``x0`` MSE under every process (``c_out = 1``).
#: - ``v``, (1 + sigma^2) / sigma^2 = SNR + 1 (default for ``v``): the ``v`` MSE under the
#:   variance-preserving processes only (``vp``, ``vp_cosine``, ``ddpm``, ``ddpm_scaled_linear``:
#:   alpha^2 + s^2 = 1); under ``ve``, ``edm`` and ``flow`` the ``v`` MSE would be
#:   alpha^2 (1 + sigma^2)^2 / sigma^2.
#: - ``edm``, (sigma^2 + sd^2) / (sigma sd)^2 (default for ``edm``): the MSE of EDM's preconditioned
#:   network under every process (its ``c_out`` ignores the process; EDM eq. 8).
#: - ``flow``, ((1 + sigma) / sigma)^2 = 1 / t^2 (default for ``flow``): the velocity MSE under the
#:   linear interpolant (the ``flow`` process, t = sigma / (1 + sigma)) only; under another process the
#:   velocity MSE would be (s' alpha - s alpha')^2 / s^2.
#:
#: Where a pair is not listed the loss is still a valid DSM objective with the same minimiser
#: (``E[x0 | x]``); only the weight across noise levels differs from the network's own MSE.
WEIGHTINGS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "eps": _eps,
    "x0": _x0,
    "v": _v,
    "edm": _edm,
    "flow": _flow,
}


def get_weighting(name: str) -> Callable[[Tensor, float], Tensor]:
    """The weighting ``w(sigma, sigma_data)`` called ``name`` (see ``WEIGHTINGS``)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; allowed: {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name]


def drop_labels(labels: Tensor, p: float, u: Tensor) -> Tensor:
    """Replace each label by ``-1`` (the 'no label' class) where ``u < p``; ``u [B]`` uniform in [0, 1).

    Training with dropped labels teaches the same network the unconditional denoiser, which
    classifier-free guidance needs (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2021, Alg. 1).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout p must lie in [0, 1], got {p}")
    return torch.where(u < p, torch.full_like(labels, -1), labels)


def denoising_loss(
    denoiser: Callable[..., Tensor],
    x0: Tensor,
    sigma: Tensor,
    noise: Tensor,
    *,
    weighting: str = "edm",
    sigma_data: float = 0.5,
    **cond,
) -> Tensor:
    """Weighted denoising score matching, per example: ``w(sigma) * mean (D(x0 + sigma n, sigma) - x0)**2``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B], **cond) -> [B, ...]``, e.g. a ``NetDenoiser``.
        x0: clean data ``[B, ...]``.
        sigma: noise levels ``[B]``, e.g. ``process.training_sigma(B)``.
        noise: standard normal noise of ``x0``'s shape.
        weighting: a name of ``WEIGHTINGS``.
        sigma_data: the data's standard deviation (used by the ``edm`` weighting).
        **cond: conditioning passed to the denoiser (``class_labels=...``).

    Returns:
        The loss of each example, ``[B]``; the training objective is its mean.
    """
    w = get_weighting(weighting)(sigma, sigma_data)
    x = x0 + append_dims(sigma, x0.ndim) * noise
    err = denoiser(x, sigma, **cond) - x0
    return w * err.square().flatten(1).mean(1)


def guidance_free_loss(
    denoiser: Callable[..., Tensor],
    x0: Tensor,
    sigma: Tensor,
    noise: Tensor,
    *,
    class_labels: Tensor,
    scale: float,
    weighting: str = "edm",
    sigma_data: float = 0.5,
    reference: Callable[..., Tensor] | None = None,
) -> Tensor:
    """Guidance-free training (model guidance): the target of a labelled row is the guided denoiser.

    With ``x = x0 + sigma n``, the stop-gradient outputs ``D(x, y)`` and ``D(x, -1)`` of the model
    itself (or of ``reference``) and ``w = 1 - 1 / scale``:

        target = x0 + w (D(x, y) - D(x, -1)),      L = w(sigma) mean (D(x, y) - target)^2

    (rows whose label is dropped to -1 have ``D(x, y) = D(x, -1)``: the plain target ``x0``). At the
    fixed point, with ``D_c = E[x0 | x, y]`` and ``D_u = E[x0 | x]`` learnt by the dropped rows,
    ``D(x, y) = D_c + w (D(x, y) - D_u)``, i.e. ``D(x, y) = D_u + scale (D_c - D_u)``: the CFG denoiser
    of ``scale``, in one network call at sampling time. (Tang et al. write it for eps with
    ``eps* = eps + w (eps(x, c) - eps(x, 0))``, whose fixed point is CFG of scale ``1 / (1 - w)``.)

    Cost: 2 extra forward passes without gradient per training step.

    References:
        Tang et al., "Diffusion Models without Classifier-free Guidance", 2025 (Model-guidance, eq. 8).
    """
    if not scale >= 1:
        raise ValueError(f"guidance-free scale must be >= 1 (1: plain conditional); got {scale!r}")
    x = x0 + append_dims(sigma, x0.ndim) * noise
    ref = reference if reference is not None else denoiser
    with torch.no_grad():
        d_c = ref(x, sigma, class_labels=class_labels)
        d_u = ref(x, sigma, class_labels=torch.full_like(class_labels, -1))
    target = x0 + (1.0 - 1.0 / scale) * (d_c - d_u).to(x0.dtype)
    err = denoiser(x, sigma, class_labels=class_labels) - target
    return get_weighting(weighting)(sigma, sigma_data) * err.square().flatten(1).mean(1)


def flow_matching_loss(
    velocity: Callable[..., Tensor], x0: Tensor, t: Tensor, noise: Tensor, **cond
) -> Tensor:
    """Conditional flow matching for the linear interpolant, per example ``mean (v(x_t, t) - (n - x0))**2``.

    ``x_t = (1 - t) x0 + t n`` and the conditional velocity is ``u = dx_t/dt = n - x0`` (rectified flow).
    In the sigma frame, ``sigma = t / (1 - t)``, ``x = x_t / (1 - t) = x0 + sigma n``, and the velocity
    network defines a denoiser by ``D = x_t - t v`` (``scorekit.denoiser.FlowPred``), so

        v - u = (x_t - D)/t - (x_t - x0)/t = -(D - x0) / t,
        |v - u|^2 = |D - x0|^2 / t^2 = ((1 + sigma) / sigma)^2 |D - x0|^2,

    i.e. flow matching is ``denoising_loss`` with the ``flow`` weighting, and logit-normal ``t``
    (``RectifiedFlow.training_sigma``) is a noise-level distribution like any other.

    Args:
        velocity: the raw network ``v(x_t [B, ...], t [B], **cond) -> [B, ...]``.
        x0: clean data ``[B, ...]``; t: times ``[B]`` in (0, 1); noise: standard normal like ``x0``.

    Returns:
        The loss of each example, ``[B]``.

    References:
        Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023 (eq. 23, the OT path with
        sigma_min = 0); Liu et al., "Flow Straight and Fast", ICLR 2023 (eq. 1).
    """
    tt = append_dims(t, x0.ndim)
    x_t = (1 - tt) * x0 + tt * noise
    return (velocity(x_t, t, **cond) - (noise - x0)).square().flatten(1).mean(1)


def default_weighting(param: str) -> str:
    """The weighting training uses for parameterisation ``param`` (see the table at ``WEIGHTINGS``).

    Its own name, except ``score -> eps``: Song et al. (ICLR 2021, eq. 7) weight the score-matching
    loss by ``lambda = s(t)**2``, which turns ``|F - score|^2`` into the eps-MSE. It is the plain MSE of
    the network's output for the pairs the table lists (e.g. ``v`` only under VP-type processes).
    """
    if param == "score":
        return "eps"
    if param not in WEIGHTINGS:
        raise ValueError(
            f"no default weighting for parameterization {param!r}; allowed: {sorted(WEIGHTINGS)}"
        )
    return param
