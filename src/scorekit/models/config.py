"""A diffusers scheduler config (plain JSON) mapped to scorekit's process and parameterisation.

No diffusers import here: the config is read as a dict and every table is rebuilt by the formulas
below, so the mapping is checked against diffusers' own schedulers in the tests, not copied from them.

Three families of configs:

* **DDPM table** (``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ``Euler...``,
  ``UniPC...``, ...): ``betas`` from ``trained_betas`` or ``beta_schedule`` (``linear``,
  ``scaled_linear``, ``squaredcos_cap_v2``, ``sigmoid``, ``exp``, ``laplace``), optionally
  ``rescale_betas_zero_snr``; ``alphas_cumprod = cumprod(1 - betas)`` gives a ``DiscreteProcess``
  whose ``t`` is the model's timestep. ``prediction_type`` ``epsilon`` / ``v_prediction`` / ``sample``
  / ``flow_prediction`` selects ``EpsPred`` / ``VPred`` / ``X0Pred`` / ``FlowPred``.
* **Flow matching** (``FlowMatch*Scheduler``): the linear interpolant ``x_t = (1 - t) x0 + t noise``
  with the model's timestep ``1000 t`` (``num_train_timesteps * t``) and velocity output
  ``noise - x0``: ``RectifiedFlow`` + ``FlowPred``. ``shift`` changes only which ``t`` the scheduler
  steps on (``t' = shift t / (1 + (shift - 1) t)``), not the model, so it enters ``schedule_sigmas``.
* **EDM** (``EDM*Scheduler``): ``EDMPrecond(sigma_data)`` with ``c_noise = ln(sigma) / 4``; with
  ``prediction_type = "v_prediction"`` diffusers negates ``c_out``.

The tables are computed in float32 exactly as diffusers computes them (the model was trained on those
numbers), then promoted to float64 for everything scorekit does with them. With
``rescale_betas_zero_snr`` the last ``alphas_cumprod`` is 0 (infinite sigma); like diffusers' Euler
and DDIM schedulers it is replaced by ``2**-24`` (sigma = 4096), so the table stays finite.

References:
    Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (linear betas). Nichol &
    Dhariwal, "Improved DDPM", ICML 2021 (``squaredcos_cap_v2``, betas capped at 0.999). Rombach et
    al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022 (``scaled_linear``).
    Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024 (zero
    terminal SNR, Algorithm 1; timestep spacings, Table 2). Esser et al., "Scaling Rectified Flow
    Transformers", ICML 2024 (flow matching, timestep shift). Karras et al., "Elucidating the Design
    Space of Diffusion-Based Generative Models", NeurIPS 2022 (EDM preconditioning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scorekit.denoiser import EDMPrecond, Parameterization, get_parameterization
from scorekit.process import EDM, DiscreteProcess, Process, RectifiedFlow

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "Mapping",
    "alphas_cumprod",
    "map_config",
    "schedule_sigmas",
]

#: diffusers' ``prediction_type`` -> scorekit parameterisation name.
PREDICTION_TYPES = {
    "epsilon": "eps",
    "v_prediction": "v",
    "sample": "x0",
    "flow_prediction": "flow",
}

#: Schedulers whose config has ``clip_sample`` with default True when the key is absent.
CLIP_BY_DEFAULT = {
    "DDPMScheduler",
    "DDIMScheduler",
    "DDPMParallelScheduler",
    "DDIMParallelScheduler",
}


def _linear(n, cfg):
    return torch.linspace(cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), n,
                          dtype=torch.float32)  # fmt: skip


def _scaled_linear(n, cfg):
    lo, hi = cfg.get("beta_start", 1e-4) ** 0.5, cfg.get("beta_end", 0.02) ** 0.5
    return torch.linspace(lo, hi, n, dtype=torch.float32) ** 2


def _from_alpha_bar(fn):
    """Betas ``min(1 - abar((i+1)/n) / abar(i/n), 0.999)`` of a continuous ``abar`` (Nichol & Dhariwal, eq. 17)."""

    def betas(n, cfg):
        b = [min(1 - fn((i + 1) / n) / fn(i / n), 0.999) for i in range(n)]
        return torch.tensor(b, dtype=torch.float32)

    return betas


def _laplace_abar(t):
    lam = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * abs(0.5 - t) + 1e-6)
    snr = math.exp(lam)
    return math.sqrt(snr / (1 + snr))


def _sigmoid(n, cfg):
    lo, hi = cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
    return torch.sigmoid(torch.linspace(-6, 6, n)) * (hi - lo) + lo


#: ``beta_schedule`` -> betas ``[n]`` (float32, as diffusers builds them).
BETA_SCHEDULES = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "squaredcos_cap_v2": _from_alpha_bar(
        lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    ),
    "exp": _from_alpha_bar(lambda t: math.exp(-12.0 * t)),
    "laplace": _from_alpha_bar(_laplace_abar),
    "sigmoid": _sigmoid,
}


def _zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale ``sqrt(abar)`` so that its last entry is 0."""
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def alphas_cumprod(cfg: dict[str, Any]) -> Tensor:
    """The config's ``alphas_cumprod`` ``[num_train_timesteps]``, float64 (values of diffusers' float32 table)."""
    n = int(cfg.get("num_train_timesteps", 1000))
    if n < 2:
        raise ValueError(f"scheduler config: num_train_timesteps must be >= 2, got {n}")
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float32).flatten()
        if betas.numel() != n:
            raise ValueError(
                f"scheduler config: trained_betas has {betas.numel()} entries, "
                f"num_train_timesteps is {n}"
            )
    else:
        name = cfg.get("beta_schedule", "linear")
        if name not in BETA_SCHEDULES:
            raise ValueError(
                f"scheduler config: unknown beta_schedule {name!r}; supported: "
                f"{sorted(BETA_SCHEDULES)} (or trained_betas)"
            )
        betas = BETA_SCHEDULES[name](n, cfg)
    if cfg.get("rescale_betas_zero_snr", False):
        betas = _zero_terminal_snr(betas)
    ac = torch.cumprod(1.0 - betas, 0)
    if cfg.get("rescale_betas_zero_snr", False):
        ac[-1] = 2**-24  # as diffusers' Euler/DDIM do: keeps sigma finite (4096)
    return ac.to(torch.float64)


@dataclass(frozen=True)
class Mapping:
    """What a scheduler config means in scorekit: the process, the adapter, the model's timestep.

    ``timestep_scale``: the model's timestep is ``timestep_scale * c_noise`` (1000 for flow models,
    whose ``c_noise`` is ``t`` in [0, 1]; 1 otherwise). ``kind``: ``"ddpm"``, ``"flow"`` or ``"edm"``.
    """

    kind: str
    process: Process
    param: Parameterization
    timestep_scale: float
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float
    thresholding: bool
    dynamic_thresholding_ratio: float
    sample_max_value: float


def _prediction(cfg: dict[str, Any], default: str) -> str:
    pred = cfg.get("prediction_type", default)
    if pred not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler config: unknown prediction_type {pred!r}; supported: {sorted(PREDICTION_TYPES)}"
        )
    return pred


class _EDMv(EDMPrecond):
    """diffusers' EDM schedulers with ``prediction_type="v_prediction"``: EDM's scalings with ``-c_out``."""

    name = "edm_v"

    def scalings(self, sigma):
        c_skip, c_out, c_in, c_noise = super().scalings(sigma)
        return c_skip, -c_out, c_in, c_noise


def map_config(cfg: dict[str, Any]) -> Mapping:
    """The ``Mapping`` of a scheduler config dict (keys as diffusers writes them in scheduler_config.json)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"scheduler config must be a dict, got {type(cfg).__name__}")
    cls = str(cfg.get("_class_name", ""))
    n = int(cfg.get("num_train_timesteps", 1000))
    clip = {
        "clip_sample": bool(cfg.get("clip_sample", cls in CLIP_BY_DEFAULT)),
        "clip_sample_range": float(cfg.get("clip_sample_range", 1.0)),
        "thresholding": bool(cfg.get("thresholding", False)),
        "dynamic_thresholding_ratio": float(cfg.get("dynamic_thresholding_ratio", 0.995)),
        "sample_max_value": float(cfg.get("sample_max_value", 1.0)),
    }
    if cls.startswith("FlowMatch"):
        pred = _prediction(cfg, "flow_prediction")
        if pred != "flow_prediction":
            raise ValueError(
                f"scheduler config: {cls} needs prediction_type flow_prediction, got {pred!r}"
            )
        shift = float(cfg.get("shift", 1.0))
        t_min = 1.0 / n if cfg.get("use_dynamic_shifting") else shift / n / (1 + (shift - 1) / n)
        # t = 1 (pure noise) is infinite sigma; stop one training step short of it.
        process = RectifiedFlow(t_min=t_min, t_max=1 - 1.0 / n)
        param = get_parameterization("flow", process=process)
        return Mapping("flow", process, param, float(n), pred, **clip)
    if cls.startswith("EDM"):
        pred = _prediction(cfg, "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"scheduler config: {cls} supports epsilon or v_prediction, got {pred!r}"
            )
        sd = float(cfg.get("sigma_data", 0.5))
        param = EDMPrecond(sd) if pred == "epsilon" else _EDMv(sd)
        process = EDM(sigma_min=float(cfg.get("sigma_min", 0.002)),
                      sigma_max=float(cfg.get("sigma_max", 80.0)))  # fmt: skip
        return Mapping("edm", process, param, 1.0, pred, **clip)
    pred = _prediction(cfg, "epsilon")
    process = DiscreteProcess(alphas_cumprod(cfg))
    param = get_parameterization(PREDICTION_TYPES[pred], process=process)
    return Mapping("ddpm", process, param, 1.0, pred, **clip)


def _timesteps(cfg: dict[str, Any], n_steps: int) -> list[int]:
    """The integer timesteps a DDPM-table scheduler steps on (``timestep_spacing``; Lin et al., Table 2)."""
    n_train = int(cfg.get("num_train_timesteps", 1000))
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return [
            round(v) for v in torch.linspace(0, n_train - 1, n_steps, dtype=torch.float64).tolist()
        ][::-1]
    if spacing == "leading":
        ratio = n_train // n_steps
        return [i * ratio + int(cfg.get("steps_offset", 0)) for i in range(n_steps)][::-1]
    if spacing == "trailing":
        ratio = n_train / n_steps
        return [round(n_train - i * ratio) - 1 for i in range(n_steps)]
    raise ValueError(
        f"scheduler config: unknown timestep_spacing {spacing!r}; supported: linspace, leading, trailing"
    )


def schedule_sigmas(cfg: dict[str, Any], mapping: Mapping, n_steps: int) -> Tensor:
    """The sigma-frame schedule ``[n_steps + 1]`` (float64, ending in 0) that the config's timestep
    spacing (DDPM table) or shift (flow) gives, as DDIM / FlowMatchEuler step on it.

    EDM configs: Karras et al.'s rho = 7 schedule between the config's sigma_min and sigma_max.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if mapping.kind == "ddpm":
        ts = torch.tensor(_timesteps(cfg, n_steps), dtype=torch.float64)
        sig = mapping.process.sigma(ts)
    elif mapping.kind == "flow":
        shift = float(cfg.get("shift", 1.0))
        # diffusers spaces t linearly from 1 to the (shifted) table minimum, then shifts again.
        t = torch.linspace(1.0, mapping.process.t_min, n_steps, dtype=torch.float64)
        t = shift * t / (1 + (shift - 1) * t)
        sig = mapping.process.sigma(t.clamp(max=mapping.process.t_max))
    else:
        lo, hi, rho = mapping.process.sigma_min, mapping.process.sigma_max, 7.0
        r = torch.linspace(0, 1, n_steps, dtype=torch.float64)
        sig = (hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([sig, sig.new_zeros(1)])
