"""Per-step overhead of the sampler itself: scorekit's sampler against the same algorithm's diffusers
scheduler loop (``scale_model_input`` + ``step``), batch 1, the model replaced by a precomputed
tensor, measured side by side in one process."""

from __future__ import annotations

import time
import warnings

import torch

from scorekit.bench.samplers.diffusers_harness import diffusers_scheduler, diffusers_sigmas
from scorekit.samplers.registry import get_sampler

__all__ = ["PAIRS", "overhead"]

#: (scorekit sampler, its options, diffusers scheduler, its config): the same algorithm.
PAIRS = [
    ("euler", {}, "EulerDiscreteScheduler", {}),
    ("heun", {}, "HeunDiscreteScheduler", {}),
    ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {"solver_order": 2}),
    ("dpmpp_3m", {}, "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("unipc", {"order": 2}, "UniPCMultistepScheduler", {"solver_order": 2}),
]


def _time_pair(ours: str, opts: dict, sched, steps: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of one scorekit run and one diffusers loop, interleaved."""
    x = torch.randn(1, 2)
    x0 = torch.zeros(1, 2)
    eps = torch.randn(1, 2)
    fn = get_sampler(ours)
    sigmas = diffusers_sigmas(sched, steps).to(torch.float32)

    def run_theirs():
        sample = x
        for t in sched.timesteps:
            inp = sched.scale_model_input(sample, t)
            del inp  # the model would read it; its output is the precomputed eps
            sample = sched.step(eps, t, sample).prev_sample

    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(lambda x_, s_: x0, x, sigmas, **opts)
        t_ours.append(time.perf_counter() - t0)
        sched.set_timesteps(steps)  # reset its state, outside the timed region
        t0 = time.perf_counter()
        run_theirs()
        t_theirs.append(time.perf_counter() - t0)
    return min(t_ours), min(t_theirs)


def overhead(steps: int, repeats: int) -> list[dict]:
    """Per-step time of the sampler alone (the denoiser returns a precomputed tensor), batch 1."""
    rows = []
    for ours, opts, theirs, cfg in PAIRS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = diffusers_scheduler(theirs, **cfg)
            sched.set_timesteps(steps)
            n_calls = len(sched.timesteps)
            best_ours, best_theirs = _time_pair(ours, opts, sched, steps, repeats)
        a, b = best_ours / n_calls * 1e6, best_theirs / n_calls * 1e6
        rows.append(
            {"scorekit": ours, "diffusers": theirs, "steps": steps, "us_per_step_scorekit": a,
             "us_per_step_diffusers": b, "ratio": a / b}
        )  # fmt: skip
    return rows
